//! TPM 2.0 marshalling: big-endian integers and size-prefixed (TPM2B) byte strings.

/// Reads TPM structures from a byte slice; every read checks the length first.
#[derive(Debug)]
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
}

/// The input ended before a field did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Truncated;

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Self { bytes }
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], Truncated> {
        if self.bytes.len() < n {
            return Err(Truncated);
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    pub(crate) fn u16(&mut self) -> Result<u16, Truncated> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, Truncated> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A TPM2B: a u16 size, then that many bytes.
    pub(crate) fn tpm2b(&mut self) -> Result<&'a [u8], Truncated> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }

    pub(crate) fn rest(&self) -> &'a [u8] {
        self.bytes
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

/// Appends `bytes` as a TPM2B. Every TPM2B this crate writes is far below 64 KiB.
pub(crate) fn put_tpm2b(out: &mut Vec<u8>, bytes: &[u8]) {
    let size = u16::try_from(bytes.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&bytes[..usize::from(size)]);
}

/// `bytes` as a TPM2B.
pub(crate) fn tpm2b(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len() + 2);
    put_tpm2b(&mut out, bytes);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_check_lengths() {
        let mut r = Reader::new(&[0, 3, 1, 2]);
        assert_eq!(r.tpm2b(), Err(Truncated));
        let mut r = Reader::new(&[0, 2, 1, 2, 9]);
        assert_eq!(r.tpm2b(), Ok(&[1u8, 2][..]));
        assert_eq!(r.rest(), &[9]);
        assert_eq!(r.u16(), Err(Truncated));
    }

    #[test]
    fn tpm2b_round_trips() {
        let encoded = tpm2b(b"abc");
        assert_eq!(encoded, [0, 3, b'a', b'b', b'c']);
        assert_eq!(Reader::new(&encoded).tpm2b(), Ok(&b"abc"[..]));
    }
}
