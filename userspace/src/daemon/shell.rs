//! The supervisor's shell: turns what happens (pidfds becoming readable, timers, signals,
//! control connections, probe results) into [`supervisor::Event`]s, and the
//! [`supervisor::Action`]s that come out into syscalls on groups, sockets and processes.
//! It decides nothing itself.
mod owners;
mod requests;
mod workers;

pub(super) use owners::CHECK_EVERY;

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    os::{fd::OwnedFd, unix::net::UnixStream},
    path::PathBuf,
    sync::Arc,
    time::Instant,
};

use tokio::sync::{mpsc, oneshot};
use tracing::{error, info};

use super::{
    DaemonError, Launch,
    notify::Notifier,
    pins,
    probes::ProbeThread,
    upgrade::{Handles, Image},
};
use crate::{
    config::Service,
    control::{Reply, Request},
    dataplane::Dataplane,
    group::Group,
    metrics,
    probe::Outcome,
    prober::Prober,
    readiness::{self, Readiness},
    supervisor::{self, Action, ServiceId, Supervisor, Timer},
    table::Slot,
};

/// What the event loop reacts to.
pub(super) enum Input {
    /// A worker's pidfd became readable: it ended.
    Exited {
        service: ServiceId,
        slot: Slot,
        pid: u32,
    },
    /// A timer the supervisor set fired.
    Timer(Timer),
    /// Time to look at the retiring workers.
    Tick,
    /// Time to check the services' addresses for foreign sockets.
    CheckOwners,
    /// SIGHUP: read the config file again.
    Hangup,
    /// A control request; its replies go back on `reply`, the last one final.
    Control {
        request: Request,
        reply: mpsc::UnboundedSender<Reply>,
    },
    /// A health probe ended.
    Probed {
        service: ServiceId,
        slot: Slot,
        pid: u32,
        outcome: Outcome,
    },
    /// The metrics endpoint wants a snapshot.
    Scrape { reply: oneshot::Sender<String> },
    /// SIGTERM or SIGINT.
    Stop,
    /// Time to tell systemd's watchdog the loop is alive.
    Watchdog,
    /// `portshard upgrade`, on its connection (the replies are written there).
    Upgrade { client: UnixStream },
    /// The new binary's check for an upgrade ended.
    UpgradeChecked {
        client: UnixStream,
        image: Image,
        checked: Result<String, String>,
    },
}

/// A running worker as the shell knows it: its pid and a pidfd on it.
struct Process {
    pid: u32,
    pidfd: OwnedFd,
}

/// The daemon's state that lives on the kernel's side of the supervisor.
pub(super) struct Shell {
    root: PathBuf,
    config: Option<PathBuf>,
    pub(super) supervisor: Supervisor<Launch>,
    /// Each service's group, by service id; `None` once a removed service's pins are gone.
    groups: Vec<Option<Group>>,
    processes: HashMap<(ServiceId, Slot), Process>,
    /// Each probed slot's prober, kept across its workers (so is its source port).
    probers: BTreeMap<(ServiceId, Slot), Arc<Prober>>,
    probing: HashMap<(ServiceId, Slot), tokio::task::JoinHandle<()>>,
    replies: HashMap<u64, mpsc::UnboundedSender<Reply>>,
    asked: u64,
    pub(super) events: mpsc::UnboundedSender<Input>,
    probes: ProbeThread,
    /// Whether the start is under way (a worker that cannot be started fails it).
    starting: bool,
    /// During the start, the first worker that could not be started.
    start_error: Option<DaemonError>,
    /// Whether a previous daemon's state was taken over.
    pub(super) adopted: bool,
    /// The services whose pins this daemon opened (and removes when it stops).
    pinned: Vec<String>,
    /// What systemd was told, and the notifications' edge.
    readiness: Readiness,
    notifier: Notifier,
    /// The last thing that happened, for the `STATUS=` line.
    last_event: String,
    /// Whether an upgrade's check is under way.
    pub(super) upgrading: bool,
    /// What an upgrade hands to the next image.
    pub(super) handles: Handles,
    /// The watch for foreign sockets on the services' addresses.
    watch: owners::Watch,
}

impl Shell {
    pub(super) fn new(
        root: PathBuf,
        config: Option<PathBuf>,
        events: mpsc::UnboundedSender<Input>,
        probes: ProbeThread,
        handles: Handles,
    ) -> Self {
        Self {
            root,
            config,
            supervisor: Supervisor::new(),
            groups: Vec::new(),
            processes: HashMap::new(),
            probers: BTreeMap::new(),
            probing: HashMap::new(),
            replies: HashMap::new(),
            asked: 0,
            events,
            probes,
            starting: false,
            start_error: None,
            adopted: false,
            pinned: Vec::new(),
            readiness: Readiness::new(),
            notifier: Notifier::from_env(),
            last_event: "starting".to_owned(),
            upgrading: false,
            handles,
            watch: owners::Watch::default(),
        }
    }

    /// Creates or adopts every service, then lets the supervisor start what is missing:
    /// a service whose dataplane cannot be loaded, or (unless `takeover`) whose address
    /// anything else shares, stops the start before any worker runs, and a worker that
    /// cannot be started fails it. An upgrade's `takeover` serves on the groups its
    /// predecessor served, foreign sockets and all (reported as before), rather than send
    /// the upgrade back over them.
    pub(super) fn start(
        &mut self,
        services: Vec<(Service, Launch)>,
        takeover: bool,
    ) -> Result<(), DaemonError> {
        // Every service's pins are checked before any is changed (migrated, or given this
        // build's program): one that cannot be adopted leaves all of them as they were.
        for (spec, _) in &services {
            pins::check(&self.root, spec)?;
            if !takeover {
                self.refuse_shared(spec)?;
            }
        }
        let mut opened = Vec::new();
        for (spec, launch) in services {
            self.adopted |= pins::is_pinned(&self.root, &spec);
            let (group, adoption, alive) = pins::open(&self.root, &spec)?;
            self.pinned.push(spec.name.clone());
            opened.push((spec, launch, group, adoption, alive));
        }
        self.starting = true;
        for (spec, launch, group, adoption, alive) in opened {
            self.add(spec, launch, group, adoption, alive);
            if let Some(error) = self.start_error.take() {
                self.starting = false;
                return Err(error);
            }
        }
        self.starting = false;
        Ok(())
    }

    /// Hands a service's group to the supervisor, with the workers adoption found.
    fn add(
        &mut self,
        spec: Service,
        launch: Launch,
        group: Group,
        adoption: supervisor::Adoption,
        alive: Vec<pins::Alive>,
    ) {
        let service = self.groups.len();
        self.groups.push(Some(group));
        for (slot, pid, pidfd) in alive {
            self.track(service, slot, pid, pidfd);
        }
        self.feed(supervisor::Event::Added {
            spec: Box::new(spec),
            launch,
            adoption,
        });
    }

    /// Handles inputs until the supervisor has stopped every worker after a stop. After
    /// each, systemd hears of what changed.
    pub(super) async fn run(&mut self, inbox: &mut mpsc::UnboundedReceiver<Input>) {
        if let Some(every) = Notifier::watchdog_interval() {
            let events = self.events.clone();
            tokio::spawn(async move {
                let mut ticks = tokio::time::interval(every);
                while events.send(Input::Watchdog).is_ok() {
                    ticks.tick().await;
                }
            });
        }
        self.settle();
        while let Some(input) = inbox.recv().await {
            match input {
                Input::Exited { service, slot, pid } => {
                    self.last_event = format!(
                        "worker pid {pid} of {} slot {slot} ended",
                        self.name(service)
                    );
                    self.exited(service, slot, pid);
                }
                Input::Timer(timer) => {
                    if let Timer::ReloadReady { service, .. } = timer {
                        self.notice_staged_exits(service);
                    }
                    self.feed(supervisor::Event::Timer(timer));
                }
                Input::Tick => {
                    let activity = self.activity();
                    self.feed(supervisor::Event::Tick { activity });
                }
                Input::CheckOwners => self.check_owners(),
                Input::Hangup => self.hangup(),
                Input::Control { request, reply } => self.control(request, reply),
                Input::Probed {
                    service,
                    slot,
                    pid,
                    outcome,
                } => self.feed(supervisor::Event::Probed {
                    service,
                    slot,
                    pid,
                    outcome,
                }),
                Input::Scrape { reply } => {
                    let _ = reply.send(metrics::encode_status(
                        &self.status(),
                        &self.supervisor.probe_outcomes(),
                    ));
                }
                Input::Stop => {
                    self.last_event = "stopping every worker".to_owned();
                    if let Some(notice) = self.readiness.stopping() {
                        self.notifier.notice(notice, &self.status_line());
                    }
                    self.feed(supervisor::Event::Stop);
                }
                // Sent from here, the event loop: a wedged loop sends none.
                Input::Watchdog => self.notifier.watchdog(),
                Input::Upgrade { client } => self.upgrade(client),
                Input::UpgradeChecked {
                    client,
                    image,
                    checked,
                } => self.upgrade_checked(client, image, checked),
            }
            if self.supervisor.is_stopped() {
                return;
            }
            self.settle();
        }
    }

    /// A SIGHUP or an upgrade begins: systemd hears `RELOADING=1`.
    pub(super) fn reloading(&mut self, event: &str) {
        self.last_event = event.to_owned();
        if let Some(notice) = self.readiness.reloading() {
            self.notifier.notice(notice, &self.status_line());
        }
    }

    /// Tells systemd `READY=1` once every service serves after a start or reload, and
    /// the status line when it changed.
    pub(super) fn settle(&mut self) {
        let status = self.status_line();
        match self.readiness.settled(self.supervisor.is_ready()) {
            Some(notice) => self.notifier.notice(notice, &status),
            None => self.notifier.status(&status),
        }
    }

    fn status_line(&self) -> String {
        readiness::status_line(
            self.supervisor.services(),
            self.supervisor.serving(),
            &self.last_event,
        )
    }

    /// The services' program tags, for an upgrade's reply.
    pub(super) fn programs(&self) -> String {
        self.status()
            .services
            .iter()
            .map(|service| format!("{} program {}", service.name, service.program_tag))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Stops every worker (see [`Input::Stop`]) and waits until all have ended.
    pub(super) async fn stop(&mut self, inbox: &mut mpsc::UnboundedReceiver<Input>) {
        self.feed(supervisor::Event::Stop);
        if !self.supervisor.is_stopped() {
            self.run(inbox).await;
        }
    }

    /// Removes every service's pins.
    pub(super) fn remove_pins(&self) {
        for name in &self.pinned {
            if let Err(error) = Dataplane::remove_pins(&self.root, name) {
                error!(service = %name, %error, "cannot remove pins");
            }
        }
    }

    /// Feeds `event` and carries out what the supervisor decides, including the decisions
    /// on the outcomes of those actions, until there is nothing left to do.
    fn feed(&mut self, event: supervisor::Event<Launch>) {
        let mut queue = VecDeque::from([event]);
        while let Some(event) = queue.pop_front() {
            self.supervisor.handle(Instant::now(), event);
            while let Some(action) = self.supervisor.poll_action() {
                if let Some(outcome) = self.execute(action) {
                    queue.push_back(outcome);
                }
            }
        }
    }

    /// Carries out one action; returns the event that reports its outcome, if awaited.
    fn execute(&mut self, action: Action<Launch>) -> Option<supervisor::Event<Launch>> {
        match action {
            Action::Spawn(spawn) => {
                let (service, slot) = (spawn.service, spawn.slot);
                Some(match self.spawn(&spawn) {
                    Ok(pid) => supervisor::Event::Spawned { service, slot, pid },
                    Err(error) => {
                        let event = supervisor::Event::SpawnFailed {
                            service,
                            slot,
                            error: error.to_string(),
                        };
                        if self.starting {
                            self.start_error.get_or_insert(error);
                        }
                        event
                    }
                })
            }
            Action::Signal {
                service,
                slot,
                pid,
                signal,
            } => {
                self.signal(service, slot, pid, signal);
                None
            }
            Action::Table {
                service,
                op,
                ticket,
            } => {
                let result = self.change(service, &op);
                match (ticket, result) {
                    (Some(ticket), result) => Some(supervisor::Event::TableDone { ticket, result }),
                    (None, Err(error)) => {
                        error!(service = %self.name(service), ?op, %error, "the group refused a change");
                        None
                    }
                    (None, Ok(_)) => None,
                }
            }
            Action::Timer { after, timer } => {
                let events = self.events.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(after).await;
                    let _ = events.send(Input::Timer(timer));
                });
                None
            }
            Action::Probe {
                service,
                slot,
                pid,
                probe,
            } => {
                self.probe(service, slot, pid, probe);
                None
            }
            Action::Unprobe { service, slot } => {
                if let Some(task) = self.probing.remove(&(service, slot)) {
                    task.abort();
                }
                None
            }
            Action::AddService { spec, launch } => {
                let opened = self
                    .refuse_shared(&spec)
                    .and_then(|()| pins::open(&self.root, &spec));
                match opened {
                    Ok((group, adoption, alive)) => {
                        self.pinned.push(spec.name.clone());
                        self.add(*spec, launch, group, adoption, alive)
                    }
                    Err(error) => {
                        error!(service = %spec.name, %error, "SIGHUP: cannot add the service")
                    }
                }
                None
            }
            Action::RemoveService { service } => {
                let name = self.name(service);
                self.groups[service] = None;
                self.probers.retain(|(id, _), _| *id != service);
                self.pinned.retain(|pinned| *pinned != name);
                self.watch.forget(&name);
                match Dataplane::remove_pins(&self.root, &name) {
                    Ok(()) => {
                        info!(service = %name, "removed: its workers have ended and its pins are gone")
                    }
                    Err(error) => {
                        error!(service = %name, %error, "cannot remove the pins of the removed service")
                    }
                }
                None
            }
            Action::Reply { to, reply } => {
                let last = reply.is_final();
                if let Some(sender) = self.replies.get(&to.0) {
                    let _ = sender.send(reply);
                }
                if last {
                    self.replies.remove(&to.0);
                }
                None
            }
        }
    }
}
