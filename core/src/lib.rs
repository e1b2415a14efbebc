//! portshard's pure logic, the way `aya-obj` sits apart from `aya`: the consistent lookup
//! table, the config and its validation, the control protocol, status reports and their
//! metrics, health-probe verdicts, and which sockets on a service's address are foreign. Nothing here makes a syscall or needs the BPF
//! toolchain, so it builds and tests on any machine, as any user; the `portshard` crate
//! puts it to work on the kernel.
pub mod config;
pub mod control;
pub mod handover;
pub mod layout;
pub mod metrics;
pub mod ownership;
pub mod probe;
pub mod readiness;
pub mod report;
pub mod service;
pub mod supervisor;
pub mod table;
