//! portshard: an eBPF-steered `SO_REUSEPORT` load balancer.
//!
//! Pure logic lives in the `portshard-core` crate, re-exported here under the same paths
//! ([`table`], [`config`], [`control`], [`report`], [`metrics`], [`probe`], [`service`]), and
//! [`object`] here; none of it makes a syscall. The edge modules ([`bpffs`], [`socket`], [`dataplane`],
//! [`process`], [`prober`]) are thin wrappers over the kernel; [`group`] ties a table to its dataplane,
//! [`daemon`] runs services, and [`echo`] is the built-in worker.
#![warn(missing_docs)]
pub mod bpffs;
pub mod daemon;
pub mod dataplane;
pub mod echo;
pub mod group;
pub mod object;
pub mod prober;
pub mod process;
pub mod sockdiag;
pub mod socket;

pub use portshard_core::{config, control, metrics, probe, report, service, supervisor, table};
