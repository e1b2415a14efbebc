//! Health probes: the route that sends a probe's packets to the slot it checks, and what
//! the daemon's probes found.

/// A health probe's route, the `probes` map's value under the probe's source port: the slot
/// it checks, and the address it comes from. The program steers a packet from that port to
/// the slot only when it also comes from that address, so a client elsewhere that happens
/// to use the same source port still follows the table.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeRoute {
    /// The slot the probe checks.
    pub slot: u32,
    /// [`PROBE_FROM_V4`] or [`PROBE_FROM_V6`]: which IP header the source address is read from.
    pub family: u32,
    /// The source address as the packet carries it; an IPv4 address fills the first 4 bytes.
    pub source: [u8; 16],
}

/// [`ProbeRoute::family`] of a probe sent over IPv4.
pub const PROBE_FROM_V4: u32 = 4;
/// [`ProbeRoute::family`] of a probe sent over IPv6.
pub const PROBE_FROM_V6: u32 = 6;

impl ProbeRoute {
    /// The route of a probe from `source` (an IPv4-mapped IPv6 address sends IPv4 packets,
    /// so it is recorded as IPv4) checking `slot`.
    pub fn new(slot: u32, source: core::net::IpAddr) -> Self {
        let v4 = |ip: core::net::Ipv4Addr| {
            let mut bytes = [0u8; 16];
            bytes[..4].copy_from_slice(&ip.octets());
            (PROBE_FROM_V4, bytes)
        };
        let (family, bytes) = match source {
            core::net::IpAddr::V4(ip) => v4(ip),
            core::net::IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
                Some(ip) => v4(ip),
                None => (PROBE_FROM_V6, ip.octets()),
            },
        };
        Self {
            slot,
            family,
            source: bytes,
        }
    }

    /// The source address, as [`ProbeRoute::new`] was given it (IPv4-mapped ones as IPv4).
    pub fn source(&self) -> core::net::IpAddr {
        if self.family == PROBE_FROM_V4 {
            let [a, b, c, d, ..] = self.source;
            core::net::IpAddr::V4(core::net::Ipv4Addr::new(a, b, c, d))
        } else {
            core::net::IpAddr::V6(core::net::Ipv6Addr::from(self.source))
        }
    }
}

/// What the daemon's health probes found for one slot, for the CLI. The program never reads it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProbeHealth {
    /// A [`ProbeState`] as `u32`.
    pub state: u32,
    /// Probes failed in a row.
    pub failures: u32,
}

/// A slot's probe state, as recorded in [`ProbeHealth::state`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeState {
    /// The service has no probe, or the slot's worker was not probed yet.
    Unprobed = 0,
    /// The last probe was answered.
    Passing = 1,
    /// The last probe (and `failures` in a row) went unanswered.
    Failing = 2,
}

impl ProbeState {
    /// Decodes a state read from the `health` map; `None` for a value never written.
    pub const fn from_raw(raw: u32) -> Option<Self> {
        match raw {
            0 => Some(Self::Unprobed),
            1 => Some(Self::Passing),
            2 => Some(Self::Failing),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use super::*;

    #[test]
    fn a_probe_route_records_the_address_as_its_packets_carry_it() {
        let v4 = ProbeRoute::new(3, IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)));
        assert_eq!((v4.slot, v4.family), (3, PROBE_FROM_V4));
        assert_eq!(v4.source[..4], [127, 0, 0, 1]);
        assert_eq!(v4.source[4..], [0; 12]);
        // A v4-mapped address sends IPv4 packets: recorded as IPv4.
        let mapped = ProbeRoute::new(3, IpAddr::V6(Ipv4Addr::new(127, 0, 0, 1).to_ipv6_mapped()));
        assert_eq!(mapped, v4);
        let v6 = ProbeRoute::new(5, IpAddr::V6(Ipv6Addr::LOCALHOST));
        assert_eq!(v6.family, PROBE_FROM_V6);
        assert_eq!(v6.source(), IpAddr::V6(Ipv6Addr::LOCALHOST));
        assert_eq!(v4.source(), IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
}
