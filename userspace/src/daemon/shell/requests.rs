//! The shell's inputs from outside: SIGHUP and the config file, control requests, health
//! probes, status snapshots and signals.
use std::sync::Arc;

use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};
use tracing::{error, info, warn};

use super::{Input, Shell};
use crate::{
    config::Service,
    control::{Reply, Request},
    daemon::{ConfigFileError, Launch, read_config},
    process::ProcessError,
    report::StatusReport,
    supervisor::{self, Command, ControlError, ReplyTo, ServiceId},
    table::Slot,
};

/// Why a reload was refused before the supervisor saw it.
#[derive(Debug, thiserror::Error)]
pub(super) enum ReloadRefused {
    /// No such service runs.
    #[error(transparent)]
    Unknown(#[from] ControlError),
    /// The config file cannot be used.
    #[error(transparent)]
    Config(#[from] ConfigFileError),
    /// The service was taken out of the config file.
    #[error(
        "service {service} is no longer in {}: put it back, or send SIGHUP to drain and remove it",
        path.display()
    )]
    NotInConfig {
        /// The service.
        service: String,
        /// The config file.
        path: std::path::PathBuf,
    },
    /// Its program or account cannot be found.
    #[error("service {service}: {source}")]
    Launch {
        /// The service.
        service: String,
        /// Why.
        #[source]
        source: ProcessError,
    },
}

impl Shell {
    /// SIGHUP: reads the config file again; a file with errors changes nothing, a service
    /// whose program or user cannot be resolved keeps running as it was.
    pub(super) fn hangup(&mut self) {
        self.reloading("SIGHUP: reading the config again");
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
        let named = config.services.iter().map(|s| s.name.clone()).collect();
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
        self.feed(supervisor::Event::Hangup { services, named });
    }

    /// A control request: `ping` is answered here, a reload's config is read here, the
    /// rest is the supervisor's to decide.
    pub(super) fn control(&mut self, request: Request, reply: mpsc::UnboundedSender<Reply>) {
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
            // The control socket hands `upgrade` over with its connection instead.
            Request::Upgrade => {
                let _ = reply.send(Reply::error(
                    "upgrade is asked on a control connection of its own",
                ));
                return;
            }
            Request::Reload { service } => match self.reload_spec(&service) {
                Ok((spec, launch)) => Command::Reload {
                    spec: Box::new(spec),
                    launch,
                },
                Err(refused) => {
                    let _ = reply.send(Reply::error(refused.to_string()));
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
    pub(super) fn reload_spec(&self, service: &str) -> Result<(Service, Launch), ReloadRefused> {
        let id = self.supervisor.service_id(service)?;
        let Some(path) = &self.config else {
            let (spec, launch) = self.supervisor.spec(id).expect("a known service");
            return Ok((spec.clone(), launch.clone()));
        };
        let spec = read_config(path)?
            .services
            .into_iter()
            .find(|s| s.name == service)
            .ok_or_else(|| ReloadRefused::NotInConfig {
                service: service.to_owned(),
                path: path.clone(),
            })?;
        let launch = Launch::of(&spec).map_err(|source| ReloadRefused::Launch {
            service: service.to_owned(),
            source,
        })?;
        Ok((spec, launch))
    }

    /// Starts probing worker `pid` of `slot`, binding the slot's probe port and steering
    /// it to the slot the first time.
    pub(super) fn probe(
        &mut self,
        service: ServiceId,
        slot: Slot,
        pid: u32,
        probe: crate::config::Probe,
    ) {
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
                            .as_mut()
                            .ok_or("the service was removed")?
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
        let events = self.events.clone();
        let task = self
            .probes
            .probe(prober, probe, slot, pid, name, move |outcome| {
                let probed = Input::Probed {
                    service,
                    slot,
                    pid,
                    outcome,
                };
                events.send(probed).is_ok()
            });
        if let Some(old) = self.probing.insert((service, slot), task) {
            old.abort();
        }
    }

    /// What `status` would print, from the daemon's open handles.
    pub(super) fn status(&self) -> StatusReport {
        StatusReport {
            services: self
                .groups
                .iter()
                .flatten()
                .filter_map(|group| group.dataplane().status().ok())
                .map(|status| {
                    let foreign = self.watch.sightings.of(&status.name).to_vec();
                    status.with_foreign(foreign)
                })
                .collect(),
        }
    }

    /// Turns SIGTERM and SIGINT into [`Input::Stop`], SIGHUP into [`Input::Hangup`], and
    /// sends [`Input::Tick`] every [`supervisor::TICK`] and [`Input::CheckOwners`] every
    /// [`super::CHECK_EVERY`].
    pub(in crate::daemon) fn listen_for_signals(&self) {
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
        for (every, input) in [
            (supervisor::TICK, (|| Input::Tick) as fn() -> Input),
            (super::CHECK_EVERY, || Input::CheckOwners),
        ] {
            let events = self.events.clone();
            tokio::spawn(async move {
                let mut ticks = tokio::time::interval(every);
                loop {
                    ticks.tick().await;
                    if events.send(input()).is_err() {
                        return;
                    }
                }
            });
        }
    }
}
