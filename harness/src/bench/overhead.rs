//! What the program costs a service: datagrams (`udp_overhead`) and connections
//! (`tcp_overhead`) per second with the program attached over without it, same senders,
//! same listeners, in interleaved rounds (with, without, with, ...).
use std::{
    io,
    net::{SocketAddr, UdpSocket},
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd},
    path::Path,
    sync::atomic::{AtomicUsize, Ordering},
    thread,
    time::{Duration, Instant},
};

use aya::programs::SkReuseport;
use portshard::{dataplane::Dataplane, group::Group, socket::Proto};
use socket2::{Domain, SockRef, Socket};

use super::{
    BenchError, Budget, ROUND_LIMIT, Result,
    report::{Figure, Summary, Target, paired_ratios},
};
use crate::{
    context,
    flows::{self, Listener},
    scenario::{self, MeasureError},
};

/// Listeners of each overhead group.
pub const LISTENERS: usize = 4;

/// UDP flows (connected sockets, one 4-tuple each) the datagrams are spread over.
pub const UDP_FLOWS: usize = 64;

/// The ratio the program may cost at most.
pub const MIN_RATIO: f64 = 0.97;

/// How long a UDP round waits for datagrams still on their way after the last send.
const STRAGGLERS: Duration = Duration::from_millis(200);

/// What a UDP round's sent count reads while the sender is still sending.
const NOT_YET: usize = usize::MAX;

const UDP_PORT: u16 = 5302;
const TCP_PORT: u16 = 5303;

/// Rates with and without the program, round by round.
struct Rounds {
    with: Vec<f64>,
    without: Vec<f64>,
}

/// Runs one warm-up round each way, then `rounds` pairs: attached, detached. Leaves the
/// program attached.
fn interleaved(
    group: &Group,
    member: BorrowedFd<'_>,
    rounds: usize,
    mut round: impl FnMut() -> Result<f64>,
) -> Result<Rounds> {
    let set = |attached: bool| -> Result<()> {
        if attached {
            group.dataplane().attach(member)?;
            Ok(())
        } else {
            SkReuseport::detach(member).map_err(BenchError::bpf(format!(
                "detaching the program from the group of socket fd {}",
                member.as_raw_fd()
            )))
        }
    };
    let mut rates = Rounds {
        with: Vec::new(),
        without: Vec::new(),
    };
    for measured in std::iter::once(false).chain(std::iter::repeat_n(true, rounds)) {
        for attached in [true, false] {
            set(attached)?;
            let rate = round()?;
            if measured {
                if attached {
                    &mut rates.with
                } else {
                    &mut rates.without
                }
                .push(rate);
            }
        }
    }
    set(true)?;
    Ok(rates)
}

/// The figure of paired rounds: the median of with/without, its spread and interval.
fn figure(name: &str, rates: &Rounds) -> Result<Figure> {
    let summary = |values: &[f64]| {
        Summary::of(values).ok_or_else(|| {
            BenchError::from(MeasureError::Traffic(format!("{name}: no round measured")))
        })
    };
    let ratio = Figure::ratio(name, 1.0, &paired_ratios(&rates.with, &rates.without))
        .ok_or_else(|| MeasureError::Traffic(format!("{name}: no round measured")))?;
    Ok(ratio
        .target(Target::AtLeast(MIN_RATIO))
        .extra("rate_with", summary(&rates.with)?.median)
        .extra("rate_without", summary(&rates.without)?.median))
}

/// A portshard group for `service` over `count` fresh listeners of `proto` on `target`,
/// with a UDP flow table of `flow_capacity` flows if that is not 0.
pub(super) fn group(
    pins: &Path,
    service: &str,
    proto: Proto,
    target: SocketAddr,
    count: usize,
    flow_capacity: u32,
) -> Result<(Vec<Option<Listener>>, Group)> {
    let listeners = flows::bind_listeners(proto, target, count)?;
    let group = scenario::steer_with_flows(pins, service, &listeners, flow_capacity)?;
    Ok((listeners, group))
}

/// Flows the flow-table variants' tables hold: the default, far more than they use.
pub(super) const FLOW_TABLE: u32 = 65_536;

/// `udp_overhead`, and `udp_overhead_flow_table` with the flow table on: one thread sends
/// `udp_datagrams` datagrams round-robin over [`UDP_FLOWS`] flows, another receives them
/// on every listener; the rate is datagrams received over the time from the first send to
/// the last arrival.
pub fn udp(pins: &Path, budget: &Budget) -> Result<Vec<Figure>> {
    [("udp_overhead", 0), ("udp_overhead_flow_table", FLOW_TABLE)]
        .into_iter()
        .map(|(name, flow_capacity)| udp_variant(pins, budget, name, flow_capacity))
        .collect()
}

/// One `udp_overhead` figure; see [`udp`].
fn udp_variant(pins: &Path, budget: &Budget, name: &str, flow_capacity: u32) -> Result<Figure> {
    let target = flows::loopback(false, UDP_PORT);
    let service = "udp-overhead";
    let (listeners, group) = group(pins, service, Proto::Udp, target, LISTENERS, flow_capacity)?;
    let senders = senders(target, ephemeral(UDP_FLOWS))?;
    let member = listeners[0].as_ref().expect("all open").as_fd();
    let rates = interleaved(&group, member, budget.overhead_rounds, || {
        udp_round(&senders, &listeners, budget.udp_datagrams)
    })?;
    drop(group);
    drop(listeners);
    Dataplane::remove_pins(pins, service)?;
    figure(name, &rates)
}

/// One UDP round; see [`udp`].
fn udp_round(
    senders: &[UdpSocket],
    listeners: &[Option<Listener>],
    datagrams: usize,
) -> Result<f64> {
    let sent = AtomicUsize::new(NOT_YET);
    let start = Instant::now();
    let (received, last) = thread::scope(|scope| {
        let receiver = scope.spawn(|| receive_all(listeners, &sent, start));
        let mut count = 0;
        while count < datagrams && start.elapsed() < ROUND_LIMIT {
            let flow = count % senders.len();
            senders[flow]
                .send(&(count as u32).to_le_bytes())
                .map_err(|e| context(e, format!("sending datagram {count} on UDP flow {flow}")))?;
            count += 1;
        }
        sent.store(count, Ordering::Release);
        receiver.join().expect("the receiver does not panic")
    })?;
    let elapsed = (last - start).as_secs_f64();
    if received == 0 || elapsed <= 0.0 {
        return Err(MeasureError::Traffic("no datagram of the round arrived".into()).into());
    }
    Ok(received as f64 / elapsed)
}

/// Receives on every listener until as many datagrams as `sent` says arrived, or none came
/// for [`STRAGGLERS`] after the sender finished; returns the count and the last arrival.
fn receive_all(
    listeners: &[Option<Listener>],
    sent: &AtomicUsize,
    start: Instant,
) -> io::Result<(usize, Instant)> {
    let (mut received, mut last) = (0, start);
    loop {
        let taken = drain(listeners)?;
        if taken > 0 {
            received += taken;
            last = Instant::now();
        }
        let sent = sent.load(Ordering::Acquire);
        let done = sent != NOT_YET && (received >= sent || last.elapsed() > STRAGGLERS);
        if done || start.elapsed() > ROUND_LIMIT + STRAGGLERS {
            return Ok((received, last));
        }
    }
}

/// Connected UDP sockets to `target`, one per source address.
pub(super) fn senders(
    target: SocketAddr,
    sources: impl IntoIterator<Item = SocketAddr>,
) -> Result<Vec<UdpSocket>> {
    sources
        .into_iter()
        .map(|source| {
            let socket = UdpSocket::bind(source)?;
            socket.connect(target)?;
            Ok(socket)
        })
        .collect::<std::io::Result<_>>()
        .map_err(|e| context(e, format!("opening UDP flows to {target}")).into())
}

/// `count` times the loopback address with port 0: sources the kernel gives a port each.
pub(super) fn ephemeral(count: usize) -> impl Iterator<Item = SocketAddr> {
    std::iter::repeat_n(flows::loopback(false, 0), count)
}

/// Receives every datagram waiting on `listeners`; returns how many.
pub(super) fn drain(listeners: &[Option<Listener>]) -> io::Result<usize> {
    let mut buffer = [std::mem::MaybeUninit::<u8>::uninit(); 16];
    let mut taken = 0;
    for (index, listener) in listeners.iter().enumerate() {
        let Some(listener) = listener else { continue };
        let socket = SockRef::from(listener);
        loop {
            match socket.recv(&mut buffer) {
                Ok(_) => taken += 1,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(context(e, format!("receiving on listener {index}"))),
            }
        }
    }
    Ok(taken)
}

/// `tcp_overhead`: connections per second, each connected, accepted and closed (the client
/// resets, so no `TIME_WAIT` piles up), one after another.
pub fn tcp(pins: &Path, budget: &Budget) -> Result<Figure> {
    let target = flows::loopback(false, TCP_PORT);
    let service = "tcp-overhead";
    let (listeners, group) = group(pins, service, Proto::Tcp, target, LISTENERS, 0)?;
    let member = listeners[0].as_ref().expect("all open").as_fd();
    let rates = interleaved(&group, member, budget.overhead_rounds, || {
        tcp_round(target, &listeners, budget.tcp_connections)
    })?;
    drop(group);
    drop(listeners);
    Dataplane::remove_pins(pins, service)?;
    figure("tcp_overhead", &rates)
}

/// One TCP round; see [`tcp`].
fn tcp_round(
    target: SocketAddr,
    listeners: &[Option<Listener>],
    connections: usize,
) -> Result<f64> {
    let start = Instant::now();
    let mut done = 0;
    while done < connections && start.elapsed() < ROUND_LIMIT {
        let what = || format!("TCP connection {done} to {target}");
        let client = Socket::new(Domain::IPV4, socket2::Type::STREAM, None)
            .and_then(|client| {
                client.set_linger(Some(Duration::ZERO))?;
                client.connect(&target.into())?;
                Ok(client)
            })
            .map_err(|e| context(e, what()))?;
        let accepted = accept_one(listeners, start).map_err(|e| context(e, what()))?;
        drop(client);
        drop(accepted);
        done += 1;
    }
    Ok(done as f64 / start.elapsed().as_secs_f64())
}

/// The one connection waiting on some listener.
fn accept_one(
    listeners: &[Option<Listener>],
    start: Instant,
) -> io::Result<Vec<(Socket, SocketAddr)>> {
    loop {
        for listener in listeners.iter().flatten() {
            let accepted = listener.accept_waiting()?;
            if !accepted.is_empty() {
                return Ok(accepted);
            }
        }
        if start.elapsed() > ROUND_LIMIT {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "never accepted"));
        }
    }
}
