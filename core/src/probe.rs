//! Health probes, the pure part: what one probe's outcome is, and how a run of outcomes
//! becomes a verdict on a worker. The probing itself (sockets, sock_diag, `/proc` reads) is
//! in the `portshard` crate's `prober` module.
//!
//! A probe must measure the worker, not the host. An unanswered probe therefore counts as a
//! failure only when the worker had every chance to answer: the prober sent it and looked
//! for the answer on time, the probe itself did not fail, and the worker was neither running
//! (busy with other work, or still answering) nor waiting for a CPU during the probe window.
//! The kernel adds a thread's run and wait times only when it gets or leaves a CPU, so a
//! thread still queued at the end of the window shows only in its state (`R`). A worker none
//! of whose threads was scheduled or runnable while a probe waited for it is stopped or
//! blocked (SIGSTOP, a deadlock): that is a hang. Everything else is retried, not counted.
use std::time::Duration;

use portshard_common::{ProbeHealth, ProbeState};

/// How late the prober's own timers may fire before an unanswered probe says more about
/// the daemon's host than about the worker: this fraction of the probe timeout...
const LATE_FRACTION: u32 = 4;
/// ...but never less than this.
const LATE_FLOOR: Duration = Duration::from_millis(10);

/// How long past its schedule the prober may act before its probe is excused.
pub fn late_slack(timeout: Duration) -> Duration {
    (timeout / LATE_FRACTION).max(LATE_FLOOR)
}

/// What the kernel's scheduler says about a worker's threads, summed
/// (`/proc/<pid>/task/<tid>/schedstat`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Schedule {
    /// Time spent running on a CPU, in nanoseconds.
    pub ran_ns: u64,
    /// Time spent runnable, waiting on a run queue for a CPU, in nanoseconds.
    pub waited_ns: u64,
    /// How many times a thread was put on a CPU.
    pub slices: u64,
    /// Whether a thread is running or queued for a CPU now (state `R` in its `stat`).
    pub runnable: bool,
}

impl Schedule {
    /// Adds one thread's `schedstat` text (`<run ns> <wait ns> <slices>`) and `stat` text
    /// (whose state letter follows the parenthesised command name); `None` if either is not
    /// in that form.
    pub fn add_thread(&mut self, schedstat: &str, stat: &str) -> Option<()> {
        let (_, after_name) = stat.rsplit_once(") ")?;
        let state = after_name.chars().next()?;
        let mut fields = schedstat.split_whitespace().map(str::parse::<u64>);
        let (ran, waited, slices) = (
            fields.next()?.ok()?,
            fields.next()?.ok()?,
            fields.next()?.ok()?,
        );
        self.ran_ns = self.ran_ns.saturating_add(ran);
        self.waited_ns = self.waited_ns.saturating_add(waited);
        self.slices = self.slices.saturating_add(slices);
        self.runnable |= state == 'R';
        Some(())
    }
}

/// Why an unanswered probe was not counted against the worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Excuse {
    /// The prober sent the probe, or looked for its answer, later than its slack: the
    /// daemon's host was busy, and the answer may have been waiting unread.
    ProberLate,
    /// The worker ran during the probe window: it is working (a saturated worker, or one
    /// still answering), not stopped or blocked.
    WorkerBusy,
    /// The worker was runnable but waited for a CPU: the host is busy, not the worker hung.
    WorkerStarved,
    /// The worker's scheduler record could not be read (it is exiting): its exit, not a
    /// probe, decides what happens next.
    WorkerGone,
    /// The probe itself failed (a socket or sock_diag error, logged): it says nothing about
    /// the worker.
    ProbeError,
}

impl Excuse {
    /// A short name for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ProberLate => "prober late",
            Self::WorkerBusy => "worker busy",
            Self::WorkerStarved => "worker waited for a CPU",
            Self::WorkerGone => "worker gone",
            Self::ProbeError => "probe failed",
        }
    }
}

/// How many probes of one slot ended each way: what an operator asks when workers are
/// killed, or not killed, on a busy host.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OutcomeCounts {
    /// Answered in time.
    pub answered: u64,
    /// Counted against the worker.
    pub unanswered: u64,
    /// Excused: the prober was late.
    pub prober_late: u64,
    /// Excused: the worker was running.
    pub worker_busy: u64,
    /// Excused: the worker waited for a CPU.
    pub worker_starved: u64,
    /// Excused: the worker was exiting.
    pub worker_gone: u64,
    /// Excused: the probe itself failed.
    pub probe_error: u64,
}

impl OutcomeCounts {
    /// Counts one more `outcome`.
    pub fn add(&mut self, outcome: Outcome) {
        let count = match outcome {
            Outcome::Answered => &mut self.answered,
            Outcome::Unanswered => &mut self.unanswered,
            Outcome::Excused(Excuse::ProberLate) => &mut self.prober_late,
            Outcome::Excused(Excuse::WorkerBusy) => &mut self.worker_busy,
            Outcome::Excused(Excuse::WorkerStarved) => &mut self.worker_starved,
            Outcome::Excused(Excuse::WorkerGone) => &mut self.worker_gone,
            Outcome::Excused(Excuse::ProbeError) => &mut self.probe_error,
        };
        *count += 1;
    }

    /// Each count under the name the metrics give its outcome.
    pub fn named(&self) -> [(&'static str, u64); 7] {
        [
            ("answered", self.answered),
            ("unanswered", self.unanswered),
            ("prober_late", self.prober_late),
            ("worker_busy", self.worker_busy),
            ("worker_starved", self.worker_starved),
            ("worker_gone", self.worker_gone),
            ("probe_error", self.probe_error),
        ]
    }
}

/// The outcome of one probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The worker answered (UDP) or accepted the probe's connection (TCP) in time.
    Answered,
    /// No answer although the worker had every chance: counts towards a hang.
    Unanswered,
    /// No answer, for a reason that says nothing about the worker's health: retried.
    Excused(Excuse),
}

/// What happened around a probe that got no answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Miss {
    /// How late the prober sent the probe, past its schedule.
    pub sent_late: Duration,
    /// How late the prober looked for the answer, past the probe's deadline.
    pub checked_late: Duration,
    /// The prober's slack ([`late_slack`]).
    pub slack: Duration,
    /// The worker's schedule when the probe was sent, if it could be read.
    pub before: Option<Schedule>,
    /// The worker's schedule when the answer was looked for, if it could be read.
    pub after: Option<Schedule>,
}

/// Judges a probe that got no answer (see the module documentation).
pub fn judge(miss: Miss) -> Outcome {
    if miss.sent_late > miss.slack || miss.checked_late > miss.slack {
        return Outcome::Excused(Excuse::ProberLate);
    }
    let (Some(before), Some(after)) = (miss.before, miss.after) else {
        return Outcome::Excused(Excuse::WorkerGone);
    };
    // Any change counts: a thread that ended in the window takes its times with it, which
    // only a worker that ran can do.
    if after.slices != before.slices || after.ran_ns != before.ran_ns {
        Outcome::Excused(Excuse::WorkerBusy)
    } else if after.runnable || after.waited_ns != before.waited_ns {
        Outcome::Excused(Excuse::WorkerStarved)
    } else {
        Outcome::Unanswered
    }
}

/// What the probes say about a worker so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The last counted probe was answered (or none was counted yet).
    Passing,
    /// The last `n` counted probes went unanswered, fewer than the limit.
    Failing(u32),
    /// As many counted probes as the limit went unanswered in a row: the worker is hung.
    Hung(u32),
}

/// Counts a worker's unanswered probes in a row; excused probes are not counted.
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
    pub fn record(&mut self, outcome: Outcome) -> Verdict {
        match outcome {
            Outcome::Answered => {
                self.probed = true;
                self.failures = 0;
            }
            Outcome::Unanswered => {
                self.probed = true;
                self.failures += 1;
            }
            Outcome::Excused(_) => {}
        }
        match self.failures {
            0 => Verdict::Passing,
            n if n >= self.limit => Verdict::Hung(n),
            n => Verdict::Failing(n),
        }
    }

    /// Whether the last counted probe was answered (a worker not probed yet is not).
    pub fn is_passing(&self) -> bool {
        self.health().state == ProbeState::Passing as u32
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

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const SLACK: Duration = Duration::from_millis(25);

    fn schedule(ran_ns: u64, waited_ns: u64, slices: u64) -> Option<Schedule> {
        Some(Schedule {
            ran_ns,
            waited_ns,
            slices,
            runnable: false,
        })
    }

    fn miss(before: Option<Schedule>, after: Option<Schedule>) -> Miss {
        Miss {
            sent_late: Duration::ZERO,
            checked_late: Duration::ZERO,
            slack: SLACK,
            before,
            after,
        }
    }

    #[test]
    fn a_worker_is_hung_after_the_limit_of_failures_in_a_row() {
        let mut tracker = Tracker::new(3);
        assert_eq!(tracker.health().state, ProbeState::Unprobed as u32);
        assert_eq!(tracker.record(Outcome::Unanswered), Verdict::Failing(1));
        assert_eq!(tracker.record(Outcome::Unanswered), Verdict::Failing(2));
        assert_eq!(
            tracker.health(),
            ProbeHealth {
                state: ProbeState::Failing as u32,
                failures: 2
            }
        );
        // One answer starts the count again.
        assert_eq!(tracker.record(Outcome::Answered), Verdict::Passing);
        assert_eq!(tracker.health().state, ProbeState::Passing as u32);
        assert_eq!(tracker.record(Outcome::Unanswered), Verdict::Failing(1));
        assert_eq!(tracker.record(Outcome::Unanswered), Verdict::Failing(2));
        assert_eq!(tracker.record(Outcome::Unanswered), Verdict::Hung(3));
    }

    #[test]
    fn excused_probes_neither_count_nor_forgive() {
        let mut tracker = Tracker::new(2);
        let late = Outcome::Excused(Excuse::ProberLate);
        assert_eq!(tracker.record(late), Verdict::Passing);
        assert_eq!(
            tracker.health().state,
            ProbeState::Unprobed as u32,
            "{tracker:?}"
        );
        assert_eq!(tracker.record(Outcome::Unanswered), Verdict::Failing(1));
        // A busy host between two real misses neither resets the run nor adds to it.
        for _ in 0..10 {
            assert_eq!(
                tracker.record(Outcome::Excused(Excuse::WorkerStarved)),
                Verdict::Failing(1)
            );
        }
        assert_eq!(tracker.record(Outcome::Unanswered), Verdict::Hung(2));
    }

    #[test]
    fn a_worker_never_scheduled_in_the_window_is_unanswered() {
        // Stopped or blocked: neither ran nor waited for a CPU.
        let same = schedule(5_000, 700, 12);
        assert_eq!(judge(miss(same, same)), Outcome::Unanswered);
    }

    #[test]
    fn a_worker_that_ran_or_waited_for_a_cpu_is_excused() {
        let before = schedule(5_000, 700, 12);
        assert_eq!(
            judge(miss(before, schedule(9_000, 700, 13))),
            Outcome::Excused(Excuse::WorkerBusy)
        );
        // Still on the CPU it had when the probe was sent: run time grew, no new slice.
        assert_eq!(
            judge(miss(before, schedule(9_000, 700, 12))),
            Outcome::Excused(Excuse::WorkerBusy)
        );
        assert_eq!(
            judge(miss(before, schedule(5_000, 90_000, 12))),
            Outcome::Excused(Excuse::WorkerStarved)
        );
        assert_eq!(
            judge(miss(before, None)),
            Outcome::Excused(Excuse::WorkerGone)
        );
        // Queued for a CPU the whole window (throttled by a quota, say): no time moved, but
        // its state says it is runnable.
        let queued = before.map(|b| Schedule {
            runnable: true,
            ..b
        });
        assert_eq!(
            judge(miss(before, queued)),
            Outcome::Excused(Excuse::WorkerStarved)
        );
    }

    #[test]
    fn a_late_prober_excuses_even_a_stopped_worker() {
        let same = schedule(5_000, 700, 12);
        for (sent_late, checked_late) in [(SLACK * 2, Duration::ZERO), (Duration::ZERO, SLACK * 2)]
        {
            let late = Miss {
                sent_late,
                checked_late,
                ..miss(same, same)
            };
            assert_eq!(judge(late), Outcome::Excused(Excuse::ProberLate));
        }
        let on_time = Miss {
            sent_late: SLACK,
            checked_late: SLACK,
            ..miss(same, same)
        };
        assert_eq!(judge(on_time), Outcome::Unanswered);
    }

    #[test]
    fn outcomes_are_counted_under_their_names() {
        let mut counts = OutcomeCounts::default();
        for outcome in [
            Outcome::Answered,
            Outcome::Answered,
            Outcome::Unanswered,
            Outcome::Excused(Excuse::ProberLate),
            Outcome::Excused(Excuse::WorkerBusy),
            Outcome::Excused(Excuse::WorkerStarved),
            Outcome::Excused(Excuse::WorkerStarved),
            Outcome::Excused(Excuse::WorkerGone),
            Outcome::Excused(Excuse::ProbeError),
        ] {
            counts.add(outcome);
        }
        assert_eq!(
            counts.named(),
            [
                ("answered", 2),
                ("unanswered", 1),
                ("prober_late", 1),
                ("worker_busy", 1),
                ("worker_starved", 2),
                ("worker_gone", 1),
                ("probe_error", 1)
            ]
        );
    }

    #[test]
    fn the_slack_is_a_quarter_of_the_timeout_with_a_floor() {
        assert_eq!(
            late_slack(Duration::from_millis(500)),
            Duration::from_millis(125)
        );
        assert_eq!(late_slack(Duration::from_millis(20)), LATE_FLOOR);
    }

    #[test]
    fn threads_add_up_and_any_runnable_one_makes_the_worker_runnable() {
        let sleeping = "4102 (python3) S 1 4102 4102 0 -1 4194560 1 0 0 0";
        let queued = "4103 (a (weird) name) R 1 4102 4102 0 -1 4194560 1 0 0 0";
        let mut total = Schedule::default();
        assert_eq!(total.add_thread("831478 45407 3\n", sleeping), Some(()));
        assert!(!total.runnable);
        assert_eq!(total.add_thread("1000 5 2", queued), Some(()));
        assert_eq!(
            total,
            Schedule {
                ran_ns: 832_478,
                waited_ns: 45_412,
                slices: 5,
                runnable: true
            }
        );
        assert_eq!(total.add_thread("12 x 3", sleeping), None);
        assert_eq!(total.add_thread("12 3", sleeping), None);
        assert_eq!(total.add_thread("12 3 4", "no name here"), None);
        assert_eq!(total.slices, 5, "a bad record adds nothing");
    }

    proptest! {
        /// The verdict depends only on the counted probes since the last answer.
        #[test]
        fn verdicts_count_failures_since_the_last_answer(
            limit in 1u32..6,
            outcomes in proptest::collection::vec(0u8..3, 0..40),
        ) {
            let mut tracker = Tracker::new(limit);
            let mut run = 0;
            for outcome in outcomes {
                let outcome = match outcome {
                    0 => Outcome::Answered,
                    1 => Outcome::Unanswered,
                    _ => Outcome::Excused(Excuse::WorkerBusy),
                };
                run = match outcome {
                    Outcome::Answered => 0,
                    Outcome::Unanswered => run + 1,
                    Outcome::Excused(_) => run,
                };
                let expected = match run {
                    0 => Verdict::Passing,
                    n if n >= limit => Verdict::Hung(n),
                    n => Verdict::Failing(n),
                };
                prop_assert_eq!(tracker.record(outcome), expected);
                prop_assert_eq!(tracker.health().failures, run);
            }
        }

        /// Whatever a schedstat file holds, reading it never panics.
        #[test]
        fn any_schedstat_text_is_read_without_panic(schedstat in "\\PC*", stat in "\\PC*") {
            let _ = Schedule::default().add_thread(&schedstat, &stat);
        }

        /// A worker whose record did not move in the window and that is not runnable at its
        /// end is unanswered; any growth of run time, slices or waiting, or a runnable
        /// thread, excuses it.
        #[test]
        fn only_a_still_worker_is_unanswered(
            ran in 0u64..1 << 40, waited in 0u64..1 << 40, slices in 0u64..1 << 20,
            grow_ran in 0u64..3, grow_waited in 0u64..3, grow_slices in 0u64..3,
            runnable: bool,
        ) {
            let before = schedule(ran, waited, slices);
            let after = schedule(ran + grow_ran, waited + grow_waited, slices + grow_slices)
                .map(|after| Schedule { runnable, ..after });
            let still = grow_ran + grow_waited + grow_slices == 0 && !runnable;
            prop_assert_eq!(judge(miss(before, after)) == Outcome::Unanswered, still);
        }
    }
}
