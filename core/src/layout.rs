//! Pin layout versions: which layouts of a service's pin directory this build can adopt,
//! and what adopting each takes. A layout this build does not know is refused before
//! anything is touched, never reused on the chance that it fits.
use portshard_common::PIN_LAYOUT;

/// The oldest pin layout this build migrates from: layout 1, written by every build before
/// the layout was recorded (its pins have no `layout` map).
pub const OLDEST_MIGRATABLE: u32 = 1;

/// What adopting pins of a given layout takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Adoption {
    /// They are in this build's layout: nothing to change.
    Current,
    /// They are in an older layout this build migrates in place.
    Migrate {
        /// The layout found.
        from: u32,
    },
}

/// What a migration from a known older layout changes, one step per layout crossed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// 1 to 2: pin the `layout` map, holding the new layout's number. The other maps are
    /// the same in both, so no flow, slot or counter changes.
    RecordLayout,
    /// 2 to 3: pin the flow table keyed by each flow's source, its admission array, its
    /// counters and the swept count. The old flow table (keyed by the flow hash alone)
    /// cannot be carried over: its flows are steered by the table again, once each, and
    /// its pin is removed once the new program replaces the old one.
    KeyFlowsBySource,
    /// 3 to 4: pin the QUIC counters, the listeners' socket arrays (a service's second to
    /// fourth listener) and the `listeners` records; nothing else changes. A service of older pins has one
    /// listener, whose sockets stay in `sockets`, and the table's listener bits are 0 for
    /// it, so no flow, slot or counter changes.
    PinListeners,
}

impl Step {
    /// The layout the pins are in once this step is done.
    pub fn reaches(self) -> u32 {
        match self {
            Self::RecordLayout => 2,
            Self::KeyFlowsBySource => 3,
            Self::PinListeners => 4,
        }
    }
}

/// Pins in a layout this build does not know.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "pin layout {found}, but this build of portshard ({version}) adopts layouts {OLDEST_MIGRATABLE} to {PIN_LAYOUT} (and writes {PIN_LAYOUT})",
    version = env!("CARGO_PKG_VERSION")
)]
pub struct UnknownLayout {
    /// The layout the pins are in.
    pub found: u32,
}

/// What adopting pins in layout `found` takes, or why they cannot be adopted.
pub fn adoption(found: u32) -> Result<Adoption, UnknownLayout> {
    match found {
        PIN_LAYOUT => Ok(Adoption::Current),
        OLDEST_MIGRATABLE..PIN_LAYOUT => Ok(Adoption::Migrate { from: found }),
        _ => Err(UnknownLayout { found }),
    }
}

/// The steps that bring pins from layout `from` to this build's, in order.
pub fn migration(from: u32) -> Result<Vec<Step>, UnknownLayout> {
    match adoption(from)? {
        Adoption::Current => Ok(Vec::new()),
        Adoption::Migrate { from } => (from..PIN_LAYOUT)
            .map(|layout| match layout {
                1 => Ok(Step::RecordLayout),
                2 => Ok(Step::KeyFlowsBySource),
                3 => Ok(Step::PinListeners),
                found => Err(UnknownLayout { found }),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_builds_layout_is_adopted_as_it_is() {
        assert_eq!(adoption(PIN_LAYOUT), Ok(Adoption::Current));
        assert_eq!(migration(PIN_LAYOUT), Ok(Vec::new()));
    }

    #[test]
    fn every_older_known_layout_has_a_step_per_layout_crossed() {
        for from in OLDEST_MIGRATABLE..PIN_LAYOUT {
            assert_eq!(adoption(from), Ok(Adoption::Migrate { from }));
            let steps = migration(from).unwrap();
            assert_eq!(steps.len(), (PIN_LAYOUT - from) as usize);
        }
        assert_eq!(
            migration(1),
            Ok(vec![
                Step::RecordLayout,
                Step::KeyFlowsBySource,
                Step::PinListeners
            ])
        );
        assert_eq!(
            migration(2),
            Ok(vec![Step::KeyFlowsBySource, Step::PinListeners])
        );
        assert_eq!(migration(3), Ok(vec![Step::PinListeners]));
        for from in OLDEST_MIGRATABLE..PIN_LAYOUT {
            let steps = migration(from).unwrap();
            let reached: Vec<u32> = steps.iter().map(|step| step.reaches()).collect();
            assert_eq!(reached, ((from + 1)..=PIN_LAYOUT).collect::<Vec<_>>());
        }
    }

    #[test]
    fn unknown_layouts_are_refused_naming_both_versions() {
        for found in [0, PIN_LAYOUT + 1, 99, u32::MAX] {
            let error = adoption(found).unwrap_err();
            assert_eq!(error, UnknownLayout { found });
            let message = error.to_string();
            assert!(
                message.contains(&format!("pin layout {found}")),
                "{message}"
            );
            assert!(
                message.contains(&format!("writes {PIN_LAYOUT}")),
                "{message}"
            );
            assert!(migration(found).is_err());
        }
    }
}
