//! Health probes, the edge: each probed slot has its own source port, which the program
//! steers to that slot's socket when it comes from the probe's address (the `probes` map),
//! so a probe reaches exactly the worker it checks. A UDP probe sends the configured payload
//! and waits for any answer; a TCP probe connects and waits until a process has accepted
//! *its* connection (sock_diag: the server side has an inode) or the worker wrote or closed
//! it, then resets the connection so the port is free at once. A probe that got no answer is
//! judged by [`crate::probe::judge`] from the worker's scheduler record over the probe's
//! window and from how late the prober itself was; verdicts are kept by
//! [`crate::probe::Tracker`].
use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Mutex,
    time::Duration,
};

use socket2::{Domain, Socket, Type};
use tokio::{
    net::{TcpSocket, TcpStream, UdpSocket},
    time::Instant,
};

use crate::{
    config::ProbeKind,
    probe::{Miss, Outcome, Schedule, judge, late_slack},
    sockdiag::{self, SockDiag},
};

/// The first pause of a TCP probe between two looks at its connection; it doubles...
const FIRST_LOOK: Duration = Duration::from_millis(1);
/// ...up to this.
const LAST_LOOK: Duration = Duration::from_millis(16);

/// What holds a probe's source port between probes.
enum Port {
    /// The UDP socket every probe uses, connected to the service.
    Udp(UdpSocket),
    /// A bound, idle TCP socket with `SO_REUSEADDR`: no other socket gets the port, and each
    /// probe's connection binds it too. With the sock_diag socket that looks the
    /// connection's server side up.
    Tcp(Socket, Mutex<SockDiag>),
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
    /// address, or on loopback when the service listens on every address. Call it inside
    /// the runtime that will run the probes, whose reactor the UDP socket joins.
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
                (Port::Tcp(socket, Mutex::new(SockDiag::open()?)), Vec::new())
            }
        };
        let source = match &port {
            Port::Udp(socket) => socket.local_addr()?,
            Port::Tcp(socket, _) => socket
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

    /// Probes the worker `pid` once, for a probe that was due at `due`.
    pub async fn check(&self, pid: u32, due: Instant) -> Outcome {
        let before = schedule(pid);
        let sent = Instant::now();
        let deadline = sent + self.timeout;
        let answered = match &self.port {
            Port::Udp(socket) => self.check_udp(socket, deadline).await,
            Port::Tcp(_, diag) => self.check_tcp(diag, deadline).await.unwrap_or(false),
        };
        if answered {
            return Outcome::Answered;
        }
        let checked = Instant::now();
        judge(Miss {
            sent_late: sent.saturating_duration_since(due),
            checked_late: checked.saturating_duration_since(deadline),
            slack: late_slack(self.timeout),
            before,
            after: schedule(pid),
        })
    }

    /// Whether any answer came by `deadline`, or is waiting unread when the prober looks.
    async fn check_udp(&self, socket: &UdpSocket, deadline: Instant) -> bool {
        let mut buffer = [0u8; 2048];
        // Late answers to earlier probes must not pass this one.
        while socket.try_recv(&mut buffer).is_ok() {}
        if socket.send(&self.payload).await.is_err() {
            return false;
        }
        match tokio::time::timeout_at(deadline, socket.recv(&mut buffer)).await {
            Ok(received) => received.is_ok(),
            Err(_) => socket.try_recv(&mut buffer).is_ok(),
        }
    }

    /// Whether a worker accepted the probe's connection (or wrote to it, or closed it) by
    /// `deadline`, looking at it with growing pauses.
    async fn check_tcp(&self, diag: &Mutex<SockDiag>, deadline: Instant) -> io::Result<bool> {
        let socket = match self.source {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        socket.set_reuseaddr(true)?;
        socket.bind(self.source)?;
        let Ok(connection) = tokio::time::timeout_at(deadline, socket.connect(self.target)).await
        else {
            return Ok(false);
        };
        let connection = connection?;
        let mut pause = FIRST_LOOK;
        let accepted = loop {
            if self.accepted(diag, &connection)? {
                break true;
            }
            if Instant::now() >= deadline {
                break false;
            }
            tokio::time::sleep(pause.min(deadline.saturating_duration_since(Instant::now()))).await;
            pause = (pause * 2).min(LAST_LOOK);
        };
        // A reset, not a FIN: no TIME_WAIT keeps the port from the next probe.
        socket2::SockRef::from(&connection).set_linger(Some(Duration::ZERO))?;
        Ok(accepted)
    }

    /// Whether the probe's `connection` has left the accept queue for a worker.
    fn accepted(&self, diag: &Mutex<SockDiag>, connection: &TcpStream) -> io::Result<bool> {
        let mut byte = [0u8; 1];
        match connection.try_read(&mut byte) {
            // The worker wrote, or closed it: it accepted it.
            Ok(_) => return Ok(true),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return Ok(false),
        }
        let local = connection.local_addr()?;
        let mut diag = diag.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        Ok(sockdiag::accepted(diag.tcp(self.target, local)?))
    }
}

/// The scheduler record of process `pid`, summed over its threads; `None` once it is gone.
fn schedule(pid: u32) -> Option<Schedule> {
    let mut total = Schedule::default();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        // A thread that ended between the listing and the read adds nothing.
        if let Ok(text) = std::fs::read_to_string(task.ok()?.path().join("schedstat")) {
            total.add_thread(&text)?;
        }
    }
    Some(total)
}
