//! Measures portshard against plain `SO_REUSEPORT` on real sockets, each run in a private
//! network namespace: the kernel tests assert on these measurements, the demo prints them.
#![warn(missing_docs)]
pub mod flows;
pub mod netns;
pub mod scenario;
