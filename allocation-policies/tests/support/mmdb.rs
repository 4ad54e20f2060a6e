//! A small MaxMind DB writer for tests: an IPv6 database (IPv4 networks under `::/96`, as in
//! GeoLite2) with 24-bit records, whose data records carry `location.latitude`/`longitude`, as
//! the MaxMind DB format specification (version 2.0) lays it out.

use std::net::IpAddr;

/// A value of the MaxMind DB data section.
#[derive(Debug, Clone)]
pub enum Value {
    Str(String),
    Double(f64),
    U16(u16),
    U32(u32),
    U64(u64),
    Map(Vec<(String, Value)>),
    Array(Vec<Value>),
}

fn control(out: &mut Vec<u8>, kind: u8, size: usize) {
    let (low, extra): (u8, Vec<u8>) = match size {
        0..=28 => (size as u8, vec![]),
        29..=284 => (29, vec![(size - 29) as u8]),
        285..=65_820 => (30, ((size - 285) as u16).to_be_bytes().to_vec()),
        _ => (31, ((size - 65_821) as u32).to_be_bytes()[1..].to_vec()),
    };
    if kind <= 7 {
        out.push((kind << 5) | low);
    } else {
        out.push(low);
        out.push(kind - 7);
    }
    out.extend(extra);
}

fn unsigned(out: &mut Vec<u8>, kind: u8, value: u64) {
    let bytes = value.to_be_bytes();
    let first = bytes.iter().position(|b| *b != 0).unwrap_or(8);
    control(out, kind, 8 - first);
    out.extend(&bytes[first..]);
}

impl Value {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Value::Str(s) => {
                control(out, 2, s.len());
                out.extend(s.as_bytes());
            }
            Value::Double(d) => {
                control(out, 3, 8);
                out.extend(d.to_be_bytes());
            }
            Value::U16(v) => unsigned(out, 5, u64::from(*v)),
            Value::U32(v) => unsigned(out, 6, u64::from(*v)),
            Value::U64(v) => unsigned(out, 9, *v),
            Value::Map(pairs) => {
                control(out, 7, pairs.len());
                for (key, value) in pairs {
                    Value::Str(key.clone()).encode(out);
                    value.encode(out);
                }
            }
            Value::Array(items) => {
                control(out, 11, items.len());
                for item in items {
                    item.encode(out);
                }
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Record {
    Empty,
    Node(usize),
    Data(usize),
}

/// Networks with coordinates, written out as a database.
#[derive(Debug, Default)]
pub struct Writer {
    nodes: Vec<[Record; 2]>,
    data: Vec<u8>,
}

impl Writer {
    pub fn new() -> Self {
        Self {
            nodes: vec![[Record::Empty; 2]],
            data: Vec::new(),
        }
    }

    /// Places `network` (an IPv4 or IPv6 CIDR) at `latitude,longitude`. Insert wider networks
    /// before narrower ones inside them.
    pub fn insert(&mut self, network: &str, latitude: f64, longitude: f64) {
        let (address, prefix) = network.split_once('/').unwrap();
        let address: IpAddr = address.parse().unwrap();
        let prefix: usize = prefix.parse().unwrap();
        let (bits, prefix) = match address {
            IpAddr::V4(v4) => (u128::from(u32::from(v4)), prefix + 96),
            IpAddr::V6(v6) => (u128::from(v6), prefix),
        };
        let offset = self.data.len();
        Value::Map(vec![(
            "location".into(),
            Value::Map(vec![
                ("latitude".into(), Value::Double(latitude)),
                ("longitude".into(), Value::Double(longitude)),
            ]),
        )])
        .encode(&mut self.data);
        let mut node = 0;
        for depth in 0..prefix {
            let bit = ((bits >> (127 - depth)) & 1) as usize;
            if depth + 1 == prefix {
                self.nodes[node][bit] = Record::Data(offset);
                break;
            }
            node = match self.nodes[node][bit] {
                Record::Node(next) => next,
                other => {
                    // A wider network's data is pushed down into both halves.
                    self.nodes.push([other; 2]);
                    let next = self.nodes.len() - 1;
                    self.nodes[node][bit] = Record::Node(next);
                    next
                }
            };
        }
    }

    /// The database file's bytes.
    pub fn finish(self) -> Vec<u8> {
        let count = self.nodes.len();
        let value = |record: Record| -> u32 {
            match record {
                Record::Empty => count as u32,
                Record::Node(n) => n as u32,
                Record::Data(offset) => (count + 16 + offset) as u32,
            }
        };
        let mut out = Vec::new();
        for [left, right] in &self.nodes {
            out.extend(&value(*left).to_be_bytes()[1..]);
            out.extend(&value(*right).to_be_bytes()[1..]);
        }
        out.extend([0u8; 16]);
        out.extend(&self.data);
        out.extend(b"\xAB\xCD\xEFMaxMind.com");
        Value::Map(vec![
            ("node_count".into(), Value::U32(count as u32)),
            ("record_size".into(), Value::U16(24)),
            ("ip_version".into(), Value::U16(6)),
            ("database_type".into(), Value::Str("DPS-Test-City".into())),
            (
                "languages".into(),
                Value::Array(vec![Value::Str("en".into())]),
            ),
            ("binary_format_major_version".into(), Value::U16(2)),
            ("binary_format_minor_version".into(), Value::U16(0)),
            ("build_epoch".into(), Value::U64(1_764_000_000)),
            (
                "description".into(),
                Value::Map(vec![("en".into(), Value::Str("test database".into()))]),
            ),
        ])
        .encode(&mut out);
        out
    }
}
