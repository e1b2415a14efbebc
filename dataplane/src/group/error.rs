//! Why a change to a reuseport group was refused.
use crate::{
    dataplane::DataplaneError,
    table::{Slot, TableError},
};

/// A group operation failed.
#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    /// The table refused the change; nothing was touched.
    #[error("service {service}: {source}")]
    Table {
        /// The service whose table refused.
        service: String,
        /// Why.
        #[source]
        source: TableError,
    },
    /// The kernel refused the change.
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    /// The pins are in use by a group someone still serves.
    #[error(
        "service {service} at {dir} is still in use (slot {slot} is recorded live, pid {pid}): stop what serves it, or remove {dir} if it is gone"
    )]
    InUse {
        /// The service.
        service: String,
        /// Its pin directory.
        dir: std::path::PathBuf,
        /// A slot recorded live.
        slot: Slot,
        /// The process recorded for it.
        pid: u32,
    },
    /// The socket offered for a slot cannot be identified.
    #[error("reading the cookie of socket fd {fd} for slot {slot}: {source}")]
    Cookie {
        /// The socket.
        fd: i32,
        /// The slot it was for.
        slot: Slot,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}
