//! Measures portshard against plain `SO_REUSEPORT` on real sockets, each run in a private
//! network namespace: the kernel tests assert on these measurements, the demo prints them.
#![warn(missing_docs)]
pub mod bench;
pub mod daemon;
pub mod flood;
pub mod flows;
pub mod netns;
pub mod scenario;
pub mod soak;

/// `error` with what was being done in front of its message, keeping its kind, so a failure
/// deep in a scenario still says which flow, listener or file it was about.
pub(crate) fn context(error: std::io::Error, what: String) -> std::io::Error {
    std::io::Error::new(error.kind(), format!("{what}: {error}"))
}
