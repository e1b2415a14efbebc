//! Setting the measured groups up, unmeasured: finding flows whose owner is a listener
//! about to close (the heir path's), and sending flows their first datagrams.
use std::{io, mem::MaybeUninit, net::SocketAddr};

use socket2::SockRef;

use super::{COLD_FLOWS, FIRST_COLD_FLOW, FLOWS};
use crate::{
    bench::{Result, overhead::drain},
    context,
    flood::Flood,
    flows::{self, FIRST_SOURCE_PORT, Flows, Listener},
    scenario::MeasureError,
};
use portshard::socket::Proto;

/// Flows tried to find those whose owner is the heir group's closed listener.
const HEIR_CANDIDATES: usize = 1024;
/// Flood datagrams sent between two drains: few enough that a listener's receive buffer
/// holds them.
const SETUP_BURST: u32 = 256;

/// The flows of the heir group whose owner is listener 0, which is then closed: every
/// datagram of theirs takes the heir path. Returns their source addresses.
pub fn orphan_sources(listeners: &mut [Option<Listener>], port: u16) -> Result<Vec<SocketAddr>> {
    let target = flows::loopback(false, port);
    let landing = Flows::new(Proto::Udp, target, HEIR_CANDIDATES).round(listeners)?;
    listeners[0] = None;
    let sources: Vec<SocketAddr> = (0..HEIR_CANDIDATES)
        .filter(|&flow| landing[flow] == Some(0))
        .take(FLOWS)
        .map(|flow| SocketAddr::new(target.ip(), FIRST_SOURCE_PORT + flow as u16))
        .collect();
    if sources.is_empty() {
        return Err(MeasureError::Traffic(format!(
            "none of {HEIR_CANDIDATES} flows to {target} is owned by listener 0"
        ))
        .into());
    }
    Ok(sources)
}

/// [`COLD_FLOWS`] flood flows from [`FLOOD_RANGES`]`[3]` on whose owner is listener 0,
/// found by where their first datagrams land; listener 0 is then closed, so each of them
/// takes the heir path.
pub fn orphan_flows(flood: &Flood, listeners: &mut [Option<Listener>]) -> Result<Vec<u32>> {
    let mut found = Vec::with_capacity(COLD_FLOWS);
    let first = FIRST_COLD_FLOW;
    let last = first + (COLD_FLOWS * listeners.len() * 2) as u32;
    let mut next = first;
    while found.len() < COLD_FLOWS && next < last {
        flood
            .send(next..next + SETUP_BURST, 1)
            .map_err(|e| context(e, "flooding the cold heir group".into()))?;
        next += SETUP_BURST;
        let owner = listeners[0].as_ref().expect("open until the search ends");
        found.extend(flood_flows(owner).map_err(|e| context(e, "on listener 0".into()))?);
        drain(listeners)?;
    }
    listeners[0] = None;
    if found.len() < COLD_FLOWS {
        return Err(MeasureError::Traffic(format!(
            "only {} of {} flood flows are owned by listener 0, {COLD_FLOWS} are needed",
            found.len(),
            next - first
        ))
        .into());
    }
    found.truncate(COLD_FLOWS);
    Ok(found)
}

/// The flood flows of the datagrams waiting on `listener`, which it receives.
fn flood_flows(listener: &Listener) -> io::Result<Vec<u32>> {
    let socket = SockRef::from(listener);
    let mut buffer = [MaybeUninit::<u8>::uninit(); 16];
    let mut flows = Vec::new();
    loop {
        match socket.recv_from(&mut buffer) {
            Ok((_, from)) => {
                if let Some(SocketAddr::V4(from)) = from.as_socket() {
                    flows.extend(Flood::flow_of(from));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(flows),
            Err(e) => return Err(e),
        }
    }
}

/// Sends `datagrams_each` datagrams from each of `flows`, [`SETUP_BURST`] flows at a
/// time, draining `listeners` in between: setting up state (admitted flows) unmeasured.
pub fn prime(
    flood: &Flood,
    flows: std::ops::Range<u32>,
    datagrams_each: u32,
    listeners: &[Option<Listener>],
) -> Result<()> {
    let mut next = flows.start;
    while next < flows.end {
        let end = (next + SETUP_BURST).min(flows.end);
        flood
            .send(next..end, datagrams_each)
            .map_err(|e| context(e, format!("priming flows {next}..{end}")))?;
        drain(listeners)?;
        next = end;
    }
    Ok(())
}
