//! The program a service's pins hold, and how a build puts its own in place: on adoption,
//! the pinned program's tag is compared with this build's; when they differ, this build's
//! program is attached to the live group (attaching to one member replaces the group's
//! program atomically) and then pinned in place of the old one, over the same maps.
use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd},
    path::{Path, PathBuf},
};

use aya::{Ebpf, EbpfLoader, programs::SkReuseport};
use portshard_common::{PIN_LAYOUT, names};
use portshard_core::layout::Step;

use super::{
    Dataplane, DataplaneError, Result, check_service_name, layout,
    pinned::{open_program, program_error, raise_memlock, remove_if_present},
};
use crate::object::{OBJECT, ObjectError};

/// This build's program, loaded over the maps pinned in a service's directory but not yet
/// attached or pinned.
pub struct LoadedProgram {
    ebpf: Ebpf,
    dir: PathBuf,
    tag: u64,
}

impl LoadedProgram {
    /// Loads this build's object over the maps pinned in `dir` (creating those missing),
    /// with a flow table of `flow_capacity`, and verifies its program.
    pub(super) fn load(dir: &Path, flow_capacity: u32) -> Result<Self> {
        raise_memlock();
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(dir)
            .map_max_entries(names::FLOWS, flow_capacity)
            .load(OBJECT)
            .map_err(|source| DataplaneError::Load {
                dir: dir.to_path_buf(),
                source: Box::new(source),
            })?;
        let path = dir.join(names::PROGRAM);
        let error = |action: &str| program_error(&path, action.to_owned());
        let program: &mut SkReuseport = ebpf
            .program_mut(names::PROGRAM)
            .ok_or(ObjectError::MissingProgram(names::PROGRAM))?
            .try_into()
            .map_err(error("preparing the program"))?;
        program
            .load()
            .map_err(error("verifying and loading the program"))?;
        let tag = program
            .info()
            .map_err(error("reading the loaded program's tag"))?
            .tag();
        Ok(Self {
            ebpf,
            dir: dir.to_path_buf(),
            tag,
        })
    }

    /// The program's tag: the kernel's hash of its instructions.
    pub fn tag(&self) -> u64 {
        self.tag
    }

    fn program(&mut self) -> &mut SkReuseport {
        self.ebpf
            .program_mut(names::PROGRAM)
            .and_then(|program| program.try_into().ok())
            .expect("checked when loaded")
    }

    /// Pins the program in place of the service's pinned one: pinned beside it, then
    /// renamed over it, so the pin always names a whole program.
    pub(super) fn pin(mut self) -> Result<()> {
        let path = self.dir.join(names::PROGRAM);
        let staged = self.dir.join(names::PROGRAM_STAGED);
        remove_if_present(&staged)?;
        self.program()
            .pin(&staged)
            .map_err(|source| DataplaneError::PinIo {
                action: "pinning the program at",
                path: staged.clone(),
                source: io::Error::other(source),
            })?;
        std::fs::rename(&staged, &path).map_err(|source| DataplaneError::PinIo {
            action: "putting the new program in place of",
            path,
            source,
        })
    }
}

/// What adopting a service's pins found and did.
pub struct Adopted {
    /// The layout the pins were migrated from, if they were in an older one.
    pub migrated_from: Option<u32>,
    /// This build's program, when its tag differs from the pinned one's or the pins were
    /// migrated: to be attached to the live group and pinned
    /// ([`Dataplane::replace_program`]).
    pub replacement: Option<LoadedProgram>,
    /// The pinned program's tag.
    pub pinned_tag: u64,
}

/// Formats a program tag the way `bpftool` shows it: 16 hex digits.
pub fn format_tag(tag: u64) -> String {
    format!("{tag:016x}")
}

impl Dataplane {
    /// Checks, changing nothing, that the pins of `service` under `root` can be adopted
    /// by this build: their layout is one it knows and every pin is what it expects.
    /// Returns the layout they are in.
    pub fn check_adoptable(root: &Path, service: &str) -> Result<u32> {
        check_service_name(service)?;
        let dir = root.join(service);
        if !dir.join(names::PROGRAM).exists() {
            return Err(DataplaneError::NotPinned { dir });
        }
        let steps = layout::check(&dir)?;
        Ok(PIN_LAYOUT - steps.len() as u32)
    }

    /// Has this kernel verify this build's program over the pins of `service` under
    /// `root`, then drops it, changing nothing: for pins in this build's layout, where
    /// every map exists and loading creates none ([`Dataplane::check_adoptable`] first).
    pub fn verify_program(root: &Path, service: &str) -> Result<()> {
        let dataplane = Self::open(root, service)?;
        LoadedProgram::load(&dataplane.dir, dataplane.flow_capacity).map(drop)
    }

    /// Adopts the pins of `service` under `root`: checks them all first (an unknown layout
    /// or a mismatching pin is refused before anything changes), migrates an older layout
    /// in place (the maps, and so every flow and slot, stay), and loads this build's
    /// program to compare its tag with the pinned one's.
    pub fn adopt(root: &Path, service: &str) -> Result<(Self, Adopted)> {
        check_service_name(service)?;
        let dir = root.join(service);
        if !dir.join(names::PROGRAM).exists() {
            return Err(DataplaneError::NotPinned { dir });
        }
        let steps = layout::check(&dir)?;
        let migrated_from = (!steps.is_empty()).then(|| PIN_LAYOUT - steps.len() as u32);
        layout::migrate(&dir, &steps)?;
        let mut dataplane = Self::open_dir(dir)?;
        if steps.contains(&Step::KeyFlowsBySource) {
            // The new flow table starts empty; `flows_new` counted the old one's flows.
            dataplane.set_flows_held(0)?;
        }
        let pinned_tag = dataplane.program_tag()?;
        let loaded = LoadedProgram::load(&dataplane.dir, dataplane.flow_capacity)?;
        // Migrated pins hold maps the pinned program never used: it is replaced even when
        // its instructions (and so its tag) are this build's.
        let replacement = (loaded.tag() != pinned_tag || migrated_from.is_some()).then_some(loaded);
        Ok((
            dataplane,
            Adopted {
                migrated_from,
                replacement,
                pinned_tag,
            },
        ))
    }

    /// Puts `program` in place of the pinned one: attaches it to the reuseport group of
    /// each of `sockets` (a live member of each listener's group; none when the groups have
    /// no socket left), then pins it.
    /// Attached first, so a failure leaves the pin naming the old program, and the next
    /// adoption tries again.
    pub fn replace_program(
        &mut self,
        mut program: LoadedProgram,
        sockets: &[BorrowedFd<'_>],
    ) -> Result<()> {
        let path = self.dir.join(names::PROGRAM);
        for (index, &socket) in sockets.iter().enumerate() {
            let action = format!(
                "attaching the new program to the reuseport group of socket fd {}",
                socket.as_raw_fd()
            );
            if let Err(error) = program
                .program()
                .attach(socket)
                .map_err(program_error(&path, action))
            {
                // The groups attached so far go back to the pinned program.
                for &attached in &sockets[..index] {
                    let _ = self.program.attach(attached);
                }
                return Err(error);
            }
        }
        if let Err(error) = program.pin() {
            // The pin still names the old program: the groups go back to it, so what
            // steers is what the pin says.
            for &socket in sockets {
                let _ = self.program.attach(socket);
            }
            return Err(error);
        }
        self.program = open_program(&path)?;
        // Pins migrated from layout 2 leave the old flow table, which only the old program
        // used.
        remove_if_present(&self.dir.join(names::LEGACY_FLOWS))
    }

    /// The pinned program's tag: the kernel's hash of its instructions, which differs
    /// between builds whose programs differ.
    pub fn program_tag(&self) -> Result<u64> {
        let path = self.dir.join(names::PROGRAM);
        Ok(self
            .program
            .info()
            .map_err(program_error(&path, "reading the program's tag".to_owned()))?
            .tag())
    }

    /// The layout the pins are in.
    pub fn layout(&self) -> Result<u32> {
        layout::pinned_layout(&self.dir)
    }
}
