//! The real `portshard serve` as tests and the demo drive it: started on a private pin root
//! and control socket, watched through its pins, killed and restarted; and the clients that
//! talk to its workers, which say who answered (`"<slot> <pid>"`, the protocol of
//! `portshard echo` and of the tests' Python worker).
use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpStream},
    os::unix::net::UnixStream,
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

mod clients;
mod processes;

pub use clients::{UdpFlows, echo, read_greeting, tcp_greeting};
pub use processes::{KilledWithQueue, kill_and_wait, kill_with_queue, signal, wait_exit};

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
