//! The real `portshard serve` as tests and the demo drive it: started on a private pin root
//! and control socket, watched through its pins, killed and restarted; and the clients that
//! talk to its workers, which say who answered (`"<slot> <pid>"`, the protocol of
//! `portshard echo` and of the tests' Python worker).
use std::{
    collections::BTreeMap,
    io::{self, BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    os::{
        fd::{AsFd as _, AsRawFd as _, FromRawFd as _},
        unix::net::UnixStream,
    },
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use portshard::{
    control::{self, Reply, Request},
    dataplane::Dataplane,
    report::ServiceStatus,
    table::Slot,
};

use crate::{context, scenario::MeasureError};

type Result<T, E = MeasureError> = std::result::Result<T, E>;

/// Which worker answered: its slot and pid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Answer {
    /// The worker's `PORTSHARD_SLOT`.
    pub slot: Slot,
    /// The worker's pid.
    pub pid: u32,
}

impl Answer {
    /// Parses `"<slot> <pid>"` at the start of `text`; the rest is returned.
    fn parse(text: &str) -> Option<(Self, &str)> {
        let mut parts = text.splitn(3, ' ');
        let slot = parts.next()?.parse().ok()?;
        let pid = parts.next()?.trim_end().parse().ok()?;
        Some((Self { slot, pid }, parts.next().unwrap_or("")))
    }
}

/// The `portshard` binary cargo built next to the running one (the demo's, the soak's).
pub fn portshard_exe() -> Result<PathBuf> {
    let exe =
        std::env::current_exe().map_err(|e| context(e, "finding this program's path".into()))?;
    let portshard = exe.with_file_name("portshard");
    if portshard.is_file() {
        Ok(portshard)
    } else {
        Err(MeasureError::Traffic(format!(
            "{} is missing: build it first (`cargo xtask demo` and `cargo xtask soak` do)",
            portshard.display()
        )))
    }
}

/// A `portshard serve` process on its own pin root and control socket, with its log in a
/// file (its workers inherit stderr and outlive it, so a pipe would never close).
pub struct DaemonRun {
    exe: PathBuf,
    /// `None`: the built-in default.
    config: Option<PathBuf>,
    pins: PathBuf,
    control: PathBuf,
    log: PathBuf,
    /// More arguments for `serve`, e.g. `--metrics ADDR`.
    args: Vec<String>,
    /// More environment variables, e.g. systemd's `NOTIFY_SOCKET`.
    env: Vec<(String, String)>,
    child: Option<Child>,
}

impl DaemonRun {
    /// Writes `config` next to the control socket and starts `exe serve` on `pins`.
    pub fn start(exe: &Path, config: &str, pins: &Path) -> Result<Self> {
        Self::start_with(exe, Some(config), pins, &[])
    }

    /// [`DaemonRun::start`] with more arguments for `serve`, e.g. `--metrics ADDR`.
    pub fn start_with_args(exe: &Path, config: &str, pins: &Path, args: &[&str]) -> Result<Self> {
        Self::start_with(exe, Some(config), pins, args)
    }

    /// Starts `exe serve` on `pins` with no `--config`: the built-in default services.
    pub fn start_builtin(exe: &Path, pins: &Path) -> Result<Self> {
        Self::start_with(exe, None, pins, &[])
    }

    /// [`DaemonRun::start`] with more environment variables, e.g. systemd's.
    pub fn start_with_env(
        exe: &Path,
        config: &str,
        pins: &Path,
        env: &[(&str, &str)],
    ) -> Result<Self> {
        let mut run = Self::prepare(exe, Some(config), pins, &[])?;
        run.env = env
            .iter()
            .map(|&(key, value)| (key.to_owned(), value.to_owned()))
            .collect();
        run.spawn()?;
        Ok(run)
    }

    fn start_with(exe: &Path, config: Option<&str>, pins: &Path, args: &[&str]) -> Result<Self> {
        let mut run = Self::prepare(exe, config, pins, args)?;
        run.spawn()?;
        Ok(run)
    }

    fn prepare(exe: &Path, config: Option<&str>, pins: &Path, args: &[&str]) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!(
            "portshard-daemon-{}",
            pins.file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
        ));
        std::fs::create_dir_all(&dir)
            .map_err(|e| context(e, format!("creating {}", dir.display())))?;
        let config_path = config
            .map(|config| {
                let path = dir.join("portshard.toml");
                std::fs::write(&path, config)
                    .map_err(|e| context(e, format!("writing {}", path.display())))?;
                Ok::<_, MeasureError>(path)
            })
            .transpose()?;
        Ok(Self {
            exe: exe.to_path_buf(),
            config: config_path,
            pins: pins.to_path_buf(),
            control: dir.join("control.sock"),
            log: dir.join("daemon.log"),
            args: args.iter().map(|&arg| arg.to_owned()).collect(),
            env: Vec::new(),
            child: None,
        })
    }

    /// Starts the daemon (again) with the same config, pins and control socket.
    pub fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| context(e, format!("opening {}", self.log.display())))?;
        let mut command = Command::new(&self.exe);
        command.arg("serve");
        if let Some(config) = &self.config {
            command.arg("--config").arg(config);
        }
        let child = command
            .arg("--bpffs")
            .arg(&self.pins)
            .arg("--control")
            .arg(&self.control)
            .args(&self.args)
            .envs(self.env.iter().map(|(key, value)| (key, value)))
            .stdin(Stdio::null())
            .stdout(
                log.try_clone()
                    .map_err(|e| context(e, "duplicating the log fd".into()))?,
            )
            .stderr(log)
            .spawn()
            .map_err(|e| context(e, format!("starting {}", self.exe.display())))?;
        self.child = Some(child);
        Ok(())
    }

    /// Waits until the daemon answers on its control socket.
    pub fn wait_control(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.request(&Request::Ping).is_ok() {
                return Ok(());
            }
            if let Some(child) = &mut self.child
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(MeasureError::Traffic(format!(
                    "the daemon exited with {status}; its log:\n{}",
                    self.log_text()
                )));
            }
            if Instant::now() > deadline {
                return Err(MeasureError::Traffic(format!(
                    "the daemon did not answer on {} within {timeout:?}; its log:\n{}",
                    self.control.display(),
                    self.log_text()
                )));
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits until the daemon answers and every service in `workers` (name, count) has
    /// that many live slots, then returns the status.
    pub fn wait_ready(
        &mut self,
        workers: &[(&str, usize)],
        timeout: Duration,
    ) -> Result<Vec<ServiceStatus>> {
        let deadline = Instant::now() + timeout;
        self.wait_control(timeout)?;
        loop {
            let status = self.status()?;
            let ready = workers.iter().all(|&(name, count)| {
                status.iter().find(|s| s.name == name).is_some_and(|s| {
                    s.slots
                        .iter()
                        .filter(|slot| slot.state == "live" && slot.pid != 0)
                        .count()
                        == count
                })
            });
            if ready {
                return Ok(status);
            }
            if Instant::now() > deadline {
                return Err(MeasureError::Traffic(format!(
                    "services not ready within {timeout:?}: {status:?}; daemon log:\n{}",
                    self.log_text()
                )));
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Every pinned service's status, read from the pins as `portshard status` does.
    pub fn status(&self) -> Result<Vec<ServiceStatus>> {
        Ok(Dataplane::pinned_services(&self.pins)?
            .iter()
            .map(|name| Dataplane::open(&self.pins, name)?.status())
            .collect::<Result<_, _>>()?)
    }

    /// Sends one control request and returns its final reply (a reload's progress lines
    /// are read past).
    pub fn request(&self, request: &Request) -> Result<Reply> {
        control_request(&self.control, request)
    }

    /// `SIGKILL`s the daemon (not its workers) and reaps it.
    pub fn kill9(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child
                .kill()
                .map_err(|e| context(e, "killing the daemon".into()))?;
            child
                .wait()
                .map_err(|e| context(e, "reaping the daemon".into()))?;
        }
        Ok(())
    }

    /// `SIGTERM`s the daemon and waits for it: it stops its workers and removes the pins.
    pub fn terminate(&mut self) -> Result<std::process::ExitStatus> {
        let Some(mut child) = self.child.take() else {
            return Err(MeasureError::Traffic("the daemon is not running".into()));
        };
        // SAFETY: plain kill(2) on our own child, not yet reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        Ok(child
            .wait()
            .map_err(|e| context(e, "waiting for the daemon".into()))?)
    }

    /// Replaces the config file (for `portshard reload` and SIGHUP to read).
    pub fn set_config(&self, config: &str) -> Result<()> {
        let path = self.config.as_ref().ok_or_else(|| {
            MeasureError::Traffic("the daemon runs the built-in default, not a file".into())
        })?;
        std::fs::write(path, config)
            .map_err(|e| context(e, format!("writing {}", path.display())).into())
    }

    /// Sends SIGHUP to the daemon: it reads its config file again.
    pub fn hangup(&self) -> Result<()> {
        let child = self
            .child
            .as_ref()
            .ok_or_else(|| MeasureError::Traffic("the daemon is not running".into()))?;
        signal(child.id(), libc::SIGHUP)
    }

    /// The daemon's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Waits for the daemon to exit by itself (a refused start) and returns its status.
    pub fn wait_exit(&mut self) -> Result<std::process::ExitStatus> {
        let mut child = self
            .child
            .take()
            .ok_or_else(|| MeasureError::Traffic("the daemon is not running".into()))?;
        Ok(child
            .wait()
            .map_err(|e| context(e, "waiting for the daemon".into()))?)
    }

    /// The pin root.
    pub fn pins(&self) -> &Path {
        &self.pins
    }

    /// The control socket.
    pub fn control(&self) -> &Path {
        &self.control
    }

    /// Everything the daemon logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for DaemonRun {
    /// Leaves nothing behind: stops the daemon (which stops its workers); if it is gone,
    /// kills the workers its pins record.
    fn drop(&mut self) {
        if self.terminate().is_err()
            && let Ok(status) = self.status()
        {
            for slot in status.iter().flat_map(|s| &s.slots) {
                if slot.pid != 0 {
                    // SAFETY: plain kill(2); the pid is a worker this run started.
                    unsafe { libc::kill(slot.pid as i32, libc::SIGKILL) };
                }
            }
        }
        if let Some(dir) = self.control.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Each live slot's pid, per service: what must not change across a daemon restart.
pub fn workers(status: &[ServiceStatus]) -> BTreeMap<String, BTreeMap<Slot, u32>> {
    status
        .iter()
        .map(|s| {
            let live = s
                .slots
                .iter()
                .filter(|slot| slot.state == "live")
                .map(|slot| (slot.slot, slot.pid))
                .collect();
            (s.name.clone(), live)
        })
        .collect()
}

/// Sends `request` to the daemon's control socket at `control` and returns the request's
/// final reply; the progress lines before it are skipped. A daemon that goes away first is
/// an error.
pub fn control_request(control: &Path, request: &Request) -> Result<Reply> {
    let mut stream = UnixStream::connect(control)
        .map_err(|e| context(e, format!("connecting to {}", control.display())))?;
    stream
        .write_all(&control::encode_request(request))
        .map_err(|e| context(e, "sending a control request".into()))?;
    let mut replies = BufReader::new(&stream);
    loop {
        let mut line = Vec::new();
        let read = replies
            .read_until(b'\n', &mut line)
            .map_err(|e| context(e, "reading a control reply".into()))?;
        if read == 0 {
            return Err(MeasureError::Traffic(format!(
                "the daemon closed {} before its final reply",
                control.display()
            )));
        }
        let reply = control::decode_reply(line.trim_ascii_end())
            .map_err(|e| MeasureError::Traffic(format!("control reply: {e}")))?;
        if reply.is_final() {
            return Ok(reply);
        }
    }
}

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

/// What became of the TCP connections waiting in a worker's accept queue when it was
/// killed.
#[derive(Debug)]
pub struct KilledWithQueue {
    /// Connections opened in all.
    pub opened: usize,
    /// Connections that waited, unaccepted, in the killed worker's queue.
    pub queued: usize,
    /// Of those, how many were answered by another worker, per slot.
    pub answered_by: BTreeMap<Slot, usize>,
    /// Of those, how many were reset or never answered.
    pub reset: usize,
}

/// Stops the worker `pid` (SIGSTOP), opens `connections` connections to `target`, so the
/// ones steered to it wait in its accept queue, then SIGKILLs it and reads every waiting
/// connection's greeting: with portshard each should come from another worker.
pub fn kill_with_queue(
    pid: u32,
    target: SocketAddr,
    connections: usize,
) -> Result<KilledWithQueue> {
    signal(pid, libc::SIGSTOP)?;
    // kill(2) returns before the stop takes effect: a worker woken in accept(2) meanwhile
    // would still take a connection, and die holding it unanswered.
    wait_stopped(pid, Duration::from_secs(2))?;
    let opened: Vec<TcpStream> = (0..connections)
        .map(|i| {
            TcpStream::connect_timeout(&target, Duration::from_secs(2))
                .map_err(|e| context(e, format!("opening connection {i} to {target}")))
        })
        .collect::<io::Result<_>>()?;
    // Queued at the stopped worker: the connections no worker greets, once as many are
    // left as its listener's accept queue holds (a live worker on a loaded host may be slow
    // to greet, but it does).
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut queued: Vec<&TcpStream> = opened.iter().collect();
    loop {
        queued.retain(|connection| !greeted(connection));
        let waiting = accept_queue_of(pid)?;
        if queued.len() == waiting {
            break;
        }
        if Instant::now() > deadline {
            return Err(MeasureError::Traffic(format!(
                "{} connections still ungreeted, but the stopped worker {pid} has {waiting} queued",
                queued.len()
            )));
        }
        thread::sleep(Duration::from_millis(10));
    }
    signal(pid, libc::SIGKILL)?;
    let mut outcome = KilledWithQueue {
        opened: opened.len(),
        queued: queued.len(),
        answered_by: BTreeMap::new(),
        reset: 0,
    };
    for connection in queued {
        match read_greeting(connection, Duration::from_secs(3)) {
            Ok(answer) => *outcome.answered_by.entry(answer.slot).or_default() += 1,
            Err(_) => outcome.reset += 1,
        }
    }
    Ok(outcome)
}

/// Whether a greeting (any byte) waits on `connection`, without reading it.
fn greeted(connection: &TcpStream) -> bool {
    let mut byte = 0u8;
    // SAFETY: a one-byte peek into a local buffer on a socket we own.
    let peeked = unsafe {
        libc::recv(
            connection.as_raw_fd(),
            (&raw mut byte).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    peeked > 0
}

/// A pidfd of process `pid` (`pidfd_open(2)`).
fn pidfd(pid: u32) -> io::Result<std::os::fd::OwnedFd> {
    // SAFETY: pidfd_open(2) returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the fd was just returned to us and is owned here only.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// How many connections wait in the accept queue of the listening socket worker `pid`
/// holds as fd 3, read through a duplicate of that fd (`pidfd_getfd`).
fn accept_queue_of(pid: u32) -> Result<usize> {
    let fail = |e, what: &str| context(e, format!("{what} of pid {pid}"));
    let pidfd = pidfd(pid).map_err(|e| fail(e, "opening a pidfd"))?;
    // SAFETY: pidfd_getfd(2) on a pidfd we own returns a new fd or -1.
    let socket = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), 3, 0) };
    if socket < 0 {
        return Err(fail(io::Error::last_os_error(), "duplicating fd 3").into());
    }
    // SAFETY: as above.
    let socket = unsafe { std::os::fd::OwnedFd::from_raw_fd(socket as i32) };
    crate::flows::accept_queue_len(socket.as_fd())
        .map_err(|e| fail(e, "reading the accept queue of fd 3").into())
}

/// Waits until every thread of `pid` is stopped (state `T` in `/proc/<pid>/task/*/stat`).
fn wait_stopped(pid: u32, timeout: Duration) -> Result<()> {
    let tasks = PathBuf::from(format!("/proc/{pid}/task"));
    let deadline = Instant::now() + timeout;
    loop {
        let states = std::fs::read_dir(&tasks)
            .and_then(|dir| {
                dir.map(|task| std::fs::read_to_string(task?.path().join("stat")))
                    .collect::<io::Result<Vec<String>>>()
            })
            .map_err(|e| context(e, format!("reading {}", tasks.display())))?;
        // The state follows the command name, which is in parentheses and may hold spaces.
        let stopped = states.iter().all(|stat| {
            stat.rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('T'))
        });
        if stopped {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(MeasureError::Traffic(format!(
                "pid {pid} did not stop within {timeout:?} of SIGSTOP"
            )));
        }
        thread::sleep(Duration::from_millis(1));
    }
}

/// Sends `signal` to `pid`.
pub fn signal(pid: u32, signal: i32) -> Result<()> {
    // SAFETY: plain kill(2).
    if unsafe { libc::kill(pid as i32, signal) } != 0 {
        return Err(context(
            io::Error::last_os_error(),
            format!("sending signal {signal} to pid {pid}"),
        )
        .into());
    }
    Ok(())
}

/// `SIGKILL`s process `pid` and waits, at most `timeout`, for its pidfd (opened before the
/// kill) to fire; returns when it fired, the moment a supervisor watching the same pidfd
/// learns of the exit.
pub fn kill_and_wait(pid: u32, timeout: Duration) -> Result<Instant> {
    let fd = pidfd(pid).map_err(|e| context(e, format!("opening a pidfd of pid {pid}")))?;
    signal(pid, libc::SIGKILL)?;
    wait_pidfd(&fd, pid, timeout)?;
    Ok(Instant::now())
}

/// Waits, at most `timeout`, until `fd` (a pidfd of `pid`) is readable: the process exited.
fn wait_pidfd(fd: &std::os::fd::OwnedFd, pid: u32, timeout: Duration) -> Result<()> {
    let mut poll = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let millis = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: one valid pollfd.
    match unsafe { libc::poll(&mut poll, 1, millis) } {
        1 => Ok(()),
        0 => Err(MeasureError::Traffic(format!(
            "pid {pid} did not exit within {timeout:?}"
        ))),
        _ => Err(context(
            io::Error::last_os_error(),
            format!("waiting for pid {pid} to exit"),
        )
        .into()),
    }
}

/// Waits until process `pid` has exited (its pidfd is readable), at most `timeout`; how
/// long that took. A pid already gone has exited.
pub fn wait_exit(pid: u32, timeout: Duration) -> Result<Duration> {
    let started = Instant::now();
    let fd = match pidfd(pid) {
        Ok(fd) => fd,
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Ok(started.elapsed()),
        Err(e) => return Err(context(e, format!("opening a pidfd of pid {pid}")).into()),
    };
    wait_pidfd(&fd, pid, timeout)?;
    Ok(started.elapsed())
}

/// The metrics text the daemon serves at `GET /metrics` on `address`.
pub fn scrape(address: SocketAddr) -> Result<String> {
    use std::io::{Read as _, Write as _};
    let fail = |e| context(e, format!("scraping http://{address}/metrics"));
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(5)).map_err(fail)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(fail)?;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: portshard\r\n\r\n")
        .map_err(fail)?;
    let mut response = String::new();
    stream.read_to_string(&mut response).map_err(fail)?;
    Ok(response
        .split_once("\r\n\r\n")
        .map_or(response.as_str(), |(_, body)| body)
        .to_owned())
}
