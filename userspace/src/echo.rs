//! `portshard echo`: the built-in worker of the default config, a socket-activated echo
//! server that says who answered, so a user (and the demo) sees steering at work.
//!
//! UDP: each datagram is answered with `"<slot> <pid> "` followed by the datagram.
//! TCP: each connection first receives the line `"<slot> <pid>\n"`, then its bytes echoed.
//! It serves every socket it is handed (`LISTEN_FDS`, from fd 3 on), each on its own thread.
use std::{
    io::{self, Read as _, Write as _},
    net::{TcpListener, TcpStream, UdpSocket},
    os::fd::{FromRawFd as _, OwnedFd},
};

use crate::process::LISTEN_FD;

/// The worker was not started by socket activation, or its socket failed.
#[derive(Debug, thiserror::Error)]
pub enum EchoError {
    /// `LISTEN_FDS`/`LISTEN_PID` do not hand this process its sockets.
    #[error(
        "portshard echo is a socket-activated worker: {0}; run it under `portshard serve`, which passes the sockets from fd 3 on"
    )]
    NotActivated(String),
    /// A socket failed.
    #[error("{action} on fd {fd}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The socket's descriptor.
        fd: i32,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// What identifies this worker in its answers.
fn identity() -> String {
    let slot = std::env::var("PORTSHARD_SLOT").unwrap_or_else(|_| "-".to_owned());
    format!("{slot} {}", std::process::id())
}

/// The most sockets `portshard echo` takes: a service's most listeners.
const MAX_SOCKETS: usize = portshard_common::MAX_LISTENERS;

/// Serves the socket-activated sockets until the process is killed, or one of them fails.
pub fn serve() -> Result<(), EchoError> {
    let var = |name: &str| {
        std::env::var(name).map_err(|_| EchoError::NotActivated(format!("{name} is not set")))
    };
    let count = var("LISTEN_FDS")?
        .parse::<usize>()
        .ok()
        .filter(|n| (1..=MAX_SOCKETS).contains(n))
        .ok_or_else(|| {
            EchoError::NotActivated(format!(
                "LISTEN_FDS is not a number from 1 to {MAX_SOCKETS}"
            ))
        })?;
    if var("LISTEN_PID")? != std::process::id().to_string() {
        return Err(EchoError::NotActivated(
            "LISTEN_PID is another process".to_owned(),
        ));
    }
    let fds: Vec<i32> = (LISTEN_FD..).take(count).collect();
    let mut threads = Vec::new();
    for &fd in &fds[1..] {
        // SAFETY: socket activation hands this process fds 3 to 3 + LISTEN_FDS - 1, which
        // nothing else here owns; each is taken once.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        threads.push(std::thread::spawn(move || serve_socket(socket, fd)));
    }
    // SAFETY: as above, for fd 3.
    let first = unsafe { OwnedFd::from_raw_fd(LISTEN_FD) };
    // Each socket is served until the process ends; the first error ends the worker.
    serve_socket(first, LISTEN_FD)?;
    for thread in threads {
        if let Ok(result) = thread.join() {
            result?;
        }
    }
    Ok(())
}

/// Serves one socket: answers its datagrams, or accepts and echoes its connections.
fn serve_socket(socket: OwnedFd, fd: i32) -> Result<(), EchoError> {
    let io = |action| move |source| EchoError::Io { action, fd, source };
    let kind = socket2::SockRef::from(&socket)
        .r#type()
        .map_err(io("reading the socket type"))?;
    let identity = identity();
    if kind == socket2::Type::DGRAM {
        let socket = UdpSocket::from(socket);
        let mut buffer = vec![0u8; 65_536];
        let prefix = format!("{identity} ");
        buffer[..prefix.len()].copy_from_slice(prefix.as_bytes());
        loop {
            let (n, peer) = socket
                .recv_from(&mut buffer[prefix.len()..])
                .map_err(io("receiving"))?;
            // A peer that went away is its own business; keep serving the others.
            let _ = socket.send_to(&buffer[..prefix.len() + n], peer);
        }
    }
    let listener = TcpListener::from(socket);
    loop {
        // Out of descriptors or memory under a storm of connections: the error lasts until
        // something closes, so wait a little rather than spin or exit.
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(error) if is_transient(&error) => {
                std::thread::sleep(std::time::Duration::from_millis(10));
                continue;
            }
            Err(error) => return Err(io("accepting")(error)),
        };
        let greeting = format!("{identity}\n");
        // A thread that cannot be started (too many at once) costs this connection only.
        let _ = std::thread::Builder::new().spawn(move || echo_connection(stream, &greeting));
    }
}

/// Whether a failed `accept` is worth retrying: the listener is fine, the process or the
/// system is short of something for now, or the connection was gone before it was taken.
fn is_transient(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(
            libc::EMFILE
                | libc::ENFILE
                | libc::ENOBUFS
                | libc::ENOMEM
                | libc::ECONNABORTED
                | libc::EINTR
                | libc::EPROTO
                | libc::EPERM
        )
    )
}

fn echo_connection(mut stream: TcpStream, greeting: &str) -> io::Result<()> {
    stream.write_all(greeting.as_bytes())?;
    let mut buffer = [0u8; 4096];
    loop {
        let n = stream.read(&mut buffer)?;
        if n == 0 {
            return Ok(());
        }
        stream.write_all(&buffer[..n])?;
    }
}
