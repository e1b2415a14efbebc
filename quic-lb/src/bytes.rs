//! Short byte strings of bounded length that live on the stack, so that encoding and
//! decoding allocate nothing.
use core::{fmt, ops::Deref};

/// At most `N` bytes, held inline: the crate's server IDs, nonces and connection IDs are all
/// at most 20 octets, and a fixed array keeps the crate free of allocation.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ByteString<const N: usize> {
    // Bytes past `len` are always zero, so the derived comparisons and hash are the slice's.
    bytes: [u8; N],
    len: u8,
}

/// A server ID: which server (for portshard, which worker) a connection belongs to.
pub type ServerId = ByteString<15>;
/// The nonce that makes each connection ID of one server unique.
pub type Nonce = ByteString<18>;
/// A whole QUIC-LB connection ID, first octet included.
pub type ConnectionId = ByteString<20>;

impl<const N: usize> ByteString<N> {
    /// The capacity, so callers can check a length before building one.
    pub const CAPACITY: usize = N;

    /// Copies `bytes`, or returns `None` when there are more than `N` of them.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        if bytes.len() > N {
            return None;
        }
        let mut out = Self {
            bytes: [0; N],
            len: bytes.len() as u8,
        };
        out.bytes[..bytes.len()].copy_from_slice(bytes);
        Some(out)
    }

    /// The bytes, as a slice of exactly the string's length.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

impl<const N: usize> Deref for ByteString<N> {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl<const N: usize> AsRef<[u8]> for ByteString<N> {
    fn as_ref(&self) -> &[u8] {
        self.as_bytes()
    }
}

/// Lowercase hex, the form the worker environment and the draft's test vectors use.
impl<const N: usize> fmt::Display for ByteString<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.as_bytes() {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl<const N: usize> fmt::Debug for ByteString<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_up_to_capacity_and_prints_hex() {
        assert!(ServerId::from_slice(&[0; 16]).is_none());
        let id = ServerId::from_slice(&[0x00, 0x05, 0x0a]).unwrap();
        assert_eq!(id.len(), 3);
        assert_eq!(format!("{id}"), "00050a");
        assert_eq!(id, ServerId::from_slice(&[0x00, 0x05, 0x0a]).unwrap());
    }
}
