//! The BPF filesystem that holds the pins: found, mounted when missing, directories made.
use std::{
    ffi::CString,
    io,
    os::unix::{ffi::OsStrExt as _, fs::DirBuilderExt as _},
    path::{Path, PathBuf},
};

/// `statfs` type of a BPF filesystem.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Where BPF filesystems are conventionally mounted, and where portshard mounts one.
pub const DEFAULT_MOUNT: &str = "/sys/fs/bpf";

/// The pin root cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum BpffsError {
    /// Mounting the BPF filesystem failed.
    #[error(
        "mounting a BPF filesystem at {path} failed: {source}; mount it yourself with `mount -t bpf bpf {path}`"
    )]
    Mount {
        /// Mount point.
        path: PathBuf,
        /// The `mount(2)` error.
        source: io::Error,
    },
    /// The root is outside any BPF filesystem and outside the default mount point.
    #[error(
        "{path} is not on a BPF filesystem; use a directory under {DEFAULT_MOUNT} or mount one with `mount -t bpf bpf DIR`"
    )]
    NotBpffs {
        /// The pin root.
        path: PathBuf,
    },
    /// A filesystem call on the root failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
}

/// Makes `dir` (a pin directory) exist on a BPF filesystem: mounts one at
/// [`DEFAULT_MOUNT`] if `dir` is below it and nothing is mounted there, then creates `dir`
/// and its parents with mode 0700.
pub fn ensure_dir(dir: &Path) -> Result<(), BpffsError> {
    let default = Path::new(DEFAULT_MOUNT);
    if dir.starts_with(default) && !is_bpffs(default)? {
        mount_bpffs(default)?;
    }
    let existing = dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    if !is_bpffs(existing)? {
        return Err(BpffsError::NotBpffs {
            path: dir.to_path_buf(),
        });
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| BpffsError::Io {
            action: "creating pin directory",
            path: dir.to_path_buf(),
            source,
        })
}

/// Whether `path` lies on a BPF filesystem.
pub fn is_bpffs(path: &Path) -> Result<bool, BpffsError> {
    let c_path = c_path(path)?;
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c_path` is NUL-terminated and `stat` is a valid out-pointer.
    if unsafe { libc::statfs(c_path.as_ptr(), &mut stat) } != 0 {
        return Err(BpffsError::Io {
            action: "statfs",
            path: path.to_path_buf(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(stat.f_type as i64 == BPF_FS_MAGIC)
}

fn mount_bpffs(path: &Path) -> Result<(), BpffsError> {
    let target = c_path(path)?;
    // SAFETY: all pointers are NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            c"mode=0700".as_ptr().cast(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(BpffsError::Mount {
            path: path.to_path_buf(),
            source: io::Error::last_os_error(),
        })
    }
}

fn c_path(path: &Path) -> Result<CString, BpffsError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| BpffsError::Io {
        action: "using",
        path: path.to_path_buf(),
        source: io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"),
    })
}
