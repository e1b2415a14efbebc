//! A private network namespace for the calling thread, with loopback up, so a test's sockets
//! and traffic touch nothing else on the machine.
use std::{
    fs::File,
    io,
    os::fd::{AsRawFd as _, OwnedFd},
};

/// The calling thread, moved into a fresh network namespace. Dropping the guard moves the
/// thread back; the namespace disappears with its last socket.
pub struct NetNs {
    original: OwnedFd,
}

impl NetNs {
    /// Enters a new network namespace and brings its loopback up. Fails with a message that
    /// says what is missing when the process lacks the privileges (root) to do so.
    pub fn enter() -> io::Result<Self> {
        let original: OwnedFd = File::open("/proc/thread-self/ns/net")?.into();
        // SAFETY: unshare affects only the calling thread's network namespace.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            let error = io::Error::last_os_error();
            return Err(io::Error::new(
                error.kind(),
                format!(
                    "creating a network namespace failed ({error}): kernel tests must run as root"
                ),
            ));
        }
        let guard = Self { original };
        loopback_up()?;
        Ok(guard)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // SAFETY: `original` is a namespace file descriptor we opened.
        let rc = unsafe { libc::setns(self.original.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "could not return to the original network namespace: {}",
            io::Error::last_os_error()
        );
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
            return Err(io::Error::last_os_error());
        }
        request.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &request) != 0 {
            return Err(io::Error::last_os_error());
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
        return Err(io::Error::last_os_error());
    }
    limit.rlim_cur = limit.rlim_max;
    // SAFETY: `limit` is a valid rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
