//! Listening sockets that can join a `SO_REUSEPORT` group: created, bound, identified.
use std::{
    io,
    net::SocketAddr,
    os::fd::{AsRawFd as _, BorrowedFd},
};

use socket2::{Domain, Protocol, Socket, Type};

pub use portshard_core::service::Proto;

/// The socket type and protocol that carry `proto`.
pub fn socket_type(proto: Proto) -> (Type, Protocol) {
    match proto {
        Proto::Udp => (Type::DGRAM, Protocol::UDP),
        Proto::Tcp => (Type::STREAM, Protocol::TCP),
    }
}

/// Accept-queue length of the listening TCP sockets portshard creates.
pub const LISTEN_BACKLOG: i32 = 4096;

/// A socket could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("{action} {proto} socket for {addr} failed: {source}")]
pub struct SocketError {
    /// What was being done.
    pub action: &'static str,
    /// Transport of the socket.
    pub proto: Proto,
    /// Address it was for.
    pub addr: SocketAddr,
    /// The underlying error.
    #[source]
    pub source: io::Error,
}

/// A socket of `proto` bound to `addr` with `SO_REUSEPORT` (and listening, for TCP), so it
/// joins the reuseport group of every other such socket on `addr`. IPv6 sockets are
/// IPv6-only, so an IPv4 and an IPv6 service on one port are separate groups.
pub fn bind_reuseport(proto: Proto, addr: SocketAddr) -> Result<Socket, SocketError> {
    let fail = |action| {
        move |source| SocketError {
            action,
            proto,
            addr,
            source,
        }
    };
    let (kind, protocol) = socket_type(proto);
    let socket =
        Socket::new(Domain::for_address(addr), kind, Some(protocol)).map_err(fail("creating"))?;
    socket
        .set_reuse_port(true)
        .map_err(fail("setting SO_REUSEPORT on"))?;
    if addr.is_ipv6() {
        socket
            .set_only_v6(true)
            .map_err(fail("setting IPV6_V6ONLY on"))?;
    }
    socket.bind(&addr.into()).map_err(fail("binding"))?;
    if proto == Proto::Tcp {
        socket
            .listen(LISTEN_BACKLOG)
            .map_err(fail("listening on"))?;
    }
    Ok(socket)
}

/// The kernel's unique, never reused identifier of a socket (`SO_COOKIE`), so a slot's
/// record names its socket unambiguously across processes.
pub fn cookie(socket: BorrowedFd<'_>) -> io::Result<u64> {
    let mut cookie = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `len` are valid out-pointers of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(cookie)
    } else {
        Err(io::Error::last_os_error())
    }
}
