//! The control protocol decoder on arbitrary bytes: a request or reply that decodes encodes
//! back to a line that decodes to the same value; anything else is an error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use portshard_core::control::{self, MAX_REQUEST, ProtocolError};

fuzz_target!(|line: &[u8]| {
    match control::decode_request(line) {
        Ok(request) => {
            let bytes = control::encode_request(&request);
            assert_eq!(bytes.last(), Some(&b'\n'));
            assert_eq!(
                control::decode_request(&bytes[..bytes.len() - 1]),
                Ok(request)
            );
        }
        Err(error) => {
            assert_eq!(error == ProtocolError::TooLong, line.len() > MAX_REQUEST);
        }
    }
    if let Ok(reply) = control::decode_reply(line) {
        let bytes = control::encode_reply(&reply);
        assert_eq!(control::decode_reply(&bytes[..bytes.len() - 1]), Ok(reply));
    }
});
