//! What names a service: its transport and its name, shared by the config (which checks
//! them) and the dataplane (which pins under the name).
use std::{fmt, net::SocketAddr};

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

/// One of a service's listeners: a transport and an address, one reuseport group. Written
/// `PROTO:ADDRESS` in the config's list form and in `status`, like `tcp:[::]:443`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Listener {
    /// Transport.
    pub proto: Proto,
    /// Address the workers' sockets of this listener are bound to.
    pub addr: SocketAddr,
}

impl Listener {
    /// A listener on `addr` over `proto`.
    pub fn new(proto: Proto, addr: SocketAddr) -> Self {
        Self { proto, addr }
    }

    /// Which kind of socket it is (see [`portshard_common::listener_kind`]): a service has
    /// at most one listener of each kind, so the program finds the listener by its kind.
    pub fn kind(&self) -> u32 {
        portshard_common::listener_kind(self.proto == Proto::Udp, self.addr.is_ipv6())
    }

    /// Its kind in words: `tcp4`, `tcp6`, `udp4` or `udp6`.
    pub fn kind_name(&self) -> &'static str {
        match (self.proto, self.addr.is_ipv6()) {
            (Proto::Tcp, false) => "tcp4",
            (Proto::Tcp, true) => "tcp6",
            (Proto::Udp, false) => "udp4",
            (Proto::Udp, true) => "udp6",
        }
    }

    /// The socket activation name (`LISTEN_FDNAMES`) of this listener's socket in a worker
    /// of `service`: the service's name alone when it has one listener, else
    /// `<service>-<kind>` (like `web-udp6`), which holds no ':' as the variable's
    /// separator requires.
    pub fn fd_name(&self, service: &str, listeners: usize) -> String {
        if listeners == 1 {
            service.to_owned()
        } else {
            format!("{service}-{}", self.kind_name())
        }
    }

    /// Reads `PROTO:ADDRESS`, like `udp:0.0.0.0:443` or `tcp:[::1]:8443`.
    pub fn parse(text: &str) -> Option<Self> {
        let (proto, addr) = text.split_once(':')?;
        let proto = match proto {
            "udp" => Proto::Udp,
            "tcp" => Proto::Tcp,
            _ => return None,
        };
        Some(Self::new(proto, addr.parse().ok()?))
    }
}

impl fmt::Display for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.proto, self.addr)
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

    #[test]
    fn listeners_read_and_print_as_proto_colon_address() {
        for text in [
            "tcp:0.0.0.0:443",
            "udp:[::]:443",
            "udp:127.0.0.1:53",
            "tcp:[::1]:8443",
        ] {
            let listener = Listener::parse(text).unwrap();
            assert_eq!(listener.to_string(), text);
        }
        for bad in [
            "",
            "tcp",
            "tcp:",
            "sctp:0.0.0.0:1",
            "tcp:0.0.0.0",
            "TCP:[::]:1",
            "[::]:1",
        ] {
            assert_eq!(Listener::parse(bad), None, "{bad}");
        }
        let names: Vec<(u32, &str)> =
            ["tcp:1.2.3.4:1", "tcp:[::]:1", "udp:1.2.3.4:1", "udp:[::]:1"]
                .iter()
                .map(|text| Listener::parse(text).unwrap())
                .map(|l| (l.kind(), l.kind_name()))
                .collect();
        assert_eq!(names, [(0, "tcp4"), (1, "tcp6"), (2, "udp4"), (3, "udp6")]);
        let web6 = Listener::parse("udp:[::]:443").unwrap();
        assert_eq!(web6.fd_name("web", 4), "web-udp6");
        assert_eq!(web6.fd_name("web", 1), "web");
    }
}
