//! Clients of the workers under test: UDP flows that each keep their 4-tuple, and TCP
//! connections that read the greeting saying who answered.
use std::{
    collections::BTreeMap,
    io::{self, BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    thread,
    time::{Duration, Instant},
};

use super::{Answer, Result};
use crate::{context, scenario::MeasureError};

/// Datagrams sent between two pauses of a round.
const PACE_EVERY: usize = 64;
/// The pause.
const PACE: Duration = Duration::from_micros(500);

/// UDP flows to a service: one socket each, so one 4-tuple each.
pub struct UdpFlows {
    sockets: Vec<UdpSocket>,
    round: u32,
}

impl UdpFlows {
    /// `count` flows from the loopback address of `target`'s family.
    pub fn new(target: SocketAddr, count: usize) -> Result<Self> {
        let local: SocketAddr = if target.is_ipv6() {
            "[::1]:0".parse().expect("literal")
        } else {
            "127.0.0.1:0".parse().expect("literal")
        };
        let sockets = (0..count)
            .map(|flow| {
                let socket = UdpSocket::bind(local)
                    .map_err(|e| context(e, format!("binding flow {flow}")))?;
                socket
                    .connect(target)
                    .map_err(|e| context(e, format!("connecting flow {flow} to {target}")))?;
                socket
                    .set_nonblocking(true)
                    .map_err(|e| context(e, format!("flow {flow}")))?;
                Ok(socket)
            })
            .collect::<Result<_>>()?;
        Ok(Self { sockets, round: 0 })
    }

    /// Sends one datagram on each flow in `which` and collects the answers: `None` for a
    /// flow none answered within `timeout`.
    pub fn round_of(
        &mut self,
        which: &[usize],
        timeout: Duration,
    ) -> Result<BTreeMap<usize, Option<Answer>>> {
        self.round += 1;
        let mut answers: BTreeMap<usize, Option<Answer>> =
            which.iter().map(|&f| (f, None)).collect();
        for (sent, &flow) in which.iter().enumerate() {
            // Paced, so a burst never overflows a worker's receive buffer (about 270
            // small datagrams by default): loss then means steering lost the flow.
            if sent % PACE_EVERY == PACE_EVERY - 1 {
                thread::sleep(PACE);
            }
            let payload = format!("r{} f{flow}", self.round);
            match self.sockets[flow].send(payload.as_bytes()) {
                Ok(_) => {}
                // The previous round's worker of this flow may just have died.
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
                Err(e) => return Err(context(e, format!("sending on flow {flow}")).into()),
            }
        }
        let deadline = Instant::now() + timeout;
        let mut buffer = [0u8; 512];
        let mut pending: Vec<usize> = which.to_vec();
        // A receive pass always follows the last pause, even one that overshot the deadline.
        loop {
            pending.retain(|&flow| {
                let expected = format!("r{} f{flow}", self.round);
                loop {
                    match self.sockets[flow].recv(&mut buffer) {
                        Ok(n) => {
                            let text = String::from_utf8_lossy(&buffer[..n]);
                            if let Some((answer, rest)) = Answer::parse(&text)
                                && rest == expected
                            {
                                answers.insert(flow, Some(answer));
                                return false;
                            }
                        }
                        Err(_) => return true,
                    }
                }
            });
            if pending.is_empty() || Instant::now() >= deadline {
                break;
            }
            thread::sleep(Duration::from_micros(200));
        }
        Ok(answers)
    }

    /// [`UdpFlows::round_of`] over every flow.
    pub fn round(&mut self, timeout: Duration) -> Result<Vec<Option<Answer>>> {
        let all: Vec<usize> = (0..self.sockets.len()).collect();
        Ok(self.round_of(&all, timeout)?.into_values().collect())
    }

    /// [`UdpFlows::round`], then the flows left unanswered asked again, up to `again` more
    /// times. On a loaded host a worker's receive buffer can overflow and drop a datagram,
    /// which is no steering fault; a flow steered where nobody reads stays unanswered.
    pub fn round_again_if_lost(
        &mut self,
        timeout: Duration,
        again: usize,
    ) -> Result<Vec<Option<Answer>>> {
        let mut answers = self.round(timeout)?;
        for _ in 0..again {
            let lost: Vec<usize> = (0..answers.len())
                .filter(|&f| answers[f].is_none())
                .collect();
            if lost.is_empty() {
                break;
            }
            for (flow, answer) in self.round_of(&lost, timeout)? {
                answers[flow] = answer;
            }
        }
        Ok(answers)
    }

    /// Every flow's answer, sending again to the flows not yet answered until all are or
    /// `timeout` passes: for a baseline while freshly started workers begin reading.
    pub fn settle(&mut self, timeout: Duration) -> Result<Vec<Answer>> {
        let deadline = Instant::now() + timeout;
        let mut answers: BTreeMap<usize, Option<Answer>> =
            (0..self.sockets.len()).map(|f| (f, None)).collect();
        loop {
            let missing: Vec<usize> = answers
                .iter()
                .filter(|(_, a)| a.is_none())
                .map(|(&f, _)| f)
                .collect();
            if missing.is_empty() {
                return Ok(answers
                    .into_values()
                    .map(|a| a.expect("all answered"))
                    .collect());
            }
            if Instant::now() > deadline {
                return Err(MeasureError::Traffic(format!(
                    "{} of {} flows never answered within {timeout:?}",
                    missing.len(),
                    self.sockets.len()
                )));
            }
            for (flow, answer) in self.round_of(&missing, Duration::from_millis(500))? {
                answers.insert(flow, answer);
            }
        }
    }

    /// Sends on `flow` every `interval` until an answer satisfies `wanted`, and returns when
    /// that happened and the answer; `None` after `timeout`.
    pub fn first_answer(
        &mut self,
        flow: usize,
        wanted: impl Fn(Answer) -> bool,
        interval: Duration,
        timeout: Duration,
    ) -> Result<Option<(Instant, Answer)>> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(Some(answer)) = self.round_of(&[flow], interval)?.remove(&flow)
                && wanted(answer)
            {
                return Ok(Some((Instant::now(), answer)));
            }
        }
        Ok(None)
    }

    /// How many flows there are.
    pub fn len(&self) -> usize {
        self.sockets.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.sockets.is_empty()
    }
}

/// Opens a TCP connection to `target` and reads the worker's greeting.
pub fn tcp_greeting(target: SocketAddr, timeout: Duration) -> Result<(TcpStream, Answer)> {
    let stream = TcpStream::connect_timeout(&target, timeout)
        .map_err(|e| context(e, format!("connecting to {target}")))?;
    let answer = read_greeting(&stream, timeout)?;
    Ok((stream, answer))
}

/// Reads the `"<slot> <pid>\n"` line a worker sends first on a connection.
pub fn read_greeting(stream: &TcpStream, timeout: Duration) -> Result<Answer> {
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| context(e, "setting a read timeout".into()))?;
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .map_err(|e| context(e, "reading the greeting".into()))?;
    Answer::parse(&line)
        .map(|(answer, _)| answer)
        .ok_or_else(|| MeasureError::Traffic(format!("bad greeting {line:?}")))
}

/// Sends `text` on an open connection and checks it comes back (after the greeting).
pub fn echo(stream: &mut TcpStream, text: &str, timeout: Duration) -> Result<()> {
    stream
        .write_all(text.as_bytes())
        .map_err(|e| context(e, "writing on a held connection".into()))?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| context(e, "setting a read timeout".into()))?;
    let mut back = vec![0u8; text.len()];
    io::Read::read_exact(stream, &mut back).map_err(|e| context(e, "reading the echo".into()))?;
    if back == text.as_bytes() {
        Ok(())
    } else {
        Err(MeasureError::Traffic(format!(
            "echo returned {:?} for {text:?}",
            String::from_utf8_lossy(&back)
        )))
    }
}
