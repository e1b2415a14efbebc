//! Properties over every server ID and nonce length the draft allows: what a server encodes,
//! a load balancer with the same config decodes, in the clear and in both encrypted modes;
//! and no input makes the decoder panic.
use portshard_quic_lb::{Config, Decoder, Generator};
use proptest::prelude::*;

/// Every (server ID length, nonce length) pair with 1..=15, 4..=18 and a sum of at most 19.
fn lengths() -> impl Strategy<Value = (usize, usize)> {
    (1usize..=15).prop_flat_map(|sid_len| (Just(sid_len), 4usize..=19 - sid_len))
}

/// A config for those lengths with random contents; `encrypted` picks whether it has a
/// key. Sums of 16 take the single-pass path, every other sum the four-pass one.
fn config(encrypted: bool) -> impl Strategy<Value = (Config, Vec<u8>)> {
    (
        lengths(),
        0u8..=6,
        any::<[u8; 16]>(),
        any::<bool>(),
        proptest::collection::vec(any::<u8>(), 33),
    )
        .prop_map(
            move |((sid_len, nonce_len), config_id, key, self_encode, bytes)| {
                let key = encrypted.then_some(key);
                let config = Config::new(config_id, &bytes[..sid_len], nonce_len, key)
                    .unwrap()
                    .with_self_encoded_length(self_encode);
                (config, bytes[15..15 + nonce_len].to_vec())
            },
        )
}

fn round_trip(config: &Config, nonce: &[u8], random_bits: u8) -> Result<(), TestCaseError> {
    let cid = config.encode(nonce, random_bits);
    prop_assert_eq!(cid.len(), config.cid_len());
    prop_assert_eq!(cid[0] >> 5, config.config_id());
    if config.self_encodes_length() {
        prop_assert_eq!(usize::from(cid[0] & 0x1f), cid.len() - 1);
    }
    let decoder = Decoder::new(
        config.config_id(),
        config.server_id().len(),
        config.nonce_len(),
        config.key().copied(),
    )
    .unwrap();
    prop_assert_eq!(decoder.decode(&cid), Some(*config.server_id()));
    let (server_id, decoded_nonce) = decoder.decode_with_nonce(&cid).unwrap();
    prop_assert_eq!(server_id, *config.server_id());
    prop_assert_eq!(decoded_nonce.as_bytes(), nonce);
    // Octets a server appends for its own use change nothing.
    let mut longer = cid.to_vec();
    longer.extend_from_slice(&[0xee; 3]);
    prop_assert_eq!(decoder.decode(&longer), Some(*config.server_id()));
    // One octet short is not this config's CID.
    prop_assert_eq!(decoder.decode(&cid[..cid.len() - 1]), None);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn plaintext_round_trips((config, nonce) in config(false), random_bits: u8) {
        round_trip(&config, &nonce, random_bits)?;
        // Unencrypted, the server ID is right there after the first octet.
        let cid = config.encode(&nonce, random_bits);
        prop_assert_eq!(&cid[1..=config.server_id().len()], config.server_id().as_bytes());
    }

    #[test]
    fn encrypted_round_trips((config, nonce) in config(true), random_bits: u8) {
        round_trip(&config, &nonce, random_bits)?;
    }

    /// The single-pass case (server ID and nonce summing to 16) on its own, so it is never
    /// left to the odds of the general strategy.
    #[test]
    fn single_pass_round_trips(
        sid_len in 1usize..=12,
        config_id in 0u8..=6,
        key: [u8; 16],
        block: [u8; 16],
    ) {
        let config = Config::new(config_id, &block[..sid_len], 16 - sid_len, Some(key)).unwrap();
        round_trip(&config, &block[sid_len..], 0)?;
    }

    #[test]
    fn generated_ids_decode_and_differ((config, seed) in config(true), extra: bool) {
        let config = config.with_self_encoded_length(extra);
        let decoder = config.decoder();
        let mut state = seed;
        let mut generator = Generator::new(config.clone(), move |bytes: &mut [u8]| {
            for byte in bytes {
                state.rotate_left(1);
                *byte = state[0] ^ 0x5c;
            }
        });
        let mut seen = std::collections::HashSet::new();
        for _ in 0..8 {
            let cid = generator.generate().unwrap();
            prop_assert_eq!(decoder.decode(&cid), Some(*config.server_id()));
            prop_assert!(seen.insert(cid), "a connection ID repeated");
        }
    }

    #[test]
    fn decoding_arbitrary_bytes_never_panics(
        (sid_len, nonce_len) in lengths(),
        config_id in 0u8..=6,
        key in proptest::option::of(any::<[u8; 16]>()),
        cid in proptest::collection::vec(any::<u8>(), 0..=24),
    ) {
        let decoder = Decoder::new(config_id, sid_len, nonce_len, key).unwrap();
        let decoded = decoder.decode(&cid);
        let fits = cid.len() > sid_len + nonce_len && cid[0] >> 5 == config_id;
        prop_assert_eq!(decoded.is_some(), fits);
        if let Some(server_id) = decoded {
            prop_assert_eq!(server_id.len(), sid_len);
            prop_assert_eq!(decoder.decode_with_nonce(&cid).map(|(s, _)| s), Some(server_id));
        }
    }
}

/// Every allowed (server ID length, nonce length) pair, each in the clear and encrypted,
/// deterministically, so no pair is left to the odds of the strategies above.
#[test]
fn every_length_pair_round_trips() {
    let mut pairs = 0;
    for sid_len in 1..=15usize {
        for nonce_len in 4..=19 - sid_len {
            for key in [None, Some([0x42; 16])] {
                for fill in [0x00u8, 0x5a, 0xff] {
                    let sid: Vec<u8> = (0..sid_len as u8)
                        .map(|i| i.wrapping_mul(37) ^ fill)
                        .collect();
                    let nonce: Vec<u8> = (0..nonce_len as u8).map(|i| i ^ fill).collect();
                    let config = Config::new(4, &sid, nonce_len, key).unwrap();
                    round_trip(&config, &nonce, fill).unwrap();
                }
            }
            pairs += 1;
        }
    }
    // 15 server ID lengths; with the longest nonce for each, 120 pairs in all.
    assert_eq!(pairs, 120);
}
