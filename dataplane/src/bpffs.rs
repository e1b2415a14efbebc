//! The BPF filesystem that holds the pins: found, mounted when missing, directories made
//! (mode 0700, never through a symbolic link), and a pin root checked to hold nothing but
//! portshard's own layout before the daemon uses it.
use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::{
            ffi::OsStrExt as _,
            fs::{FileTypeExt as _, MetadataExt as _},
        },
    },
    path::{Component, Path, PathBuf},
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
    /// A component of a pin path is a symbolic link, which could point the pins anywhere.
    #[error(
        "pin path {path} goes through a symbolic link at {link}: portshard does not follow links in pin paths; give the real path in --bpffs"
    )]
    Symlink {
        /// The pin path asked for.
        path: PathBuf,
        /// The component that is a link (or not a directory).
        link: PathBuf,
    },
    /// The pin root exists but is not portshard's to use.
    #[error(
        "pin root {root} is not a portshard pin root: {reason}; it belongs to another program or another layout, and portshard does not overwrite it: give this daemon its own --bpffs, or remove {root} if nothing uses it"
    )]
    Foreign {
        /// The pin root.
        root: PathBuf,
        /// What was found.
        reason: String,
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
/// and its missing parents with mode 0700, component by component, refusing any component
/// that is a symbolic link.
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
    let absolute = std::path::absolute(dir).map_err(io_error("resolving pin directory", dir))?;
    let mut here = PathBuf::from("/");
    let mut parent = open_dir(None, c"/").map_err(io_error("opening", &here))?;
    for component in absolute.components() {
        let name = match component {
            Component::Normal(name) => name,
            Component::RootDir | Component::CurDir => continue,
            Component::ParentDir | Component::Prefix(_) => {
                return Err(io_error("using pin directory", dir)(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "it contains `..`, which could lead anywhere: give the path without it",
                )));
            }
        };
        here.push(name);
        let c_name = c_path(Path::new(name))?;
        // SAFETY: `parent` is an open directory and `c_name` a NUL-terminated name.
        if unsafe { libc::mkdirat(parent.as_raw_fd(), c_name.as_ptr(), 0o700) } != 0 {
            let error = io::Error::last_os_error();
            if error.kind() != io::ErrorKind::AlreadyExists {
                return Err(io_error("creating pin directory", &here)(error));
            }
        }
        parent = open_dir(Some(&parent), &c_name).map_err(|error| match error.raw_os_error() {
            Some(libc::ELOOP | libc::ENOTDIR) => BpffsError::Symlink {
                path: dir.to_path_buf(),
                link: here.clone(),
            },
            _ => io_error("opening pin directory", &here)(error),
        })?;
    }
    Ok(())
}

/// Turns an I/O error into one that says what was being done on which path.
fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> BpffsError {
    let path = path.to_path_buf();
    move |source| BpffsError::Io {
        action,
        path,
        source,
    }
}

/// Opens directory `name` (below `parent`, or absolute) without following a final symlink.
fn open_dir(parent: Option<&OwnedFd>, name: &std::ffi::CStr) -> io::Result<OwnedFd> {
    let at = parent.map_or(libc::AT_FDCWD, |fd| fd.as_raw_fd());
    // SAFETY: `name` is NUL-terminated; a non-negative result is a fresh fd.
    let fd = unsafe {
        libc::openat(
            at,
            name.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        Err(io::Error::last_os_error())
    } else {
        // SAFETY: a fresh fd we own.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }
}

/// What a portshard pin root may hold: directories named by `is_service`, each holding only
/// pins named in `pins`, all owned by this process's user, none a symbolic link. Anything
/// else means the root belongs to another program or layout, and it is refused. The root
/// itself is made mode 0700 if it is portshard's.
pub fn check_root(
    root: &Path,
    is_service: impl Fn(&str) -> bool,
    pins: &[&str],
) -> Result<(), BpffsError> {
    let foreign = |reason: String| BpffsError::Foreign {
        root: root.to_path_buf(),
        reason,
    };
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    let root_meta = std::fs::symlink_metadata(root).map_err(io_error("reading pin root", root))?;
    if root_meta.uid() != me {
        return Err(foreign(format!(
            "it is owned by uid {}, not by uid {me} that runs portshard",
            root_meta.uid()
        )));
    }
    let list = |dir: &Path| -> Result<Vec<(String, std::fs::Metadata)>, BpffsError> {
        std::fs::read_dir(dir)
            .and_then(|entries| {
                entries
                    .map(|entry| {
                        let entry = entry?;
                        let meta = std::fs::symlink_metadata(entry.path())?;
                        Ok((entry.file_name().to_string_lossy().into_owned(), meta))
                    })
                    .collect()
            })
            .map_err(io_error("listing", dir))
    };
    for (name, meta) in list(root)? {
        let path = root.join(&name);
        if !meta.is_dir() || !is_service(&name) {
            return Err(foreign(format!(
                "it holds {} ({}), which is not a service directory",
                path.display(),
                kind(&meta)
            )));
        }
        for (pin, meta) in list(&path)? {
            let kind = kind(&meta);
            if !pins.contains(&pin.as_str()) || kind != "a pin" || meta.uid() != me {
                return Err(foreign(format!(
                    "{} holds {pin} ({kind}, owner uid {}), which is not one of portshard's pins ({})",
                    path.display(),
                    meta.uid(),
                    pins.join(", ")
                )));
            }
        }
    }
    use std::os::unix::fs::PermissionsExt as _;
    if root_meta.mode() & 0o777 != 0o700 {
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700))
            .map_err(io_error("restricting pin root to mode 0700", root))?;
    }
    Ok(())
}

/// What a directory entry is, for messages; a BPF pin is a regular file on a BPF filesystem.
fn kind(meta: &std::fs::Metadata) -> &'static str {
    let kind = meta.file_type();
    if kind.is_symlink() {
        "a symbolic link"
    } else if kind.is_dir() {
        "a directory"
    } else if kind.is_file() {
        "a pin"
    } else if kind.is_socket() || kind.is_fifo() {
        "a socket or fifo"
    } else {
        "a special file"
    }
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
