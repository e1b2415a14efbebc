//! AES-128 decryption of one block, for QUIC-LB's single-pass encrypted connection IDs: the
//! program decrypts a connection ID's 16 octets after its first to read the server ID. The
//! equivalent inverse cipher (FIPS-197 5.3.5) with one 1 KiB table of constants and
//! rotations of it, built at compile time; userspace expands the key once
//! ([`QuicKey::new`]) and the program only looks up. Not constant-time: it runs in the
//! kernel on packets whose ciphertext any client chooses, and reveals through timing at
//! most what the server ID it decrypts to already does (which worker answers).

/// A service's QUIC-LB key, the value of the `quic_key` map: the key workers get, and the
/// decryption round keys the program uses. All zeros when none was set.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuicKey {
    /// The AES-128 key, as workers get it (`PORTSHARD_QUIC_LB_KEY`).
    pub key: [u8; 16],
    /// The decryption round keys of [`QuicKey::key`], in the order the rounds use them.
    pub round_keys: [u32; ROUND_KEY_WORDS],
}

/// Words of AES-128's expanded key: 11 round keys of 4 words.
pub const ROUND_KEY_WORDS: usize = 44;

impl QuicKey {
    /// No key.
    pub const NONE: Self = Self {
        key: [0; 16],
        round_keys: [0; ROUND_KEY_WORDS],
    };

    /// `key` with its decryption round keys.
    pub fn new(key: [u8; 16]) -> Self {
        let forward = expand_key(&key);
        let mut round_keys = [0u32; ROUND_KEY_WORDS];
        for round in 0..=ROUNDS {
            for word in 0..4 {
                let value = forward[4 * (ROUNDS - round) + word];
                // The middle rounds' keys go through InvMixColumns, as the equivalent
                // inverse cipher needs: `td(SBOX[b])` is InvMixColumns of octet `b`.
                round_keys[4 * round + word] = if round == 0 || round == ROUNDS {
                    value
                } else {
                    let [b0, b1, b2, b3] = value.to_be_bytes();
                    td(SBOX[b0 as usize] as usize, 0)
                        ^ td(SBOX[b1 as usize] as usize, 1)
                        ^ td(SBOX[b2 as usize] as usize, 2)
                        ^ td(SBOX[b3 as usize] as usize, 3)
                };
            }
        }
        Self { key, round_keys }
    }

    /// Whether a key was set.
    pub fn is_set(&self) -> bool {
        self.key != [0; 16]
    }
}

/// AES-128's rounds.
const ROUNDS: usize = 10;

/// Decrypts one AES-128 block with the decryption round keys of [`QuicKey::new`]. The four
/// columns are written out, not computed through a helper: the program measured faster so
/// (`prog_ns_quic_aes`), and every index is a constant or provably in bounds, so no bounds
/// check (whose panic path the verifier refuses) is left.
#[inline(always)]
pub fn decrypt_block(round_keys: &[u32; ROUND_KEY_WORDS], block: &[u8; 16]) -> [u8; 16] {
    let word = |i: usize| {
        u32::from_be_bytes([
            block[4 * i],
            block[4 * i + 1],
            block[4 * i + 2],
            block[4 * i + 3],
        ])
    };
    let mut s = [
        word(0) ^ round_keys[0],
        word(1) ^ round_keys[1],
        word(2) ^ round_keys[2],
        word(3) ^ round_keys[3],
    ];
    let mut round = 1;
    while round < ROUNDS {
        let key = |i: usize| round_keys[4 * round + i];
        s = [
            td(byte(s[0], 0), 0)
                ^ td(byte(s[3], 1), 1)
                ^ td(byte(s[2], 2), 2)
                ^ td(byte(s[1], 3), 3)
                ^ key(0),
            td(byte(s[1], 0), 0)
                ^ td(byte(s[0], 1), 1)
                ^ td(byte(s[3], 2), 2)
                ^ td(byte(s[2], 3), 3)
                ^ key(1),
            td(byte(s[2], 0), 0)
                ^ td(byte(s[1], 1), 1)
                ^ td(byte(s[0], 2), 2)
                ^ td(byte(s[3], 3), 3)
                ^ key(2),
            td(byte(s[3], 0), 0)
                ^ td(byte(s[2], 1), 1)
                ^ td(byte(s[1], 2), 2)
                ^ td(byte(s[0], 3), 3)
                ^ key(3),
        ];
        round += 1;
    }
    let last = |a: u32, b: u32, c: u32, d: u32, key: u32| {
        u32::from_be_bytes([
            INV_SBOX[byte(a, 0)],
            INV_SBOX[byte(b, 1)],
            INV_SBOX[byte(c, 2)],
            INV_SBOX[byte(d, 3)],
        ]) ^ key
    };
    let out = [
        last(s[0], s[3], s[2], s[1], round_keys[40]),
        last(s[1], s[0], s[3], s[2], round_keys[41]),
        last(s[2], s[1], s[0], s[3], round_keys[42]),
        last(s[3], s[2], s[1], s[0], round_keys[43]),
    ];
    let mut plain = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let bytes = out[i].to_be_bytes();
        plain[4 * i] = bytes[0];
        plain[4 * i + 1] = bytes[1];
        plain[4 * i + 2] = bytes[2];
        plain[4 * i + 3] = bytes[3];
        i += 1;
    }
    plain
}

/// Octet `n` (0 the most significant) of `word`, as an index.
#[inline(always)]
const fn byte(word: u32, n: u32) -> usize {
    ((word >> (24 - 8 * n)) & 0xff) as usize
}

/// The inverse round's table for octet position `n`: `TD0` rotated right by `8 * n` bits.
#[inline(always)]
const fn td(index: usize, n: u32) -> u32 {
    TD0[index & 0xff].rotate_right(8 * n)
}

/// Multiplication in AES's field, GF(2^8) modulo x^8 + x^4 + x^3 + x + 1.
const fn mul(mut a: u8, mut b: u8) -> u8 {
    let mut product = 0u8;
    while b != 0 {
        if b & 1 != 0 {
            product ^= a;
        }
        let carry = a & 0x80 != 0;
        a <<= 1;
        if carry {
            a ^= 0x1b;
        }
        b >>= 1;
    }
    product
}

/// The multiplicative inverse in AES's field (`a^254`), 0 for 0.
const fn inverse(a: u8) -> u8 {
    let mut result = 1u8;
    let mut exponent = 254u8;
    let mut base = a;
    while exponent != 0 {
        if exponent & 1 != 0 {
            result = mul(result, base);
        }
        base = mul(base, base);
        exponent >>= 1;
    }
    if a == 0 { 0 } else { result }
}

/// AES's S-box: the inverse, then the affine map (FIPS-197 5.1.1).
const SBOX: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut x = 0;
    while x < 256 {
        let b = inverse(x as u8);
        table[x] =
            b ^ b.rotate_left(1) ^ b.rotate_left(2) ^ b.rotate_left(3) ^ b.rotate_left(4) ^ 0x63;
        x += 1;
    }
    table
};

/// The inverse S-box.
const INV_SBOX: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut x = 0;
    while x < 256 {
        table[SBOX[x] as usize] = x as u8;
        x += 1;
    }
    table
};

/// The inverse round's table: InvSubBytes and InvMixColumns of one octet, as a column
/// `(0e, 09, 0d, 0b) * INV_SBOX[x]`, big-endian.
const TD0: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut x = 0;
    while x < 256 {
        let s = INV_SBOX[x];
        table[x] = u32::from_be_bytes([mul(s, 0x0e), mul(s, 0x09), mul(s, 0x0d), mul(s, 0x0b)]);
        x += 1;
    }
    table
};

/// AES-128's key expansion (FIPS-197 5.2): 44 words, round key `r` at `4 * r`.
fn expand_key(key: &[u8; 16]) -> [u32; ROUND_KEY_WORDS] {
    let mut words = [0u32; ROUND_KEY_WORDS];
    for (i, chunk) in key.chunks_exact(4).enumerate() {
        words[i] = u32::from_be_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
    }
    let mut rcon = 1u8;
    for i in 4..ROUND_KEY_WORDS {
        let mut temp = words[i - 1];
        if i % 4 == 0 {
            let [a, b, c, d] = temp.rotate_left(8).to_be_bytes();
            temp = u32::from_be_bytes([
                SBOX[a as usize] ^ rcon,
                SBOX[b as usize],
                SBOX[c as usize],
                SBOX[d as usize],
            ]);
            rcon = mul(rcon, 2);
        }
        words[i] = words[i - 4] ^ temp;
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(text: &str) -> [u8; 16] {
        let mut out = [0u8; 16];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).unwrap();
        }
        out
    }

    #[test]
    fn the_tables_are_aes() {
        assert_eq!(
            (SBOX[0x00], SBOX[0x01], SBOX[0x53], SBOX[0xff]),
            (0x63, 0x7c, 0xed, 0x16)
        );
        assert_eq!(INV_SBOX[0x63], 0);
        assert_eq!(TD0[0], 0x51f4_a750);
    }

    #[test]
    fn the_fips_197_example_decrypts() {
        // FIPS-197 Appendix C.1.
        let key = QuicKey::new(hex("000102030405060708090a0b0c0d0e0f"));
        let cipher = hex("69c4e0d86a7b0430d8cdb78070b4c55a");
        assert_eq!(
            decrypt_block(&key.round_keys, &cipher),
            hex("00112233445566778899aabbccddeeff")
        );
        // FIPS-197 Appendix B's key expansion ends with this round key.
        let forward = expand_key(&hex("2b7e151628aed2a6abf7158809cf4f3c"));
        assert_eq!(
            forward[40..],
            [0xd014_f9a8, 0xc9ee_2589, 0xe13f_0cc8, 0xb663_0ca6]
        );
    }

    #[test]
    fn what_a_worker_encrypts_the_program_decrypts() {
        // The workers' single-pass encryption (the `aes` crate, through portshard-quic-lb)
        // against this decryption, for keys, server IDs and nonces from a fixed sequence.
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        };
        for _ in 0..512 {
            let key: [u8; 16] = core::array::from_fn(|_| next());
            let server_id: [u8; 3] = core::array::from_fn(|_| next());
            let nonce: [u8; 13] = core::array::from_fn(|_| next());
            let config = portshard_quic_lb::Config::new(1, &server_id, 13, Some(key)).unwrap();
            let cid = config.encode(&nonce, 0);
            let block: [u8; 16] = cid.as_bytes()[1..17].try_into().unwrap();
            assert_ne!(block[..3], server_id);
            let plain = decrypt_block(&QuicKey::new(key).round_keys, &block);
            assert_eq!((&plain[..3], &plain[3..]), (&server_id[..], &nonce[..]));
        }
    }

    #[test]
    fn no_key_is_not_set() {
        assert!(!QuicKey::NONE.is_set());
        assert!(QuicKey::new([1; 16]).is_set());
    }
}
