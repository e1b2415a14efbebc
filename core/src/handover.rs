//! What a daemon hands to the image it executes in its place for `portshard upgrade`: the
//! descriptors that stay open across `execve`, named in one environment variable. Pure:
//! the daemon's edge clears their close-on-exec flags and takes them back.
use std::fmt;

/// The environment variable that carries a [`Handover`].
pub const ENV: &str = "PORTSHARD_HANDOVER";

/// The environment variable that asks `serve` only to check that it could take over the
/// running daemon's pins (the upgrade's first step), changing nothing.
pub const CHECK_ENV: &str = "PORTSHARD_UPGRADE_CHECK";

/// The descriptors a daemon keeps open across its re-execution, and how it went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Handover {
    /// The pin root, locked: held across the exec, so no other daemon takes the root.
    pub lock: i32,
    /// The control socket's listener: requests arriving meanwhile wait in its backlog.
    pub control: i32,
    /// The connection of the `portshard upgrade` that asked: the final reply goes there.
    pub client: i32,
    /// The image being replaced, opened, to go back to if the new one cannot take over;
    /// `None` once gone back.
    pub previous: Option<i32>,
    /// Why the new image could not take over, for the image gone back to.
    pub failed: Option<String>,
}

/// The variable's value cannot be understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{ENV}={value:?} is not a handover from a portshard daemon ({why}); unset it: it is set only by `portshard upgrade`"
)]
pub struct HandoverError {
    /// The value.
    pub value: String,
    /// What is wrong with it.
    pub why: String,
}

impl fmt::Display for Handover {
    /// `lock=3;control=4;client=5[;previous=6][;failed=<text to the end>]`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "lock={};control={};client={}",
            self.lock, self.control, self.client
        )?;
        if let Some(previous) = self.previous {
            write!(f, ";previous={previous}")?;
        }
        if let Some(failed) = &self.failed {
            write!(f, ";failed={failed}")?;
        }
        Ok(())
    }
}

impl Handover {
    /// Reads a value written by [`Handover`]'s `Display`.
    pub fn parse(value: &str) -> Result<Self, HandoverError> {
        let error = |why: String| HandoverError {
            value: value.to_owned(),
            why,
        };
        // The failure text comes last and may hold anything, `;` included.
        let (fields, failed) = match value.split_once(";failed=") {
            Some((fields, failed)) => (fields, Some(failed.to_owned())),
            None => (value, None),
        };
        let (mut lock, mut control, mut client, mut previous) = (None, None, None, None);
        for field in fields.split(';') {
            let (key, number) = field
                .split_once('=')
                .ok_or_else(|| error(format!("field {field:?} is not key=number")))?;
            let number: i32 = number
                .parse()
                .ok()
                .filter(|n| *n >= 0)
                .ok_or_else(|| error(format!("{key} is not a descriptor number")))?;
            let slot = match key {
                "lock" => &mut lock,
                "control" => &mut control,
                "client" => &mut client,
                "previous" => &mut previous,
                other => return Err(error(format!("unknown field {other:?}"))),
            };
            if slot.replace(number).is_some() {
                return Err(error(format!("{key} is given twice")));
            }
        }
        let need = |name: &str, value: Option<i32>| {
            value.ok_or_else(|| error(format!("{name} is missing")))
        };
        Ok(Self {
            lock: need("lock", lock)?,
            control: need("control", control)?,
            client: need("client", client)?,
            previous,
            failed,
        })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn a_handover_reads_back_as_written() {
        let handover = Handover {
            lock: 3,
            control: 4,
            client: 7,
            previous: Some(9),
            failed: None,
        };
        assert_eq!(handover.to_string(), "lock=3;control=4;client=7;previous=9");
        assert_eq!(Handover::parse(&handover.to_string()), Ok(handover));
    }

    #[test]
    fn broken_values_are_refused_saying_what_is_wrong() {
        for (value, why) in [
            ("", "not key=number"),
            ("lock=3;control=4", "client is missing"),
            (
                "lock=3;control=4;client=x",
                "client is not a descriptor number",
            ),
            (
                "lock=3;control=4;client=-1",
                "client is not a descriptor number",
            ),
            ("lock=3;lock=3;control=4;client=5", "lock is given twice"),
            ("lock=3;control=4;client=5;pid=1", "unknown field \"pid\""),
        ] {
            let message = Handover::parse(value).unwrap_err().to_string();
            assert!(message.contains(why), "{value:?}: {message}");
            assert!(message.contains("unset it"), "{message}");
        }
    }

    proptest! {
        #[test]
        fn any_handover_survives_the_round_trip(
            lock in 0..i32::MAX,
            control in 0..i32::MAX,
            client in 0..i32::MAX,
            previous in proptest::option::of(0..i32::MAX),
            failed in proptest::option::of(".*"),
        ) {
            let handover = Handover { lock, control, client, previous, failed };
            prop_assert_eq!(Handover::parse(&handover.to_string()), Ok(handover));
        }
    }
}
