//! Standard Webhooks signing (<https://www.standardwebhooks.com>):
//! `webhook-signature` carries `v1,<base64 HMAC-SHA256 of "id.timestamp.body">`,
//! one entry per active key, space-separated, so receivers can rotate secrets.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::fmt;

pub const ID_HEADER: &str = "webhook-id";
pub const TIMESTAMP_HEADER: &str = "webhook-timestamp";
pub const SIGNATURE_HEADER: &str = "webhook-signature";

const PREFIX: &str = "whsec_";

/// A decoded `whsec_` secret.
#[derive(Clone)]
pub struct StandardKey(Vec<u8>);

impl fmt::Debug for StandardKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StandardKey(***)")
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("must start with `whsec_`")]
    MissingPrefix,
    #[error("the part after `whsec_` is not valid base64")]
    NotBase64,
    #[error("decodes to {0} bytes; use 24 to 64 random bytes")]
    BadLength(usize),
}

impl StandardKey {
    /// Parses `whsec_<base64>`. The error never repeats the secret.
    pub fn parse(secret: &str) -> Result<Self, KeyError> {
        let encoded = secret.strip_prefix(PREFIX).ok_or(KeyError::MissingPrefix)?;
        let bytes = B64.decode(encoded).map_err(|_| KeyError::NotBase64)?;
        if !(24..=64).contains(&bytes.len()) {
            return Err(KeyError::BadLength(bytes.len()));
        }
        Ok(StandardKey(bytes))
    }

    /// `v1,<base64 signature>` of one message.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes keys of any length");
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!("v1,{}", B64.encode(mac.finalize().into_bytes()))
    }
}

/// The `webhook-signature` value: one signature per key, space-separated.
pub fn signature_header(keys: &[StandardKey], id: &str, timestamp: i64, body: &[u8]) -> String {
    keys.iter()
        .map(|k| k.sign(id, timestamp, body))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    // The specification's published test vector.
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const TS: i64 = 1614265330;
    const BODY: &[u8] = br#"{"test": 2432232314}"#;
    const EXPECTED: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    #[test]
    fn signs_the_published_vector() {
        let key = StandardKey::parse(SECRET).unwrap();
        assert_eq!(key.sign(ID, TS, BODY), EXPECTED);
    }

    #[test]
    fn one_entry_per_key_during_rotation() {
        let old = StandardKey::parse(SECRET).unwrap();
        let new = StandardKey::parse("whsec_QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo=").unwrap();
        let header = signature_header(&[new.clone(), old], ID, TS, BODY);
        let parts: Vec<&str> = header.split(' ').collect();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0], new.sign(ID, TS, BODY));
        assert_eq!(parts[1], EXPECTED);
    }

    #[test]
    fn timestamp_and_id_are_signed() {
        let key = StandardKey::parse(SECRET).unwrap();
        assert_ne!(key.sign(ID, TS + 1, BODY), EXPECTED);
        assert_ne!(key.sign("msg_other", TS, BODY), EXPECTED);
    }

    #[test]
    fn rejects_malformed_secrets_without_echoing_them() {
        assert_eq!(
            StandardKey::parse("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap_err(),
            KeyError::MissingPrefix
        );
        assert_eq!(
            StandardKey::parse("whsec_***not base64***").unwrap_err(),
            KeyError::NotBase64
        );
        assert_eq!(
            StandardKey::parse("whsec_c2hvcnQ=").unwrap_err(),
            KeyError::BadLength(5)
        );
        let msg = StandardKey::parse("whsec_c2hvcnQ=")
            .unwrap_err()
            .to_string();
        assert!(!msg.contains("c2hvcnQ"));
    }
}
