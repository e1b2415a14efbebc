//! portshard: an eBPF-steered `SO_REUSEPORT` load balancer.
//!
//! Pure logic ([`table`], [`config`], [`control`], [`object`], [`report`], [`metrics`],
//! [`probe`]) never makes a syscall; the edge modules ([`bpffs`], [`socket`], [`dataplane`],
//! [`process`], [`prober`]) are thin wrappers over the kernel; [`group`] ties a table to its dataplane,
//! [`daemon`] runs services, and [`echo`] is the built-in worker.
#![warn(missing_docs)]
pub mod bpffs;
pub mod config;
pub mod control;
pub mod daemon;
pub mod dataplane;
pub mod echo;
pub mod group;
pub mod metrics;
pub mod object;
pub mod probe;
pub mod prober;
pub mod process;
pub mod report;
pub mod sockdiag;
pub mod socket;
pub mod table;
