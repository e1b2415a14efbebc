//! The worker environment portshard sets for a QUIC-LB service (see the crate doc).
use crate::config::{Config, ConfigError};

/// The config rotation codepoint, `0` to `6`.
pub const ENV_CONFIG_ID: &str = "PORTSHARD_QUIC_LB_CONFIG_ID";
/// The worker's server ID in lowercase hex (portshard: slot as big-endian `u16`, then the
/// low byte of its generation, e.g. `00050a`).
pub const ENV_SERVER_ID: &str = "PORTSHARD_QUIC_LB_SERVER_ID";
/// The nonce length in octets, `4` to `18`.
pub const ENV_NONCE_LEN: &str = "PORTSHARD_QUIC_LB_NONCE_LEN";
/// The AES-128 key as 32 hex digits; absent for unencrypted connection IDs.
pub const ENV_KEY: &str = "PORTSHARD_QUIC_LB_KEY";

/// What is wrong with the QUIC-LB config in a worker's environment.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvError {
    /// Part of a config is set but a required variable is not.
    #[error(
        "{set} is set but {missing} is not: a QUIC-LB config needs {ENV_CONFIG_ID}, {ENV_SERVER_ID} and {ENV_NONCE_LEN}"
    )]
    Missing {
        /// The variable that is missing.
        missing: &'static str,
        /// A variable that is set.
        set: &'static str,
    },
    /// A variable does not parse.
    #[error("{var}={value:?} is not {expected}")]
    Invalid {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
        /// What it should be.
        expected: &'static str,
    },
    /// The values parse but do not make a valid config.
    #[error("the QUIC-LB config in the environment is invalid: {0}")]
    Config(#[from] ConfigError),
}

/// Parses hex digits (either case) into bytes, or `None` for an odd count or a non-hex
/// character: the form of the server ID and key variables.
pub fn parse_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || !text.is_ascii() {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok())
        .collect()
}

/// Lowercase hex, the form the daemon writes the server ID and key in.
pub fn format_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

impl Config {
    /// The config portshard passed this worker in its environment (see the crate doc), or
    /// `None` when none of the variables is set: the worker then issues connection IDs of
    /// its own choosing.
    pub fn from_env() -> Result<Option<Config>, EnvError> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// [`Config::from_env`] with the variables looked up by `var`, so it can be tested
    /// without touching the process environment.
    pub fn from_vars(
        var: impl Fn(&'static str) -> Option<String>,
    ) -> Result<Option<Config>, EnvError> {
        let config_id = var(ENV_CONFIG_ID);
        let server_id = var(ENV_SERVER_ID);
        let nonce_len = var(ENV_NONCE_LEN);
        let key = var(ENV_KEY);
        let (config_id, server_id, nonce_len) = match (config_id, server_id, nonce_len) {
            (Some(c), Some(s), Some(n)) => (c, s, n),
            (None, None, None) if key.is_none() => return Ok(None),
            (c, s, n) => {
                let present = [
                    (ENV_CONFIG_ID, c.is_some()),
                    (ENV_SERVER_ID, s.is_some()),
                    (ENV_NONCE_LEN, n.is_some()),
                    (ENV_KEY, key.is_some()),
                ];
                let set = present.iter().find(|(_, is)| *is).expect("one is set").0;
                let missing = present[..3]
                    .iter()
                    .find(|(_, is)| !is)
                    .expect("one is not")
                    .0;
                return Err(EnvError::Missing { missing, set });
            }
        };
        let invalid = |var: &'static str, value: &str, expected: &'static str| EnvError::Invalid {
            var,
            value: value.to_owned(),
            expected,
        };
        let config_id_value: u8 = config_id
            .parse()
            .map_err(|_| invalid(ENV_CONFIG_ID, &config_id, "a number from 0 to 6"))?;
        let server_id_bytes = parse_hex(&server_id).ok_or_else(|| {
            invalid(
                ENV_SERVER_ID,
                &server_id,
                "hex digits, two per octet (e.g. 00050a)",
            )
        })?;
        let nonce_len_value: usize = nonce_len
            .parse()
            .map_err(|_| invalid(ENV_NONCE_LEN, &nonce_len, "a number from 4 to 18"))?;
        let key = match key {
            None => None,
            Some(text) => Some(
                parse_hex(&text)
                    .and_then(|bytes| <[u8; 16]>::try_from(bytes).ok())
                    .ok_or_else(|| {
                        // The key itself stays out of the message.
                        invalid(ENV_KEY, "<hidden>", "32 hex digits (an AES-128 key)")
                    })?,
            ),
        };
        Ok(Some(Config::new(
            config_id_value,
            &server_id_bytes,
            nonce_len_value,
            key,
        )?))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn from(pairs: &[(&'static str, &str)]) -> Result<Option<Config>, EnvError> {
        let vars: HashMap<&str, String> = pairs.iter().map(|(k, v)| (*k, v.to_string())).collect();
        Config::from_vars(|name| vars.get(name).cloned())
    }

    #[test]
    fn reads_a_full_config() {
        let config = from(&[
            (ENV_CONFIG_ID, "2"),
            (ENV_SERVER_ID, "00050a"),
            (ENV_NONCE_LEN, "8"),
            (ENV_KEY, "8f95f09245765f80256934e50c66207f"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(config.config_id(), 2);
        assert_eq!(config.server_id().as_bytes(), [0, 5, 10]);
        assert_eq!(config.nonce_len(), 8);
        assert_eq!(config.key().unwrap()[0], 0x8f);
        assert_eq!(config.cid_len(), 12);
    }

    #[test]
    fn no_variables_is_no_config_and_no_key_is_unencrypted() {
        assert_eq!(from(&[]), Ok(None));
        let config = from(&[
            (ENV_CONFIG_ID, "0"),
            (ENV_SERVER_ID, "01"),
            (ENV_NONCE_LEN, "4"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(config.key(), None);
    }

    #[test]
    fn errors_name_the_variable() {
        assert_eq!(
            from(&[(ENV_SERVER_ID, "01")]).unwrap_err().to_string(),
            "PORTSHARD_QUIC_LB_SERVER_ID is set but PORTSHARD_QUIC_LB_CONFIG_ID is not: a QUIC-LB config needs PORTSHARD_QUIC_LB_CONFIG_ID, PORTSHARD_QUIC_LB_SERVER_ID and PORTSHARD_QUIC_LB_NONCE_LEN"
        );
        let base = [(ENV_CONFIG_ID, "0"), (ENV_NONCE_LEN, "4")];
        let with = |extra: &[(&'static str, &str)]| {
            let mut all = base.to_vec();
            all.extend_from_slice(extra);
            from(&all).unwrap_err().to_string()
        };
        assert_eq!(
            with(&[(ENV_SERVER_ID, "0g")]),
            "PORTSHARD_QUIC_LB_SERVER_ID=\"0g\" is not hex digits, two per octet (e.g. 00050a)"
        );
        assert_eq!(
            with(&[(ENV_SERVER_ID, "00112233445566778899aabbccddeeff")]),
            "the QUIC-LB config in the environment is invalid: server ID length 16 is out of range 1..=15"
        );
        let key_error = with(&[(ENV_SERVER_ID, "01"), (ENV_KEY, "secret")]);
        assert!(!key_error.contains("secret"), "{key_error}");
        assert!(key_error.contains("32 hex digits"), "{key_error}");
    }

    #[test]
    fn hex_round_trips() {
        assert_eq!(parse_hex("00050A"), Some(vec![0, 5, 10]));
        assert_eq!(format_hex(&[0, 5, 10]), "00050a");
        assert_eq!(parse_hex("abc"), None);
        assert_eq!(parse_hex("é1"), None);
    }
}
