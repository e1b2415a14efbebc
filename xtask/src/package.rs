//! `cargo xtask package` and the builds the upgrade and packaging tests need: the Debian
//! package (through `cargo-deb`, installed on first use), and a second `portshard` whose
//! eBPF program differs (the `upgrade-test` feature).
use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, Result, bail};

use crate::{build_ebpf, cargo_command, portshard_cargo, root};

/// The cargo-deb release `cargo xtask package` installs.
const CARGO_DEB_VERSION: &str = "3.8.0";

/// The environment variable the tests read the package's path from.
pub const DEB_ENV: &str = "PORTSHARD_DEB";

/// The environment variable the tests read the second build's path from.
pub const UPGRADE_TEST_BINARY_ENV: &str = "PORTSHARD_UPGRADE_TEST_BINARY";

/// Builds `target/debian/portshard_<version>-1_<arch>.deb`: the binary, the systemd unit
/// (`dist/portshard.service`), the example config (`dist/portshard.toml`, a conffile) and
/// the operations and configuration docs. Returns its path.
pub fn package() -> Result<PathBuf> {
    build_ebpf()?;
    install_cargo_deb()?;
    let output = cargo_command(&["deb", "--package", "portshard"])
        .output()
        .context("could not start cargo deb")?;
    if !output.status.success() {
        bail!(
            "cargo deb failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    // cargo-deb prints the package's path last.
    let printed = String::from_utf8_lossy(&output.stdout);
    let path = printed
        .lines()
        .rev()
        .find(|line| line.ends_with(".deb"))
        .map(|line| PathBuf::from(line.trim()))
        .context("cargo deb printed no package path")?;
    println!("package: {}", path.display());
    Ok(path)
}

fn install_cargo_deb() -> Result<()> {
    let installed = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .args(["deb", "--version"])
        .output()
        .is_ok_and(|out| out.status.success());
    if installed {
        return Ok(());
    }
    println!("package: installing cargo-deb {CARGO_DEB_VERSION}");
    let status = cargo_command(&[
        "install",
        "cargo-deb",
        "--locked",
        "--version",
        CARGO_DEB_VERSION,
    ])
    .status()
    .context("could not start cargo install")?;
    if !status.success() {
        bail!("installing cargo-deb {CARGO_DEB_VERSION} failed ({status})");
    }
    Ok(())
}

/// Builds `portshard` with the `upgrade-test` feature (its eBPF program has a never-taken
/// branch more, so a different tag) and keeps it as `target/upgrade-test/portshard`, for
/// the upgrade tests to upgrade to. Returns its path.
pub fn upgrade_test_binary() -> Result<PathBuf> {
    let built = portshard_cargo("build")
        .args(["--features", "upgrade-test"])
        .status()
        .context("could not start cargo build")?;
    if !built.success() {
        bail!("building the upgrade-test portshard failed ({built})");
    }
    let root = root();
    let dir = root.join("target/upgrade-test");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let kept = dir.join("portshard");
    std::fs::copy(root.join("target/release/portshard"), &kept)
        .with_context(|| format!("copying the upgrade-test build to {}", kept.display()))?;
    Ok(kept)
}

/// Installs what the packaging test runs besides the package: `systemd-analyze` (Debian's
/// `systemd` package; nothing needs systemd running).
pub fn install_test_tools() -> Result<()> {
    let present = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|out| out.status.success());
    if present {
        return Ok(());
    }
    println!("test: installing Debian's systemd package for systemd-analyze");
    for args in [
        &["update", "-q"][..],
        &["install", "-y", "-q", "--no-install-recommends", "systemd"][..],
    ] {
        let status = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("could not start apt-get")?;
        if !status.success() {
            bail!("apt-get {} failed ({status})", args.join(" "));
        }
    }
    Ok(())
}
