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
    mem::MaybeUninit,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Mutex,
    time::Duration,
};

use socket2::{Domain, SockRef, Socket, Type};
use tokio::{
    net::{TcpSocket, TcpStream, UdpSocket},
    time::Instant,
};

use crate::{
    config::{Probe, ProbeKind},
    probe::{Miss, Outcome, Schedule, judge, late_slack},
    sockdiag::{self, SockDiag},
};

/// Stale answers and errors drained before a UDP probe, at most.
const DRAIN_LIMIT: usize = 64;

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

/// The probe port of one slot of a service, kept across its workers and probe settings.
pub struct Prober {
    port: Port,
    source: SocketAddr,
    target: SocketAddr,
}

impl Prober {
    /// Binds the probe's source port for a service listening on `listen`: on the listen
    /// address, or on loopback when the service listens on every address. Call it inside
    /// the runtime that will run the probes, whose reactor the UDP socket joins.
    pub fn bind(kind: &ProbeKind, listen: SocketAddr) -> io::Result<Self> {
        let ip = match listen.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        let target = SocketAddr::new(ip, listen.port());
        let port = match kind {
            ProbeKind::Udp(_) => {
                let socket = std::net::UdpSocket::bind(SocketAddr::new(ip, 0))?;
                socket.connect(target)?;
                socket.set_nonblocking(true)?;
                Port::Udp(UdpSocket::from_std(socket)?)
            }
            ProbeKind::Tcp => {
                let socket = Socket::new(Domain::for_address(target), Type::STREAM, None)?;
                socket.set_reuse_address(true)?;
                socket.bind(&SocketAddr::new(ip, 0).into())?;
                Port::Tcp(socket, Mutex::new(SockDiag::open()?))
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
            source,
            target,
        })
    }

    /// The address and port probes come from, which the program steers to the probed slot.
    pub fn source(&self) -> SocketAddr {
        self.source
    }

    /// Probes the worker `pid` once as `probe` says, for a probe that was due at `due` (the
    /// later of its tick and the end of the previous probe). An error is the probe's own
    /// failure, which says nothing about the worker.
    pub async fn check(&self, pid: u32, due: Instant, probe: &Probe) -> io::Result<Outcome> {
        let before = schedule(pid);
        let sent = Instant::now();
        let deadline = sent + probe.timeout;
        let answered = match (&self.port, &probe.kind) {
            (Port::Udp(socket), ProbeKind::Udp(payload)) => {
                self.check_udp(socket, payload, deadline).await?
            }
            (Port::Tcp(_, diag), ProbeKind::Tcp) => self.check_tcp(diag, deadline).await?,
            _ => {
                return Err(io::Error::other(format!(
                    "the probe port from {} was bound for another protocol than {:?}",
                    self.source, probe.kind
                )));
            }
        };
        if answered {
            return Ok(Outcome::Answered);
        }
        let checked = Instant::now();
        Ok(judge(Miss {
            sent_late: sent.saturating_duration_since(due),
            checked_late: checked.saturating_duration_since(deadline),
            slack: late_slack(probe.timeout),
            before,
            after: schedule(pid),
        }))
    }

    /// Whether any answer to `payload` came by `deadline`, or is waiting unread when the
    /// prober looks.
    async fn check_udp(
        &self,
        socket: &UdpSocket,
        payload: &[u8],
        deadline: Instant,
    ) -> io::Result<bool> {
        // Late answers to earlier probes must not pass this one; an ICMP error an earlier
        // probe left is consumed the same way.
        for _ in 0..DRAIN_LIMIT {
            match read_waiting(socket) {
                Ok(false) => break,
                Ok(true) => {}
                Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {}
                Err(e) => return Err(e),
            }
        }
        socket.send(payload).await?;
        let mut buffer = [0u8; 2048];
        match tokio::time::timeout_at(deadline, socket.recv(&mut buffer)).await {
            Ok(received) => received.map(|_| true),
            Err(_) => read_waiting(socket),
        }
    }

    /// Whether a worker accepted the probe's connection (or wrote to it, or closed it) by
    /// `deadline`, looking at it with growing pauses. The connection is reset when it is
    /// dropped, here or when the probe is aborted, so the port is free at once.
    async fn check_tcp(&self, diag: &Mutex<SockDiag>, deadline: Instant) -> io::Result<bool> {
        let socket = match self.source {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        socket.set_reuseaddr(true)?;
        socket.bind(self.source)?;
        let Ok(connection) = tokio::time::timeout_at(deadline, socket.connect(self.target)).await
        else {
            // The handshake did not finish: the worker's full queue dropped the SYN, or
            // nothing was scheduled to take it.
            return Ok(false);
        };
        let connection = connection?;
        // A reset, not a FIN: no TIME_WAIT keeps the port from the next probe.
        SockRef::from(&connection).set_linger(Some(Duration::ZERO))?;
        let mut pause = FIRST_LOOK;
        loop {
            if self.accepted(diag, &connection)? {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(pause.min(deadline.saturating_duration_since(Instant::now()))).await;
            pause = (pause * 2).min(LAST_LOOK);
        }
    }

    /// Whether the probe's `connection` has left the accept queue for a worker.
    fn accepted(&self, diag: &Mutex<SockDiag>, connection: &TcpStream) -> io::Result<bool> {
        let mut byte = [MaybeUninit::<u8>::uninit(); 1];
        match SockRef::from(connection).recv_with_flags(&mut byte, libc::MSG_DONTWAIT) {
            // The worker wrote, or closed it: it accepted it.
            Ok(_) => return Ok(true),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        let local = connection.local_addr()?;
        let mut diag = diag.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        Ok(sockdiag::accepted(diag.tcp(self.target, local)?))
    }
}

/// Reads one datagram waiting on `socket` without blocking, through a real `recv(2)`: tokio's
/// own `try_recv` answers from its readiness record, which can lag behind the socket.
fn read_waiting(socket: &UdpSocket) -> io::Result<bool> {
    let mut buffer = [MaybeUninit::<u8>::uninit(); 2048];
    match SockRef::from(socket).recv_with_flags(&mut buffer, libc::MSG_DONTWAIT) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
        Err(e) => Err(e),
    }
}

/// The scheduler record of process `pid`, summed over its threads; `None` once it is gone.
fn schedule(pid: u32) -> Option<Schedule> {
    let mut total = Schedule::default();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let task = task.ok()?.path();
        let read = |file| std::fs::read_to_string(task.join(file));
        // A thread that ended between the listing and the reads adds nothing.
        if let (Ok(schedstat), Ok(stat)) = (read("schedstat"), read("stat")) {
            total.add_thread(&schedstat, &stat)?;
        }
    }
    Some(total)
}
