//! `portshard upgrade`: the daemon replaces itself with the binary now on disk, keeping its
//! pid (so systemd and the workers, its children, see no change), the way nginx upgrades
//! its binary, then the new image adopts the pins and workers exactly as a restarted
//! daemon does.
//!
//! 1. The new binary is run in check mode ([`CHECK_ENV`]): it reads the config and checks
//!    every service's pins (layout, maps, recorded service) without changing anything. A
//!    refusal ends the upgrade there; this daemon serves on.
//! 2. The daemon executes the new binary in its own process, with its original arguments.
//!    The pin root's lock, the control listener, the asking client's connection and the
//!    old image (opened) stay open across the exec, named in [`handover::ENV`].
//! 3. The new image adopts everything and answers the client. If it cannot, it executes
//!    the old image again, which adopts everything back and answers with the reason.
use std::{
    ffi::{CString, OsString},
    io::{self, Write as _},
    os::{
        fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd, RawFd},
        unix::{ffi::OsStrExt as _, net::UnixStream},
    },
    path::{Path, PathBuf},
    time::Duration,
};

use rustix::io::{FdFlags, fcntl_getfd, fcntl_setfd};
use tracing::{error, info};

use super::{
    DaemonError,
    shell::{Input, Shell},
};
use crate::{
    control::{self, ErrorKind, Reply},
    handover::{self, CHECK_ENV, Handover},
};

/// How long a client's connection may block the daemon on one reply.
const CLIENT_WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// The binary to execute and the arguments this daemon was started with.
#[derive(Clone, Debug)]
pub(super) struct Image {
    exe: PathBuf,
    args: Vec<OsString>,
}

impl Image {
    /// This daemon's binary path (where a package upgrade puts the new one, even if the
    /// running file was replaced since) and arguments.
    pub(super) fn current() -> io::Result<Self> {
        Ok(Self {
            exe: installed_path(std::env::current_exe()?),
            args: std::env::args_os().skip(1).collect(),
        })
    }
}

/// Where the binary behind `exe` (`/proc/self/exe`'s target) is installed: a file replaced
/// since it started reads as "<path> (deleted)", and the new one is at <path>.
fn installed_path(exe: PathBuf) -> PathBuf {
    match exe.to_str().and_then(|e| e.strip_suffix(" (deleted)")) {
        Some(path) => PathBuf::from(path),
        None => exe,
    }
}

/// The descriptors this daemon hands to its next image.
#[derive(Clone, Copy, Debug)]
pub(super) struct Handles {
    /// The pin root's lock.
    pub(super) lock: RawFd,
    /// The control socket's listener.
    pub(super) control: RawFd,
}

/// Writes `reply` on `client`; a client that went away misses it.
pub(super) fn reply(client: &mut UnixStream, reply: &Reply) {
    let _ = client.write_all(&control::encode_reply(reply));
}

/// Prepares a client connection for replies written from the event loop.
pub(super) fn blocking(client: &UnixStream) {
    let _ = client.set_nonblocking(false);
    let _ = client.set_write_timeout(Some(CLIENT_WRITE_TIMEOUT));
}

fn cloexec(fd: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    let flags = fcntl_getfd(fd)?;
    let flags = if on {
        flags | FdFlags::CLOEXEC
    } else {
        flags - FdFlags::CLOEXEC
    };
    Ok(fcntl_setfd(fd, flags)?)
}

impl Shell {
    /// Step 1: checks the new binary in the background, answering with
    /// [`Input::UpgradeChecked`].
    pub(super) fn upgrade(&mut self, mut client: UnixStream) {
        blocking(&client);
        let refusal = if self.upgrading {
            Some("an upgrade is already under way".to_owned())
        } else if self.supervisor.is_busy() {
            Some("a reload, the removal of a service or the stop is under way: upgrade once it is over".to_owned())
        } else {
            None
        };
        if let Some(refusal) = refusal {
            return reply(&mut client, &Reply::error(refusal));
        }
        let image = match Image::current() {
            Ok(image) => image,
            Err(error) => {
                return reply(
                    &mut client,
                    &Reply::error(format!("cannot find this daemon's binary: {error}")),
                );
            }
        };
        reply(
            &mut client,
            &Reply::Progress {
                message: format!(
                    "checking that {} can take over pid {}'s pins and workers",
                    image.exe.display(),
                    std::process::id()
                ),
            },
        );
        self.upgrading = true;
        let events = self.events.clone();
        std::thread::spawn(move || {
            let checked = check(&image);
            let _ = events.send(Input::UpgradeChecked {
                client,
                image,
                checked,
            });
        });
    }

    /// Step 2: executes the checked binary in place of this one. Returns only if that
    /// could not be done (this daemon serves on, and says why).
    pub(super) fn upgrade_checked(
        &mut self,
        mut client: UnixStream,
        image: Image,
        checked: Result<String, String>,
    ) {
        self.upgrading = false;
        let exe = image.exe.display().to_string();
        let summary = match checked {
            Ok(summary) => summary,
            Err(reason) => {
                let message = format!(
                    "{exe} cannot take over: {reason}; nothing was changed, this daemon (pid {}) serves on",
                    std::process::id()
                );
                error!(%message, "upgrade refused");
                return reply(&mut client, &Reply::error(message));
            }
        };
        if self.supervisor.is_busy() {
            return reply(
                &mut client,
                &Reply::error(
                    "a reload, a removal or the stop began meanwhile: upgrade once it is over",
                ),
            );
        }
        reply(&mut client, &Reply::Progress { message: summary });
        info!(binary = %exe, "upgrade: executing the new binary in place of this one");
        self.reloading(&format!("upgrading to {exe}"));
        let error = execute(&image, self.handles, &client);
        let message = format!(
            "cannot execute {exe}: {error}; nothing was changed, this daemon (pid {}) serves on",
            std::process::id()
        );
        error!(%message, "upgrade failed");
        reply(&mut client, &Reply::error(message));
        self.settle();
    }
}

/// How long the new binary's check may take: it starts, reads the config and the pins and
/// verifies its program; a check still running by then is killed and the upgrade refused.
const CHECK_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `image` in check mode: `Ok` with its summary, or `Err` with why it refuses.
fn check(image: &Image) -> Result<String, String> {
    let child = std::process::Command::new(&image.exe)
        .args(&image.args)
        .env(CHECK_ENV, "1")
        .env_remove(handover::ENV)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|error| format!("cannot run it: {error}"))?;
    let pid = child.id();
    let (done, outcome) = std::sync::mpsc::channel();
    std::thread::spawn(move || done.send(child.wait_with_output()));
    let output = match outcome.recv_timeout(CHECK_TIMEOUT) {
        Ok(output) => output.map_err(|error| format!("waiting for its check: {error}"))?,
        Err(_) => {
            if let Ok(pid) = i32::try_from(pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            return Err(format!(
                "its check (pid {pid}) did not finish within {} s and was killed",
                CHECK_TIMEOUT.as_secs()
            ));
        }
    };
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).trim().to_owned();
    if output.status.success() {
        Ok(text(&output.stdout))
    } else {
        let stderr = text(&output.stderr);
        let reason = stderr.strip_prefix("error: ").unwrap_or(&stderr);
        Err(format!("its check failed ({}): {reason}", output.status))
    }
}

/// Executes `image` in this process, handing over `handles`, `client` and this image.
/// Returns only on failure, with every descriptor as it was.
fn execute(image: &Image, handles: Handles, client: &UnixStream) -> io::Error {
    let previous = match rustix::fs::open(
        "/proc/self/exe",
        rustix::fs::OFlags::RDONLY,
        rustix::fs::Mode::empty(),
    ) {
        Ok(previous) => previous,
        Err(error) => return error.into(),
    };
    let handover = Handover {
        lock: handles.lock,
        control: handles.control,
        client: client.as_raw_fd(),
        previous: Some(previous.as_raw_fd()),
        failed: None,
    };
    // SAFETY: both descriptors stay open in this process for as long as it runs.
    let (lock, control) = unsafe {
        (
            BorrowedFd::borrow_raw(handles.lock),
            BorrowedFd::borrow_raw(handles.control),
        )
    };
    let kept = [lock, control, client.as_fd(), previous.as_fd()];
    if let Err(error) = kept.iter().try_for_each(|fd| cloexec(*fd, false)) {
        kept.iter().for_each(|fd| drop(cloexec(*fd, true)));
        return error;
    }
    let argv: Vec<CString> = std::iter::once(image.exe.as_os_str())
        .chain(image.args.iter().map(OsString::as_os_str))
        .filter_map(|arg| CString::new(arg.as_bytes()).ok())
        .collect();
    let error = match CString::new(image.exe.as_os_str().as_bytes()) {
        Ok(path) => exec_with_signals_held(
            |env| nix::unistd::execve(&path, &argv, env).map(drop),
            &handover,
        ),
        Err(_) => io::Error::other("the binary's path holds a NUL byte"),
    };
    kept.iter().for_each(|fd| drop(cloexec(*fd, true)));
    error
}

/// The signals that must not end the daemon between `execve` and the next image's
/// handlers: held (blocked) across the exec, delivered once the next image handles them
/// ([`release_signals`]).
fn held_signals() -> nix::sys::signal::SigSet {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    for signal in [Signal::SIGHUP, Signal::SIGTERM, Signal::SIGINT] {
        set.add(signal);
    }
    set
}

/// Runs `exec` (an `execve` that returns only on failure) with this process's environment
/// (less the check variable) plus `handover`, and [`held_signals`] blocked. Raw `execve`,
/// not `Command::exec`: that resets the signal mask and SIGPIPE's disposition, for good if
/// the exec then fails. On failure the mask is put back and the error returned.
fn exec_with_signals_held(
    exec: impl FnOnce(&[CString]) -> nix::Result<()>,
    handover: &Handover,
) -> io::Error {
    use nix::sys::signal::{SigmaskHow, sigprocmask};
    let env: Vec<CString> = std::env::vars_os()
        .filter(|(key, _)| key != handover::ENV && key != CHECK_ENV)
        .chain([(handover::ENV.into(), handover.to_string().into())])
        .filter_map(|(key, value)| crate::process::env_entry(&key, &value))
        .collect();
    let mut before = nix::sys::signal::SigSet::empty();
    if let Err(errno) = sigprocmask(
        SigmaskHow::SIG_BLOCK,
        Some(&held_signals()),
        Some(&mut before),
    ) {
        return errno.into();
    }
    let error = match exec(&env) {
        Ok(()) => io::Error::other("execve returned without an error"),
        Err(errno) => errno.into(),
    };
    let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&before), None);
    error
}

/// In an image started by an upgrade (or not: it is harmless), delivers the signals held
/// across the exec, now that their handlers are installed.
pub(super) fn release_signals() {
    use nix::sys::signal::{SigmaskHow, sigprocmask};
    let _ = sigprocmask(SigmaskHow::SIG_UNBLOCK, Some(&held_signals()), None);
}

/// In a new image that could not take over: executes the previous image again, with the
/// same arguments and handles, telling it why. Returns only if that failed too.
pub fn go_back(handover: &Handover, reason: &str) -> io::Error {
    let Some(previous) = handover.previous else {
        return io::Error::other("no previous image to go back to");
    };
    let back = Handover {
        previous: None,
        failed: Some(reason.to_owned()),
        ..handover.clone()
    };
    let args: Vec<CString> = std::env::args_os()
        .filter_map(|arg| CString::new(arg.as_bytes()).ok())
        .collect();
    // SAFETY: the descriptor was handed over open by the previous image.
    let previous = unsafe { BorrowedFd::borrow_raw(previous) };
    // Closed by the exec itself (an ELF needs no open descriptor to run), so the image
    // gone back to does not keep its own file open.
    if let Err(error) = cloexec(previous, true) {
        return error;
    }
    exec_with_signals_held(
        |env| nix::unistd::fexecve(previous, &args, env).map(drop),
        &back,
    )
}

/// The descriptors a handover names, as the new image uses them: copies, close-on-exec
/// (workers never inherit them). The handed-over descriptors stay open as they are until
/// the new image serves ([`finish`]), so one that cannot take over can still hand them
/// back ([`go_back`]).
pub(super) struct TakenOver {
    /// The pin root's lock, checked to be on the pin root.
    pub(super) lock: OwnedFd,
    /// The control listener.
    pub(super) control: std::os::unix::net::UnixListener,
    /// The asking client.
    pub(super) client: UnixStream,
}

/// Takes copies of what `handover` names; the lock must be on `root`.
pub(super) fn take_over(handover: &Handover, root: &Path) -> Result<TakenOver, DaemonError> {
    let io_error = |what: &'static str| {
        let path = format!("the {what} descriptor handed over for {}", root.display());
        move |source: io::Error| DaemonError::Io {
            action: "taking over",
            path,
            source,
        }
    };
    let copy = |fd: RawFd, what: &'static str| {
        // SAFETY: the previous image handed this descriptor over open; it stays open (see
        // `finish`), and only a copy is owned here.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        rustix::io::fcntl_dupfd_cloexec(fd, 3).map_err(|e| io_error(what)(e.into()))
    };
    let lock = copy(handover.lock, "lock")?;
    let control = copy(handover.control, "control socket")?;
    let client = copy(handover.client, "client")?;
    let locked = rustix::fs::fstat(&lock).map_err(|e| io_error("lock")(e.into()))?;
    let on_root = rustix::fs::stat(root).map_err(|e| io_error("lock")(e.into()))?;
    if (locked.st_dev, locked.st_ino) != (on_root.st_dev, on_root.st_ino) {
        return Err(io_error("lock")(io::Error::other(
            "it is not the pin root: was --bpffs changed?",
        )));
    }
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive)
        .map_err(|e| io_error("lock")(e.into()))?;
    let control = std::os::unix::net::UnixListener::from(control);
    control
        .set_nonblocking(true)
        .map_err(io_error("control socket"))?;
    let client = UnixStream::from(client);
    blocking(&client);
    Ok(TakenOver {
        lock,
        control,
        client,
    })
}

/// The new image serves: closes the handed-over descriptors (its copies stay), the old
/// image's included, so its file is freed once replaced on disk.
pub(super) fn finish(handover: &Handover) {
    let handed = [handover.lock, handover.control, handover.client]
        .into_iter()
        .chain(handover.previous);
    for fd in handed {
        // SAFETY: handed over open, owned by nothing in this image but this call.
        drop(unsafe { OwnedFd::from_raw_fd(fd) });
    }
}

/// The final reply of an upgrade, from the image that serves after it: the new one
/// (`Done`), or the previous one gone back to (`Error`, with why).
pub(super) fn outcome(handover: &Handover, programs: &str) -> Reply {
    let pid = std::process::id();
    match &handover.failed {
        None => Reply::Done {
            message: format!(
                "upgraded: pid {pid} now runs portshard {} ({programs})",
                env!("CARGO_PKG_VERSION")
            ),
            moved: 0,
        },
        Some(reason) => Reply::Error {
            message: format!(
                "the new binary could not take over: {reason}; the previous binary serves again as pid {pid} ({programs})"
            ),
            kind: ErrorKind::RolledBack,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replaced_binary_is_looked_for_where_it_was_installed() {
        for (running, installed) in [
            ("/usr/bin/portshard", "/usr/bin/portshard"),
            ("/usr/bin/portshard (deleted)", "/usr/bin/portshard"),
            ("/opt/a (deleted) b", "/opt/a (deleted) b"),
        ] {
            assert_eq!(installed_path(running.into()), PathBuf::from(installed));
        }
    }

    #[test]
    fn the_final_reply_names_the_image_that_serves() {
        let handover = Handover {
            lock: 3,
            control: 4,
            client: 5,
            previous: Some(6),
            failed: None,
        };
        let done = outcome(&handover, "dns program 00ff");
        assert!(
            matches!(&done, Reply::Done { message, .. } if message.starts_with("upgraded: pid ") && message.ends_with("(dns program 00ff)"))
        );
        let back = Handover {
            failed: Some("no BPF".to_owned()),
            previous: None,
            ..handover
        };
        match outcome(&back, "dns program 00ff") {
            Reply::Error { message, kind } => {
                assert_eq!(kind, ErrorKind::RolledBack);
                assert!(message.contains("could not take over: no BPF"), "{message}");
                assert!(
                    message.contains("the previous binary serves again"),
                    "{message}"
                );
            }
            other => panic!("{other:?}"),
        }
    }
}
