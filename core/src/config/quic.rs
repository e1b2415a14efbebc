//! Validation of a service's QUIC-LB fields (`quic`, `quic_config_id`, `quic_nonce_len`,
//! `quic_encrypt`).
use portshard_common::quic::{
    ENCRYPTED_NONCE_LEN, MAX_NONCE_LEN, MIN_NONCE_LEN, UNROUTABLE_CONFIG_ID,
};
use toml::Spanned;

use super::{Checker, DEFAULT_QUIC_NONCE_LEN, QuicLb};

/// The QUIC-LB fields of a service, as written.
pub(super) struct RawQuic {
    pub(super) quic: Option<Spanned<bool>>,
    pub(super) config_id: Option<Spanned<i64>>,
    pub(super) nonce_len: Option<Spanned<i64>>,
    pub(super) encrypt: Option<Spanned<bool>>,
}

/// Validates the QUIC-LB connection-ID steering of a service, which has a UDP listener if
/// `udp`.
pub(super) fn check_quic(
    checker: &mut Checker<'_>,
    udp: bool,
    raw: RawQuic,
    what: &dyn Fn(&str) -> String,
) -> Option<QuicLb> {
    let on = raw.quic.as_ref().is_some_and(|q| *q.get_ref());
    if !on {
        let stray = [
            ("quic_config_id", raw.config_id.map(|f| f.span())),
            ("quic_nonce_len", raw.nonce_len.map(|f| f.span())),
            ("quic_encrypt", raw.encrypt.map(|f| f.span())),
        ];
        for (field, span) in stray {
            if let Some(span) = span {
                checker.report(
                    span,
                    what(field),
                    "is set without `quic = true`: add it, or remove this field".to_owned(),
                );
            }
        }
        return None;
    }
    if !udp {
        checker.report(
            raw.quic.map_or(0..0, |q| q.span()),
            what("quic"),
            "QUIC runs over UDP, and this service has no UDP listener: remove `quic`, or listen on UDP".to_owned(),
        );
        return None;
    }
    let config_id = raw.config_id.as_ref().map_or(0, |c| {
        // 7 (0b111) is the draft's unroutable codepoint: no load balancer routes it.
        checker.integer(
            c,
            &what("quic_config_id"),
            0..u32::from(UNROUTABLE_CONFIG_ID),
        )
    });
    let encrypted = raw.encrypt.as_ref().is_some_and(|e| *e.get_ref());
    let nonce_len = match (&raw.nonce_len, encrypted) {
        (None, false) => DEFAULT_QUIC_NONCE_LEN,
        (None, true) => ENCRYPTED_NONCE_LEN,
        (Some(n), false) => checker.integer(
            n,
            &what("quic_nonce_len"),
            u32::from(MIN_NONCE_LEN)..u32::from(MAX_NONCE_LEN) + 1,
        ) as u8,
        (Some(n), true) => {
            // The program decrypts the single-pass mode only: server ID and nonce are one
            // AES block.
            if *n.get_ref() != i64::from(ENCRYPTED_NONCE_LEN) {
                checker.report(
                    n.span(),
                    what("quic_nonce_len"),
                    format!(
                        "is {}, but with `quic_encrypt = true` the server ID (3 octets) and nonce must make one 16-octet AES block, the single-pass mode the program decrypts: remove this field, or set it to {ENCRYPTED_NONCE_LEN}",
                        n.get_ref()
                    ),
                );
            }
            ENCRYPTED_NONCE_LEN
        }
    };
    Some(QuicLb {
        config_id: config_id as u8,
        nonce_len,
        encrypted,
    })
}
