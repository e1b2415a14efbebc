//! Health probes, the pure part: how a run of answered and unanswered probes becomes a
//! verdict on a worker, and how a TCP listener's accept queue is read from
//! `/proc/net/tcp`. The probing itself (sockets, `/proc` reads) is in [`crate::prober`].
use portshard_common::{ProbeHealth, ProbeState};

/// What the probes say about a worker so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The last probe was answered.
    Passing,
    /// The last `n` probes went unanswered, fewer than the limit.
    Failing(u32),
    /// As many probes as the limit went unanswered in a row: the worker is hung.
    Hung(u32),
}

/// Counts a worker's unanswered probes in a row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tracker {
    limit: u32,
    failures: u32,
    probed: bool,
}

impl Tracker {
    /// A worker not probed yet, hung after `limit` (at least 1) unanswered probes in a row.
    pub fn new(limit: u32) -> Self {
        Self {
            limit: limit.max(1),
            failures: 0,
            probed: false,
        }
    }

    /// Takes one probe's outcome into account.
    pub fn record(&mut self, answered: bool) -> Verdict {
        self.probed = true;
        if answered {
            self.failures = 0;
            Verdict::Passing
        } else {
            self.failures += 1;
            if self.failures >= self.limit {
                Verdict::Hung(self.failures)
            } else {
                Verdict::Failing(self.failures)
            }
        }
    }

    /// The record the CLI shows for the worker.
    pub fn health(&self) -> ProbeHealth {
        let state = match (self.probed, self.failures) {
            (false, _) => ProbeState::Unprobed,
            (true, 0) => ProbeState::Passing,
            (true, _) => ProbeState::Failing,
        };
        ProbeHealth {
            state: state as u32,
            failures: self.failures,
        }
    }
}

/// The accept-queue length of the listening socket with inode `inode` in the text of
/// `/proc/net/tcp` or `/proc/net/tcp6`: for a socket in `LISTEN` (state `0A`), the
/// `rx_queue` column counts connections waiting to be accepted. `None` if it is not there.
pub fn accept_queue(table: &str, inode: u64) -> Option<u32> {
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (state, queues, found) = (fields.get(3)?, fields.get(4)?, fields.get(9)?);
        if *state != "0A" || found.parse::<u64>().ok()? != inode {
            return None;
        }
        u32::from_str_radix(queues.split_once(':')?.1, 16).ok()
    })
}

/// The inode of a socket from the target of its `/proc/<pid>/fd/<n>` link (`socket:[N]`).
pub fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn a_worker_is_hung_after_the_limit_of_failures_in_a_row() {
        let mut tracker = Tracker::new(3);
        assert_eq!(tracker.health().state, ProbeState::Unprobed as u32);
        assert_eq!(tracker.record(false), Verdict::Failing(1));
        assert_eq!(tracker.record(false), Verdict::Failing(2));
        assert_eq!(
            tracker.health(),
            ProbeHealth {
                state: ProbeState::Failing as u32,
                failures: 2
            }
        );
        // One answer starts the count again.
        assert_eq!(tracker.record(true), Verdict::Passing);
        assert_eq!(tracker.health().state, ProbeState::Passing as u32);
        assert_eq!(tracker.record(false), Verdict::Failing(1));
        assert_eq!(tracker.record(false), Verdict::Failing(2));
        assert_eq!(tracker.record(false), Verdict::Hung(3));
    }

    #[test]
    fn the_accept_queue_of_a_listener_is_read_by_inode() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:14B4 00000000:0000 0A 00000000:00000003 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0
   1: 0100007F:14B4 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 4243 1 0000000000000000 20 4 30 10 -1
   2: 0100007F:14B4 00000000:0000 0A 00000000:00000000 00:00000000 00000000 65534        0 4244 1 0000000000000000 100 0 0 10 0";
        assert_eq!(accept_queue(table, 4242), Some(3));
        assert_eq!(accept_queue(table, 4244), Some(0));
        assert_eq!(accept_queue(table, 4243), None, "not a listener");
        assert_eq!(accept_queue(table, 1), None);
        assert_eq!(socket_inode("socket:[4242]"), Some(4242));
        assert_eq!(socket_inode("/dev/null"), None);
    }

    proptest! {
        /// The verdict depends only on the unanswered probes since the last answer.
        #[test]
        fn verdicts_count_failures_since_the_last_answer(limit in 1u32..6, outcomes in proptest::collection::vec(any::<bool>(), 0..40)) {
            let mut tracker = Tracker::new(limit);
            let mut run = 0;
            for answered in outcomes {
                run = if answered { 0 } else { run + 1 };
                let expected = match run {
                    0 => Verdict::Passing,
                    n if n >= limit => Verdict::Hung(n),
                    n => Verdict::Failing(n),
                };
                prop_assert_eq!(tracker.record(answered), expected);
                prop_assert_eq!(tracker.health().failures, run);
            }
        }

        /// Whatever `/proc/net/tcp` holds, reading it never panics.
        #[test]
        fn any_table_text_is_read_without_panic(text in "\\PC*", inode in any::<u64>()) {
            let _ = accept_queue(&text, inode);
        }
    }
}
