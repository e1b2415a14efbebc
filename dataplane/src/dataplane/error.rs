//! What can go wrong with a service's dataplane, each error naming its path, service, slot
//! or socket, and for a failed BPF load what to do about it.
use std::{io, path::PathBuf};

use aya::{maps::MapError, programs::ProgramError};
use portshard_common::TABLE_SIZE;

use crate::{bpffs::BpffsError, object::ObjectError};

/// A dataplane operation failed; each message names the path, service, slot or socket.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    /// The pin root is unusable.
    #[error(transparent)]
    Bpffs(#[from] BpffsError),
    /// The embedded object is unusable.
    #[error(transparent)]
    Object(#[from] ObjectError),
    /// The service name cannot name a pin directory.
    #[error("service name {name:?} is invalid: use 1 to 32 characters from a-z, 0-9 and '-'")]
    BadServiceName {
        /// The offending name.
        name: String,
    },
    /// A worker was given more sockets than a service has socket arrays.
    #[error(
        "service at {dir}: {count} sockets for one slot, but a service has 1 to {max} listeners",
        max = portshard_common::MAX_LISTENERS
    )]
    TooManyListeners {
        /// The service's pin directory.
        dir: std::path::PathBuf,
        /// How many sockets were given.
        count: usize,
    },
    /// Nothing is pinned for the service.
    #[error(
        "no dataplane is pinned at {dir}: the service was never started under this pin root, or was stopped"
    )]
    NotPinned {
        /// The service's pin directory.
        dir: PathBuf,
    },
    /// A pin exists but is not what this build uses: never reused silently.
    #[error(
        "pinned map {path} has {what} {found}, but this build expects {expected}: it was left by another portshard version or another program; remove {} (after stopping whatever uses it) or use another pin root",
        path.parent().map_or_else(|| path.display(), |dir| dir.display())
    )]
    PinMismatch {
        /// The mismatching pin.
        path: PathBuf,
        /// Which property differs.
        what: &'static str,
        /// What the pin has.
        found: String,
        /// What this build needs.
        expected: String,
    },
    /// A pin path holds something that is not a map (or cannot be opened).
    #[error("cannot open pinned map {path}: {source}")]
    OpenPin {
        /// The pin.
        path: PathBuf,
        /// Why.
        #[source]
        source: Box<MapError>,
    },
    /// Creating the maps or reading the object failed.
    #[error("loading the eBPF object for the pins in {dir} failed: {source}; {}", bpf_hint(source.as_ref()))]
    Load {
        /// The service's pin directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: Box<aya::EbpfError>,
    },
    /// The verifier or the program pin failed.
    #[error("{action} ({path}) failed: {source}; {}", bpf_hint(source.as_ref()))]
    Program {
        /// What was being done.
        action: String,
        /// The program pin.
        path: PathBuf,
        /// Why.
        #[source]
        source: Box<ProgramError>,
    },
    /// A pin could not be written or removed.
    #[error("{action} {path} failed: {source}")]
    PinIo {
        /// What was being done.
        action: &'static str,
        /// The pin or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A map operation failed.
    #[error("{action} in {path} failed: {source}")]
    Map {
        /// What was being done, naming the slot or socket.
        action: String,
        /// The map's pin.
        path: PathBuf,
        /// Why.
        #[source]
        source: Box<MapError>,
    },
    /// A table of the wrong length was offered for writing.
    #[error("refusing to write {len} entries to the table {path}: a table has {TABLE_SIZE}")]
    TableLength {
        /// The table's pin.
        path: PathBuf,
        /// The offered length.
        len: usize,
    },
    /// An entry index outside the table was offered for writing.
    #[error("refusing to write entry {index} of the table {path}: entries are 0 to {}", TABLE_SIZE - 1)]
    TableIndex {
        /// The table's pin.
        path: PathBuf,
        /// The offending index.
        index: u32,
    },
    /// A program pin holds something other than this build's program type.
    #[error(
        "pinned program {path} is of type {found}, not SK_REUSEPORT: it was left by another program; remove it or use another pin root"
    )]
    ProgramMismatch {
        /// The pin.
        path: PathBuf,
        /// Its type, as the kernel reports it.
        found: String,
    },
    /// The pins are in a layout this build does not know: nothing was touched.
    #[error(
        "the pins in {dir} are in {source}: nothing was changed; run the portshard build that wrote them (or a newer one), or stop the service's workers and remove {dir}"
    )]
    UnknownLayout {
        /// The service's pin directory.
        dir: PathBuf,
        /// The layout found, and the ones this build knows.
        #[source]
        source: portshard_core::layout::UnknownLayout,
    },
    /// A map the pins' layout must have is missing: half a pin directory is never adopted.
    #[error(
        "pin {path} is missing, but pin layout {layout} has it: the directory was changed by hand or left half-made; stop the service's workers and remove {}",
        path.parent().map_or_else(|| path.display(), |dir| dir.display())
    )]
    MissingPin {
        /// The missing pin.
        path: PathBuf,
        /// The layout the directory is in.
        layout: u32,
    },
    /// Memory-mapping the table failed.
    #[error("memory-mapping the table {path} failed: {source}")]
    Mmap {
        /// The table's pin.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The kernel's random source failed.
    #[error("drawing a new QUIC-LB key for {dir} from the kernel's random source failed: {source}")]
    Random {
        /// The service's pin directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

pub(crate) type Result<T, E = DataplaneError> = std::result::Result<T, E>;

/// What to do about a failure to create BPF maps or load the program, from the kernel's
/// error at the bottom of `error`'s chain.
pub(super) fn bpf_hint(error: &(dyn std::error::Error + 'static)) -> &'static str {
    let mut errno = None;
    let mut next = Some(error);
    while let Some(current) = next {
        if let Some(io) = current.downcast_ref::<io::Error>() {
            errno = io.raw_os_error().or(errno);
        }
        next = current.source();
    }
    match errno {
        Some(libc::EPERM | libc::EACCES) => {
            "the kernel refused BPF to this process: run `portshard serve` as root with CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON (or CAP_SYS_ADMIN), not in a container or sandbox that drops them, and check that kernel lockdown allows BPF"
        }
        Some(libc::ENOMEM) => {
            "the kernel ran out of memory for BPF maps: on kernels before 5.11 raise the locked-memory limit (`ulimit -l unlimited`, or LimitMEMLOCK=infinity for a systemd unit)"
        }
        Some(libc::EINVAL | libc::EOPNOTSUPP | libc::E2BIG | 524) => {
            "this kernel lacks what portshard needs (SK_REUSEPORT select-or-migrate programs and mmapable arrays): use Linux 5.14 or later built with CONFIG_BPF_SYSCALL"
        }
        _ => "check the kernel log (`dmesg`) and that this is Linux 5.14 or later with BPF enabled",
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use portshard_common::names;

    use super::*;

    #[test]
    fn bpf_failures_say_what_to_do_from_the_kernel_error_at_the_bottom() {
        let load = |errno| {
            let map = MapError::CreateError {
                name: names::TABLE.to_owned(),
                io_error: io::Error::from_raw_os_error(errno),
            };
            DataplaneError::Load {
                dir: PathBuf::from("/sys/fs/bpf/portshard/dns"),
                source: Box::new(aya::EbpfError::MapError(map)),
            }
            .to_string()
        };
        for (errno, advice) in [
            (libc::EPERM, "run `portshard serve` as root with CAP_BPF"),
            (libc::ENOMEM, "raise the locked-memory limit"),
            (libc::EINVAL, "use Linux 5.14 or later"),
            (libc::EIO, "check the kernel log"),
        ] {
            let message = load(errno);
            assert!(
                message.starts_with(
                    "loading the eBPF object for the pins in /sys/fs/bpf/portshard/dns failed"
                ) && message.contains(advice),
                "{message}"
            );
        }
    }
}
