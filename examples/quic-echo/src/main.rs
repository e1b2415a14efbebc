//! `portshard-quic-echo`: an example QUIC worker for a portshard UDP service.
//!
//! It takes its UDP socket by systemd socket activation (`LISTEN_FDS`, `LISTEN_PID`, fd 3
//! on; the first UDP socket among those passed), or binds `--listen ADDR` when run by
//! hand. When portshard passes a QUIC-LB config (`PORTSHARD_QUIC_LB_CONFIG_ID`,
//! `PORTSHARD_QUIC_LB_SERVER_ID`, `PORTSHARD_QUIC_LB_NONCE_LEN`, optionally
//! `PORTSHARD_QUIC_LB_KEY`), every connection ID it issues carries its server ID; without
//! one it uses quinn's random connection IDs. It serves a certificate for `localhost`,
//! self-signed at start.
//!
//! It speaks two application protocols, chosen by ALPN. Echo (`portshard-echo`): on each
//! bidirectional stream it reads the request to its end and answers
//! `slot=<PORTSHARD_SLOT> pid=<pid>\n` followed by the request. HTTP/3 (`h3`, with the `h3`
//! crate): every request is answered `200` with `slot=<PORTSHARD_SLOT> pid=<pid>\n` and the
//! request's method and path. Either way a client can tell which worker answered. On SIGTERM or SIGINT it stops accepting connections and gives open
//! ones up to 10 seconds to finish.
//!
//! `portshard-quic-echo --connect ADDR [--count N]` is the matching client: N connections
//! (default 1), one request each, each answer printed. It does not verify the server's
//! certificate, which is self-signed.
use std::{
    net::{SocketAddr, UdpSocket},
    os::fd::{FromRawFd as _, RawFd},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use bytes::Bytes;
use portshard_quic_echo::{ECHO_ALPN, H3_ALPN, client};
use portshard_quic_lb::{Config, QuicLbGenerator};
use quinn::{
    Endpoint, EndpointConfig, ServerConfig, TokioRuntime,
    crypto::rustls::{HandshakeData, QuicServerConfig},
    rustls::{
        self,
        crypto::ring,
        pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer},
    },
};

/// The first fd systemd socket activation passes.
const SD_LISTEN_FDS_START: RawFd = 3;
/// The longest request read from one stream.
const MAX_REQUEST: usize = 64 * 1024;
/// How long open connections may go on after SIGTERM.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

fn main() {
    if let Err(error) = run() {
        eprintln!("portshard-quic-echo: {error:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let socket = match mode()? {
        Mode::Listen(addr) => UdpSocket::bind(addr).with_context(|| format!("binding {addr}"))?,
        Mode::Activated => activated_socket()?,
        Mode::Connect(addr, count) => return client::run(addr, count),
    };
    socket
        .set_nonblocking(true)
        .context("making the socket non-blocking")?;
    let quic_lb = Config::from_env()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(serve(socket, quic_lb))
}

/// What the command line asks for.
enum Mode {
    /// Serve on the socket passed by socket activation.
    Activated,
    /// Serve on a socket bound here (`--listen ADDR`), for running by hand.
    Listen(SocketAddr),
    /// Be the client (`--connect ADDR [--count N]`).
    Connect(SocketAddr, usize),
}

const USAGE: &str = "usage: portshard-quic-echo [--listen ADDR | --connect ADDR [--count N]] (with neither, serve the UDP socket passed by socket activation: LISTEN_FDS, LISTEN_PID, fd 3)";

fn mode() -> Result<Mode> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let addr = |text: &str| -> Result<SocketAddr> {
        text.parse()
            .with_context(|| format!("{text:?} is not an address (IP:PORT)"))
    };
    Ok(
        match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
            [] => Mode::Activated,
            ["--listen", listen] => Mode::Listen(addr(listen)?),
            ["--connect", connect] => Mode::Connect(addr(connect)?, 1),
            ["--connect", connect, "--count", count] => Mode::Connect(
                addr(connect)?,
                count
                    .parse()
                    .with_context(|| format!("--count {count:?} is not a number"))?,
            ),
            _ => bail!(USAGE),
        },
    )
}

/// The first UDP socket passed by socket activation, checked to be meant for this process.
fn activated_socket() -> Result<UdpSocket> {
    let pid = std::process::id();
    match std::env::var("LISTEN_PID") {
        Ok(listen_pid) if listen_pid == pid.to_string() => {}
        Ok(listen_pid) => bail!(
            "LISTEN_PID={listen_pid} is not this process ({pid}): the passed sockets are another's"
        ),
        Err(_) => bail!(
            "no socket passed: LISTEN_PID is not set (run under portshard or systemd socket activation, or pass --listen ADDR)"
        ),
    }
    let count: RawFd = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .filter(|&n| n > 0)
        .context("LISTEN_FDS is not a positive number of passed sockets")?;
    for fd in SD_LISTEN_FDS_START..SD_LISTEN_FDS_START + count {
        if socket_type(fd) == Some(libc::SOCK_DGRAM) {
            // SAFETY: fd is one of the descriptors socket activation passed to this process,
            // which nothing else in it owns; it is taken once.
            return Ok(unsafe { UdpSocket::from_raw_fd(fd) });
        }
    }
    bail!("none of the {count} passed sockets (fd 3 on) is a UDP socket")
}

/// The socket type (`SOCK_DGRAM`, `SOCK_STREAM`) of `fd`, or `None` if it is not a socket.
fn socket_type(fd: RawFd) -> Option<libc::c_int> {
    let mut kind: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `kind`, which is that large.
    let ok = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            (&raw mut kind).cast(),
            &mut len,
        )
    } == 0;
    ok.then_some(kind)
}

/// The line each answer starts with: which worker this is.
fn identity() -> String {
    let slot = std::env::var("PORTSHARD_SLOT").unwrap_or_else(|_| "none".to_owned());
    format!("slot={slot} pid={}\n", std::process::id())
}

async fn serve(socket: UdpSocket, quic_lb: Option<Config>) -> Result<()> {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])
        .context("generating a self-signed certificate")?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        certified.signing_key.serialize_der(),
    ));
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3 with ring")?
        .with_no_client_auth()
        .with_single_cert(vec![certified.cert.der().clone()], key)
        .context("building the TLS config")?;
    tls.alpn_protocols = vec![H3_ALPN.to_vec(), ECHO_ALPN.to_vec()];
    let server_config = ServerConfig::with_crypto(Arc::new(
        QuicServerConfig::try_from(tls).context("building the QUIC TLS config")?,
    ));
    let mut endpoint_config = EndpointConfig::default();
    let cids = match quic_lb {
        Some(config) => {
            let described = format!(
                "QUIC-LB config {} server ID {} nonce {} octets, {}",
                config.config_id(),
                config.server_id(),
                config.nonce_len(),
                if config.key().is_some() {
                    "encrypted"
                } else {
                    "unencrypted"
                }
            );
            endpoint_config.cid_generator(QuicLbGenerator::new(config).factory());
            described
        }
        None => "random connection IDs (no QUIC-LB config)".to_owned(),
    };
    let addr = socket
        .local_addr()
        .context("reading the socket's address")?;
    let endpoint = Endpoint::new(
        endpoint_config,
        Some(server_config),
        socket,
        Arc::new(TokioRuntime),
    )
    .context("starting the QUIC endpoint")?;
    eprintln!(
        "portshard-quic-echo: {} serving QUIC on {addr}, {cids}",
        identity().trim_end()
    );

    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("handling SIGTERM")?;
    loop {
        tokio::select! {
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => {
                    tokio::spawn(async move {
                        if let Ok(connection) = incoming.await {
                            handle(connection).await;
                        }
                    });
                }
                None => break,
            },
            _ = terminate.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    // Draining: no new connection; open ones get a while to finish.
    endpoint.set_server_config(None);
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, endpoint.wait_idle()).await;
    endpoint.close(0u32.into(), b"worker stopping");
    Ok(())
}

/// Serves `connection` in the protocol its handshake chose, until it closes.
async fn handle(connection: quinn::Connection) {
    let protocol = connection
        .handshake_data()
        .and_then(|data| data.downcast::<HandshakeData>().ok())
        .and_then(|data| data.protocol);
    if protocol.as_deref() == Some(H3_ALPN) {
        serve_http3(connection).await;
    } else {
        serve_echo(connection).await;
    }
}

/// Answers every HTTP/3 request of `connection` with this worker's identity, the request's
/// method and its path.
async fn serve_http3(connection: quinn::Connection) {
    let Ok(mut http3) =
        h3::server::Connection::<_, Bytes>::new(h3_quinn::Connection::new(connection)).await
    else {
        return;
    };
    while let Ok(Some(resolver)) = http3.accept().await {
        tokio::spawn(async move {
            let Ok((request, mut stream)) = resolver.resolve_request().await else {
                return;
            };
            let body = format!(
                "{}{} {}\n",
                identity(),
                request.method(),
                request.uri().path()
            );
            let response = http::Response::builder()
                .status(http::StatusCode::OK)
                .header(http::header::CONTENT_TYPE, "text/plain")
                .body(())
                .expect("a status and a valid header");
            if stream.send_response(response).await.is_ok()
                && stream.send_data(Bytes::from(body)).await.is_ok()
            {
                let _ = stream.finish().await;
            }
        });
    }
}

/// Answers every bidirectional stream of `connection` until it closes.
async fn serve_echo(connection: quinn::Connection) {
    while let Ok((mut send, mut recv)) = connection.accept_bi().await {
        tokio::spawn(async move {
            let Ok(request) = recv.read_to_end(MAX_REQUEST).await else {
                return;
            };
            let mut answer = identity().into_bytes();
            answer.extend_from_slice(&request);
            if send.write_all(&answer).await.is_ok() {
                let _ = send.finish();
            }
        });
    }
}
