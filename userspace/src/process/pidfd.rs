//! Processes through pidfds (via `rustix`): a signal sent through a pidfd never reaches a
//! process that reused the pid, and a pidfd becomes readable when its process ends.
use std::{io, os::fd::BorrowedFd, os::fd::OwnedFd};

use rustix::{
    event::{PollFd, PollFlags},
    process::{Pid, PidfdFlags, WaitId, WaitIdOptions},
};

use crate::supervisor::{Exit, Signal};

/// A pidfd on `pid` (`pidfd_open`); fails with `ESRCH` if no such process exists.
pub fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    let pid = i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::ESRCH))?;
    Ok(rustix::process::pidfd_open(pid, PidfdFlags::empty())?)
}

/// Sends `signal` to the process behind `pidfd`.
pub fn signal(pidfd: BorrowedFd<'_>, signal: Signal) -> io::Result<()> {
    let signal = match signal {
        Signal::Term => rustix::process::Signal::TERM,
        Signal::Kill => rustix::process::Signal::KILL,
    };
    Ok(rustix::process::pidfd_send_signal(pidfd, signal)?)
}

/// Collects the exit of the process behind `pidfd` if it has ended: `Ok(None)` while it
/// runs, [`Exit::Unknown`] if it is not our child.
pub fn reap(pidfd: BorrowedFd<'_>) -> io::Result<Option<Exit>> {
    match rustix::process::waitid(
        WaitId::PidFd(pidfd),
        WaitIdOptions::EXITED | WaitIdOptions::NOHANG,
    ) {
        Ok(None) => Ok(None),
        Ok(Some(status)) => Ok(Some(
            match (status.exit_status(), status.terminating_signal()) {
                (Some(code), _) => Exit::Code(code),
                (None, Some(signal)) => Exit::Signal(signal),
                (None, None) => Exit::Unknown,
            },
        )),
        Err(rustix::io::Errno::CHILD) => Ok(Some(Exit::Unknown)),
        Err(error) => Err(error.into()),
    }
}

/// Whether the process behind `pidfd` has ended (its pidfd is readable), without waiting.
pub fn has_exited(pidfd: BorrowedFd<'_>) -> bool {
    let mut fds = [PollFd::new(&pidfd, PollFlags::IN)];
    let zero = rustix::event::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    matches!(rustix::event::poll(&mut fds, Some(&zero)), Ok(n) if n > 0)
        && fds[0].revents().contains(PollFlags::IN)
}
