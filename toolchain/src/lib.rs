//! The eBPF toolchain, in one place: what it is made of, how to tell what is missing, how to
//! install it and how to compile the eBPF crate with it.
//!
//! rustup's toolchain here has no `rust-src`, so `-Z build-std` is impossible. Debian ships a
//! rustc (`rustc-web`) with a prebuilt `core` for `bpfel-unknown-none`, and `bpf-linker` is
//! built against Debian's LLVM 22. The dataplane crate's build script and `cargo xtask` both use this
//! crate, so the recipe exists once.
#![warn(missing_docs)]
use std::{
    env,
    ffi::OsString,
    fmt,
    path::{Path, PathBuf},
    process::Command,
};

/// Debian packages: rustc with the prebuilt BPF `core`, and what `bpf-linker` links against.
pub const DEBIAN_PACKAGES: [&str; 6] = [
    "rustc-web",
    "libstd-rust-web-dev-bpf",
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
];

/// Where Debian's LLVM 22 lives; `bpf-linker`'s build finds it through `LLVM_PREFIX`.
pub const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

/// The `bpf-linker` release known to work with LLVM 22 and the rustc above.
pub const BPF_LINKER_VERSION: &str = "0.13.0";

/// The compiler target of the eBPF program.
pub const BPF_TARGET: &str = "bpfel-unknown-none";

/// Name of the eBPF crate's production binary (the object the daemon loads), i.e. of the
/// object file cargo writes.
pub const OBJECT_NAME: &str = "portshard-steer";

/// Name of the eBPF crate's binary with the reference programs `cargo xtask bench` measures
/// portshard's program against; never loaded by the daemon.
pub const REFERENCE_OBJECT_NAME: &str = "portshard-reference";

/// Something the toolchain lacks, with what installs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Missing {
    /// A Debian package is not installed.
    Package(&'static str),
    /// No `bpf-linker` on `PATH` or in cargo's bin directory.
    BpfLinker,
    /// The BPF rustc exists but has no prebuilt `core` for the target.
    BpfCore {
        /// The sysroot of the BPF rustc.
        sysroot: PathBuf,
    },
}

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Package(name) => write!(f, "Debian package {name}"),
            Self::BpfLinker => write!(f, "bpf-linker {BPF_LINKER_VERSION}"),
            Self::BpfCore { sysroot } => write!(
                f,
                "prebuilt core for {BPF_TARGET} under {}",
                sysroot.join("lib/rustlib").join(BPF_TARGET).display()
            ),
        }
    }
}

/// The rustc that compiles the eBPF crate: `PORTSHARD_BPF_RUSTC`, else Debian's `/usr/bin/rustc`.
pub fn bpf_rustc() -> PathBuf {
    env::var_os("PORTSHARD_BPF_RUSTC")
        .map_or_else(|| PathBuf::from("/usr/bin/rustc"), PathBuf::from)
}

/// Cargo's bin directory, where `cargo install` puts `bpf-linker`.
pub fn cargo_bin_dir() -> PathBuf {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
        .join("bin")
}

/// The `bpf-linker` executable: the first on `PATH`, else the one in cargo's bin directory.
pub fn bpf_linker() -> Option<PathBuf> {
    let path = env::var_os("PATH").unwrap_or_default();
    env::split_paths(&path)
        .chain([cargo_bin_dir()])
        .map(|dir| dir.join("bpf-linker"))
        .find(|candidate| candidate.is_file())
}

/// Everything the toolchain lacks, empty when it is complete.
pub fn missing() -> Vec<Missing> {
    let mut missing: Vec<Missing> = DEBIAN_PACKAGES
        .iter()
        .filter(|package| !debian_package_installed(package))
        .map(|package| Missing::Package(package))
        .collect();
    if bpf_linker().is_none() {
        missing.push(Missing::BpfLinker);
    }
    if missing.is_empty() {
        let sysroot = rustc_sysroot(&bpf_rustc()).unwrap_or_else(|| PathBuf::from("/usr"));
        if !has_prebuilt_core(&sysroot) {
            missing.push(Missing::BpfCore { sysroot });
        }
    }
    missing
}

fn debian_package_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|out| out.status.success() && out.stdout.ends_with(b"install ok installed"))
}

fn rustc_sysroot(rustc: &Path) -> Option<PathBuf> {
    let out = Command::new(rustc)
        .args(["--print", "sysroot"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

fn has_prebuilt_core(sysroot: &Path) -> bool {
    let dir = sysroot.join("lib/rustlib").join(BPF_TARGET).join("lib");
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries
            .flatten()
            .any(|entry| entry.file_name().to_string_lossy().starts_with("libcore-"))
    })
}

/// The commands that install what is missing, in order, for `cargo xtask setup` to run and
/// print. Empty when nothing is missing.
pub fn install_plan(missing: &[Missing]) -> Vec<Command> {
    let mut plan = Vec::new();
    let packages: Vec<&str> = missing
        .iter()
        .filter_map(|m| match m {
            Missing::Package(name) => Some(*name),
            _ => None,
        })
        .collect();
    if !packages.is_empty() {
        let mut update = Command::new("apt-get");
        update.args(["update", "-q"]);
        let mut install = Command::new("apt-get");
        install
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&packages)
            .env("DEBIAN_FRONTEND", "noninteractive");
        plan.extend([update, install]);
    }
    if missing.contains(&Missing::BpfLinker) {
        let mut cargo = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
        cargo
            .args([
                "install",
                "bpf-linker",
                "--locked",
                "--version",
                BPF_LINKER_VERSION,
            ])
            .args(["--no-default-features", "--features", "llvm-22"])
            .env("LLVM_PREFIX", LLVM_PREFIX);
        plan.push(cargo);
    }
    plan
}

/// What cargo sets for a build script beyond `CARGO_*`.
const BUILD_SCRIPT_VARIABLES: [&str; 7] = [
    "HOST",
    "TARGET",
    "OUT_DIR",
    "OPT_LEVEL",
    "PROFILE",
    "DEBUG",
    "NUM_JOBS",
];

/// Compiles the eBPF crate at `ebpf_dir` (all its binaries, with the cargo `features`
/// given) into `target_dir` and returns the path of the object `name` (e.g.
/// [`OBJECT_NAME`]). Builds with other features belong in another `target_dir`.
///
/// Runs a nested cargo with the BPF rustc. Every variable a surrounding cargo, clippy or
/// rustdoc sets for its own compiler is removed first, so the nested build compiles for the
/// BPF target with the BPF compiler and nothing else.
pub fn build_object(
    ebpf_dir: &Path,
    target_dir: &Path,
    name: &str,
    features: &[&str],
) -> Result<PathBuf, BuildError> {
    let missing = missing();
    let Some(linker) = bpf_linker().filter(|_| missing.is_empty()) else {
        return Err(BuildError::Incomplete(missing));
    };
    let cargo = env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let mut command = Command::new(cargo);
    for (key, _) in env::vars_os() {
        let key = key.to_string_lossy();
        // What cargo sets for a build script (HOST, TARGET, ...) goes too: aya-ebpf's build
        // script tracks HOST, and callers that differ in it would rebuild each other's work.
        let inherited =
            (key.starts_with("CARGO_") && key != "CARGO_HOME" && key != "CARGO_MAKEFLAGS")
                || key.starts_with("RUSTC")
                || key.starts_with("RUSTDOC")
                || key == "RUSTFLAGS"
                || BUILD_SCRIPT_VARIABLES.contains(&key.as_ref());
        if inherited {
            command.env_remove(key.as_ref());
        }
    }
    command
        .current_dir(ebpf_dir)
        .args(["build", "--release", "--target", BPF_TARGET, "--target-dir"])
        .arg(target_dir)
        .args(features.iter().flat_map(|feature| ["--features", feature]))
        .env("RUSTC", bpf_rustc())
        .env("RUSTC_BOOTSTRAP", "1")
        .env("CARGO_TARGET_BPFEL_UNKNOWN_NONE_LINKER", linker)
        // A build script's stdout is read by cargo as directives: keep the nested build's
        // output on stderr.
        .stdout(std::io::stderr());
    let dir = ebpf_dir.to_path_buf();
    let status = command.status().map_err(|source| BuildError::Spawn {
        dir: dir.clone(),
        source,
    })?;
    if !status.success() {
        return Err(BuildError::Compile { dir, status });
    }
    let object = target_dir.join(BPF_TARGET).join("release").join(name);
    if object.is_file() {
        Ok(object)
    } else {
        Err(BuildError::NoObject(object))
    }
}

/// Compiling the eBPF crate failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// Parts of the toolchain are missing.
    #[error(
        "the eBPF toolchain is incomplete (missing: {}); run `cargo xtask setup` to install it",
        .0.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
    )]
    Incomplete(Vec<Missing>),
    /// Cargo could not be started.
    #[error("could not run cargo for the eBPF crate in {}: {source}", dir.display())]
    Spawn {
        /// The eBPF crate.
        dir: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The compiler failed; its messages were printed.
    #[error("compiling the eBPF crate in {} failed ({status}); the compiler's messages are above", dir.display())]
    Compile {
        /// The eBPF crate.
        dir: PathBuf,
        /// Cargo's exit status.
        status: std::process::ExitStatus,
    },
    /// Cargo reported success but left no object.
    #[error("cargo succeeded but wrote no object at {}", .0.display())]
    NoObject(PathBuf),
}
