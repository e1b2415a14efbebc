//! The supervisor's shell: turns what happens (pidfds becoming readable, timers, signals,
//! control connections, probe results) into [`supervisor::Event`]s, and the
//! [`supervisor::Action`]s that come out into syscalls on groups, sockets and processes.
//! It decides nothing itself.
use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    os::fd::{AsFd as _, OwnedFd},
    path::PathBuf,
    sync::Arc,
    time::Instant,
};

use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
    sync::{mpsc, oneshot},
};
use tracing::{error, info, warn};

use super::{DaemonError, Launch, pins, probes::ProbeThread, read_config};
use crate::{
    config::Service,
    control::{Reply, Request},
    dataplane::Dataplane,
    group::{Group, Holder},
    metrics,
    probe::Outcome,
    prober::Prober,
    process::{self, Activation, Exit},
    report::StatusReport,
    socket::{self, Proto},
    supervisor::{
        self, Action, Activity, Command, ReplyTo, ServiceId, Signal, Supervisor, TableOp, Timer,
    },
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
    supervisor: Supervisor<Launch>,
    groups: Vec<Group>,
    processes: HashMap<(ServiceId, Slot), Process>,
    /// Each probed slot's prober, kept across its workers (so is its source port).
    probers: BTreeMap<(ServiceId, Slot), Arc<Prober>>,
    probing: HashMap<(ServiceId, Slot), tokio::task::JoinHandle<()>>,
    replies: HashMap<u64, mpsc::UnboundedSender<Reply>>,
    asked: u64,
    events: mpsc::UnboundedSender<Input>,
    probes: ProbeThread,
    /// During the start, the first worker that could not be started.
    start_error: Option<DaemonError>,
    /// Whether a previous daemon's state was taken over.
    pub(super) adopted: bool,
}

impl Shell {
    pub(super) fn new(
        root: PathBuf,
        config: Option<PathBuf>,
        events: mpsc::UnboundedSender<Input>,
        probes: ProbeThread,
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
            start_error: None,
            adopted: false,
        }
    }

    /// Creates or adopts every service, then lets the supervisor start what is missing:
    /// a service whose dataplane cannot be loaded stops the start before any worker runs,
    /// and a worker that cannot be started fails it.
    pub(super) fn start(&mut self, services: Vec<(Service, Launch)>) -> Result<(), DaemonError> {
        let mut opened = Vec::new();
        for (spec, launch) in services {
            self.adopted |= pins::is_pinned(&self.root, &spec);
            let (group, adoption, alive) = pins::open(&self.root, &spec)?;
            opened.push((spec, launch, group, adoption, alive));
        }
        self.start_error = None;
        for (spec, launch, group, adoption, alive) in opened {
            self.add(spec, launch, group, adoption, alive);
            if let Some(error) = self.start_error.take() {
                return Err(error);
            }
        }
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
        self.groups.push(group);
        for (slot, pid, pidfd) in alive {
            self.track(service, slot, pid, pidfd);
        }
        self.feed(supervisor::Event::Added {
            spec: Box::new(spec),
            launch,
            adoption,
        });
    }

    /// Handles inputs until the supervisor has stopped every worker after a stop.
    pub(super) async fn run(&mut self, inbox: &mut mpsc::UnboundedReceiver<Input>) {
        while let Some(input) = inbox.recv().await {
            match input {
                Input::Exited { service, slot, pid } => self.exited(service, slot, pid),
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
                Input::Stop => self.feed(supervisor::Event::Stop),
            }
            if self.supervisor.is_stopped() {
                return;
            }
        }
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
        for service in 0..self.groups.len() {
            let name = self.name(service);
            if let Err(error) = Dataplane::remove_pins(&self.root, &name) {
                error!(service = name, %error, "cannot remove pins");
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
            Action::Spawn {
                service,
                slot,
                spec,
                launch,
                generation,
                restarts,
                staged,
            } => Some(
                match self.spawn(service, slot, &spec, &launch, generation, restarts, staged) {
                    Ok(pid) => supervisor::Event::Spawned { service, slot, pid },
                    Err(error) => {
                        let event = supervisor::Event::SpawnFailed {
                            service,
                            slot,
                            error: error.to_string(),
                        };
                        self.start_error.get_or_insert(error);
                        event
                    }
                },
            ),
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
                match pins::open(&self.root, &spec) {
                    Ok((group, adoption, alive)) => self.add(*spec, launch, group, adoption, alive),
                    Err(error) => {
                        error!(service = %spec.name, %error, "SIGHUP: cannot add the service")
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

    fn name(&self, service: ServiceId) -> String {
        self.supervisor
            .spec(service)
            .map_or_else(|| format!("#{service}"), |(spec, _)| spec.name.clone())
    }

    /// Binds a socket for `slot`, starts a worker on it, hands the socket to the group
    /// (into the table, or staged), closes the daemon's copy and watches the worker.
    #[allow(clippy::too_many_arguments)]
    fn spawn(
        &mut self,
        service: ServiceId,
        slot: Slot,
        spec: &Service,
        launch: &Launch,
        generation: u32,
        restarts: u32,
        staged: bool,
    ) -> Result<u32, DaemonError> {
        let socket = socket::bind_reuseport(spec.proto, spec.listen).map_err(|source| {
            DaemonError::Socket {
                service: spec.name.clone(),
                source,
            }
        })?;
        let spawned = process::spawn(
            &launch.program,
            &spec.command,
            socket.as_fd(),
            &Activation {
                name: &spec.name,
                slot,
            },
            launch.credentials.as_ref(),
        )
        .map_err(|source| DaemonError::Worker {
            service: spec.name.clone(),
            slot,
            source,
        })?;
        let holder = Holder {
            pid: spawned.pid,
            generation,
            started: process::start_time(spawned.pid).unwrap_or(0),
            restarts,
        };
        let group = &mut self.groups[service];
        let placed = if staged {
            group.stage(slot, socket.as_fd(), spec.weight, holder)
        } else {
            group
                .add(slot, socket.as_fd(), spec.weight, holder)
                .map(drop)
        };
        if let Err(error) = placed {
            let _ = process::signal(spawned.pidfd.as_fd(), libc::SIGKILL);
            return Err(error.into());
        }
        drop(socket);
        self.track(service, slot, spawned.pid, spawned.pidfd);
        Ok(spawned.pid)
    }

    /// Keeps `pidfd` for worker `pid` of `slot` and sends [`Input::Exited`] when it ends.
    fn track(&mut self, service: ServiceId, slot: Slot, pid: u32, pidfd: OwnedFd) {
        let events = self.events.clone();
        match exit_watch(&pidfd) {
            Ok(fd) => {
                tokio::spawn(async move {
                    let _ = fd.readable().await;
                    let _ = events.send(Input::Exited { service, slot, pid });
                });
            }
            Err(e) => {
                error!(pid, error = %e, "cannot watch worker; treating it as dead");
                let _ = events.send(Input::Exited { service, slot, pid });
            }
        }
        self.processes
            .insert((service, slot), Process { pid, pidfd });
    }

    /// A worker's pidfd became readable: reap it and tell the supervisor how it ended.
    fn exited(&mut self, service: ServiceId, slot: Slot, pid: u32) {
        let Some(process) = self
            .processes
            .get(&(service, slot))
            .filter(|p| p.pid == pid)
        else {
            return;
        };
        let exit = process::reap(process.pidfd.as_fd())
            .ok()
            .flatten()
            .unwrap_or(Exit::Unknown);
        self.processes.remove(&(service, slot));
        self.feed(supervisor::Event::Exited {
            service,
            slot,
            pid,
            exit,
        });
    }

    /// A reload's new worker may have ended while its exit event is still on its way:
    /// report such exits before the reload's readiness timer.
    fn notice_staged_exits(&mut self, service: ServiceId) {
        for (slot, pid) in self.supervisor.staged(service) {
            let ended = self
                .processes
                .get(&(service, slot))
                .is_some_and(|p| p.pid == pid && process::has_exited(p.pidfd.as_fd()));
            if ended {
                self.exited(service, slot, pid);
            }
        }
    }

    fn signal(&self, service: ServiceId, slot: Slot, pid: u32, signal: Signal) {
        let Some(process) = self
            .processes
            .get(&(service, slot))
            .filter(|p| p.pid == pid)
        else {
            return;
        };
        let number = match signal {
            Signal::Term => libc::SIGTERM,
            Signal::Kill => libc::SIGKILL,
        };
        if let Err(error) = process::signal(process.pidfd.as_fd(), number) {
            warn!(service = %self.name(service), slot, pid, ?signal, %error, "cannot signal the worker");
        }
    }

    /// Makes a change to a group: entries moved, or the group's error.
    fn change(&mut self, service: ServiceId, op: &TableOp) -> Result<u32, String> {
        let group = &mut self.groups[service];
        let moved = match op {
            TableOp::Remove(slot) => group.remove(*slot).map(|d| d.moved),
            TableOp::Release(slot) => group.release(*slot).map(|()| 0),
            TableOp::Drain(slot) => group.drain(*slot).map(|d| d.moved),
            TableOp::Admit { slot, weight } => group.admit(*slot, *weight).map(|d| d.moved),
            TableOp::SetWeight { slot, weight } => {
                group.set_weight(*slot, *weight).map(|d| d.moved)
            }
            TableOp::Switch { old, new, weight } => {
                group.switch(old, new, *weight).map(|d| d.moved)
            }
            TableOp::SetFlags(flags) => {
                group.dataplane().set_flags(*flags);
                Ok(0)
            }
            TableOp::SetHealth { slot, health } => group.set_health(*slot, *health).map(|()| 0),
        };
        moved.map_err(|error| error.to_string())
    }

    /// How busy each retiring worker is: datagrams delivered to its slot (UDP) or its
    /// established connections (TCP).
    fn activity(&self) -> Vec<(ServiceId, Slot, Activity)> {
        let retiring = self.supervisor.retiring();
        let mut counters = HashMap::new();
        retiring
            .into_iter()
            .map(|(service, slot, pid)| {
                let Some((spec, _)) = self.supervisor.spec(service) else {
                    return (service, slot, Activity::Unknown);
                };
                let activity = match spec.proto {
                    Proto::Udp => counters
                        .entry(service)
                        .or_insert_with(|| self.groups[service].dataplane().counters().ok())
                        .as_ref()
                        .and_then(|c: &portshard_common::Counters| c.slots.get(usize::from(slot)))
                        .map_or(Activity::Unknown, |c| {
                            Activity::Delivered(
                                c.selected + c.failed_over + c.probed + c.migrated + c.flow_hits,
                            )
                        }),
                    Proto::Tcp => process::established_connections(pid, spec.listen.port())
                        .map_or(Activity::Unknown, Activity::Connections),
                };
                (service, slot, activity)
            })
            .collect()
    }

    /// SIGHUP: reads the config file again; a file with errors changes nothing, a service
    /// whose program or user cannot be resolved keeps running as it was.
    fn hangup(&mut self) {
        let Some(path) = self.config.clone() else {
            warn!("SIGHUP: the built-in default has no config file to read again");
            return;
        };
        let config = match read_config(&path) {
            Ok(config) => config,
            Err(error) => {
                error!(%error, "SIGHUP: the config was not applied; everything runs as before");
                return;
            }
        };
        info!(config = %path.display(), "SIGHUP: applying the config");
        let services = config
            .services
            .into_iter()
            .filter_map(|spec| match Launch::of(&spec) {
                Ok(launch) => Some((spec, launch)),
                Err(error) => {
                    error!(service = %spec.name, %error, "SIGHUP: not applied to this service");
                    None
                }
            })
            .collect();
        self.feed(supervisor::Event::Hangup(services));
    }

    /// A control request: `ping` is answered here, a reload's config is read here, the
    /// rest is the supervisor's to decide.
    fn control(&mut self, request: Request, reply: mpsc::UnboundedSender<Reply>) {
        let command = match request {
            Request::Ping => {
                let _ = reply.send(Reply::Done {
                    message: format!(
                        "portshard daemon pid {} serves {} services",
                        std::process::id(),
                        self.supervisor.services()
                    ),
                    moved: 0,
                });
                return;
            }
            Request::Drain { service, slot } => Command::Drain { service, slot },
            Request::Weight {
                service,
                slot,
                weight,
            } => Command::Weight {
                service,
                slot,
                weight,
            },
            Request::Reload { service } => match self.reload_spec(&service) {
                Ok((spec, launch)) => Command::Reload {
                    spec: Box::new(spec),
                    launch,
                },
                Err(message) => {
                    let _ = reply.send(Reply::error(message));
                    return;
                }
            },
        };
        self.asked += 1;
        self.replies.insert(self.asked, reply);
        self.feed(supervisor::Event::Control {
            command,
            reply: ReplyTo(self.asked),
        });
    }

    /// The settings a reload of `service` starts its new generation with: the service's
    /// as the config file now says (the built-in default's stay as they are).
    fn reload_spec(&self, service: &str) -> Result<(Service, Launch), String> {
        let id = self
            .supervisor
            .service_id(service)
            .map_err(|e| e.to_string())?;
        let Some(path) = &self.config else {
            let (spec, launch) = self.supervisor.spec(id).expect("a known service");
            return Ok((spec.clone(), launch.clone()));
        };
        let spec = read_config(path)?
            .services
            .into_iter()
            .find(|s| s.name == service)
            .ok_or_else(|| {
                format!(
                    "service {service} is no longer in {}: put it back, or restart portshard to drop it",
                    path.display()
                )
            })?;
        let launch = Launch::of(&spec).map_err(|e| format!("service {service}: {e}"))?;
        Ok((spec, launch))
    }

    /// Starts probing worker `pid` of `slot`, binding the slot's probe port and steering
    /// it to the slot the first time.
    fn probe(&mut self, service: ServiceId, slot: Slot, pid: u32, probe: crate::config::Probe) {
        let name = self.name(service);
        let listen = match self.supervisor.spec(service) {
            Some((spec, _)) => spec.listen,
            None => return,
        };
        let prober = match self.probers.get(&(service, slot)) {
            Some(prober) => Arc::clone(prober),
            None => {
                let bound = self
                    .probes
                    .bind(&probe.kind, listen)
                    .map_err(|e| e.to_string())
                    .and_then(|prober| {
                        self.groups[service]
                            .set_probe(prober.source(), slot)
                            .map_err(|e| e.to_string())?;
                        Ok(Arc::new(prober))
                    });
                match bound {
                    Ok(prober) => {
                        self.probers.insert((service, slot), Arc::clone(&prober));
                        prober
                    }
                    Err(error) => {
                        error!(service = %name, slot, %error, "cannot set up the health probe of this slot; its workers are not probed");
                        return;
                    }
                }
            }
        };
        let task = self.probes.probe(
            prober,
            probe,
            slot,
            pid,
            name,
            self.events.clone(),
            move |outcome| Input::Probed {
                service,
                slot,
                pid,
                outcome,
            },
        );
        if let Some(old) = self.probing.insert((service, slot), task) {
            old.abort();
        }
    }

    /// What `status` would print, from the daemon's open handles.
    fn status(&self) -> StatusReport {
        StatusReport {
            services: self
                .groups
                .iter()
                .filter_map(|group| group.dataplane().status().ok())
                .collect(),
        }
    }

    /// Turns SIGTERM and SIGINT into [`Input::Stop`], SIGHUP into [`Input::Hangup`], and
    /// sends [`Input::Tick`] every [`supervisor::TICK`].
    pub(super) fn listen_for_signals(&self) {
        let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        ) else {
            error!("cannot install signal handlers; stopping");
            let _ = self.events.send(Input::Stop);
            return;
        };
        let events = self.events.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => info!("SIGTERM: stopping workers and removing pins"),
                _ = int.recv() => info!("SIGINT: stopping workers and removing pins"),
            }
            let _ = events.send(Input::Stop);
        });
        let events = self.events.clone();
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                if events.send(Input::Hangup).is_err() {
                    return;
                }
            }
        });
        let events = self.events.clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(supervisor::TICK);
            loop {
                ticks.tick().await;
                if events.send(Input::Tick).is_err() {
                    return;
                }
            }
        });
    }
}

/// Registers a copy of `pidfd` with the reactor, so its worker's exit can be awaited: a
/// pidfd becomes readable when its process ends.
fn exit_watch(pidfd: &OwnedFd) -> std::io::Result<AsyncFd<OwnedFd>> {
    let fd = pidfd.try_clone()?;
    // SAFETY: `fd` is an `OwnedFd`, so it stays open and refers to the same pidfd until the
    // `AsyncFd` drops it.
    unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }.map_err(|e| e.into_parts().1)
}
