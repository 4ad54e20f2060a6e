//! Azure `geoLatency`: the hub with the lowest latency to the device.
//!
//! The device's location comes, in order, from trusted request metadata (a region name, or
//! `latitude,longitude`, set by an edge the operator trusts), from a CIDR-to-region table
//! matched against the source address, or from a MaxMind-format GeoIP database (GeoLite2 City,
//! DB-IP City Lite, ...) that gives the address's coordinates. Hubs are then ranked by a configured region-to-hub
//! latency table, else by great-circle distance from the device's coordinates (a region's
//! configured coordinates count) to the hub's. Equal or unknown distances are broken by the
//! weighted hash, as Azure breaks ties.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use ipnet::IpNet;
use serde::Deserialize;

use crate::policy::{Allocation, AllocationPolicy, Candidate, Device, PolicyError, hash_order};

/// Metadata key holding a trusted region name.
pub const REGION_METADATA: &str = "region";
/// Metadata key holding trusted `latitude,longitude`.
pub const COORDINATES_METADATA: &str = "coordinates";

/// Where devices are, and how far regions are from hubs.
#[derive(Debug, Clone, Default)]
pub struct GeoSettings {
    /// Source networks and the region each lies in (most specific match wins).
    pub networks: Vec<(IpNet, String)>,
    /// Coordinates (latitude, longitude) of named regions.
    pub regions: BTreeMap<String, (f64, f64)>,
    /// Measured or configured latency in milliseconds from a region to a hub.
    pub latency_ms: BTreeMap<String, BTreeMap<String, f64>>,
    /// A GeoIP database, consulted after the network table.
    pub geoip: Option<Arc<GeoIp>>,
    /// The region this server runs in: latencies measured by probing the hubs count as that
    /// region's, and devices with no other known location are taken to be there.
    pub local_region: Option<String>,
    /// Latencies from this server to the hubs, measured by probing them.
    pub measured: Arc<MeasuredLatency>,
}

/// Latency from this server to each hub, smoothed over probes.
#[derive(Debug, Default)]
pub struct MeasuredLatency {
    by_hub: std::sync::RwLock<BTreeMap<String, f64>>,
}

impl MeasuredLatency {
    /// Weight of a new sample in the moving average.
    const ALPHA: f64 = 0.3;

    /// Adds a sample for `hub`, in milliseconds.
    pub fn record(&self, hub: &str, ms: f64) {
        if let Ok(mut map) = self.by_hub.write() {
            let entry = map.entry(hub.to_ascii_lowercase()).or_insert(ms);
            *entry = Self::ALPHA * ms + (1.0 - Self::ALPHA) * *entry;
        }
    }

    /// Drops `hub`'s figure (it did not answer, or is no longer linked).
    pub fn forget(&self, hub: &str) {
        if let Ok(mut map) = self.by_hub.write() {
            map.remove(&hub.to_ascii_lowercase());
        }
    }

    /// Every hub's smoothed latency.
    pub fn snapshot(&self) -> BTreeMap<String, f64> {
        self.by_hub.read().map(|m| m.clone()).unwrap_or_default()
    }
}

/// A MaxMind-format (MMDB) database of address locations, held in memory.
pub struct GeoIp {
    reader: maxminddb::Reader<Vec<u8>>,
}

/// Why a GeoIP database cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("not a usable MaxMind DB file: {0}")]
pub struct GeoIpError(String);

/// The part of a City record the policy reads.
#[derive(Debug, Deserialize)]
struct CityRecord {
    location: Option<CityLocation>,
}

#[derive(Debug, Deserialize)]
struct CityLocation {
    latitude: Option<f64>,
    longitude: Option<f64>,
}

impl GeoIp {
    /// Reads a database file.
    pub fn open(path: &Path) -> Result<Self, GeoIpError> {
        let bytes = std::fs::read(path).map_err(|e| GeoIpError(e.to_string()))?;
        Self::from_bytes(bytes)
    }

    /// A database from its bytes.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, GeoIpError> {
        let reader =
            maxminddb::Reader::from_source(bytes).map_err(|e| GeoIpError(e.to_string()))?;
        Ok(Self { reader })
    }

    /// The coordinates the database gives for `address`, if any.
    pub fn coordinates(&self, address: IpAddr) -> Option<(f64, f64)> {
        let record: CityRecord = match self.reader.lookup(address).and_then(|r| r.decode()) {
            Ok(record) => record?,
            Err(e) => {
                // An IPv6 address in an IPv4-only database, or a damaged record.
                tracing::debug!(error = %e, "GeoIP lookup failed");
                return None;
            }
        };
        let location = record.location?;
        let (lat, lon) = (location.latitude?, location.longitude?);
        ((-90.0..=90.0).contains(&lat) && (-180.0..=180.0).contains(&lon)).then_some((lat, lon))
    }
}

impl fmt::Debug for GeoIp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GeoIp")
            .field("database_type", &self.reader.metadata().database_type)
            .field("node_count", &self.reader.metadata().node_count)
            .finish()
    }
}

/// The lowest-latency policy.
#[derive(Debug, Clone, Default)]
pub struct GeoLatency {
    settings: GeoSettings,
}

/// Where the device was placed, and from what.
#[derive(Debug, Clone, PartialEq)]
struct Location {
    region: Option<String>,
    coordinates: Option<(f64, f64)>,
    source: &'static str,
}

impl GeoLatency {
    /// The policy with `settings`.
    pub fn new(settings: GeoSettings) -> Self {
        Self { settings }
    }

    /// Where the device is: from the request, else this server's region when probing.
    fn locate(&self, device: &Device<'_>) -> Option<Location> {
        let located = self.locate_by_request(device);
        if located.is_some() {
            return located;
        }
        let region = self.settings.local_region.clone()?;
        Some(Location {
            coordinates: self.settings.regions.get(&region).copied(),
            region: Some(region),
            source: "this server's region, as nothing else places the device",
        })
    }

    fn locate_by_request(&self, device: &Device<'_>) -> Option<Location> {
        if let Some(region) = device.metadata.get(REGION_METADATA) {
            let region = region.trim().to_ascii_lowercase();
            return Some(Location {
                coordinates: self.settings.regions.get(&region).copied(),
                region: Some(region),
                source: "the trusted region metadata",
            });
        }
        if let Some(text) = device.metadata.get(COORDINATES_METADATA)
            && let Some(coordinates) = parse_coordinates(text)
        {
            return Some(Location {
                region: None,
                coordinates: Some(coordinates),
                source: "the trusted coordinates metadata",
            });
        }
        let address = device.source_address?;
        let network = self
            .settings
            .networks
            .iter()
            .filter(|(net, _)| net.contains(&address))
            .max_by_key(|(net, _)| net.prefix_len());
        if let Some((_, region)) = network {
            return Some(Location {
                coordinates: self.settings.regions.get(region).copied(),
                region: Some(region.clone()),
                source: "the network table",
            });
        }
        let coordinates = self.settings.geoip.as_ref()?.coordinates(address)?;
        Some(Location {
            region: None,
            coordinates: Some(coordinates),
            source: "the GeoIP database",
        })
    }
}

fn parse_coordinates(text: &str) -> Option<(f64, f64)> {
    let (lat, lon) = text.split_once(',')?;
    let (lat, lon) = (
        lat.trim().parse::<f64>().ok()?,
        lon.trim().parse::<f64>().ok()?,
    );
    ((-90.0..=90.0).contains(&lat) && (-180.0..=180.0).contains(&lon)).then_some((lat, lon))
}

/// Great-circle distance in kilometres (haversine).
pub fn distance_km(a: (f64, f64), b: (f64, f64)) -> f64 {
    let (lat1, lon1) = (a.0.to_radians(), a.1.to_radians());
    let (lat2, lon2) = (b.0.to_radians(), b.1.to_radians());
    let h = ((lat2 - lat1) / 2.0).sin().powi(2)
        + lat1.cos() * lat2.cos() * ((lon2 - lon1) / 2.0).sin().powi(2);
    2.0 * 6371.0 * h.sqrt().asin()
}

#[async_trait::async_trait]
impl AllocationPolicy for GeoLatency {
    async fn allocate(
        &self,
        device: &Device<'_>,
        candidates: &[Candidate],
    ) -> Result<Allocation, PolicyError> {
        // The weighted hash order breaks ties.
        let hashed = hash_order(device, candidates)?;
        let location = self.locate(device);
        let region = location.as_ref().and_then(|l| l.region.as_ref());
        // Configured latencies for the device's region, over the measured ones when the
        // device is in this server's region.
        let mut latencies = match region {
            Some(r) if Some(r) == self.settings.local_region.as_ref() => {
                self.settings.measured.snapshot()
            }
            _ => BTreeMap::new(),
        };
        let table = region.and_then(|r| self.settings.latency_ms.get(r));
        let how = match (latencies.is_empty(), table) {
            (false, Some(_)) => "the latency table and latency measured from this server",
            (false, None) => "latency measured from this server",
            (true, _) => "the latency table",
        };
        if let Some(table) = table {
            latencies.extend(table.iter().map(|(hub, ms)| (hub.clone(), *ms)));
        }
        let (cost, how): (Box<dyn Fn(&Candidate) -> Option<f64>>, &str) =
            match (latencies.is_empty(), &location) {
                (false, _) => (
                    Box::new(move |c: &Candidate| {
                        latencies.get(&c.host_name.to_ascii_lowercase()).copied()
                    }),
                    how,
                ),
                (
                    true,
                    Some(Location {
                        coordinates: Some(at),
                        ..
                    }),
                ) => {
                    let at = *at;
                    (
                        Box::new(move |c: &Candidate| c.location.map(|hub| distance_km(at, hub))),
                        "great-circle distance",
                    )
                }
                _ => (Box::new(|_: &Candidate| None), "nothing"),
            };
        let mut ranked: Vec<(Option<f64>, usize, &str)> = hashed
            .iter()
            .enumerate()
            .map(|(order, host)| {
                let candidate = candidates.iter().find(|c| c.host_name == *host);
                (candidate.and_then(&cost), order, host.as_str())
            })
            .collect();
        // Known costs first, lowest first; unknown costs last; the hash order within ties.
        ranked.sort_by(|a, b| match (a.0, b.0) {
            (Some(x), Some(y)) => x.total_cmp(&y).then(a.1.cmp(&b.1)),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => a.1.cmp(&b.1),
        });
        let reason = match &location {
            Some(l) if how != "nothing" => format!(
                "located by {} ({}); ranked by {how}, ties by the weighted hash",
                l.source,
                l.region.as_deref().unwrap_or("coordinates")
            ),
            Some(l) => format!(
                "located by {} but no latency or coordinates are known for it; every hub ties, so the weighted hash",
                l.source
            ),
            None => "the device's location is unknown; every hub ties, so the weighted hash".into(),
        };
        Ok(Allocation {
            ranked: ranked
                .into_iter()
                .map(|(_, _, host)| host.to_owned())
                .collect(),
            reason,
            payload: None,
            initial_twin: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn hub(host: &str, location: Option<(f64, f64)>) -> Candidate {
        Candidate {
            host_name: host.into(),
            weight: 1,
            region: None,
            location,
            healthy: true,
        }
    }

    fn first(
        policy: &GeoLatency,
        metadata: &[(&str, &str)],
        source: Option<&str>,
        hubs: &[Candidate],
    ) -> (String, String) {
        let metadata: BTreeMap<String, String> = metadata
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect();
        let enrollment = Value::Null;
        let device = Device {
            instance: "tenant",
            registration_id: "dev-1",
            attestation: "symmetricKey",
            enrollment: &enrollment,
            enrollment_group_id: None,
            payload: None,
            source_address: source.map(|s| s.parse().unwrap()),
            metadata: &metadata,
            previous_hub: None,
            hardware_ids: &[],
        };
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        let mut future = std::pin::pin!(policy.allocate(&device, hubs));
        match future.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(Ok(a)) => (a.ranked[0].clone(), a.reason),
            other => panic!("{other:?}"),
        }
    }

    const AMSTERDAM: (f64, f64) = (52.37, 4.90);
    const VIRGINIA: (f64, f64) = (38.03, -78.48);
    const SYDNEY: (f64, f64) = (-33.87, 151.21);

    fn policy() -> GeoLatency {
        GeoLatency::new(GeoSettings {
            networks: vec![
                ("10.0.0.0/8".parse().unwrap(), "us-east".into()),
                ("10.9.0.0/16".parse().unwrap(), "ap-south".into()),
            ],
            regions: [
                ("us-east".to_owned(), VIRGINIA),
                ("ap-south".to_owned(), SYDNEY),
            ]
            .into_iter()
            .collect(),
            latency_ms: [(
                "eu-west".to_owned(),
                [("hub-eu".to_owned(), 9.0), ("hub-us".to_owned(), 80.0)]
                    .into_iter()
                    .collect(),
            )]
            .into_iter()
            .collect(),
            ..GeoSettings::default()
        })
    }

    fn hubs() -> Vec<Candidate> {
        vec![
            hub("hub-us", Some(VIRGINIA)),
            hub("hub-eu", Some(AMSTERDAM)),
            hub("hub-au", Some(SYDNEY)),
        ]
    }

    #[test]
    fn trusted_metadata_then_networks_decide_the_location() {
        let p = policy();
        assert_eq!(
            first(&p, &[("region", "EU-West")], None, &hubs()).0,
            "hub-eu",
            "latency table"
        );
        assert_eq!(
            first(&p, &[("coordinates", "-37.8, 144.9")], None, &hubs()).0,
            "hub-au",
            "distance"
        );
        assert_eq!(
            first(&p, &[], Some("10.1.2.3"), &hubs()).0,
            "hub-us",
            "network table"
        );
        assert_eq!(
            first(&p, &[], Some("10.9.2.3"), &hubs()).0,
            "hub-au",
            "most specific network"
        );
        let (_, reason) = first(&p, &[], Some("192.0.2.1"), &hubs());
        assert!(reason.contains("unknown"), "{reason}");
    }

    #[test]
    fn unknown_costs_rank_last_and_ties_follow_the_hash() {
        let p = policy();
        let mut mixed = hubs();
        mixed.push(hub("hub-nowhere", None));
        let metadata = [("coordinates", "52.0,5.0")];
        assert_eq!(first(&p, &metadata, None, &mixed).0, "hub-eu");
        // With no location at all the order is the weighted hash.
        use crate::hashed::WeightedHub;
        let plain = crate::hashed::rank(
            "dev-1",
            &mixed
                .iter()
                .map(|c| WeightedHub {
                    host_name: &c.host_name,
                    weight: 1,
                })
                .collect::<Vec<_>>(),
        );
        assert_eq!(first(&p, &[], None, &mixed).0, plain[0]);
    }

    #[test]
    fn measured_latency_counts_for_this_servers_region() {
        let measured = Arc::new(MeasuredLatency::default());
        let p = GeoLatency::new(GeoSettings {
            local_region: Some("ap-south".into()),
            measured: measured.clone(),
            ..policy().settings
        });
        // Before any probe answers, the server's region places the device by distance.
        let (hub, reason) = first(&p, &[], None, &hubs());
        assert_eq!(hub, "hub-au");
        assert!(reason.contains("this server's region"), "{reason}");
        measured.record("HUB-US", 40.0);
        measured.record("hub-au", 300.0);
        let (hub, reason) = first(&p, &[], None, &hubs());
        assert_eq!(hub, "hub-us", "{reason}");
        assert!(reason.contains("measured"), "{reason}");
        // Samples are smoothed; a hub that stops answering is forgotten.
        measured.record("hub-us", 400.0);
        assert!((measured.snapshot()["hub-us"] - 148.0).abs() < 1e-9);
        measured.forget("hub-us");
        assert_eq!(first(&p, &[], None, &hubs()).0, "hub-au");
        // Devices placed elsewhere are not ranked by this server's measurements.
        assert_eq!(
            first(&p, &[("region", "eu-west")], None, &hubs()).0,
            "hub-eu"
        );
    }

    #[test]
    fn distances_are_great_circle_kilometres() {
        let d = distance_km(AMSTERDAM, VIRGINIA);
        assert!((6200.0..6400.0).contains(&d), "{d}");
        assert!(distance_km(AMSTERDAM, AMSTERDAM) < 1e-6);
        assert_eq!(parse_coordinates("91,0"), None);
        assert_eq!(parse_coordinates("1,2"), Some((1.0, 2.0)));
    }
}
