//! The `portshard` command against pins a live group wrote, in a fresh network namespace.
use std::{os::fd::AsFd as _, process::Command};

use portshard::{
    group::{Group, Holder},
    socket::{Proto, bind_reuseport},
};
use portshard_harness::{
    flows::loopback,
    scenario::{PinRoot, Sandbox},
};

fn portshard(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_portshard"))
        .args(args)
        .output()
        .expect("running portshard")
}

#[test]
fn table_reads_the_pins_of_a_running_group() {
    let sandbox = Sandbox::enter().unwrap_or_else(|e| panic!("kernel test sandbox: {e}"));
    let root = sandbox.pins().to_str().unwrap();
    let sockets: Vec<_> = (0..3)
        .map(|_| bind_reuseport(Proto::Tcp, loopback(true, 5300)).unwrap())
        .collect();
    let mut group = Group::create(sandbox.pins(), "web", 0).unwrap();
    for (slot, socket) in sockets.iter().enumerate() {
        group
            .add(slot as u16 * 2, socket.as_fd(), 1, Holder::this_process())
            .unwrap();
    }
    group.remove(2).unwrap();

    let out = portshard(&["table", "web", "--bpffs", root, "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let slots = json["slots"].as_array().unwrap();
    let summary: Vec<(u64, &str, u64)> = slots
        .iter()
        .map(|s| {
            (
                s["slot"].as_u64().unwrap(),
                s["state"].as_str().unwrap(),
                s["entries"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [(0, "live", 32_768), (2, "dead", 0), (4, "live", 32_768)]
    );
    assert_eq!(
        slots[0]["pid"].as_u64().unwrap(),
        u64::from(std::process::id())
    );
    assert_eq!(json["balance"].as_f64().unwrap(), 1.0);

    let out = portshard(&["table", "web", "--bpffs", root]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.starts_with("service web: 2 slots own entries, balance 1.0000"),
        "{text}"
    );
    // Each slot says, in words, where its entries go if it dies.
    assert!(text.contains("its entries go to slot 4"), "{text}");

    // A TCP service has no flow table: `flows` says so rather than list an empty one.
    let out = portshard(&["flows", "web", "--bpffs", root]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("service web has no flow table"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A reader that went away (`| head`) ends the command quietly, with success.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_portshard"))
        .args(["table", "web", "--bpffs", root])
        .stdout(writer)
        .output()
        .unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "{:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn table_of_an_unknown_service_says_so() {
    let pins = PinRoot::new().expect("creating a pin root on the BPF filesystem");
    // As on CI machines: still one line, no backtrace.
    let out = Command::new(env!("CARGO_BIN_EXE_portshard"))
        .args(["table", "nope", "--bpffs", pins.path().to_str().unwrap()])
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("error: ") && stderr.lines().count() == 1,
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "no service \"nope\": none is pinned under {}",
            pins.path().display()
        )),
        "{stderr}"
    );
    assert_eq!(
        out.status.code(),
        Some(2),
        "an unknown service is invalid input"
    );
}
