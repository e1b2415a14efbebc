//! Health probes, the edge: each probed slot has its own source port, which the program
//! steers to that slot's socket when it comes from the probe's address (the `probes` map),
//! so a probe reaches exactly the worker it checks. A UDP probe sends the configured payload and waits for any answer; a TCP probe
//! connects and waits until the worker's listener has accepted it (its accept queue, read
//! from `/proc/net/tcp`, is empty again), then resets the connection so the port is free at
//! once. Verdicts are kept by [`crate::probe::Tracker`].
use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use socket2::{Domain, Socket, Type};
use tokio::net::{TcpSocket, UdpSocket};

use crate::{config::ProbeKind, probe};

/// How often a TCP probe looks at the accept queue while it waits.
const QUEUE_POLL: Duration = Duration::from_millis(5);

/// What holds a probe's source port between probes.
enum Port {
    /// The UDP socket every probe uses, connected to the service.
    Udp(UdpSocket),
    /// A bound, idle TCP socket with `SO_REUSEADDR`: no other socket gets the port, and each
    /// probe's connection binds it too.
    Tcp(Socket),
}

/// The probe of one slot of a service.
pub struct Prober {
    port: Port,
    payload: Vec<u8>,
    source: SocketAddr,
    target: SocketAddr,
    timeout: Duration,
}

impl Prober {
    /// Binds the probe's source port for a service listening on `listen`: on the listen
    /// address, or on loopback when the service listens on every address.
    pub fn bind(kind: &ProbeKind, listen: SocketAddr, timeout: Duration) -> io::Result<Self> {
        let ip = match listen.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        let target = SocketAddr::new(ip, listen.port());
        let (port, payload) = match kind {
            ProbeKind::Udp(payload) => {
                let socket = std::net::UdpSocket::bind(SocketAddr::new(ip, 0))?;
                socket.connect(target)?;
                socket.set_nonblocking(true)?;
                (Port::Udp(UdpSocket::from_std(socket)?), payload.clone())
            }
            ProbeKind::Tcp => {
                let socket = Socket::new(Domain::for_address(target), Type::STREAM, None)?;
                socket.set_reuse_address(true)?;
                socket.bind(&SocketAddr::new(ip, 0).into())?;
                (Port::Tcp(socket), Vec::new())
            }
        };
        let source = match &port {
            Port::Udp(socket) => socket.local_addr()?,
            Port::Tcp(socket) => socket
                .local_addr()?
                .as_socket()
                .ok_or_else(|| io::Error::other("probe socket has no IP address"))?,
        };
        Ok(Self {
            port,
            payload,
            source,
            target,
            timeout,
        })
    }

    /// The address and port probes come from, which the program steers to the probed slot.
    pub fn source(&self) -> SocketAddr {
        self.source
    }

    /// Probes the worker `pid` once: whether it answered within the timeout.
    pub async fn check(&self, pid: u32) -> bool {
        match &self.port {
            Port::Udp(socket) => self.check_udp(socket).await,
            Port::Tcp(_) => self.check_tcp(pid).await.unwrap_or(false),
        }
    }

    async fn check_udp(&self, socket: &UdpSocket) -> bool {
        let mut buffer = [0u8; 2048];
        // Late answers to earlier probes must not pass this one.
        while socket.try_recv(&mut buffer).is_ok() {}
        if socket.send(&self.payload).await.is_err() {
            return false;
        }
        matches!(
            tokio::time::timeout(self.timeout, socket.recv(&mut buffer)).await,
            Ok(Ok(_))
        )
    }

    async fn check_tcp(&self, pid: u32) -> io::Result<bool> {
        let link = std::fs::read_link(format!("/proc/{pid}/fd/{}", crate::process::LISTEN_FD))?;
        let inode = probe::socket_inode(&link.to_string_lossy())
            .ok_or_else(|| io::Error::other("the worker's fd 3 is not a socket"))?;
        let table = if self.target.is_ipv6() {
            "/proc/net/tcp6"
        } else {
            "/proc/net/tcp"
        };
        let socket = match self.source {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        socket.set_reuseaddr(true)?;
        socket.bind(self.source)?;
        let deadline = tokio::time::Instant::now() + self.timeout;
        let Ok(connection) = tokio::time::timeout_at(deadline, socket.connect(self.target)).await
        else {
            return Ok(false);
        };
        let connection = connection?;
        let accepted = loop {
            let queued = probe::accept_queue(&std::fs::read_to_string(table)?, inode);
            if queued == Some(0) {
                break true;
            }
            if tokio::time::Instant::now() >= deadline {
                break false;
            }
            tokio::time::sleep(QUEUE_POLL).await;
        };
        // A reset, not a FIN: no TIME_WAIT keeps the port from the next probe.
        socket2::SockRef::from(&connection).set_linger(Some(Duration::ZERO))?;
        Ok(accepted)
    }
}
