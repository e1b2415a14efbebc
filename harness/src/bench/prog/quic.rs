//! The QUIC subjects: a group with QUIC-LB on, its connection IDs in the clear or encrypted,
//! and the short-header packet naming one of its live slots that each measured datagram is.
use std::path::{Path, PathBuf};

use portshard::{group::Group, supervisor::Switches, table::Slot};
use portshard_common::quic::{self, ENCRYPTED_NONCE_LEN};

use super::{LISTENERS, portshard_group};
use crate::{bench::Result, flows::Listener, scenario::MeasureError};

/// The slot the QUIC subjects' packets name (generation 0, as the bench's groups hold).
const QUIC_SLOT: Slot = 3;
/// The QUIC subjects' nonce length in the clear: 12-octet connection IDs.
const NONCE_LEN: u8 = 8;
/// The config rotation codepoint of the subjects' connection IDs.
const CONFIG_ID: u8 = 0;

/// A group steering QUIC by connection ID, and the packet its measured datagrams carry.
pub struct QuicSubject {
    pub listeners: Vec<Option<Listener>>,
    pub group: Group,
    pub program: PathBuf,
    pub packet: Vec<u8>,
}

/// The group of `service` on `port` with QUIC-LB on (`encrypted`: single-pass AES under the
/// key the group draws, as the daemon's workers would be given), and a short-header packet
/// of a small request whose destination connection ID names [`QUIC_SLOT`].
pub fn quic_subject(pins: &Path, service: &str, port: u16, encrypted: bool) -> Result<QuicSubject> {
    let (listeners, mut group, program) = portshard_group(pins, service, port, LISTENERS, 0)?;
    let nonce_len = if encrypted {
        ENCRYPTED_NONCE_LEN
    } else {
        NONCE_LEN
    };
    let key = if encrypted {
        Some(group.quic_key()?)
    } else {
        None
    };
    group.dataplane().set_switches(Switches {
        flags: quic::quic_flags(CONFIG_ID, nonce_len, encrypted),
        flow_idle_s: 0,
    });
    let config = portshard_quic_lb::Config::new(
        CONFIG_ID,
        &quic::server_id(QUIC_SLOT, 0),
        usize::from(nonce_len),
        key,
    )
    .map_err(|e| MeasureError::Traffic(format!("{service}: QUIC-LB config: {e}")))?;
    let mut packet = vec![0x41];
    packet.extend_from_slice(
        config
            .encode(&vec![0x5a; usize::from(nonce_len)], 0)
            .as_bytes(),
    );
    packet.extend([0xa5; 64]);
    Ok(QuicSubject {
        listeners,
        group,
        program,
        packet,
    })
}

impl QuicSubject {
    /// Every datagram must have taken the connection-ID path, or the figures measured
    /// another one.
    pub fn check_steered(&self, name: &str) -> Result<()> {
        let counts = self.group.dataplane().quic_counters()?;
        let by_id = counts.slots[usize::from(QUIC_SLOT)].by_connection_id;
        let stale: u64 = counts.slots.iter().map(|s| s.stale_server_id).sum();
        let by_table = counts.long_header
            + counts.other_config
            + counts.unknown_server_id
            + counts.malformed
            + stale;
        if by_id == 0 || by_table != 0 {
            return Err(MeasureError::Traffic(format!(
                "{name}: {by_id} datagrams steered by connection ID, {by_table} by the table; the QUIC figures would measure another path"
            ))
            .into());
        }
        Ok(())
    }
}
