//! Pusher / soketi webhook signing: hex HMAC-SHA256 of the exact body bytes,
//! keyed with the app secret, sent as `X-Pusher-Signature` beside `X-Pusher-Key`.

use hmac::{Hmac, Mac};
use sha2::Sha256;

pub const KEY_HEADER: &str = "x-pusher-key";
pub const SIGNATURE_HEADER: &str = "x-pusher-signature";

/// Hex HMAC-SHA256 of `body` keyed with `secret`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_a_reference_hmac() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn depends_on_every_byte_of_the_body_and_the_secret() {
        let body = br#"{"time_ms":1764201600000,"events":[{"name":"channel_occupied","channel":"private-orders"}]}"#;
        let a = signature(b"app-secret", body);
        assert_eq!(a.len(), 64);
        assert_ne!(a, signature(b"app-secreT", body));
        let mut other = body.to_vec();
        other[10] ^= 1;
        assert_ne!(a, signature(b"app-secret", &other));
    }
}
