//! Flows from fixed source ports toward one service address, and which listener each reached.
//!
//! A flow is a 4-tuple: the same source port in every round gives the same kernel hash, so
//! comparing rounds shows exactly which flows moved. UDP flows send one datagram carrying
//! their number; TCP flows open one connection, identified by its source port, and reset it
//! once accepted so the next round can reuse the 4-tuple at once.
use std::{
    io,
    mem::MaybeUninit,
    net::{IpAddr, SocketAddr},
    os::fd::{AsFd, AsRawFd as _, BorrowedFd},
    thread,
    time::{Duration, Instant},
};

use portshard::socket::{self, Proto};

use crate::context;
use socket2::{Domain, Socket};

/// Source port of flow 0; flow `f` uses `FIRST_SOURCE_PORT + f`.
pub const FIRST_SOURCE_PORT: u16 = 10_000;

/// The most flows one address can have: source ports up to 65 000.
pub const MAX_FLOWS: usize = 55_000;

/// Flows sent between two drains of the listeners.
const BATCH: usize = 256;

/// How long a round waits for stragglers before declaring a flow lost.
const SETTLE: Duration = Duration::from_secs(2);

/// Receive buffer of every listener, so a batch never overflows one.
const LISTENER_RCVBUF: usize = 4 << 20;

/// Which listener each flow reached (an index into the listener list), `None` if none did.
pub type Landing = Vec<Option<usize>>;

/// One listening socket of a test group, non-blocking.
pub struct Listener {
    socket: Socket,
    proto: Proto,
}

impl Listener {
    /// A socket that joins the reuseport group on `addr` (see [`socket::bind_reuseport`]).
    pub fn bind(proto: Proto, addr: SocketAddr) -> io::Result<Self> {
        let socket = socket::bind_reuseport(proto, addr).map_err(io::Error::other)?;
        let configure = || {
            socket.set_nonblocking(true)?;
            socket.set_recv_buffer_size(LISTENER_RCVBUF)
        };
        configure().map_err(|e| context(e, format!("configuring a {proto} listener on {addr}")))?;
        Ok(Self { socket, proto })
    }

    /// Takes every datagram or connection waiting, recording which flow it belongs to.
    fn drain(
        &self,
        me: usize,
        flows: &Flows,
        landing: &mut Landing,
        accepted: &mut Vec<Socket>,
    ) -> io::Result<usize> {
        let mut taken = 0;
        loop {
            let flow = match self.proto {
                Proto::Udp => {
                    let mut buf = [MaybeUninit::<u8>::uninit(); 8];
                    match self.socket.recv(&mut buf) {
                        Ok(4) => {
                            // SAFETY: recv initialised the 4 bytes it returned.
                            let bytes: [u8; 4] =
                                std::array::from_fn(|i| unsafe { buf[i].assume_init() });
                            u32::from_le_bytes(bytes) as usize
                        }
                        Ok(n) => {
                            return Err(io::Error::other(format!("unexpected {n}-byte datagram")));
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(taken),
                        Err(e) => return Err(e),
                    }
                }
                Proto::Tcp => match self.socket.accept() {
                    Ok((connection, peer)) => {
                        accepted.push(connection);
                        flows.flow_of(
                            peer.as_socket()
                                .ok_or_else(|| io::Error::other("non-IP peer"))?,
                        )?
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(taken),
                    Err(e) => return Err(e),
                },
            };
            if flow >= landing.len() {
                return Err(io::Error::other(format!(
                    "listener {me} got unknown flow {flow}"
                )));
            }
            if let Some(other) = landing[flow].replace(me) {
                return Err(io::Error::other(format!(
                    "flow {flow} reached listeners {other} and {me}"
                )));
            }
            taken += 1;
        }
    }
}

impl Listener {
    /// Accepts every connection waiting (TCP), with its peer address.
    pub fn accept_waiting(&self) -> io::Result<Vec<(Socket, SocketAddr)>> {
        let mut accepted = Vec::new();
        loop {
            match self.socket.accept() {
                Ok((connection, peer)) => {
                    let peer = peer
                        .as_socket()
                        .ok_or_else(|| io::Error::other("non-IP peer"))?;
                    accepted.push((connection, peer));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(accepted),
                Err(e) => return Err(e),
            }
        }
    }

    /// Connections waiting in this TCP listener's accept queue.
    pub fn accept_queue_len(&self) -> io::Result<usize> {
        accept_queue_len(self.socket.as_fd())
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }
}

/// `count` flows of `proto` toward `target`, from the target's own loopback address.
#[derive(Debug, Clone)]
pub struct Flows {
    proto: Proto,
    target: SocketAddr,
    count: usize,
}

impl Flows {
    /// Flows toward `target`; panics past [`MAX_FLOWS`], which has no source ports left.
    pub fn new(proto: Proto, target: SocketAddr, count: usize) -> Self {
        assert!(
            count <= MAX_FLOWS,
            "{count} flows need more source ports than exist"
        );
        Self {
            proto,
            target,
            count,
        }
    }

    /// The source address of flow `flow`.
    fn source(&self, flow: usize) -> SocketAddr {
        SocketAddr::new(self.target.ip(), FIRST_SOURCE_PORT + flow as u16)
    }

    fn flow_of(&self, source: SocketAddr) -> io::Result<usize> {
        source
            .port()
            .checked_sub(FIRST_SOURCE_PORT)
            .map(usize::from)
            .filter(|&f| f < self.count && source.ip() == self.target.ip())
            .ok_or_else(|| io::Error::other(format!("connection from unknown source {source}")))
    }

    fn client(&self, flow: usize) -> io::Result<Socket> {
        let (kind, protocol) = portshard::socket::socket_type(self.proto);
        let client = Socket::new(Domain::for_address(self.target), kind, Some(protocol))?;
        if self.proto == Proto::Tcp {
            // Close with a reset: no TIME_WAIT, so the next round reuses the 4-tuple.
            client.set_linger(Some(Duration::ZERO))?;
        }
        client.bind(&self.source(flow).into())?;
        Ok(client)
    }

    /// Opens flow `flow`: sends its datagram, or connects. A refused TCP connection (no
    /// listener) is `Ok(None)`.
    pub fn open(&self, flow: usize) -> io::Result<Option<Socket>> {
        let opened = self.client(flow).and_then(|client| match self.proto {
            Proto::Udp => {
                client.send_to(&(flow as u32).to_le_bytes(), &self.target.into())?;
                Ok(Some(client))
            }
            Proto::Tcp => match client.connect(&self.target.into()) {
                Ok(()) => Ok(Some(client)),
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Ok(None),
                Err(e) => Err(e),
            },
        });
        opened.map_err(|e| {
            let what = format!(
                "{} flow {flow} from {} to {}",
                self.proto,
                self.source(flow),
                self.target
            );
            context(e, what)
        })
    }

    /// Sends every flow once and records where each landed. `listeners[i]` is `None` for a
    /// listener that has been closed.
    pub fn round(&self, listeners: &[Option<Listener>]) -> io::Result<Landing> {
        let mut landing = vec![None; self.count];
        let mut accepted = Vec::new();
        let mut expected = 0;
        let mut arrived = 0;
        for start in (0..self.count).step_by(BATCH) {
            let mut clients = Vec::with_capacity(BATCH);
            for flow in start..(start + BATCH).min(self.count) {
                if let Some(client) = self.open(flow)? {
                    clients.push(client);
                    expected += 1;
                }
            }
            let deadline = Instant::now() + SETTLE;
            loop {
                arrived += drain_all(self, listeners, &mut landing, &mut accepted)?;
                // UDP datagrams left over are picked up by the next drains; a TCP batch is
                // only done once every connection is accepted, before the clients reset.
                if self.proto == Proto::Udp || arrived == expected || Instant::now() > deadline {
                    break;
                }
                thread::yield_now();
            }
            // Reset the clients before closing the accepted sockets: a server that closed
            // first would make the client's last packets miss every connection and run the
            // program again on the listener lookup.
            drop(clients);
            accepted.clear();
        }
        let deadline = Instant::now() + SETTLE;
        while arrived < expected && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(1));
            arrived += drain_all(self, listeners, &mut landing, &mut accepted)?;
        }
        Ok(landing)
    }
}

fn drain_all(
    flows: &Flows,
    listeners: &[Option<Listener>],
    landing: &mut Landing,
    accepted: &mut Vec<Socket>,
) -> io::Result<usize> {
    let mut taken = 0;
    for (i, listener) in listeners.iter().enumerate() {
        if let Some(listener) = listener {
            taken += listener
                .drain(i, flows, landing, accepted)
                .map_err(|e| context(e, format!("receiving on listener {i}")))?;
        }
    }
    Ok(taken)
}

/// `n` listeners joining the reuseport group on `target`, all open.
pub fn bind_listeners(
    proto: Proto,
    target: SocketAddr,
    n: usize,
) -> io::Result<Vec<Option<Listener>>> {
    (0..n)
        .map(|_| Listener::bind(proto, target).map(Some))
        .collect()
}

/// The IPv6 or IPv4 loopback address, on `port`.
pub fn loopback(ipv6: bool, port: u16) -> SocketAddr {
    let ip: IpAddr = if ipv6 {
        "::1".parse().unwrap()
    } else {
        "127.0.0.1".parse().unwrap()
    };
    SocketAddr::new(ip, port)
}

/// Flows whose landing differs between two rounds.
pub fn moved(before: &Landing, after: &Landing) -> usize {
    before.iter().zip(after).filter(|(a, b)| a != b).count()
}

/// Flows that reached no listener.
pub fn lost(landing: &Landing) -> usize {
    landing.iter().filter(|l| l.is_none()).count()
}

/// Connections waiting in the accept queue of the listening TCP socket `socket`
/// (`tcpi_unacked` of a listener).
pub fn accept_queue_len(socket: BorrowedFd<'_>) -> io::Result<usize> {
    // SAFETY: tcp_info is plain data.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` and `len` are valid out-pointers of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(info.tcpi_unacked as usize)
    } else {
        Err(io::Error::last_os_error())
    }
}
