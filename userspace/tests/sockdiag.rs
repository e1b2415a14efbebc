//! The sock_diag lookup the TCP health probe relies on, against the real kernel in a fresh
//! network namespace: a queued connection is not accepted, an accepted one is, and a
//! connection that is not there is never taken for one.
use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use portshard::sockdiag::{self, SockDiag};
use portshard_harness::netns::NetNs;

#[test]
fn a_connection_counts_as_accepted_only_once_a_process_accepted_it() {
    let _netns = NetNs::enter().unwrap_or_else(|e| panic!("kernel test (needs root): {e}"));
    let mut diag = SockDiag::open().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let server = listener.local_addr().unwrap();
    let client = TcpStream::connect(server).unwrap();
    let local = client.local_addr().unwrap();

    // connect() returns on the SYN-ACK; the server side is established once the kernel
    // has handled the client's ACK, which a loaded host may do a moment later.
    let deadline = Instant::now() + Duration::from_secs(5);
    let queued = loop {
        let side = diag.tcp(server, local).unwrap();
        if side.is_some_and(|side| side.state == 1) || Instant::now() > deadline {
            break side;
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    assert_eq!(
        queued.map(|side| (side.state, side.inode)),
        Some((1, 0)),
        "established, in the accept queue"
    );
    assert!(!sockdiag::accepted(queued));

    let (held, _) = listener.accept().unwrap();
    let taken = diag.tcp(server, local).unwrap();
    assert!(sockdiag::accepted(taken), "{taken:?}");

    // Closed by the server that accepted it: still counts.
    drop(held);
    let closing = diag.tcp(server, local).unwrap();
    assert!(sockdiag::accepted(closing), "{closing:?}");

    // A 4-tuple with no connection finds at most the listener, which is not an acceptance.
    let nobody = SocketAddr::from(([127, 0, 0, 1], 1));
    let missing = diag.tcp(server, nobody).unwrap();
    assert!(!sockdiag::accepted(missing), "{missing:?}");
    let elsewhere = SocketAddr::from(([127, 0, 0, 1], server.port() ^ 1));
    assert!(!sockdiag::accepted(diag.tcp(elsewhere, local).unwrap()));
}
