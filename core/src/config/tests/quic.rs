//! The QUIC-LB fields: read with their defaults, refused where they cannot apply.
use super::*;

#[test]
fn quic_is_read_with_its_defaults_and_its_fields() {
    let quic = |extra: &str| {
        parse(&DNS.replace("mode = \"balance\"", extra))
            .unwrap()
            .services
            .remove(0)
            .quic
    };
    assert_eq!(quic(""), None);
    assert_eq!(
        quic("quic = true"),
        Some(QuicLb {
            config_id: 0,
            nonce_len: 8,
            encrypted: false,
        })
    );
    assert_eq!(
        quic("quic = true\nquic_config_id = 6\nquic_nonce_len = 16"),
        Some(QuicLb {
            config_id: 6,
            nonce_len: 16,
            encrypted: false,
        })
    );
    // Encrypted: one AES block of server ID and nonce, so a 13-octet nonce.
    for fields in [
        "quic = true\nquic_encrypt = true",
        "quic = true\nquic_encrypt = true\nquic_nonce_len = 13",
    ] {
        assert_eq!(
            quic(fields),
            Some(QuicLb {
                config_id: 0,
                nonce_len: 13,
                encrypted: true,
            }),
            "{fields}"
        );
    }
    assert_eq!(quic("quic = false"), None);
}

#[test]
fn bad_quic_fields_name_their_field_and_what_is_allowed() {
    let cases = [
        (
            "quic = true\nquic_config_id = 7",
            "9:18: service \"dns\" field `quic_config_id`: 7 is out of range: use 0 to 6",
        ),
        (
            "quic = true\nquic_nonce_len = 3",
            "9:18: service \"dns\" field `quic_nonce_len`: 3 is out of range: use 4 to 16",
        ),
        (
            "quic_nonce_len = 8",
            "8:18: service \"dns\" field `quic_nonce_len`: is set without `quic = true`",
        ),
        (
            "quic = true\nquic_encrypt = true\nquic_nonce_len = 8",
            "10:18: service \"dns\" field `quic_nonce_len`: is 8, but with `quic_encrypt = true` the server ID (3 octets) and nonce must make one 16-octet AES block, the single-pass mode the program decrypts: remove this field, or set it to 13",
        ),
        (
            "quic_encrypt = true",
            "8:16: service \"dns\" field `quic_encrypt`: is set without `quic = true`",
        ),
        (
            "quic = \"yes\"",
            "8:8: service \"dns\" field `quic`: expected true or false",
        ),
    ];
    for (to, expected) in cases {
        let found = problem(&DNS.replace("mode = \"balance\"", to));
        assert!(found.starts_with(&format!("{FILE}:{expected}")), "{found}");
    }
    let tcp = DNS
        .replace("\"udp\"", "\"tcp\"")
        .replace("mode = \"balance\"", "quic = true");
    let found = problem(&tcp);
    assert!(
        found.contains("field `quic`: QUIC runs over UDP, and this service has no UDP listener"),
        "{found}"
    );
}
