//! A service's listeners: the most it has, and the table flags that name, for each kind of
//! listening socket, which of them the program selects from.

#[cfg(doc)]
use crate::{Table, names};

/// The most listeners (transport and address pairs) one service has, each its own
/// reuseport group with its own socket array; a worker holds one socket of each, all in
/// the same slot, so the one table steers every listener alike.
pub const MAX_LISTENERS: usize = 4;

/// Which of the four kinds of listening socket the program runs for: `(UDP) << 1 | (IPv6)`.
/// A service has at most one listener of each kind, so the kind finds the listener.
pub const fn listener_kind(udp: bool, ipv6: bool) -> u32 {
    ((udp as u32) << 1) | ipv6 as u32
}

/// First bit of the listener indexes in [`Table::flags`]: two bits per listener kind
/// ([`listener_kind`]), bits `16 + 2 * kind` and the next, hold the index (0 to 3) of the
/// service's listener of that kind, whose socket array the program selects from. A
/// single-listener service leaves them 0: its socket array is [`names::SOCKETS`].
pub const TABLE_LISTENER_SHIFT: u32 = 16;

/// The [`Table::flags`] bits that say the listener of `kind` is listener `index`.
pub const fn listener_flags(kind: u32, index: u32) -> u32 {
    (index & 3) << (TABLE_LISTENER_SHIFT + 2 * kind)
}

/// The index of the listener of `kind` recorded in `flags` (see [`listener_flags`]).
pub const fn listener_index(flags: u32, kind: u32) -> u32 {
    (flags >> (TABLE_LISTENER_SHIFT + 2 * kind)) & 3
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{TABLE_FLOWS, TABLE_PROBES};

    #[test]
    fn each_listener_kind_has_its_own_two_bits() {
        let mut flags = TABLE_FLOWS | TABLE_PROBES;
        for kind in 0..4 {
            flags |= listener_flags(kind, 3 - kind);
        }
        for kind in 0..4 {
            assert_eq!(listener_index(flags, kind), 3 - kind);
        }
        assert_eq!(flags & 3, TABLE_FLOWS | TABLE_PROBES);
        assert_eq!(listener_kind(false, false), 0);
        assert_eq!(listener_kind(false, true), 1);
        assert_eq!(listener_kind(true, false), 2);
        assert_eq!(listener_kind(true, true), 3);
        assert_eq!(listener_index(TABLE_FLOWS | TABLE_PROBES, 3), 0);
    }
}
