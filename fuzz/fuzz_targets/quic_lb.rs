//! The QUIC-LB decoder on arbitrary connection IDs under arbitrary configs: it never
//! panics; it reads a CID exactly when the CID is long enough and carries the config's ID;
//! and what it reads encodes back to the same CID (decoding is the inverse of encoding, in
//! the clear, single-pass and four-pass alike).
#![no_main]
use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use portshard_quic_lb::{Config, Decoder};

#[derive(Debug, Arbitrary)]
struct Input {
    config_id: u8,
    server_id_len: u8,
    nonce_len: u8,
    key: Option<[u8; 16]>,
    cid: Vec<u8>,
}

fuzz_target!(|input: Input| {
    let Input {
        config_id,
        server_id_len,
        nonce_len,
        key,
        cid,
    } = input;
    // Out-of-range parameters are refused, never a panic.
    let Ok(decoder) = Decoder::new(
        config_id,
        usize::from(server_id_len),
        usize::from(nonce_len),
        key,
    ) else {
        return;
    };
    let cid_len = decoder.cid_len();
    let decoded = decoder.decode_with_nonce(&cid);
    assert_eq!(
        decoded.is_some(),
        cid.len() >= cid_len && cid[0] >> 5 == config_id
    );
    let Some((server_id, nonce)) = decoded else {
        return;
    };
    assert_eq!(decoder.decode(&cid), Some(server_id));
    let config = Config::new(config_id, &server_id, nonce.len(), key)
        .unwrap()
        .with_self_encoded_length(false);
    assert_eq!(config.encode(&nonce, cid[0]).as_bytes(), &cid[..cid_len]);
});
