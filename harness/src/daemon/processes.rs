//! Workers as processes: signals, kills waited on by pidfd, and a kill with connections
//! waiting in the worker's accept queue.
use std::{
    collections::BTreeMap,
    io,
    net::{SocketAddr, TcpStream},
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _},
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use portshard::table::Slot;

use super::{Result, read_greeting};
use crate::{context, scenario::MeasureError};

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
