//! A private network namespace for the calling thread, with loopback up, so a test's sockets
//! and traffic touch nothing else on the machine.
use crate::context;
use std::{
    fs::File,
    io,
    marker::PhantomData,
    os::fd::{AsRawFd as _, OwnedFd},
};

/// The calling thread, moved into a fresh network namespace. Dropping the guard moves the
/// thread back; the namespace disappears with its last socket. The guard cannot leave its
/// thread: dropped on another, it would move the wrong thread back.
pub struct NetNs {
    original: OwnedFd,
    _this_thread_only: PhantomData<*const ()>,
}

impl NetNs {
    /// Enters a new network namespace and brings its loopback up. Fails with a message that
    /// says what is missing when the process lacks the privileges (root) to do so.
    pub fn enter() -> io::Result<Self> {
        const OWN: &str = "/proc/thread-self/ns/net";
        let original: OwnedFd = File::open(OWN)
            .map_err(|e| context(e, format!("opening {OWN}")))?
            .into();
        // SAFETY: unshare affects only the calling thread's network namespace.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            let error = io::Error::last_os_error();
            let hint = if error.kind() == io::ErrorKind::PermissionDenied {
                ": kernel tests and the demo must run as root"
            } else {
                ""
            };
            return Err(context(
                error,
                format!("creating a network namespace{hint}"),
            ));
        }
        let guard = Self {
            original,
            _this_thread_only: PhantomData,
        };
        loopback_up().map_err(|e| context(e, "bringing up lo in the new namespace".into()))?;
        Ok(guard)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // SAFETY: `original` is a namespace file descriptor we opened.
        let rc = unsafe { libc::setns(self.original.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc != 0 {
            // A thread left in a test's namespace would run later tests there; stop now, even
            // while unwinding from another failure.
            eprintln!(
                "could not return to the original network namespace: {}",
                io::Error::last_os_error()
            );
            std::process::abort();
        }
    }
}

/// `ip link set lo up`, with the two ioctls it amounts to.
fn loopback_up() -> io::Result<()> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
    // SAFETY: ifreq is plain data; the name fits with its NUL.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in request.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write `request`, which is a valid ifreq.
    unsafe {
        if libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut request) != 0 {
            return Err(context(
                io::Error::last_os_error(),
                "SIOCGIFFLAGS on lo".into(),
            ));
        }
        request.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &request) != 0 {
            return Err(context(
                io::Error::last_os_error(),
                "SIOCSIFFLAGS on lo".into(),
            ));
        }
    }
    Ok(())
}

/// Raises this process's open-file limit to its hard limit: a test holds thousands of
/// client sockets at once.
pub fn raise_fd_limit() -> io::Result<()> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid out-pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(context(
            io::Error::last_os_error(),
            "reading RLIMIT_NOFILE".into(),
        ));
    }
    limit.rlim_cur = limit.rlim_max;
    // SAFETY: `limit` is a valid rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        let what = format!("raising RLIMIT_NOFILE to {}", limit.rlim_max);
        return Err(context(io::Error::last_os_error(), what));
    }
    Ok(())
}
