//! The soak's bookkeeping, pure: the faults injected (with the time span each disturbs its
//! slot), each flow's last answer, and the invariants every observation is checked against.
//! The soak runner (`portshard-soak`) makes the observations and injects the faults.
//!
//! Invariants: a flow moves (answered by another slot, or another worker of its slot) only
//! when its slot or the slot it moves to was disturbed (its worker killed, stopped, drained,
//! restored or reweighted, or retired by a reload of its service) in the span since its last
//! answer, or it passed through a slot
//! that gained entries and lost them again in that span (restored, then killed: the flow goes
//! back to that slot, then on to its heir); a datagram goes unanswered only when its slot was
//! disturbed, or a slot that gained entries was down; a TCP connection fails
//! only when its worker (or, unknown, any worker of the service) was killed or stopped, or its
//! worker was retired by a reload (which ends held connections at `drain_timeout`), and is
//! never refused; a reload is switched to, or else the daemon was killed while it ran; no
//! table entry stays without a live owner or heir.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    time::Duration,
};

use portshard::table::Slot;

use crate::daemon::Answer;

/// What a fault did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum FaultKind {
    /// SIGKILL of a worker; disturbs its slot until the replacement serves.
    Kill,
    /// SIGSTOP of a worker; disturbs its slot until SIGCONT (or its replacement serves).
    Stop,
    /// `kill -9` of the daemon and a restart; disturbs no slot.
    DaemonKill,
    /// A slot drained.
    Drain,
    /// A drained slot given its weight back.
    Restore,
    /// A slot's weight changed.
    Weight,
    /// A service reloaded: each slot of its old generation is disturbed from the request in
    /// `balance` mode (the switch moves its flows), from its worker's exit in `handover`
    /// mode (its flows stay on it until then), until the service has settled (its old
    /// generation exited, or the new one was rolled back).
    Reload,
}

impl FaultKind {
    /// The name in the soak's report.
    pub fn name(self) -> &'static str {
        match self {
            Self::Kill => "kill",
            Self::Stop => "stop",
            Self::DaemonKill => "daemon_kill",
            Self::Drain => "drain",
            Self::Restore => "restore",
            Self::Weight => "weight",
            Self::Reload => "reload",
        }
    }

    /// Whether the slot's worker does not serve during the fault.
    fn takes_down(self) -> bool {
        matches!(self, Self::Kill | Self::Stop)
    }
}

/// One injected fault.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fault {
    /// What was done.
    pub kind: FaultKind,
    /// To which service (empty for the daemon).
    pub service: String,
    /// To which slot, if one.
    pub slot: Option<Slot>,
    /// When, since the start.
    pub from: Duration,
    /// Until when it disturbs the slot; `None` while it still does.
    pub until: Option<Duration>,
}

/// A broken invariant, with what it was about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// When it was seen, since the start.
    pub at: Duration,
    /// The service.
    pub service: String,
    /// The flow or connection.
    pub flow: String,
    /// The slot involved.
    pub slot: Option<Slot>,
    /// The worker involved.
    pub pid: Option<u32>,
    /// What went wrong.
    pub what: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let slot = self.slot.map_or("-".to_owned(), |s| s.to_string());
        let pid = self.pid.map_or("-".to_owned(), |p| p.to_string());
        write!(
            f,
            "violation t={:.3}s service={} flow={} slot={slot} pid={pid}: {}",
            self.at.as_secs_f64(),
            self.service,
            self.flow,
            self.what
        )
    }
}

/// How a TCP connection of the load went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TcpOutcome {
    /// Greeted by this worker and echoed.
    Served(Answer),
    /// Refused at connect: never allowed.
    Refused,
    /// Failed (reset, timed out) after being greeted by `answer`, or before any greeting.
    Failed {
        /// The worker that greeted it, if one did.
        answer: Option<Answer>,
        /// What failed.
        what: String,
    },
}

/// Everything the soak knows: faults, last answers, violations.
#[derive(Debug)]
pub struct Ledger {
    margin: Duration,
    /// Faults injected, by kind (a reload is one, however many slots it disturbs).
    injected: BTreeMap<FaultKind, usize>,
    /// What each fault disturbs: one span per slot.
    faults: Vec<Fault>,
    last: BTreeMap<(String, usize), (Answer, Duration)>,
    violations: Vec<Violation>,
    /// Datagrams lost where the expected worker's socket dropped datagrams (a full receive
    /// buffer) during the round: excused, counted.
    buffer_losses: usize,
}

impl Ledger {
    /// A ledger that allows `margin` around each fault for delivery and scheduling delays.
    pub fn new(margin: Duration) -> Self {
        Self {
            margin,
            injected: BTreeMap::new(),
            faults: Vec::new(),
            last: BTreeMap::new(),
            violations: Vec::new(),
            buffer_losses: 0,
        }
    }

    /// Records a fault; returns its number, to end it with [`Ledger::end`].
    pub fn fault(&mut self, fault: Fault) -> usize {
        *self.injected.entry(fault.kind).or_default() += 1;
        self.faults.push(fault);
        self.faults.len() - 1
    }

    /// Counts a reload injected; what it disturbs is recorded per old slot with
    /// [`Ledger::retiring`].
    pub fn count_reload(&mut self) {
        *self.injected.entry(FaultKind::Reload).or_default() += 1;
    }

    /// Records that a reload of `service` disturbs old slot `slot` from `from` on; returns
    /// the span's number, to end it with [`Ledger::end`] once the service has settled.
    pub fn retiring(&mut self, service: &str, slot: Slot, from: Duration) -> usize {
        self.faults.push(Fault {
            kind: FaultKind::Reload,
            service: service.to_owned(),
            slot: Some(slot),
            from,
            until: None,
        });
        self.faults.len() - 1
    }

    /// Records that a reload of `service` requested at `from` was not switched to by `to`
    /// (`what` says how it ended): a violation unless the daemon was killed meanwhile, which
    /// rolls back a reload it had not switched to yet.
    pub fn reload_failed(&mut self, service: &str, from: Duration, to: Duration, what: String) {
        let daemon_killed = self
            .faults
            .iter()
            .any(|f| f.kind == FaultKind::DaemonKill && f.from >= from && f.from <= to);
        if !daemon_killed {
            let what = format!("reload not switched to: {what}");
            self.violate(to, service, "reload".to_owned(), None, what);
        }
    }

    /// Fault `index` stopped disturbing its slot at `at`.
    pub fn end(&mut self, index: usize, at: Duration) {
        if let Some(fault) = self.faults.get_mut(index) {
            fault.until.get_or_insert(at);
        }
    }

    /// Faults on `service` slot `slot` (any slot if `None`) whose span meets `[from, to]`,
    /// widened by the margin.
    fn faults_on<'a>(
        &'a self,
        service: &'a str,
        slot: Option<Slot>,
        from: Duration,
        to: Duration,
    ) -> impl Iterator<Item = &'a Fault> + 'a {
        let (from, to) = (from.saturating_sub(self.margin), to + self.margin);
        self.faults.iter().filter(move |f| {
            f.service == service
                && f.slot.is_some()
                && (slot.is_none() || f.slot == slot)
                && f.from <= to
                && f.until.is_none_or(|until| until >= from)
        })
    }

    fn disturbed(&self, service: &str, slot: Slot, from: Duration, to: Duration) -> bool {
        self.faults_on(service, Some(slot), from, to)
            .next()
            .is_some()
    }

    /// Whether some slot of `service` gained entries and then lost them (went down or was
    /// drained) within the span: a flow may have gone to it and on to its heir, or be lost
    /// with it, without either end of the flow's move being disturbed.
    fn passed_through(&self, service: &str, from: Duration, to: Duration) -> bool {
        let spans = || self.faults_on(service, None, from, to);
        spans().any(|gain| {
            // A restored or reweighted slot gains at once; a killed one when it rejoins.
            let gained = match gain.kind {
                FaultKind::Restore | FaultKind::Weight => gain.from,
                FaultKind::Kill => gain.until.unwrap_or(Duration::MAX),
                _ => return false,
            };
            spans().any(|lost| {
                (lost.kind.takes_down() || lost.kind == FaultKind::Drain)
                    && lost.slot == gain.slot
                    && lost.from >= gained
            })
        })
    }

    fn violate(
        &mut self,
        at: Duration,
        service: &str,
        flow: String,
        answer: Option<Answer>,
        what: String,
    ) {
        self.violations.push(Violation {
            at,
            service: service.to_owned(),
            flow,
            slot: answer.map(|a| a.slot),
            pid: answer.map(|a| a.pid),
            what,
        });
    }

    /// Checks one UDP round of `service` collected until `done`: `answers[flow]` is who
    /// answered the flow, if anyone did. A flow's span runs from its last answer to `done`.
    pub fn udp_round(&mut self, service: &str, done: Duration, answers: &[Option<Answer>]) {
        self.udp_round_with_drops(service, done, answers, &BTreeSet::new());
    }

    /// [`Ledger::udp_round`], where the sockets of the slots `dropped` dropped datagrams
    /// during the round (their receive buffers were full, as under a flood): a flow of
    /// theirs left unanswered is a buffer's loss, not steering's, and is excused.
    pub fn udp_round_with_drops(
        &mut self,
        service: &str,
        done: Duration,
        answers: &[Option<Answer>],
        dropped: &BTreeSet<Slot>,
    ) {
        for (flow, answer) in answers.iter().enumerate() {
            let key = (service.to_owned(), flow);
            let Some(&(before, since)) = self.last.get(&key) else {
                if let Some(answer) = answer {
                    self.last.insert(key, (*answer, done));
                }
                continue;
            };
            let name = format!("udp {flow}");
            match answer {
                Some(now) if now.slot != before.slot => {
                    if !self.disturbed(service, before.slot, since, done)
                        && !self.disturbed(service, now.slot, since, done)
                        && !self.passed_through(service, since, done)
                    {
                        let what = format!(
                            "moved from slot {} pid {} although neither slot was disturbed",
                            before.slot, before.pid
                        );
                        self.violate(done, service, name, Some(*now), what);
                    }
                }
                Some(now) if now.pid != before.pid => {
                    if !self.disturbed(service, before.slot, since, done) {
                        let what = format!(
                            "answered by another worker than pid {} although its slot was not disturbed",
                            before.pid
                        );
                        self.violate(done, service, name, Some(*now), what);
                    }
                }
                Some(_) => {}
                None if dropped.contains(&before.slot) => {
                    self.buffer_losses += 1;
                    continue;
                }
                None => {
                    if !self.disturbed(service, before.slot, since, done)
                        && !self.passed_through(service, since, done)
                    {
                        let what = "datagram lost although its worker stayed healthy".to_owned();
                        self.violate(done, service, name, Some(before), what);
                    }
                    continue;
                }
            }
            if let Some(answer) = answer {
                self.last.insert(key, (*answer, done));
            }
        }
    }

    /// Checks a TCP connection of `service` opened at `from` and finished at `to`.
    pub fn tcp(
        &mut self,
        service: &str,
        from: Duration,
        to: Duration,
        flow: String,
        outcome: TcpOutcome,
    ) {
        match outcome {
            TcpOutcome::Served(_) => {}
            TcpOutcome::Refused => {
                self.violate(to, service, flow, None, "connection refused".to_owned());
            }
            TcpOutcome::Failed { answer, what } => {
                let excused = match answer {
                    // A reload's retiring worker ends what it still holds at drain_timeout.
                    Some(a) => self
                        .faults_on(service, Some(a.slot), from, to)
                        .any(|f| f.kind.takes_down() || f.kind == FaultKind::Reload),
                    None => self
                        .faults_on(service, None, from, to)
                        .any(|f| f.kind.takes_down()),
                };
                if !excused {
                    let what = format!(
                        "{what} although no worker it could have reached was killed or stopped"
                    );
                    self.violate(to, service, flow, answer, what);
                }
            }
        }
    }

    /// Records that `entries` table entries of `service` named neither a live owner nor a
    /// live heir at `at`, unless a worker of the service was killed just before (the
    /// daemon heals the table when it learns of the death).
    pub fn table(&mut self, service: &str, at: Duration, entries: usize, example: String) {
        if entries > 0
            && !self
                .faults_on(service, None, at, at)
                .any(|f| f.kind.takes_down())
        {
            let what = format!(
                "{entries} table entries with neither a live owner nor a live heir, e.g. {example}"
            );
            self.violate(at, service, "table".to_owned(), None, what);
        }
    }

    /// Records a violation found outside the ledger's own checks (leftovers at the end).
    pub fn other(&mut self, at: Duration, what: String) {
        self.violate(at, "-", "-".to_owned(), None, what);
    }

    /// The faults injected so far, by kind.
    pub fn faults_by_kind(&self) -> &BTreeMap<FaultKind, usize> {
        &self.injected
    }

    /// Datagrams lost where their worker's socket dropped datagrams meanwhile (excused).
    pub fn buffer_losses(&self) -> usize {
        self.buffer_losses
    }

    /// How many faults were injected.
    pub fn fault_count(&self) -> usize {
        self.injected.values().sum()
    }

    /// Every violation, in the order seen.
    pub fn violations(&self) -> &[Violation] {
        &self.violations
    }
}

/// A small deterministic generator (xorshift64*), so a soak is repeatable from its seed.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (0 is replaced, xorshift cannot leave it).
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    /// A number in `range` (which must not be empty).
    pub fn below(&mut self, range: std::ops::Range<u64>) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        range.start + self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % (range.end - range.start)
    }

    /// A duration in `range`, to the millisecond.
    pub fn millis(&mut self, range: std::ops::Range<u64>) -> Duration {
        Duration::from_millis(self.below(range))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: &str = "udp-a";

    fn at(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    fn answer(slot: Slot, pid: u32) -> Option<Answer> {
        Some(Answer { slot, pid })
    }

    fn ledger_with(kind: FaultKind, slot: Slot, from: u64, until: u64) -> Ledger {
        let mut ledger = Ledger::new(at(100));
        ledger.fault(Fault {
            kind,
            service: S.to_owned(),
            slot: Some(slot),
            from: at(from),
            until: Some(at(until)),
        });
        ledger.udp_round(S, at(10), &[answer(0, 100), answer(1, 101)]);
        ledger
    }

    #[test]
    fn a_flow_may_move_only_when_its_slot_or_its_new_slot_was_disturbed() {
        let mut ledger = ledger_with(FaultKind::Kill, 0, 1000, 1500);
        // Long after the kill, flow 1 moves from slot 1 to 2: neither was disturbed.
        ledger.udp_round(S, at(3010), &[answer(0, 200), answer(2, 102)]);
        assert_eq!(ledger.violations().len(), 1, "{:?}", ledger.violations());
        let violation = ledger.violations()[0].to_string();
        assert!(violation.starts_with("violation t=3.010s service=udp-a flow=udp 1 slot=2 pid=102: moved from slot 1 pid 101"), "{violation}");
        // Flow 0's slot 0 was killed within its span: a new pid is allowed.
        let mut ledger = ledger_with(FaultKind::Kill, 0, 1000, 1500);
        ledger.udp_round(S, at(1210), &[answer(3, 103), answer(1, 101)]);
        ledger.udp_round(S, at(1610), &[answer(0, 200), answer(1, 101)]);
        assert!(ledger.violations().is_empty(), "{:?}", ledger.violations());
    }

    #[test]
    fn a_lost_datagram_is_excused_only_where_its_workers_socket_dropped_datagrams() {
        let mut ledger = ledger_with(FaultKind::Stop, 0, 1000, 1500);
        // Long after the fault: slot 1's socket dropped datagrams, slot 0's did not.
        let dropped = BTreeSet::from([1]);
        ledger.udp_round_with_drops(S, at(3300), &[answer(0, 100), None], &dropped);
        assert!(ledger.violations().is_empty(), "{:?}", ledger.violations());
        assert_eq!(ledger.buffer_losses(), 1);
        ledger.udp_round_with_drops(S, at(3700), &[None, answer(1, 101)], &dropped);
        assert_eq!(ledger.violations().len(), 1);
        assert_eq!(ledger.buffer_losses(), 1);
    }

    #[test]
    fn a_lost_datagram_is_a_violation_unless_its_worker_or_a_gaining_slot_was_down() {
        let mut ledger = ledger_with(FaultKind::Stop, 0, 1000, 1500);
        ledger.udp_round(S, at(1400), &[None, answer(1, 101)]);
        assert!(ledger.violations().is_empty());
        ledger.udp_round(S, at(3300), &[answer(0, 100), None]);
        assert_eq!(ledger.violations().len(), 1);
        assert!(
            ledger.violations()[0]
                .what
                .contains("lost although its worker stayed healthy")
        );
        // Slot 4 was given weight and stopped: flows it gained may go unanswered.
        let mut ledger = ledger_with(FaultKind::Weight, 4, 5000, 5000);
        ledger.fault(Fault {
            kind: FaultKind::Stop,
            service: S.to_owned(),
            slot: Some(4),
            from: at(5050),
            until: None,
        });
        ledger.udp_round(S, at(5400), &[None, answer(1, 101)]);
        assert!(ledger.violations().is_empty(), "{:?}", ledger.violations());
    }

    #[test]
    fn a_flow_may_pass_through_a_slot_restored_and_killed_between_two_rounds() {
        // Slot 4 is restored (takes back flow 1, once its own) and killed a moment later:
        // flow 1 goes on to its heir, slot 2; the rounds see it move from 1 to 2.
        let mut ledger = ledger_with(FaultKind::Restore, 4, 2000, 2000);
        ledger.fault(Fault {
            kind: FaultKind::Kill,
            service: S.to_owned(),
            slot: Some(4),
            from: at(2006),
            until: Some(at(2200)),
        });
        ledger.udp_round(S, at(2300), &[answer(0, 100), answer(2, 102)]);
        assert!(ledger.violations().is_empty(), "{:?}", ledger.violations());
        // A restore alone is no reason for a flow to move between two other slots.
        let mut ledger = ledger_with(FaultKind::Restore, 4, 2000, 2000);
        ledger.udp_round(S, at(2300), &[answer(0, 100), answer(2, 102)]);
        assert_eq!(ledger.violations().len(), 1);
    }

    #[test]
    fn tcp_failures_need_a_downed_worker_and_refusals_are_never_allowed() {
        let mut ledger = ledger_with(FaultKind::Drain, 2, 0, 0);
        let failed = |answer| TcpOutcome::Failed {
            answer,
            what: "reset".to_owned(),
        };
        ledger.tcp(
            S,
            at(2000),
            at(2100),
            "tcp 1".into(),
            failed(answer(2, 102)),
        );
        ledger.tcp(S, at(2000), at(2100), "tcp 2".into(), TcpOutcome::Refused);
        ledger.tcp(
            S,
            at(2000),
            at(2100),
            "tcp 3".into(),
            TcpOutcome::Served(Answer { slot: 1, pid: 1 }),
        );
        assert_eq!(ledger.violations().len(), 2);
        let mut ledger = ledger_with(FaultKind::Stop, 2, 1900, 2200);
        ledger.tcp(
            S,
            at(2000),
            at(2100),
            "tcp 1".into(),
            failed(answer(2, 102)),
        );
        ledger.tcp(S, at(2000), at(2100), "tcp 2".into(), failed(None));
        ledger.tcp(
            S,
            at(2000),
            at(2100),
            "tcp 3".into(),
            failed(answer(3, 103)),
        );
        assert_eq!(ledger.violations().len(), 1);
        assert_eq!(ledger.violations()[0].flow, "tcp 3");
    }

    #[test]
    fn faults_are_counted_by_kind_and_open_faults_last_until_ended() {
        let mut ledger = Ledger::new(at(0));
        let open = ledger.fault(Fault {
            kind: FaultKind::Kill,
            service: S.to_owned(),
            slot: Some(1),
            from: at(10),
            until: None,
        });
        assert!(ledger.disturbed(S, 1, at(100_000), at(100_001)));
        ledger.end(open, at(20));
        assert!(!ledger.disturbed(S, 1, at(100), at(200)));
        ledger.table(S, at(15), 3, "entry 7".into());
        ledger.table(S, at(500), 3, "entry 7".into());
        assert_eq!(ledger.violations().len(), 1);
        assert_eq!(
            ledger.faults_by_kind(),
            &BTreeMap::from([(FaultKind::Kill, 1)])
        );
        let mut rng = Rng::new(7);
        let draws: Vec<u64> = (0..1000).map(|_| rng.below(3..9)).collect();
        assert!(draws.iter().all(|d| (3..9).contains(d)));
        assert_eq!(
            draws
                .iter()
                .collect::<std::collections::BTreeSet<_>>()
                .len(),
            6
        );
    }

    #[test]
    fn a_reload_excuses_moves_losses_and_ended_connections_of_its_old_slots_only() {
        let mut ledger = Ledger::new(at(100));
        ledger.udp_round(S, at(10), &[answer(0, 100), answer(1, 101)]);
        ledger.count_reload();
        let spans = [
            ledger.retiring(S, 0, at(1000)),
            ledger.retiring(S, 1, at(1000)),
        ];
        // At the switch both flows go to the new generation's slots; one datagram is lost
        // as slot 1's worker exits.
        ledger.udp_round(S, at(1500), &[answer(8, 108), None]);
        ledger.udp_round(S, at(4200), &[answer(8, 108), answer(9, 109)]);
        let failed = TcpOutcome::Failed {
            answer: answer(1, 101),
            what: "held connection failed: reset".to_owned(),
        };
        ledger.tcp(S, at(500), at(4100), "held 0".into(), failed);
        for span in spans {
            ledger.end(span, at(4200));
        }
        assert!(ledger.violations().is_empty(), "{:?}", ledger.violations());
        // Once the old workers are gone, the new slots are held to the rules again.
        ledger.udp_round(S, at(9000), &[answer(9, 109), answer(9, 109)]);
        assert_eq!(ledger.violations().len(), 1, "{:?}", ledger.violations());
        assert_eq!(ledger.violations()[0].flow, "udp 0");
        // A new connection on the new generation may not fail because of the reload.
        let failed = TcpOutcome::Failed {
            answer: answer(8, 108),
            what: "echo: reset".to_owned(),
        };
        ledger.tcp(S, at(2000), at(2100), "tcp 1".into(), failed);
        assert_eq!(ledger.violations().len(), 2);
        // A reload counts once, however many slots it retires.
        assert_eq!(ledger.fault_count(), 1);
    }

    #[test]
    fn in_handover_a_flow_may_leave_its_old_slot_only_once_the_old_worker_is_gone() {
        let mut ledger = Ledger::new(at(100));
        ledger.udp_round(S, at(10), &[answer(0, 100), answer(1, 101)]);
        ledger.count_reload();
        // Switched at about 1000; flow 1 moves to the new generation while its old worker
        // still runs (its span only starts when the worker is seen gone, at 4000).
        ledger.udp_round(S, at(1500), &[answer(0, 100), answer(9, 109)]);
        let span = ledger.retiring(S, 0, at(3900));
        ledger.udp_round(S, at(4100), &[answer(8, 108), answer(9, 109)]);
        ledger.end(span, at(4000));
        assert_eq!(ledger.violations().len(), 1, "{:?}", ledger.violations());
        assert_eq!(ledger.violations()[0].flow, "udp 1");
    }

    #[test]
    fn a_reload_must_be_switched_to_unless_the_daemon_was_killed_meanwhile() {
        let mut ledger = Ledger::new(at(100));
        ledger.reload_failed(S, at(1000), at(1400), "rolled back".to_owned());
        assert_eq!(ledger.violations().len(), 1);
        assert_eq!(ledger.violations()[0].flow, "reload");
        ledger.fault(Fault {
            kind: FaultKind::DaemonKill,
            service: String::new(),
            slot: None,
            from: at(2100),
            until: Some(at(2100)),
        });
        ledger.reload_failed(S, at(2000), at(2300), "the daemon went away".to_owned());
        assert_eq!(ledger.violations().len(), 1);
    }
}
