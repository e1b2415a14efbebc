//! `portshard echo`: the built-in worker of the default config, a socket-activated echo
//! server that says who answered, so a user (and the demo) sees steering at work.
//!
//! UDP: each datagram is answered with `"<slot> <pid> "` followed by the datagram.
//! TCP: each connection first receives the line `"<slot> <pid>\n"`, then its bytes echoed.
use std::{
    io::{self, Read as _, Write as _},
    net::{TcpListener, TcpStream, UdpSocket},
    os::fd::{FromRawFd as _, OwnedFd},
};

use crate::process::LISTEN_FD;

/// The worker was not started by socket activation, or its socket failed.
#[derive(Debug, thiserror::Error)]
pub enum EchoError {
    /// `LISTEN_FDS`/`LISTEN_PID` do not hand this process exactly one socket.
    #[error(
        "portshard echo is a socket-activated worker: {0}; run it under `portshard serve`, which passes the socket as fd 3"
    )]
    NotActivated(String),
    /// The socket failed.
    #[error("{action} on fd 3: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
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

/// Serves the socket-activated socket until the process is killed.
pub fn serve() -> Result<(), EchoError> {
    let var = |name: &str| {
        std::env::var(name).map_err(|_| EchoError::NotActivated(format!("{name} is not set")))
    };
    if var("LISTEN_FDS")? != "1" {
        return Err(EchoError::NotActivated("LISTEN_FDS is not 1".to_owned()));
    }
    if var("LISTEN_PID")? != std::process::id().to_string() {
        return Err(EchoError::NotActivated(
            "LISTEN_PID is another process".to_owned(),
        ));
    }
    // SAFETY: socket activation hands this process fd 3, which nothing else here owns.
    let socket = unsafe { OwnedFd::from_raw_fd(LISTEN_FD) };
    let io = |action| move |source| EchoError::Io { action, source };
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
