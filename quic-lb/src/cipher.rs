//! The draft's encryption of the plaintext block (server ID then nonce): one AES-128-ECB
//! block when it is exactly 16 octets (section 5.4.1), a four-pass Feistel network with
//! AES-128-ECB as the round function otherwise (section 5.4.2). The steps and their numbers
//! follow the draft's "Algorithm Description".
use aes::{
    Aes128,
    cipher::{Array, BlockCipherDecrypt, BlockCipherEncrypt},
};

use crate::config::MAX_PLAINTEXT_LEN;

/// The plaintext (and ciphertext) block, at most 19 octets.
pub(crate) type Block = [u8; MAX_PLAINTEXT_LEN];

/// One half of the block: `half_len` = `plaintext_len / 2` rounded up, at most 10.
type Half = [u8; MAX_PLAINTEXT_LEN.div_ceil(2)];

/// `expand(length, pass, input_bytes)`: `input_bytes`, zeros, then `length` as the 15th
/// octet and `pass` as the 16th.
fn expand(length: usize, pass: u8, input: &[u8]) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..input.len()].copy_from_slice(input);
    out[14] = length as u8;
    out[15] = pass;
    out
}

/// One Feistel round: `target ^= truncate(AES_ECB(key, expand(length, pass, source)),
/// half_len)`.
fn round(cipher: &Aes128, length: usize, pass: u8, source: &[u8], target: &mut [u8]) {
    let mut block = Array::from(expand(length, pass, source));
    cipher.encrypt_block(&mut block);
    for (t, r) in target.iter_mut().zip(block.iter()) {
        *t ^= r;
    }
}

/// For an odd length, `left` gives up the low four bits of its last octet: the middle
/// octet's low nibble belongs to `right`.
fn clear_last_bits(half: &mut [u8], odd: bool) {
    if odd {
        *half.last_mut().expect("a half is never empty") &= 0xf0;
    }
}

/// For an odd length, `right` gives up the high four bits of its first octet: the middle
/// octet's high nibble belongs to `left`.
fn clear_first_bits(half: &mut [u8], odd: bool) {
    if odd {
        half[0] &= 0x0f;
    }
}

/// Step 2: splits `block` into `left` and `right` halves of `half_len` octets each, the
/// middle octet of an odd length split between them.
fn split(block: &[u8]) -> (Half, Half, usize, bool) {
    let len = block.len();
    let half_len = len.div_ceil(2);
    let odd = !len.is_multiple_of(2);
    let (mut left, mut right) = (Half::default(), Half::default());
    left[..half_len].copy_from_slice(&block[..half_len]);
    right[..half_len].copy_from_slice(&block[len - half_len..]);
    clear_last_bits(&mut left[..half_len], odd);
    clear_first_bits(&mut right[..half_len], odd);
    (left, right, half_len, odd)
}

/// Step 12: `left || right`, the two zero nibbles of an odd length stripped out.
fn join(left: &[u8], right: &[u8], odd: bool, out: &mut [u8]) {
    let half_len = left.len();
    out[..half_len].copy_from_slice(left);
    if odd {
        out[half_len - 1] |= right[0];
        out[half_len..].copy_from_slice(&right[1..]);
    } else {
        out[half_len..].copy_from_slice(right);
    }
}

/// Encrypts `block` (server ID then nonce, 5 to 19 octets) in place.
pub(crate) fn encrypt(cipher: &Aes128, block: &mut [u8]) {
    let len = block.len();
    if len == 16 {
        let mut one = Array::from(<[u8; 16]>::try_from(&*block).expect("16 octets"));
        cipher.encrypt_block(&mut one);
        block.copy_from_slice(&one);
        return;
    }
    let (mut left, mut right, half_len, odd) = split(block);
    let (left, right) = (&mut left[..half_len], &mut right[..half_len]);
    // Steps 3 to 11.
    round(cipher, len, 1, left, right);
    clear_first_bits(right, odd);
    round(cipher, len, 2, right, left);
    clear_last_bits(left, odd);
    round(cipher, len, 3, left, right);
    clear_first_bits(right, odd);
    round(cipher, len, 4, right, left);
    clear_last_bits(left, odd);
    join(left, right, odd, block);
}

/// Decrypts `block` in place. With `server_id_len` at most `floor(len / 2)` the server ID
/// lies wholly in `left_0` and the draft's three passes suffice; only the octets of
/// `block` past the server ID are then left undefined (callers wanting the nonce pass
/// `block.len()`).
pub(crate) fn decrypt(cipher: &Aes128, block: &mut [u8], server_id_len: usize) {
    let len = block.len();
    if len == 16 {
        let mut one = Array::from(<[u8; 16]>::try_from(&*block).expect("16 octets"));
        cipher.decrypt_block(&mut one);
        block.copy_from_slice(&one);
        return;
    }
    let (mut left, mut right, half_len, odd) = split(block);
    let (left, right) = (&mut left[..half_len], &mut right[..half_len]);
    round(cipher, len, 4, right, left);
    clear_last_bits(left, odd);
    round(cipher, len, 3, left, right);
    clear_first_bits(right, odd);
    round(cipher, len, 2, right, left);
    clear_last_bits(left, odd);
    if server_id_len > len / 2 {
        round(cipher, len, 1, left, right);
        clear_first_bits(right, odd);
    }
    join(left, right, odd, block);
}

#[cfg(test)]
mod tests {
    use aes::cipher::KeyInit;

    use super::*;

    fn hex(text: &str) -> Vec<u8> {
        (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn expand_matches_the_draft() {
        // Section 5.4.2.2: expand(0x06, 0x02, 0xaaba3c).
        assert_eq!(
            expand(6, 2, &hex("aaba3c")).to_vec(),
            hex("aaba3c00000000000000000000000602")
        );
    }

    #[test]
    fn split_matches_the_draft() {
        // Step 2: 0x7040b81b55ccf3 splits into 0x7040b810 and 0x0b55ccf3.
        let (left, right, half_len, odd) = split(&hex("7040b81b55ccf3"));
        assert!(odd);
        assert_eq!(left[..half_len], hex("7040b810"));
        assert_eq!(right[..half_len], hex("0b55ccf3"));
    }

    #[test]
    fn encryption_example_of_the_draft() {
        // Section 5.4.2.4 ("Encryption Example"), its intermediate values included: the
        // first round's AES output and the final ciphertext. (Step 10 of the example XORs
        // with 0xb3e4357c where its AES output reads 0xb334357c; its result, 0x67947d2c,
        // is the XOR with the latter, which is what this checks.)
        let key: [u8; 16] = hex("fdf726a9893ec05c0632d3956680baf0").try_into().unwrap();
        let cipher = Aes128::new(&Array::from(key));
        let mut first = Array::from(expand(7, 1, &hex("31441a90")));
        cipher.encrypt_block(&mut first);
        assert_eq!(first.to_vec(), hex("a255dd8cdacf01948d3a848c3c7fee23"));

        let mut block = hex("31441a9c69c275");
        encrypt(&cipher, &mut block);
        assert_eq!(block, hex("67947d29be054a"));
        decrypt(&cipher, &mut block, 7);
        assert_eq!(block, hex("31441a9c69c275"));
    }
}
