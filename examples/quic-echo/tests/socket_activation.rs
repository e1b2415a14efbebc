//! The worker as portshard runs it: its UDP socket on fd 3 with `LISTEN_FDS=1` and
//! `LISTEN_PID`, a QUIC-LB config in its environment. A quinn client talks to it through a
//! relay that reads the connection IDs on the wire, and checks the answer names the
//! worker and every connection ID the server chose decodes to the configured server ID.
//! Needs no root.
use std::{
    net::{SocketAddr, UdpSocket},
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use portshard_quic_echo::client;
use portshard_quic_lb::{Config, ENV_CONFIG_ID, ENV_KEY, ENV_NONCE_LEN, ENV_SERVER_ID, format_hex};
use quinn::Endpoint;

/// How long one exchange may take before the test gives up.
const TIMEOUT: Duration = Duration::from_secs(20);

/// The worker, killed when the test ends however it ends.
struct Worker(Child);

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the worker with `socket` as fd 3 and `env` added, the way portshard's daemon
/// does: `sh` sets `LISTEN_PID` to its own pid, then execs the worker, which keeps it.
fn spawn_worker(socket: &UdpSocket, env: &[(&str, String)]) -> Worker {
    spawn_worker_with_stderr(socket, env, Stdio::inherit())
}

/// [`spawn_worker`] with the worker's stderr going to `stderr`.
fn spawn_worker_with_stderr(socket: &UdpSocket, env: &[(&str, String)], stderr: Stdio) -> Worker {
    let fd = socket.as_raw_fd();
    let mut command = Command::new("/bin/sh");
    command
        .args(["-c", "LISTEN_PID=$$ exec \"$0\""])
        .arg(env!("CARGO_BIN_EXE_portshard-quic-echo"))
        .env("LISTEN_FDS", "1")
        .env("LISTEN_FDNAMES", "quic")
        .env("PORTSHARD_SLOT", "3")
        .env_remove(ENV_CONFIG_ID)
        .env_remove(ENV_SERVER_ID)
        .env_remove(ENV_NONCE_LEN)
        .env_remove(ENV_KEY)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stderr(stderr);
    // SAFETY: only dup2 or fcntl, async-signal-safe, between fork and exec. The new fd 3
    // is without close-on-exec, so it survives both execs; a socket that already is fd 3
    // (dup2 onto itself changes nothing) has its close-on-exec flag cleared instead.
    unsafe {
        command.pre_exec(move || {
            let done = if fd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, 3)
            };
            if done < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Worker(command.spawn().expect("starting portshard-quic-echo"))
}

fn client() -> Endpoint {
    client::endpoint("127.0.0.1:0".parse().unwrap()).unwrap()
}

/// Connection IDs the server chose, as seen on the wire: the source CID of its
/// long-header packets, and the destination CID of the client's short-header packets.
#[derive(Default)]
struct Seen {
    server_long_scids: Vec<Vec<u8>>,
    client_short_dcids: Vec<Vec<u8>>,
}

/// Forwards datagrams between the client and `server`, noting connection IDs.
async fn relay(server: SocketAddr, cid_len: usize, seen: Arc<Mutex<Seen>>) -> SocketAddr {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut client = None;
        let mut buf = vec![0u8; 65536];
        loop {
            let Ok((len, from)) = socket.recv_from(&mut buf).await else {
                return;
            };
            let packet = &buf[..len];
            let from_server = from == server;
            {
                let mut seen = seen.lock().unwrap();
                note(&mut seen, packet, from_server, cid_len);
            }
            if from_server {
                if let Some(client) = client {
                    let _ = socket.send_to(packet, client).await;
                }
            } else {
                client = Some(from);
                let _ = socket.send_to(packet, server).await;
            }
        }
    });
    addr
}

/// Notes the connection IDs the server chose in one datagram.
fn note(seen: &mut Seen, packet: &[u8], from_server: bool, cid_len: usize) {
    let len = packet.len();
    if from_server {
        // Long header: flags, version (4), DCID length and DCID, SCID length and SCID.
        if packet[0] & 0x80 != 0 && len > 6 {
            let dcid_len = usize::from(packet[5]);
            let scid_at = 6 + dcid_len;
            if let Some(&scid_len) = packet.get(scid_at)
                && let Some(scid) = packet.get(scid_at + 1..scid_at + 1 + usize::from(scid_len))
            {
                seen.server_long_scids.push(scid.to_vec());
            }
        }
    } else if packet[0] & 0x80 == 0 && len > cid_len {
        seen.client_short_dcids.push(packet[1..=cid_len].to_vec());
    }
}

/// One exchange with the worker through a relay: the answer, and the CIDs seen.
async fn exchange(server: SocketAddr, cid_len: usize, request: &[u8]) -> (String, Seen) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let via = relay(server, cid_len, seen.clone()).await;
    let endpoint = client();
    let answer = tokio::time::timeout(TIMEOUT, async {
        let connection = endpoint.connect(via, "localhost").unwrap().await.unwrap();
        let (mut send, mut recv) = connection.open_bi().await.unwrap();
        send.write_all(request).await.unwrap();
        send.finish().unwrap();
        let answer = recv.read_to_end(64 * 1024).await.unwrap();
        // A second stream, so that short-header packets carry the server's CIDs.
        let (mut send, mut recv) = connection.open_bi().await.unwrap();
        send.write_all(b"again").await.unwrap();
        send.finish().unwrap();
        recv.read_to_end(64 * 1024).await.unwrap();
        connection.close(0u32.into(), b"done");
        answer
    })
    .await
    .expect("the worker did not answer in time");
    endpoint.wait_idle().await;
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    (String::from_utf8(answer).unwrap(), seen)
}

async fn check_quic_lb(key: Option<[u8; 16]>) {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let server = socket.local_addr().unwrap();
    // portshard's server IDs: slot 3 as a big-endian u16, then generation 7's low byte.
    let server_id = [0x00, 0x03, 0x07];
    let config = Config::new(2, &server_id, 6, key).unwrap();
    let mut env = vec![
        (ENV_CONFIG_ID, "2".to_owned()),
        (ENV_SERVER_ID, format_hex(&server_id)),
        (ENV_NONCE_LEN, "6".to_owned()),
    ];
    if let Some(key) = key {
        env.push((ENV_KEY, format_hex(&key)));
    }
    let worker = spawn_worker(&socket, &env);
    drop(socket);
    let (answer, seen) = exchange(server, config.cid_len(), b"hello").await;
    assert_eq!(answer, format!("slot=3 pid={}\nhello", worker.0.id()));

    let decoder = config.decoder();
    let chosen: Vec<_> = seen
        .server_long_scids
        .iter()
        .chain(&seen.client_short_dcids)
        .collect();
    assert!(
        !seen.server_long_scids.is_empty(),
        "no server long header seen"
    );
    assert!(
        !seen.client_short_dcids.is_empty(),
        "no client short header seen"
    );
    for cid in chosen {
        assert_eq!(cid.len(), 10, "{}", format_hex(cid));
        assert_eq!(
            decoder.decode(cid).map(|id| id.to_vec()),
            Some(server_id.to_vec()),
            "CID {} does not carry the server ID",
            format_hex(cid)
        );
    }
}

#[tokio::test]
async fn encrypted_connection_ids_carry_the_server_id() {
    check_quic_lb(Some(*b"portshard-quiclb")).await;
}

#[tokio::test]
async fn unencrypted_connection_ids_carry_the_server_id() {
    check_quic_lb(None).await;
}

#[tokio::test]
async fn without_a_config_it_still_answers() {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let server = socket.local_addr().unwrap();
    let worker = spawn_worker(&socket, &[]);
    drop(socket);
    // quinn's default CIDs are 8 octets.
    let (answer, _) = exchange(server, 8, b"").await;
    assert_eq!(answer, format!("slot=3 pid={}\n", worker.0.id()));
}

#[test]
fn refuses_sockets_meant_for_another_process() {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_portshard-quic-echo"))
        .env("LISTEN_PID", "1")
        .env("LISTEN_FDS", "1")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    drop(socket);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("LISTEN_PID=1 is not this process"),
        "{stderr}"
    );
}

#[test]
fn refuses_a_bad_quic_lb_config() {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut worker = spawn_worker_with_stderr(
        &socket,
        &[(ENV_SERVER_ID, "0003".to_owned())],
        Stdio::piped(),
    );
    let mut stderr = String::new();
    std::io::Read::read_to_string(worker.0.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(!worker.0.wait().unwrap().success());
    assert!(
        stderr
            .contains("PORTSHARD_QUIC_LB_SERVER_ID is set but PORTSHARD_QUIC_LB_CONFIG_ID is not"),
        "{stderr}"
    );
}
