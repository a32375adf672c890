//! Discord interaction signatures: Ed25519 over `X-Signature-Timestamp` + raw body, with the
//! application's public key, and a fresh timestamp.

use ed25519_dalek::{Signature, VerifyingKey};

/// How far an interaction's timestamp may be from now.
pub const MAX_SKEW_SECS: i64 = 300;

/// Why an interaction's signature was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignatureError {
    /// A signature header is missing.
    #[error("missing X-Signature-Ed25519 or X-Signature-Timestamp")]
    Missing,
    /// The timestamp is not a number.
    #[error("the timestamp is not a number")]
    BadTimestamp,
    /// The timestamp is too far from now.
    #[error("the timestamp is too old or in the future")]
    Stale,
    /// The signature is malformed or does not verify.
    #[error("the signature does not verify")]
    Mismatch,
}

/// Parses the application's public key (64 hex digits, as the developer portal shows it).
///
/// # Errors
/// A message saying what is wrong.
pub fn parse_public_key(hex_key: &str) -> Result<VerifyingKey, String> {
    let bytes: [u8; 32] = hex::decode(hex_key.trim())
        .map_err(|_| "the Discord public key is not hex".to_owned())?
        .try_into()
        .map_err(|_| "the Discord public key must be 32 bytes (64 hex digits)".to_owned())?;
    VerifyingKey::from_bytes(&bytes)
        .map_err(|_| "the Discord public key is not a valid Ed25519 key".to_owned())
}

/// Verifies an interaction request.
///
/// # Errors
/// [`SignatureError`].
pub fn verify(
    key: &VerifyingKey,
    timestamp: Option<&str>,
    signature: Option<&str>,
    body: &[u8],
    now: i64,
) -> Result<(), SignatureError> {
    let (Some(ts), Some(sig)) = (timestamp, signature) else {
        return Err(SignatureError::Missing);
    };
    let t: i64 = ts.parse().map_err(|_| SignatureError::BadTimestamp)?;
    // abs_diff: `now - t` overflows for a timestamp near i64::MIN or i64::MAX (a panic in a
    // debug build, and in a release build `t = now + i64::MIN` wrapped to i64::MIN and passed).
    if now.abs_diff(t) > MAX_SKEW_SECS.unsigned_abs() {
        return Err(SignatureError::Stale);
    }
    let sig: [u8; 64] = hex::decode(sig)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or(SignatureError::Mismatch)?;
    let mut msg = Vec::with_capacity(ts.len() + body.len());
    msg.extend_from_slice(ts.as_bytes());
    msg.extend_from_slice(body);
    // verify_strict also rejects the malleable and small-order forms.
    key.verify_strict(&msg, &Signature::from_bytes(&sig))
        .map_err(|_| SignatureError::Mismatch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signer, SigningKey};

    #[test]
    fn a_signed_interaction_verifies_and_alterations_fail() {
        let sk = SigningKey::from_bytes(&[7u8; 32]);
        let pk = parse_public_key(&hex::encode(sk.verifying_key().to_bytes())).unwrap();
        let body = br#"{"type":1}"#;
        let sig = hex::encode(
            sk.sign(&[b"1700000000".as_slice(), body].concat())
                .to_bytes(),
        );
        let check =
            |ts: Option<&str>, s: Option<&str>, b: &[u8], now: i64| verify(&pk, ts, s, b, now);
        assert_eq!(
            check(Some("1700000000"), Some(&sig), body, 1_700_000_000),
            Ok(())
        );
        assert_eq!(
            check(
                Some("1700000000"),
                Some(&sig),
                br#"{"type":2}"#,
                1_700_000_000
            ),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            check(Some("1700000001"), Some(&sig), body, 1_700_000_000),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            check(Some("1700000000"), Some(&sig), body, 1_700_000_301),
            Err(SignatureError::Stale)
        );
        assert_eq!(
            check(Some("1700000000"), Some("00"), body, 1_700_000_000),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            check(None, Some(&sig), body, 1_700_000_000),
            Err(SignatureError::Missing)
        );
        assert!(parse_public_key("zz").is_err());
        assert!(parse_public_key(&"00".repeat(31)).is_err());
    }

    #[test]
    fn extreme_timestamps_are_stale_not_an_overflow() {
        let sk = SigningKey::from_bytes(&[7u8; 32]);
        let pk = sk.verifying_key();
        let body = br#"{"type":1}"#;
        let now = 1_700_000_000;
        let signed = |ts: &str| hex::encode(sk.sign(&[ts.as_bytes(), body].concat()).to_bytes());
        for ts in [
            i64::MIN,
            i64::MIN + 1,
            now + i64::MIN,
            i64::MAX,
            now + 301,
            253_402_300_800,
        ] {
            let t = ts.to_string();
            assert_eq!(
                verify(&pk, Some(&t), Some(&signed(&t)), body, now),
                Err(SignatureError::Stale),
                "{t}"
            );
        }
        for now in [i64::MIN, i64::MAX] {
            assert_eq!(
                verify(&pk, Some("0"), Some(&signed("0")), body, now),
                Err(SignatureError::Stale)
            );
        }
    }
}
