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
    let socket = reuseport_socket(proto, addr)?;
    join(&socket, proto, addr)?;
    Ok(socket)
}

/// A socket of `proto` for `addr` with `SO_REUSEPORT` (IPv6-only for IPv6), not bound yet:
/// its cookie can be recorded before it joins a group with [`join`], so whoever lists the
/// group's sockets finds it recorded.
pub fn reuseport_socket(proto: Proto, addr: SocketAddr) -> Result<Socket, SocketError> {
    let (kind, protocol) = socket_type(proto);
    let socket = Socket::new(Domain::for_address(addr), kind, Some(protocol))
        .map_err(failed("creating", proto, addr))?;
    socket
        .set_reuse_port(true)
        .map_err(failed("setting SO_REUSEPORT on", proto, addr))?;
    if addr.is_ipv6() {
        socket
            .set_only_v6(true)
            .map_err(failed("setting IPV6_V6ONLY on", proto, addr))?;
    }
    Ok(socket)
}

/// Binds `socket` (from [`reuseport_socket`]) to `addr`, and listens for TCP: it joins the
/// reuseport group there.
pub fn join(socket: &Socket, proto: Proto, addr: SocketAddr) -> Result<(), SocketError> {
    socket
        .bind(&addr.into())
        .map_err(failed("binding", proto, addr))?;
    if proto == Proto::Tcp {
        socket
            .listen(LISTEN_BACKLOG)
            .map_err(failed("listening on", proto, addr))?;
    }
    Ok(())
}

fn failed(
    action: &'static str,
    proto: Proto,
    addr: SocketAddr,
) -> impl FnOnce(io::Error) -> SocketError {
    move |source| SocketError {
        action,
        proto,
        addr,
        source,
    }
}

/// Whether `socket` can be a member of the reuseport group of `proto` on `addr`: of that
/// transport, bound to exactly `addr`, with `SO_REUSEPORT`, and listening for TCP (a TCP
/// connection accepted on the address is bound to it too, but is no member).
pub fn is_member_of(socket: BorrowedFd<'_>, proto: Proto, addr: SocketAddr) -> bool {
    let socket = socket2::SockRef::from(&socket);
    let (kind, _) = socket_type(proto);
    socket.r#type().is_ok_and(|t| t == kind)
        && socket
            .local_addr()
            .is_ok_and(|local| local.as_socket() == Some(addr))
        && socket.reuse_port().unwrap_or(false)
        && (proto == Proto::Udp || socket.is_listener().unwrap_or(false))
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
