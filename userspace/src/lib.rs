//! portshard: an eBPF-steered `SO_REUSEPORT` load balancer.
//!
//! Three crates, one job each: `portshard-core` holds the pure logic (the table, the
//! config, the control protocol, reports, metrics, probe verdicts and the supervisor's
//! state machine); `portshard-dataplane` is the kernel edge (the embedded eBPF object, pins,
//! maps, sockets, a table tied to its maps); this crate runs them: the [`daemon`] (the
//! supervisor's shell), worker [`process`]es, health probes ([`prober`], [`sockdiag`]), the
//! watch for foreign sockets on a service's address ([`owners`]) and the built-in [`echo`]
//! worker. Both others are re-exported here under their old paths.
#![warn(missing_docs)]
pub mod daemon;
pub mod echo;
pub mod owners;
pub mod prober;
pub mod process;
pub mod sockdiag;

pub use portshard_core::{
    config, control, handover, layout, metrics, ownership, probe, readiness, report, service,
    supervisor, table,
};
pub use portshard_dataplane::{bpffs, dataplane, group, object, socket};
