//! What the daemon's accept loops (control socket, metrics endpoint) do when `accept`
//! fails: out of file descriptors (`EMFILE`, `ENFILE`) or memory, the error lasts until
//! something closes, so retrying at once would spin a core on the event loop's thread.
use std::{io, time::Duration};

use tracing::warn;

/// How long an accept loop waits after a failed `accept`.
pub(super) const BACKOFF: Duration = Duration::from_millis(100);

/// Logs the failed `accept` of `listener` and waits [`BACKOFF`] before the next.
pub(super) async fn back_off(listener: &str, error: &io::Error) {
    warn!(%error, "accepting a connection on the {listener} failed; trying again in {BACKOFF:?}");
    tokio::time::sleep(BACKOFF).await;
}
