//! Worker processes: started by socket activation, watched and signalled through pidfds,
//! identified across daemon restarts by their start time. Thin wrappers over syscalls.
//!
//! A worker is started with `fork` and `execve` rather than `std::process::Command`,
//! because socket activation needs `LISTEN_PID` to be the worker's own pid, which only the
//! child knows; the child writes it into an environment buffer prepared before the fork,
//! and calls nothing but async-signal-safe functions.
use std::{
    ffi::{CString, OsStr},
    io,
    os::{
        fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd, RawFd},
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

pub use portshard_core::supervisor::Exit;

/// Where `program` would be run from: itself if it names a path, else the first
/// executable of that name on `PATH`.
pub fn resolve(program: &str) -> Result<PathBuf, ProcessError> {
    let not_runnable = |reason: String| ProcessError::NotRunnable {
        program: program.to_owned(),
        reason,
    };
    let executable = |path: &Path| {
        CString::new(path.as_os_str().as_bytes())
            .ok()
            .is_some_and(|c| {
                // SAFETY: `c` is a valid NUL-terminated path.
                unsafe { libc::access(c.as_ptr(), libc::X_OK) == 0 }
            })
            && path.is_file()
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

/// Whom a worker runs as: resolved from the config's `user` and `group` when the daemon
/// starts, applied in the child between fork and exec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credentials {
    /// The uid.
    pub uid: u32,
    /// The primary gid.
    pub gid: u32,
    /// Supplementary groups: the user's, as `/etc/group` lists them, with `gid` among them.
    pub groups: Vec<u32>,
}

impl Credentials {
    /// Resolves `user` (a name or a uid) and `group` (a name or a gid; `None` for the user's
    /// primary group) through the system's user database.
    pub fn lookup(user: &str, group: Option<&str>) -> Result<Self, ProcessError> {
        let missing = |kind, name: &str| ProcessError::NoSuchAccount {
            kind,
            name: name.to_owned(),
        };
        let account = passwd(user).map_err(os(format!("looking up user {user:?}")))?;
        let (uid, primary, name) = match (account, user.parse::<u32>()) {
            (Some(found), _) => found,
            // A bare uid with no passwd entry is allowed when the group is given.
            (None, Ok(uid)) if group.is_some() => (uid, u32::MAX, None),
            (None, _) => return Err(missing("user", user)),
        };
        let gid = match group {
            None => primary,
            Some(group) => {
                match group_id(group).map_err(os(format!("looking up group {group:?}")))? {
                    Some(gid) => gid,
                    None => group.parse().map_err(|_| missing("group", group))?,
                }
            }
        };
        let mut groups = name.map_or_else(Vec::new, |name| supplementary(&name, gid));
        if !groups.contains(&gid) {
            groups.push(gid);
        }
        Ok(Self { uid, gid, groups })
    }
}

/// Runs a reentrant user-database lookup (`getpw*_r`, `getgr*_r`) with a buffer of `size`
/// bytes and `read`s the entry while its strings are valid: `Ok(None)` when there is none.
fn database<T, R>(
    size: usize,
    lookup: impl FnOnce(*mut T, *mut libc::c_char, usize, *mut *mut T) -> libc::c_int,
    read: impl FnOnce(&T) -> R,
) -> io::Result<Option<R>> {
    // SAFETY: the database records are plain C data; zeroed is a valid out-buffer.
    let mut entry: T = unsafe { std::mem::zeroed() };
    let mut buffer = vec![0 as libc::c_char; size];
    let mut found: *mut T = std::ptr::null_mut();
    let rc = lookup(&mut entry, buffer.as_mut_ptr(), buffer.len(), &mut found);
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok((!found.is_null()).then(|| read(&entry)))
}

/// The uid, primary gid and name of `user` (a name, or a uid) from the user database.
fn passwd(user: &str) -> io::Result<Option<(u32, u32, Option<CString>)>> {
    let Ok(c_user) = CString::new(user) else {
        return Ok(None);
    };
    database::<libc::passwd, _>(
        16 * 1024,
        // SAFETY: every pointer is valid for the call; the buffer's length is passed.
        |entry, buffer, len, found| unsafe {
            match user.parse::<u32>() {
                Ok(uid) => libc::getpwuid_r(uid, entry, buffer, len, found),
                Err(_) => libc::getpwnam_r(c_user.as_ptr(), entry, buffer, len, found),
            }
        },
        |entry| {
            // SAFETY: the lookup filled `entry`, whose name points into the live buffer.
            let name = unsafe { std::ffi::CStr::from_ptr(entry.pw_name) }.to_owned();
            (entry.pw_uid, entry.pw_gid, Some(name))
        },
    )
}

/// The gid of `group` (a name or a gid) from the group database, `None` if it has none.
fn group_id(group: &str) -> io::Result<Option<u32>> {
    let Ok(c_group) = CString::new(group) else {
        return Ok(None);
    };
    database::<libc::group, _>(
        64 * 1024,
        // SAFETY: every pointer is valid for the call; the buffer's length is passed.
        |entry, buffer, len, found| unsafe {
            match group.parse::<u32>() {
                Ok(gid) => libc::getgrgid_r(gid, entry, buffer, len, found),
                Err(_) => libc::getgrnam_r(c_group.as_ptr(), entry, buffer, len, found),
            }
        },
        |entry| entry.gr_gid,
    )
}

/// The groups `name` belongs to, `gid` included (`getgrouplist`).
fn supplementary(name: &std::ffi::CStr, gid: u32) -> Vec<u32> {
    let mut groups = vec![0 as libc::gid_t; 256];
    let mut count = groups.len() as libc::c_int;
    // SAFETY: `groups` has room for `count` gids; getgrouplist writes at most that many.
    let rc = unsafe { libc::getgrouplist(name.as_ptr(), gid, groups.as_mut_ptr(), &mut count) };
    groups.truncate(if rc < 0 { 0 } else { count.max(0) as usize });
    groups
}

/// The socket-activation environment of a worker, besides `LISTEN_PID`.
pub struct Activation<'a> {
    /// `LISTEN_FDNAMES`: the service name.
    pub name: &'a str,
    /// `PORTSHARD_SLOT`.
    pub slot: u16,
}

const STRIPPED: [&str; 5] = [
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "PORTSHARD_SLOT",
    "NOTIFY_SOCKET",
];

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

/// Starts `command` (resolved to `program`) with `socket` as fd 3 and the systemd
/// socket-activation variables, in its own process group, with stdin on `/dev/null` and
/// stdout and stderr inherited, every other descriptor closed on exec and no ambient
/// capabilities; as `credentials` when given. The caller keeps its own `socket` and should
/// close it once the worker has it, so the worker's exit closes the socket.
pub fn spawn(
    program: &Path,
    command: &[String],
    socket: BorrowedFd<'_>,
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
        .filter_map(|(key, value)| {
            let mut pair = key.as_bytes().to_vec();
            pair.push(b'=');
            pair.extend_from_slice(value.as_bytes());
            CString::new(pair).ok()
        })
        .collect();
    env.push(cstring(b"LISTEN_FDS=1")?);
    env.push(cstring(
        format!("LISTEN_FDNAMES={}", activation.name).as_bytes(),
    )?);
    env.push(cstring(
        format!("PORTSHARD_SLOT={}", activation.slot).as_bytes(),
    )?);
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
    let high = |fd: RawFd, what: &str| {
        // SAFETY: duplicating an fd we hold; the result is a fresh fd we own.
        let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10) };
        if new < 0 {
            Err(os(format!("duplicating {what} for {name}"))(
                io::Error::last_os_error(),
            ))
        } else {
            // SAFETY: `new` is a fresh fd owned by nobody else.
            Ok(unsafe { OwnedFd::from_raw_fd(new) })
        }
    };
    let null = std::fs::File::open("/dev/null").map_err(os("opening /dev/null"))?;
    let null = high(null.as_raw_fd(), "/dev/null")?;
    let socket = high(socket.as_raw_fd(), "the listening socket")?;
    let (report_read, report_write) = pipe().map_err(os("creating the exec report pipe"))?;
    let identity = credentials.map(|c| (c.uid, c.gid, c.groups.as_slice()));

    // SAFETY: the child only calls async-signal-safe functions on memory prepared above,
    // then execs or exits.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(os(format!("forking a worker for {name}"))(
            io::Error::last_os_error(),
        ));
    }
    if pid == 0 {
        // SAFETY: in the child of a fork: async-signal-safe calls only.
        unsafe {
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            libc::setpgid(0, 0);
            let stage = if libc::dup2(null.as_raw_fd(), 0) != 0
                || libc::dup2(socket.as_raw_fd(), LISTEN_FD) != LISTEN_FD
                // Whatever the daemon inherited or opened without O_CLOEXEC stays behind.
                || libc::syscall(libc::SYS_close_range, LISTEN_FD + 1, u32::MAX, CLOSE_RANGE_CLOEXEC) != 0
            {
                Stage::Fds
            } else if libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            ) != 0
                || identity.is_some_and(|(uid, gid, groups)| {
                    libc::setgroups(groups.len(), groups.as_ptr()) != 0
                        || libc::setresgid(gid, gid, gid) != 0
                        || libc::setresuid(uid, uid, uid) != 0
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
        // SAFETY: reading into the rest of a local buffer.
        let n = unsafe {
            libc::read(
                report_read.as_raw_fd(),
                report[read..].as_mut_ptr().cast(),
                report.len() - read,
            )
        };
        match n {
            0 => break,
            n if n > 0 => read += n as usize,
            _ if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted => {}
            _ => break,
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

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two fds.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both fds are fresh and ours.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// A pidfd on `pid` (`pidfd_open`); fails with `ESRCH` if no such process exists.
pub fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; a non-negative result is a fresh fd.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        Err(io::Error::last_os_error())
    } else {
        // SAFETY: `fd` is a fresh fd we own.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
    }
}

/// Sends `signal` to the process behind `pidfd` (never to a process that reused its pid).
pub fn signal(pidfd: BorrowedFd<'_>, signal: i32) -> io::Result<()> {
    // SAFETY: plain syscall with a valid fd.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Collects the exit of the process behind `pidfd` if it has ended: `Ok(None)` while it
/// runs, [`Exit::Unknown`] if it is not our child.
pub fn reap(pidfd: BorrowedFd<'_>) -> io::Result<Option<Exit>> {
    const P_PIDFD: libc::idtype_t = 3;
    // SAFETY: a zeroed siginfo is a valid out-buffer.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd and out-pointer.
    let rc = unsafe {
        libc::waitid(
            P_PIDFD,
            pidfd.as_raw_fd() as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG,
        )
    };
    if rc != 0 {
        let error = io::Error::last_os_error();
        return if error.raw_os_error() == Some(libc::ECHILD) {
            Ok(Some(Exit::Unknown))
        } else {
            Err(error)
        };
    }
    // SAFETY: waitid filled `info` (or left it zeroed when nothing exited).
    let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
    if pid == 0 {
        return Ok(None);
    }
    Ok(Some(match info.si_code {
        libc::CLD_EXITED => Exit::Code(status),
        _ => Exit::Signal(status),
    }))
}

/// Whether the process behind `pidfd` has ended (its pidfd is readable), without waiting.
pub fn has_exited(pidfd: BorrowedFd<'_>) -> bool {
    let mut poll = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no waiting.
    let ready = unsafe { libc::poll(&mut poll, 1, 0) };
    ready > 0 && poll.revents & libc::POLLIN != 0
}

/// The start time of `pid` in clock ticks after boot (`/proc/<pid>/stat` field 22): with
/// the pid, it names one process for the life of the machine.
pub fn start_time(pid: u32) -> io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_start_time(&stat).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("/proc/{pid}/stat has no start time"),
        )
    })
}

/// Field 22 of a `/proc/<pid>/stat` line; the command name (field 2) may hold spaces and
/// parentheses, so fields are counted after its last `)`.
fn parse_start_time(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// How many established TCP connections with local port `port` the process `pid` holds:
/// its socket descriptors (`/proc/<pid>/fd`) matched against its network namespace's
/// connection tables (`/proc/<pid>/net/tcp` and `tcp6`).
pub fn established_connections(pid: u32, port: u16) -> io::Result<usize> {
    let mut inodes = std::collections::BTreeSet::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        // A descriptor closed while listing is simply not counted.
        let Ok(target) = std::fs::read_link(fd?.path()) else {
            continue;
        };
        if let Some(inode) = target
            .to_str()
            .and_then(|t| t.strip_prefix("socket:["))
            .and_then(|t| t.strip_suffix(']'))
            .and_then(|t| t.parse::<u64>().ok())
        {
            inodes.insert(inode);
        }
    }
    let mut count = 0;
    for table in ["tcp", "tcp6"] {
        match std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) {
            Ok(text) => {
                count += established_inodes(&text, port)
                    .filter(|inode| inodes.contains(inode))
                    .count();
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(count)
}

/// The inodes of the established connections with local port `port` in a
/// `/proc/net/tcp{,6}` table (`sl local_address rem_address st ... inode`, hex ports).
fn established_inodes(table: &str, port: u16) -> impl Iterator<Item = u64> + '_ {
    const ESTABLISHED: &str = "01";
    table.lines().skip(1).filter_map(move |line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let local_port = fields.get(1)?.rsplit_once(':')?.1;
        let local_port = u16::from_str_radix(local_port, 16).ok()?;
        (local_port == port && *fields.get(3)? == ESTABLISHED)
            .then(|| fields.get(9)?.parse().ok())
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn established_connections_are_read_from_the_tcp_table() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:14B4 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 111 1 0 100 0 0 10 0
   1: 0100007F:14B4 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 222 1 0 20 4 30 10 -1
   2: 0100007F:C350 0100007F:14B4 01 00000000:00000000 00:00000000 00000000     0        0 333 1 0 20 4 30 10 -1
   3: 0100007F:14B4 0100007F:C351 06 00000000:00000000 03:00000000 00000000     0        0 0 3 0
";
        assert_eq!(established_inodes(table, 5300).collect::<Vec<_>>(), [222]);
        assert_eq!(established_inodes(table, 50000).collect::<Vec<_>>(), [333]);
    }

    #[test]
    fn this_process_holds_its_connections() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let _client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let _server = listener.accept().unwrap();
        assert_eq!(
            established_connections(std::process::id(), port).unwrap(),
            1
        );
    }

    #[test]
    fn start_time_survives_odd_command_names() {
        let stat = "42 (a) b (c)) S 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(parse_start_time(stat), Some(987_654));
        assert_eq!(parse_start_time("garbage"), None);
    }

    #[test]
    fn this_process_has_a_start_time() {
        assert!(start_time(std::process::id()).unwrap() > 0);
    }

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
