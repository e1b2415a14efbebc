//! The reference programs (`ebpf/src/reference.rs`): loaded from their own object,
//! verified, and given a socket array and lookup array over a group's listeners.
use std::{os::fd::AsFd as _, path::Path};

use aya::{
    Ebpf,
    maps::{Array, ReusePortSockArray},
    programs::SkReuseport,
};
use portshard_common::reference;

use super::super::{BenchError, Result};
use crate::{flows::Listener, scenario::MeasureError};

/// The reference object, loaded, with its programs verified.
pub fn load(object: &Path) -> Result<Ebpf> {
    let mut ebpf = Ebpf::load_file(object).map_err(|source| BenchError::Bpf {
        what: format!("loading the reference object {}", object.display()),
        source: Box::new(source),
    })?;
    for name in [reference::PASS, reference::SELECT, reference::SELECT_TABLE] {
        let program: &mut SkReuseport = ebpf
            .program_mut(name)
            .ok_or_else(|| no_program(name))?
            .try_into()
            .map_err(BenchError::bpf(format!("reference program {name}")))?;
        program.load().map_err(BenchError::bpf(format!(
            "verifying reference program {name}"
        )))?;
    }
    Ok(ebpf)
}

/// The loaded reference program `name`.
pub fn program<'a>(ebpf: &'a Ebpf, name: &str) -> Result<&'a SkReuseport> {
    ebpf.program(name)
        .ok_or_else(|| no_program(name))?
        .try_into()
        .map_err(BenchError::bpf(format!("reference program {name}")))
}

fn no_program(name: &str) -> BenchError {
    MeasureError::Traffic(format!("the reference object has no program {name}")).into()
}

/// Puts `listeners` in the reference object's socket array `sockets_map`, slot `i` for
/// listener `i`, and spreads the `entries` of its lookup array `slots_map` over them.
pub fn fill_maps(
    ebpf: &mut Ebpf,
    (sockets_map, slots_map, entries): (&str, &str, u32),
    listeners: &[Option<Listener>],
) -> Result<()> {
    let map_error = |what: String| {
        move |source: aya::maps::MapError| BenchError::Bpf {
            what,
            source: Box::new(source),
        }
    };
    let map = |ebpf: &mut Ebpf, name: &str| {
        ebpf.take_map(name)
            .ok_or_else(|| MeasureError::Traffic(format!("the reference object has no map {name}")))
    };
    let mut sockets = ReusePortSockArray::try_from(map(ebpf, sockets_map)?)
        .map_err(map_error(format!("opening map {sockets_map}")))?;
    for (slot, listener) in listeners.iter().enumerate() {
        let listener = listener.as_ref().expect("all open");
        sockets
            .set(slot as u32, &listener.as_fd(), 0)
            .map_err(map_error(format!(
                "placing listener {slot} in {sockets_map}"
            )))?;
    }
    let mut slots: Array<_, u32> = Array::try_from(map(ebpf, slots_map)?)
        .map_err(map_error(format!("opening map {slots_map}")))?;
    for index in 0..entries {
        slots
            .set(index, index % listeners.len() as u32, 0)
            .map_err(map_error(format!("writing entry {index} of {slots_map}")))?;
    }
    Ok(())
}
