//! What names a service: its transport and its name, shared by the config (which checks
//! them) and the dataplane (which pins under the name).
use std::fmt;

/// Transport of a service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Proto {
    /// Datagrams: each 4-tuple is a flow, steered datagram by datagram.
    Udp,
    /// Connections: each SYN is steered once; queued connections migrate on close.
    Tcp,
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Udp => "udp",
            Self::Tcp => "tcp",
        })
    }
}

/// Whether `name` can name a service and its pin directory: 1 to 32 of `a-z`, `0-9`, `-`.
pub fn is_valid_name(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_short_lowercase_digits_and_dashes() {
        for good in ["dns", "web-1", &"a".repeat(32)] {
            assert!(is_valid_name(good), "{good}");
        }
        for bad in ["", "Web", "a_b", "a/b", "..", &"a".repeat(33)] {
            assert!(!is_valid_name(bad), "{bad}");
        }
        assert_eq!(format!("{} {}", Proto::Udp, Proto::Tcp), "udp tcp");
    }
}
