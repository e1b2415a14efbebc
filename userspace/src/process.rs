//! Worker processes: started by socket activation, watched and signalled through pidfds,
//! identified across daemon restarts by their start time. Thin wrappers over syscalls.
//!
//! A worker is started with `fork` and `execve` rather than `std::process::Command`,
//! because socket activation needs `LISTEN_PID` to be the worker's own pid, which only the
//! child knows; the child writes it into an environment buffer prepared before the fork,
//! and calls nothing but async-signal-safe functions: between fork and exec it makes raw
//! `libc` calls only, which allocate nothing. Everything else goes through `rustix`
//! (pidfds, waitid, poll, pipes, fds, access) and `nix` (the user database).
mod accounts;
mod pidfd;
mod sockets;

use nix::unistd::{Gid, Uid};

use std::{
    ffi::{CString, OsStr},
    io,
    os::{
        fd::{AsFd as _, AsRawFd as _, BorrowedFd, OwnedFd, RawFd},
        unix::ffi::OsStrExt as _,
    },
    path::{Path, PathBuf},
};

/// The fd a socket-activated server finds its socket on (`SD_LISTEN_FDS_START`).
pub const LISTEN_FD: RawFd = 3;

/// `close_range(2)` flag: mark the range close-on-exec instead of closing it now, so the
/// exec report pipe still works if exec fails.
const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;

/// A worker could not be started or watched.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The program was not found or cannot be run.
    #[error(
        "cannot run {program:?}: {reason}; give an absolute path or a program on PATH in `command`"
    )]
    NotRunnable {
        /// The program as configured.
        program: String,
        /// Why.
        reason: String,
    },
    /// The configured user or group does not exist.
    #[error(
        "{kind} {name:?} does not exist on this machine: create it, or name another in the service's `{kind}`"
    )]
    NoSuchAccount {
        /// `user` or `group`.
        kind: &'static str,
        /// The name as configured.
        name: String,
    },
    /// The worker could not take on its identity before running the program.
    #[error(
        "worker of {program:?} could not switch to uid {uid} gid {gid}: {reason}; the daemon must run as root to start workers as another user"
    )]
    Identity {
        /// The program as configured.
        program: String,
        /// The uid it was to run as.
        uid: u32,
        /// The gid it was to run as.
        gid: u32,
        /// The kernel's error.
        reason: String,
    },
    /// A syscall failed.
    #[error("{action}: {source}")]
    Os {
        /// What was being done, naming the pid or program.
        action: String,
        /// The kernel's error.
        #[source]
        source: io::Error,
    },
}

fn os(action: impl Into<String>) -> impl FnOnce(io::Error) -> ProcessError {
    let action = action.into();
    move |source| ProcessError::Os { action, source }
}

/// A running worker as its starter knows it.
#[derive(Debug)]
pub struct Spawned {
    /// Its pid.
    pub pid: u32,
    /// A pidfd on it: readable once it exits, and signals sent through it cannot reach a
    /// process that reused the pid.
    pub pidfd: OwnedFd,
}

pub use accounts::Credentials;
pub use pidfd::{has_exited, pidfd_open, reap, signal};
pub use portshard_core::supervisor::Exit;
pub use portshard_dataplane::group::start_time;
pub use sockets::{
    established_connections, held_sockets, holder, member_socket_of, socket_holders, socket_of,
};

/// Where `program` would be run from: itself if it names a path, else the first
/// executable of that name on `PATH`.
pub fn resolve(program: &str) -> Result<PathBuf, ProcessError> {
    let not_runnable = |reason: String| ProcessError::NotRunnable {
        program: program.to_owned(),
        reason,
    };
    let executable = |path: &Path| {
        rustix::fs::access(path, rustix::fs::Access::EXEC_OK).is_ok() && path.is_file()
    };
    if program.contains('/') {
        let path = PathBuf::from(program);
        return if executable(&path) {
            Ok(path)
        } else {
            Err(not_runnable("no executable file at that path".to_owned()))
        };
    }
    let search = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
    std::env::split_paths(&search)
        .map(|dir| dir.join(program))
        .find(|path| executable(path))
        .ok_or_else(|| not_runnable("not found on PATH".to_owned()))
}

/// The socket-activation environment of a worker, besides `LISTEN_PID`.
pub struct Activation<'a> {
    /// `LISTEN_FDNAMES`: each socket's name, in fd order (the service's name alone for a
    /// service with one listener); joined with ':' as systemd does.
    pub names: &'a [String],
    /// `PORTSHARD_SLOT`.
    pub slot: u16,
    /// The `PORTSHARD_QUIC_LB_*` variables of a worker of a `quic` service.
    pub quic_lb: Option<QuicLbEnv>,
}

/// What a worker of a `quic` service needs to issue connection IDs the program steers by
/// (draft-ietf-quic-load-balancers).
pub struct QuicLbEnv {
    /// `PORTSHARD_QUIC_LB_CONFIG_ID`: the config rotation codepoint.
    pub config_id: u8,
    /// `PORTSHARD_QUIC_LB_SERVER_ID`, as lowercase hex: the worker's server ID.
    pub server_id: [u8; portshard_common::quic::SERVER_ID_LEN],
    /// `PORTSHARD_QUIC_LB_NONCE_LEN`: nonce octets after the server ID.
    pub nonce_len: u8,
    /// `PORTSHARD_QUIC_LB_KEY`, as lowercase hex: the AES-128 key of a service whose
    /// connection IDs are encrypted.
    pub key: Option<[u8; 16]>,
}

impl QuicLbEnv {
    /// The variables, as `execve` takes them.
    fn entries(&self) -> Vec<String> {
        let hex = |bytes: &[u8]| -> String { bytes.iter().map(|b| format!("{b:02x}")).collect() };
        let mut entries = vec![
            format!("PORTSHARD_QUIC_LB_CONFIG_ID={}", self.config_id),
            format!("PORTSHARD_QUIC_LB_SERVER_ID={}", hex(&self.server_id)),
            format!("PORTSHARD_QUIC_LB_NONCE_LEN={}", self.nonce_len),
        ];
        entries.extend(
            self.key
                .map(|key| format!("PORTSHARD_QUIC_LB_KEY={}", hex(&key))),
        );
        entries
    }
}

/// The daemon's variables a worker must not see: socket activation's and QUIC-LB's (set
/// anew for the worker) and systemd's notification and watchdog ones, which are the daemon's alone.
const STRIPPED: [&str; 11] = [
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "PORTSHARD_SLOT",
    "PORTSHARD_QUIC_LB_CONFIG_ID",
    "PORTSHARD_QUIC_LB_SERVER_ID",
    "PORTSHARD_QUIC_LB_NONCE_LEN",
    "PORTSHARD_QUIC_LB_KEY",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
];

/// `key=value` as `execve` takes it; `None` if either holds a NUL byte (no such variable
/// can exist).
pub fn env_entry(key: &OsStr, value: &OsStr) -> Option<CString> {
    let mut pair = key.as_bytes().to_vec();
    pair.push(b'=');
    pair.extend_from_slice(value.as_bytes());
    CString::new(pair).ok()
}

/// Where a forked child failed before its program ran, as reported through the exec pipe.
#[derive(Clone, Copy)]
#[repr(i32)]
enum Stage {
    /// Arranging fds 0 and 3.
    Fds = 1,
    /// Taking on the configured uid, gid and groups.
    Identity = 2,
    /// `execve`.
    Exec = 3,
}

/// Starts `command` (resolved to `program`) with `sockets` as fds 3, 4, ... in order and
/// the systemd socket-activation variables (`LISTEN_FDS` their number), in its own process
/// group, with stdin on `/dev/null` and stdout and stderr inherited, every other
/// descriptor closed on exec and no ambient capabilities; as `credentials` when given. The
/// caller keeps its own `sockets` and should close them once the worker has them, so the
/// worker's exit closes them.
pub fn spawn(
    program: &Path,
    command: &[String],
    sockets: &[BorrowedFd<'_>],
    activation: &Activation<'_>,
    credentials: Option<&Credentials>,
) -> Result<Spawned, ProcessError> {
    let name = command.first().map_or("", String::as_str);
    let cstring = |bytes: &[u8]| {
        CString::new(bytes).map_err(|_| ProcessError::NotRunnable {
            program: name.to_owned(),
            reason: "an argument contains a NUL byte".to_owned(),
        })
    };
    let path = cstring(program.as_os_str().as_bytes())?;
    let args = command
        .iter()
        .map(|a| cstring(a.as_bytes()))
        .collect::<Result<Vec<_>, _>>()?;
    let mut env: Vec<CString> = std::env::vars_os()
        .filter(|(key, _)| !STRIPPED.iter().any(|s| OsStr::new(s) == key))
        .filter_map(|(key, value)| env_entry(&key, &value))
        .collect();
    env.push(cstring(format!("LISTEN_FDS={}", sockets.len()).as_bytes())?);
    env.push(cstring(
        format!("LISTEN_FDNAMES={}", activation.names.join(":")).as_bytes(),
    )?);
    env.push(cstring(
        format!("PORTSHARD_SLOT={}", activation.slot).as_bytes(),
    )?);
    for entry in activation.quic_lb.iter().flat_map(QuicLbEnv::entries) {
        env.push(cstring(entry.as_bytes())?);
    }
    // Filled in by the child with its own pid; 20 digits hold any pid.
    let mut listen_pid = b"LISTEN_PID=".to_vec();
    listen_pid.resize(listen_pid.len() + 21, 0);
    let pid_at = b"LISTEN_PID=".len();
    let mut argv: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = env.iter().map(|e| e.as_ptr()).collect();
    envp.push(listen_pid.as_ptr().cast());
    envp.push(std::ptr::null());

    // Every fd the child rearranges sits above 3 first, so no dup2 clobbers another.
    let high = |fd: BorrowedFd<'_>, what: &str| {
        rustix::io::fcntl_dupfd_cloexec(fd, 10)
            .map_err(|e| os(format!("duplicating {what} for {name}"))(e.into()))
    };
    let null = std::fs::File::open("/dev/null").map_err(os("opening /dev/null"))?;
    let null = high(null.as_fd(), "/dev/null")?;
    let sockets = sockets
        .iter()
        .map(|&socket| high(socket, "a listening socket"))
        .collect::<Result<Vec<OwnedFd>, _>>()?;
    // Read by the child: each socket's fd, and where it goes (3, 4, ...).
    let moves: Vec<(RawFd, RawFd)> = sockets
        .iter()
        .zip(LISTEN_FD..)
        .map(|(socket, to)| (socket.as_raw_fd(), to))
        .collect();
    let past_sockets = LISTEN_FD + moves.len() as RawFd;
    let (report_read, report_write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        .map_err(|e| os("creating the exec report pipe")(e.into()))?;
    // Prepared before the fork: the child only passes them to the kernel.
    let identity = credentials.map(|c| {
        let groups: Vec<Gid> = c.groups.iter().copied().map(Gid::from_raw).collect();
        (Uid::from_raw(c.uid), Gid::from_raw(c.gid), groups)
    });

    // SAFETY: the child only calls async-signal-safe functions on memory prepared above,
    // then execs or exits.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(os(format!("forking a worker for {name}"))(
            io::Error::last_os_error(),
        ));
    }
    if pid == 0 {
        // SAFETY: in the child of a fork: async-signal-safe calls only. `nix` and `rustix`
        // wrap each of theirs as one syscall with no allocation; `execve` stays raw because
        // its wrappers build their argument arrays on the heap, `close_range` because neither
        // wraps it.
        unsafe {
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            libc::setpgid(0, 0);
            // Every socket's copy sits at fd 10 or above, so no dup2 to 3.. clobbers another.
            let stage = if libc::dup2(null.as_raw_fd(), 0) != 0
                || moves.iter().any(|&(from, to)| libc::dup2(from, to) != to)
                // Whatever the daemon inherited or opened without O_CLOEXEC stays behind.
                || libc::syscall(libc::SYS_close_range, past_sockets, u32::MAX, CLOSE_RANGE_CLOEXEC) != 0
            {
                Stage::Fds
            } else if rustix::thread::clear_ambient_capability_set().is_err()
                || identity.as_ref().is_some_and(|(uid, gid, groups)| {
                    nix::unistd::setgroups(groups).is_err()
                        || nix::unistd::setresgid(*gid, *gid, *gid).is_err()
                        || nix::unistd::setresuid(*uid, *uid, *uid).is_err()
                })
            {
                Stage::Identity
            } else {
                write_decimal(listen_pid.as_ptr().add(pid_at).cast_mut(), libc::getpid());
                libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr());
                Stage::Exec
            };
            let report = [stage as i32, *libc::__errno_location()];
            libc::write(
                report_write.as_raw_fd(),
                report.as_ptr().cast(),
                size_of_val(&report),
            );
            libc::_exit(127);
        }
    }
    drop(report_write);
    let pid = pid as u32;
    // Our unreaped child cannot be replaced by another process with its pid.
    let pidfd = pidfd_open(pid).map_err(os(format!("opening a pidfd on worker {pid}")))?;
    let mut report = [0u8; 8];
    let mut read = 0;
    while read < report.len() {
        match rustix::io::read(&report_read, &mut report[read..]) {
            Ok(0) => break,
            Ok(n) => read += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(_) => break,
        }
    }
    if read < report.len() {
        return Ok(Spawned { pid, pidfd });
    }
    let _ = reap(pidfd.as_fd());
    let [stage, errno] = [&report[..4], &report[4..]]
        .map(|half| i32::from_ne_bytes(half.try_into().expect("4 bytes")));
    let reason = io::Error::from_raw_os_error(errno).to_string();
    Err(match (stage, credentials) {
        (s, Some(c)) if s == Stage::Identity as i32 => ProcessError::Identity {
            program: name.to_owned(),
            uid: c.uid,
            gid: c.gid,
            reason,
        },
        (s, _) if s == Stage::Fds as i32 => os(format!(
            "arranging fds 0 and 3 for a worker of {name}"
        ))(io::Error::from_raw_os_error(errno)),
        (_, Some(c)) => ProcessError::NotRunnable {
            program: name.to_owned(),
            reason: format!(
                "{reason} (as uid {} gid {}, which must be able to reach and run it)",
                c.uid, c.gid
            ),
        },
        _ => ProcessError::NotRunnable {
            program: name.to_owned(),
            reason,
        },
    })
}

/// Writes `value` in decimal, NUL-terminated, at `at` (which has room for 21 bytes), with
/// no allocation: it runs in a forked child.
///
/// # Safety
/// `at` must be valid for 21 bytes of writes.
unsafe fn write_decimal(at: *mut u8, value: libc::pid_t) {
    let mut digits = [0u8; 20];
    let mut n = value.unsigned_abs();
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in 0..len {
        // SAFETY: i < len <= 20 < 21.
        unsafe { *at.add(i) = digits[len - 1 - i] };
    }
    // SAFETY: len <= 20 < 21.
    unsafe { *at.add(len) = 0 };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_writing_needs_no_allocation() {
        let mut buffer = [0xffu8; 21];
        // SAFETY: the buffer has 21 bytes.
        unsafe { write_decimal(buffer.as_mut_ptr(), 4_194_304) };
        assert_eq!(&buffer[..8], b"4194304\0");
    }

    #[test]
    fn users_and_groups_resolve_by_name_or_id_and_unknown_ones_are_explained() {
        let root = Credentials::lookup("root", None).unwrap();
        assert_eq!((root.uid, root.gid), (0, 0));
        assert!(root.groups.contains(&0));
        assert_eq!(Credentials::lookup("0", Some("root")).unwrap().gid, 0);
        // A bare uid with no passwd entry runs with the group given.
        let bare = Credentials::lookup("4000000", Some("0")).unwrap();
        assert_eq!((bare.uid, bare.gid, bare.groups), (4_000_000, 0, vec![0]));
        for (user, group, message) in [
            (
                "no-such-user-here",
                None,
                "user \"no-such-user-here\" does not exist on this machine",
            ),
            ("4000000", None, "user \"4000000\" does not exist"),
            (
                "root",
                Some("no-such-group-here"),
                "group \"no-such-group-here\" does not exist",
            ),
        ] {
            let error = Credentials::lookup(user, group).unwrap_err().to_string();
            assert!(error.contains(message), "{error}");
        }
    }

    #[test]
    fn missing_programs_are_explained() {
        let error = resolve("surely-no-such-program-here").unwrap_err();
        assert!(error.to_string().contains("not found on PATH"), "{error}");
        let plain =
            std::env::temp_dir().join(format!("portshard-not-executable-{}", std::process::id()));
        std::fs::write(&plain, "data").unwrap();
        let refused = resolve(plain.to_str().unwrap());
        std::fs::remove_file(&plain).unwrap();
        assert!(
            refused
                .unwrap_err()
                .to_string()
                .contains("no executable file")
        );
        assert!(resolve("sh").unwrap().is_absolute());
    }
}
