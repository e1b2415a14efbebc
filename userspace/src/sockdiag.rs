//! The kernel's sock_diag netlink interface, for three questions: has a worker accepted the
//! TCP health probe's connection, how many established connections does a retiring
//! worker still hold, and which sockets are bound on a service's port? A connection still
//! in a listener's accept queue has no file yet, so sock_diag reports inode 0 for it;
//! `accept()` gives it one. An exact lookup by 4-tuple is a hash lookup in the kernel, cheap
//! enough to repeat while a probe waits; a dump walks the kernel's socket tables once.
use std::{
    collections::BTreeSet,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP},
    inet::{ExtensionFlags, InetRequest, InetResponse, SocketId, StateFlags, nlas::Nla},
};
use netlink_sys::{Socket, SocketAddr as NetlinkAddr, protocols::NETLINK_SOCK_DIAG};

use crate::{ownership::BoundSocket, socket::Proto};

/// `INET_DIAG_NOCOOKIE`: look the socket up by its addresses alone.
const NO_COOKIE: [u8; 8] = [0xff; 8];
/// How long a lookup waits for the kernel's reply (it answers at once; this bounds a lost one).
const REPLY_TIMEOUT: Duration = Duration::from_secs(1);

/// What sock_diag reports of one TCP socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpSocketState {
    /// The TCP state (`TCP_ESTABLISHED` = 1 ... `TCP_CLOSING` = 11; a connection still in
    /// its handshake is reported as `TCP_SYN_RECV`, a listener as `TCP_LISTEN`).
    pub state: u8,
    /// The socket's inode: 0 while no process holds it as a file.
    pub inode: u32,
}

/// A sock_diag netlink socket.
pub struct SockDiag {
    socket: Socket,
    buffer: Vec<u8>,
    /// The sequence number of the last request, to skip replies to earlier ones.
    sequence: u32,
}

impl SockDiag {
    /// Opens a sock_diag socket.
    pub fn open() -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
        socket.bind_auto()?;
        socket.connect(&NetlinkAddr::new(0, 0))?;
        socket2::SockRef::from(&socket).set_read_timeout(Some(REPLY_TIMEOUT))?;
        Ok(Self {
            socket,
            buffer: Vec::with_capacity(8192),
            sequence: 0,
        })
    }

    /// The TCP socket whose local address is `local` and remote address is `remote`, as the
    /// kernel's socket lookup finds it: the connection itself, or, when it does not exist
    /// (yet, or any more), the listener a packet on that 4-tuple would reach. `None` if
    /// nothing matches.
    pub fn tcp(
        &mut self,
        local: SocketAddr,
        remote: SocketAddr,
    ) -> io::Result<Option<TcpSocketState>> {
        let family = if local.is_ipv6() { AF_INET6 } else { AF_INET };
        let request = NetlinkMessage::new(
            self.header(NLM_F_REQUEST),
            SockDiagMessage::InetRequest(InetRequest {
                family,
                protocol: IPPROTO_TCP,
                extensions: ExtensionFlags::empty(),
                states: StateFlags::all(),
                socket_id: SocketId {
                    source_port: local.port(),
                    destination_port: remote.port(),
                    source_address: local.ip(),
                    destination_address: remote.ip(),
                    interface_id: 0,
                    cookie: NO_COOKIE,
                },
            })
            .into(),
        );
        self.send(request)?;
        self.buffer.clear();
        let received = self.socket.recv(&mut self.buffer, 0)?;
        let reply = NetlinkMessage::<SockDiagMessage>::deserialize(&self.buffer[..received])
            .map_err(|e| {
                io::Error::new(io::ErrorKind::InvalidData, format!("sock_diag reply: {e}"))
            })?;
        match reply.payload {
            NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
                Ok(Some(TcpSocketState {
                    state: response.header.state,
                    inode: response.header.inode,
                }))
            }
            NetlinkPayload::Error(error) => match error.code.map(|code| -code.get()) {
                Some(libc::ENOENT) => Ok(None),
                Some(code) => Err(io::Error::from_raw_os_error(code)),
                None => Ok(None),
            },
            other => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "unexpected sock_diag reply of type {}",
                    other.message_type()
                ),
            )),
        }
    }

    /// The inodes of the established TCP connections, IPv4 and IPv6, whose local port is
    /// `port` (one dump of each family; the kernel filters by state and port).
    pub fn established_inodes(&mut self, port: u16) -> io::Result<BTreeSet<u32>> {
        let mut inodes = BTreeSet::new();
        for family in [AF_INET, AF_INET6] {
            self.dump(
                family,
                IPPROTO_TCP,
                StateFlags::ESTABLISHED,
                port,
                |response| {
                    if response.header.inode != 0 {
                        inodes.insert(response.header.inode);
                    }
                },
            )?;
        }
        Ok(inodes)
    }

    /// The sockets of `proto` bound on `port`, IPv4 and IPv6 (one dump of each family): TCP
    /// listeners, and UDP sockets in any state (a connected one still takes its peer's
    /// datagrams). Whether each shares a service's address is
    /// [`crate::ownership::overlaps`]'s to say.
    pub fn bound(&mut self, proto: Proto, port: u16) -> io::Result<Vec<BoundSocket>> {
        let (protocol, states) = match proto {
            Proto::Tcp => (IPPROTO_TCP, StateFlags::LISTEN),
            Proto::Udp => (IPPROTO_UDP, StateFlags::all()),
        };
        let mut found = Vec::new();
        for family in [AF_INET, AF_INET6] {
            self.dump(family, protocol, states.clone(), port, |response| {
                let id = &response.header.socket_id;
                found.push(BoundSocket {
                    local: SocketAddr::new(id.source_address, id.source_port),
                    v6only: response.nlas.iter().find_map(|nla| match nla {
                        Nla::SkV6Only(v6only) => Some(*v6only),
                        _ => None,
                    }),
                    cookie: cookie(id.cookie),
                    inode: response.header.inode,
                    uid: response.header.uid,
                });
            })?;
        }
        Ok(found)
    }

    /// A request header with the next sequence number.
    fn header(&mut self, flags: u16) -> NetlinkHeader {
        self.sequence = self.sequence.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = self.sequence;
        header
    }

    fn send(&mut self, mut request: NetlinkMessage<SockDiagMessage>) -> io::Result<()> {
        request.finalize();
        let mut bytes = vec![0; request.buffer_len()];
        request.serialize(&mut bytes);
        self.socket.send(&bytes, 0)?;
        Ok(())
    }

    /// Dumps the sockets of `family` and `protocol` in `states` whose local port is `port`,
    /// handing each to `each`. The kernel filters by state and port (a socket of another
    /// port would still be skipped here).
    fn dump(
        &mut self,
        family: u8,
        protocol: u8,
        states: StateFlags,
        port: u16,
        mut each: impl FnMut(&InetResponse),
    ) -> io::Result<()> {
        let unspecified = if family == AF_INET {
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        } else {
            IpAddr::V6(Ipv6Addr::UNSPECIFIED)
        };
        let request = NetlinkMessage::new(
            self.header(NLM_F_REQUEST | NLM_F_DUMP),
            SockDiagMessage::InetRequest(InetRequest {
                family,
                protocol,
                extensions: ExtensionFlags::empty(),
                states,
                socket_id: SocketId {
                    source_port: port,
                    destination_port: 0,
                    source_address: unspecified,
                    destination_address: unspecified,
                    interface_id: 0,
                    cookie: NO_COOKIE,
                },
            })
            .into(),
        );
        self.send(request)?;
        loop {
            self.buffer.clear();
            let received = self.socket.recv(&mut self.buffer, 0)?;
            let mut offset = 0;
            while offset < received {
                let message =
                    NetlinkMessage::<SockDiagMessage>::deserialize(&self.buffer[offset..received])
                        .map_err(|e| {
                            io::Error::new(
                                io::ErrorKind::InvalidData,
                                format!("sock_diag reply: {e}"),
                            )
                        })?;
                let length = message.header.length as usize;
                if message.header.sequence_number == self.sequence {
                    match message.payload {
                        NetlinkPayload::Done(_) => return Ok(()),
                        NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response))
                            if response.header.socket_id.source_port == port =>
                        {
                            each(&response)
                        }
                        NetlinkPayload::Error(error) => {
                            if let Some(code) = error.code {
                                return Err(io::Error::from_raw_os_error(-code.get()));
                            }
                        }
                        _ => {}
                    }
                }
                if length == 0 {
                    break;
                }
                offset += length.next_multiple_of(4);
            }
        }
    }
}

/// A socket's cookie from sock_diag's `id.cookie`: the kernel writes the 64-bit cookie as
/// two `u32`s in host byte order, low half first. It equals `SO_COOKIE`.
fn cookie(bytes: [u8; 8]) -> u64 {
    let [a, b, c, d, e, f, g, h] = bytes;
    u64::from(u32::from_ne_bytes([a, b, c, d])) | u64::from(u32::from_ne_bytes([e, f, g, h])) << 32
}

/// Whether the server side of a connection, as sock_diag reports it, was accepted by a
/// process: it is held as a file (an inode), or it is already closing from the server's
/// side, which only a process that accepted it can do.
pub fn accepted(server_side: Option<TcpSocketState>) -> bool {
    const FIN_WAIT1: u8 = 4;
    const FIN_WAIT2: u8 = 5;
    const TIME_WAIT: u8 = 6;
    const LAST_ACK: u8 = 9;
    const LISTEN: u8 = 10;
    const CLOSING: u8 = 11;
    server_side.is_some_and(|side| match side.state {
        // The lookup fell back to a listener: the connection is not there.
        LISTEN => false,
        FIN_WAIT1 | FIN_WAIT2 | TIME_WAIT | LAST_ACK | CLOSING => true,
        _ => side.inode != 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn side(state: u8, inode: u32) -> Option<TcpSocketState> {
        Some(TcpSocketState { state, inode })
    }

    #[test]
    fn a_connection_is_accepted_once_a_process_holds_or_closes_it() {
        assert!(!accepted(None), "not there");
        assert!(!accepted(side(3, 0)), "still in its handshake");
        assert!(!accepted(side(1, 0)), "in the accept queue");
        assert!(!accepted(side(10, 4242)), "only the listener was found");
        assert!(
            !accepted(side(8, 0)),
            "closed by the client, never accepted"
        );
        assert!(accepted(side(1, 4243)), "accepted");
        for closing in [4, 5, 6, 9, 11] {
            assert!(
                accepted(side(closing, 0)),
                "closed by the server: {closing}"
            );
        }
    }
}
