//! portshard's dataplane edge, the way `aya` sits on `aya-obj`: the eBPF object built from
//! the sources beside it and embedded ([`object`]), pins on the BPF filesystem ([`bpffs`]),
//! the pinned maps and program ([`dataplane`]), a service's table tied to its maps
//! ([`group`]) and reuseport sockets ([`socket`]). It is the only crate whose build needs
//! the BPF toolchain; the pure logic it applies comes from `portshard-core`.
#![warn(missing_docs)]
pub mod bpffs;
pub mod dataplane;
pub mod group;
pub mod object;
pub mod socket;

use portshard_core::{report, table};
