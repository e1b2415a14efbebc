//! The control protocol between the CLI and the daemon: one JSON object per line each way,
//! `{"v":1,"request":{...}}` then `{"v":1,"reply":{...}}`. Pure: it turns bytes into
//! requests and replies into bytes; the socket lives in the daemon and the CLI.
//!
//! The version lets a newer CLI talk to an older daemon (or the reverse) and get a clear
//! refusal instead of a misunderstanding.
use serde::{Deserialize, Serialize};

use crate::table::Slot;

/// The protocol version this build speaks.
pub const VERSION: u32 = 1;

/// The longest request line the daemon reads; anything longer is refused unread.
pub const MAX_REQUEST: usize = 4096;

/// What the CLI asks the daemon to do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Is the daemon there and listening?
    Ping,
    /// Moves every entry of `slot` to its heirs; the worker keeps running and keeps its
    /// established connections.
    Drain {
        /// The service.
        service: String,
        /// The slot to drain.
        slot: Slot,
    },
    /// Sets `slot`'s weight, moving the fewest entries; a drained slot rejoins the table.
    Weight {
        /// The service.
        service: String,
        /// The slot.
        slot: Slot,
        /// The new weight.
        weight: u32,
    },
    /// Starts a new generation of the service's workers (with its configuration as the
    /// config file now says) and switches new work to it once it is ready. The daemon
    /// answers with [`Reply::Progress`] lines, then `Done` or, after a rollback, `Error`.
    Reload {
        /// The service.
        service: String,
    },
    /// Replaces the daemon with the binary now on disk, keeping its pid, its workers and
    /// every flow: the new binary is checked first, then executed in place; the new image
    /// adopts everything and answers `Done` once it serves. If it cannot, the old binary
    /// is executed again and answers `Error` with the reason.
    Upgrade,
}

/// The daemon's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Reply {
    /// Done; `message` says what happened, `moved` how many table entries changed owner.
    Done {
        /// Human-readable outcome.
        message: String,
        /// Table entries whose owner changed.
        moved: u32,
    },
    /// Refused, or rolled back; nothing changed.
    Error {
        /// What was wrong and what to do.
        message: String,
        /// Refused (the default, left out on the wire) or rolled back, so the CLI can exit
        /// with a code scripts tell apart.
        #[serde(default, skip_serializing_if = "ErrorKind::is_refused")]
        kind: ErrorKind,
    },
    /// A step of a longer request; more replies follow.
    Progress {
        /// What just happened.
        message: String,
    },
}

/// Why a request did not happen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Refused as asked (unknown service or slot, a reload under way, ...): nothing was
    /// tried.
    #[default]
    Refused,
    /// A reload was tried and rolled back: the old generation serves on.
    RolledBack,
}

impl ErrorKind {
    fn is_refused(&self) -> bool {
        *self == Self::Refused
    }
}

impl Reply {
    /// A refusal saying `message`.
    pub fn error(message: impl Into<String>) -> Self {
        Self::Error {
            message: message.into(),
            kind: ErrorKind::Refused,
        }
    }

    /// Whether this is the request's last reply.
    pub fn is_final(&self) -> bool {
        !matches!(self, Self::Progress { .. })
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RequestEnvelope {
    v: u32,
    request: serde_json::Value,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplyEnvelope {
    v: u32,
    reply: Reply,
}

/// A request or reply line could not be understood.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// Longer than [`MAX_REQUEST`].
    #[error("request is longer than {MAX_REQUEST} bytes")]
    TooLong,
    /// Not the expected JSON.
    #[error("malformed {what}: {reason}")]
    Malformed {
        /// `request` or `reply`.
        what: &'static str,
        /// The parser's explanation.
        reason: String,
    },
    /// Another protocol version.
    #[error(
        "protocol version {found} is not supported: this portshard speaks version {VERSION}; use a portshard CLI and daemon of the same release"
    )]
    Version {
        /// The version received.
        found: u32,
    },
}

/// Encodes `request` as one line, newline included.
pub fn encode_request(request: &Request) -> Vec<u8> {
    let envelope = RequestEnvelope {
        v: VERSION,
        request: serde_json::to_value(request).expect("a request always serializes"),
    };
    line(&envelope)
}

/// Decodes one request line (without its newline). Never panics, whatever the bytes.
pub fn decode_request(line: &[u8]) -> Result<Request, ProtocolError> {
    if line.len() > MAX_REQUEST {
        return Err(ProtocolError::TooLong);
    }
    let malformed = |e: serde_json::Error| ProtocolError::Malformed {
        what: "request",
        reason: e.to_string(),
    };
    let envelope: RequestEnvelope = serde_json::from_slice(line).map_err(malformed)?;
    if envelope.v != VERSION {
        return Err(ProtocolError::Version { found: envelope.v });
    }
    serde_json::from_value(envelope.request).map_err(malformed)
}

/// Encodes `reply` as one line, newline included.
pub fn encode_reply(reply: &Reply) -> Vec<u8> {
    line(&ReplyEnvelope {
        v: VERSION,
        reply: reply.clone(),
    })
}

/// Decodes one reply line (without its newline).
pub fn decode_reply(line: &[u8]) -> Result<Reply, ProtocolError> {
    let envelope: ReplyEnvelope =
        serde_json::from_slice(line).map_err(|e| ProtocolError::Malformed {
            what: "reply",
            reason: e.to_string(),
        })?;
    if envelope.v != VERSION {
        return Err(ProtocolError::Version { found: envelope.v });
    }
    Ok(envelope.reply)
}

fn line(value: &impl Serialize) -> Vec<u8> {
    let mut bytes = serde_json::to_vec(value).expect("plain data always serializes");
    bytes.push(b'\n');
    bytes
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn requests_round_trip() {
        for request in [
            Request::Ping,
            Request::Drain {
                service: "dns".into(),
                slot: 3,
            },
            Request::Weight {
                service: "web".into(),
                slot: 0,
                weight: 7,
            },
            Request::Reload {
                service: "web".into(),
            },
        ] {
            let bytes = encode_request(&request);
            assert_eq!(bytes.last(), Some(&b'\n'));
            assert_eq!(decode_request(&bytes[..bytes.len() - 1]), Ok(request));
        }
    }

    #[test]
    fn the_wire_format_is_stable() {
        let bytes = encode_request(&Request::Drain {
            service: "dns".into(),
            slot: 3,
        });
        assert_eq!(
            String::from_utf8(bytes).unwrap(),
            "{\"v\":1,\"request\":{\"op\":\"drain\",\"service\":\"dns\",\"slot\":3}}\n"
        );
        let reply = encode_reply(&Reply::Error {
            kind: ErrorKind::Refused,
            message: "no".into(),
        });
        assert_eq!(
            String::from_utf8(reply).unwrap(),
            "{\"v\":1,\"reply\":{\"error\":{\"message\":\"no\"}}}\n"
        );
    }

    #[test]
    fn replies_round_trip() {
        let reply = Reply::Done {
            message: "drained".into(),
            moved: 8192,
        };
        let bytes = encode_reply(&reply);
        assert_eq!(decode_reply(&bytes[..bytes.len() - 1]), Ok(reply));
    }

    #[test]
    fn bad_requests_are_explained() {
        let version = decode_request(br#"{"v":2,"request":{"op":"ping"}}"#).unwrap_err();
        assert_eq!(version, ProtocolError::Version { found: 2 });
        assert!(
            version
                .to_string()
                .contains("this portshard speaks version 1")
        );
        let unknown = decode_request(br#"{"v":1,"request":{"op":"explode"}}"#).unwrap_err();
        assert!(
            unknown
                .to_string()
                .starts_with("malformed request: unknown variant `explode`")
        );
        let extra =
            decode_request(br#"{"v":1,"request":{"op":"drain","service":"a","slot":1,"x":0}}"#)
                .unwrap_err();
        assert!(extra.to_string().contains("unknown field `x`"), "{extra}");
        let range =
            decode_request(br#"{"v":1,"request":{"op":"drain","service":"a","slot":70000}}"#);
        assert!(range.is_err());
        assert_eq!(
            decode_request(&[b' '; MAX_REQUEST + 1]),
            Err(ProtocolError::TooLong)
        );
    }

    proptest! {
        /// Whatever arrives on the socket, decoding returns a request or an error.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_request(&bytes);
            let _ = decode_reply(&bytes);
        }

        /// Every well-formed drain or weight request decodes to itself.
        #[test]
        fn well_formed_requests_decode(service in "[a-z0-9-]{1,32}", slot in any::<u16>(), weight in any::<u32>()) {
            let request = Request::Weight { service, slot, weight };
            let bytes = encode_request(&request);
            prop_assert_eq!(decode_request(&bytes[..bytes.len() - 1]), Ok(request));
        }
    }
}
