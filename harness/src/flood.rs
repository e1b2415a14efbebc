//! Floods of UDP flows from many source addresses: what DNS-style traffic (one datagram per
//! flow) or a spoofed flood looks like to a reuseport group. The datagrams go out through
//! a raw IPv4 socket with its own headers, so each flow has its own source address in
//! 127.0.0.0/8 of the test's network namespace; answers to them go nowhere.
use std::{
    collections::BTreeMap,
    io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// `IPPROTO_RAW`: a raw socket that sends whole IP packets, headers included.
const IPPROTO_RAW: i32 = 255;
/// The first flow's address offset in 127.0.0.0/8 (127.0.0.1 is the clients' own).
const FIRST_ADDRESS: u32 = 0x7f01_0000;
/// Source ports used, from 1024 on.
const PORTS: u32 = 60_000;

/// A sender of datagrams from flows numbered 0, 1, 2, ...: flow `n` has its own source
/// address and port ([`Flood::source`]).
pub struct Flood {
    socket: Socket,
    target: SocketAddrV4,
    payload: Vec<u8>,
}

impl Flood {
    /// A flood towards `target`, an IPv4 address of this network namespace.
    pub fn new(target: SocketAddrV4) -> io::Result<Self> {
        Self::with_payload(target, b"flood".to_vec())
    }

    /// A flood towards `target` whose every datagram carries `payload` (a QUIC packet, say).
    pub fn with_payload(target: SocketAddrV4, payload: Vec<u8>) -> io::Result<Self> {
        let socket = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(IPPROTO_RAW)))?;
        socket.set_send_buffer_size(4 << 20)?;
        Ok(Self {
            socket,
            target,
            payload,
        })
    }

    /// The source address and port of flow `n`: distinct for every `n` below 2^24 - 2^16.
    pub fn source(n: u32) -> SocketAddrV4 {
        let port = 1024 + (n % PORTS) as u16;
        SocketAddrV4::new(Ipv4Addr::from(FIRST_ADDRESS + n), port)
    }

    /// The flow number of a datagram from `source`, if a flood sent it.
    pub fn flow_of(source: SocketAddrV4) -> Option<u32> {
        let n = u32::from(*source.ip()).checked_sub(FIRST_ADDRESS)?;
        (Self::source(n) == source).then_some(n)
    }

    /// Sends `datagrams_each` datagrams from each flow of `flows`, back to back per flow;
    /// returns how many the kernel took. A full queue (`ENOBUFS`) is retried: the flood's
    /// point is that every flow arrives.
    pub fn send(
        &self,
        flows: impl IntoIterator<Item = u32>,
        datagrams_each: u32,
    ) -> io::Result<u64> {
        let to = SockAddr::from(SocketAddr::V4(self.target));
        let mut sent = 0;
        for n in flows {
            let packet = packet(Self::source(n), self.target, &self.payload);
            for _ in 0..datagrams_each {
                loop {
                    match self.socket.send_to(&packet, &to) {
                        Ok(_) => break,
                        Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                            std::thread::yield_now();
                        }
                        Err(e) => return Err(e),
                    }
                }
                sent += 1;
            }
        }
        Ok(sent)
    }
}

/// An IPv4 UDP packet from `from` to `to` carrying `payload` (UDP checksum 0: none, which
/// IPv4 allows).
fn packet(from: SocketAddrV4, to: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let udp_len = 8 + payload.len();
    let total = 20 + udp_len;
    let mut packet = Vec::with_capacity(total);
    packet.extend_from_slice(&[0x45, 0]);
    packet.extend_from_slice(&(total as u16).to_be_bytes());
    packet.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]);
    packet.extend_from_slice(&from.ip().octets());
    packet.extend_from_slice(&to.ip().octets());
    let checksum = ip_checksum(&packet[..20]);
    packet[10..12].copy_from_slice(&checksum.to_be_bytes());
    packet.extend_from_slice(&from.port().to_be_bytes());
    packet.extend_from_slice(&to.port().to_be_bytes());
    packet.extend_from_slice(&(udp_len as u16).to_be_bytes());
    packet.extend_from_slice(&[0, 0]);
    packet.extend_from_slice(payload);
    packet
}

/// The IPv4 header checksum: the ones' complement of the ones' complement sum of its words.
fn ip_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|word| u32::from(u16::from_be_bytes([word[0], word[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Datagrams the UDP sockets of this network namespace dropped (a full receive buffer),
/// from `/proc/thread-self/net/udp` (a test enters its namespace in its own thread; the
/// process's `/proc/net` is the main thread's): the service's and the clients' alike, what
/// a loss that is not steering's shows as.
pub fn udp_drops() -> io::Result<u64> {
    Ok(udp_drops_by_inode()?.values().sum())
}

/// [`udp_drops`] per socket, by the socket's inode (`/proc/<pid>/fd/<n>` links to
/// `socket:[<inode>]`).
pub fn udp_drops_by_inode() -> io::Result<BTreeMap<u64, u64>> {
    let text = std::fs::read_to_string("/proc/thread-self/net/udp")?;
    Ok(text
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            Some((fields.get(9)?.parse().ok()?, fields.last()?.parse().ok()?))
        })
        .collect())
}

/// Packets the CPUs' input backlogs dropped (`/proc/net/softnet_stat`, second column), in
/// every namespace: a flood can fill a backlog before any socket sees the packet.
pub fn backlog_drops() -> io::Result<u64> {
    let text = std::fs::read_to_string("/proc/net/softnet_stat")?;
    Ok(text
        .lines()
        .filter_map(|line| u64::from_str_radix(line.split_whitespace().nth(1)?, 16).ok())
        .sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flows_have_distinct_sources() {
        let sources: std::collections::BTreeSet<SocketAddrV4> =
            (0..200_000).map(Flood::source).collect();
        assert_eq!(sources.len(), 200_000);
        assert_eq!(Flood::source(0), "127.1.0.0:1024".parse().unwrap());
        for n in [0, 1, 59_999, 60_000, 199_999] {
            assert_eq!(Flood::flow_of(Flood::source(n)), Some(n));
        }
        assert_eq!(Flood::flow_of("127.0.0.1:1024".parse().unwrap()), None);
        assert_eq!(Flood::flow_of("127.1.0.0:1025".parse().unwrap()), None);
    }

    #[test]
    fn the_header_checksum_verifies() {
        let packet = packet(
            "127.1.2.3:1000".parse().unwrap(),
            "127.0.0.1:53".parse().unwrap(),
            b"x",
        );
        // Summing a header with its checksum in place gives all ones.
        assert_eq!(ip_checksum(&packet[..20]), 0);
        assert_eq!(packet.len(), 29);
    }
}
