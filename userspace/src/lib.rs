//! portshard: an eBPF-steered `SO_REUSEPORT` load balancer.
//!
//! Pure logic ([`table`], [`object`], [`report`]) never makes a syscall; the edge modules ([`bpffs`],
//! [`socket`], [`dataplane`]) are thin wrappers over the kernel, and [`group`] ties a
//! table to its dataplane.
#![warn(missing_docs)]
pub mod bpffs;
pub mod dataplane;
pub mod group;
pub mod object;
pub mod report;
pub mod socket;
pub mod table;
