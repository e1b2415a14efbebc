//! Compiles the eBPF program and hands its object to this crate through `OUT_DIR`, so the
//! binary always embeds the object built from the sources beside it, never a stale one.
use std::{env, path::PathBuf, process::exit};

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let root = manifest_dir
        .parent()
        .expect("the dataplane crate sits inside the workspace");
    for input in ["ebpf", "common", "Cargo.lock", ".cargo/config.toml"] {
        println!("cargo::rerun-if-changed={}", root.join(input).display());
    }
    println!("cargo::rerun-if-env-changed=PORTSHARD_BPF_RUSTC");

    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo"));
    // The upgrade tests' second build embeds a program that differs (see the eBPF crate's
    // `upgrade-test` feature), built apart so neither build overwrites the other's object.
    let (target, features): (&str, &[&str]) = if env::var_os("CARGO_FEATURE_UPGRADE_TEST").is_some()
    {
        ("target/ebpf-upgrade-test", &["upgrade-test"])
    } else {
        ("target/ebpf", &[])
    };
    let built = portshard_toolchain::build_object(
        &root.join("ebpf"),
        &root.join(target),
        portshard_toolchain::OBJECT_NAME,
        features,
    )
    .map_err(|e| e.to_string())
    .and_then(|object| {
        std::fs::copy(&object, out_dir.join("portshard.bpf.o")).map_err(|e| {
            format!(
                "copying {} into {}: {e}",
                object.display(),
                out_dir.display()
            )
        })
    });
    if let Err(message) = built {
        println!("cargo::error={message}");
        exit(1);
    }
}
