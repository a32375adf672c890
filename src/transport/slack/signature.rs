//! Slack request signatures: `v0=` + hex(HMAC-SHA256(signing secret, "v0:" + timestamp + ":" + body)),
//! checked on the raw bytes in constant time, with the timestamp within five minutes of now.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// How far a request's timestamp may be from now.
pub const MAX_SKEW_SECS: i64 = 300;

/// Why a request's signature was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignatureError {
    /// A signature header is missing.
    #[error("missing X-Slack-Signature or X-Slack-Request-Timestamp")]
    Missing,
    /// The timestamp is not a number.
    #[error("the request timestamp is not a number")]
    BadTimestamp,
    /// The timestamp is too far from now (a replay, or a wrong clock).
    #[error("the request timestamp is too old or in the future")]
    Stale,
    /// The signature does not match.
    #[error("the signature does not match")]
    Mismatch,
}

/// Verifies a Slack request.
///
/// # Errors
/// [`SignatureError`] naming what failed.
pub fn verify(
    secret: &[u8],
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
    let given = sig
        .strip_prefix("v0=")
        .and_then(|h| hex::decode(h).ok())
        .ok_or(SignatureError::Mismatch)?;
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(b"v0:");
    mac.update(ts.as_bytes());
    mac.update(b":");
    mac.update(body);
    // verify_slice compares in constant time.
    mac.verify_slice(&given)
        .map_err(|_| SignatureError::Mismatch)
}

/// Signs a body the way Slack does; for tests and stand-ins.
pub fn sign(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(format!("v0:{timestamp}:").as_bytes());
    mac.update(body);
    format!("v0={}", hex::encode(mac.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Slack's published example from its "Verifying requests from Slack" page.
    const SECRET: &[u8] = b"8f742231b10e8888abcd99yyyzzz85a5";
    const TS: &str = "1531420618";
    const BODY: &str = "token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text=&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c";
    const SIG: &str = "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503";

    fn check(
        ts: Option<&str>,
        sig: Option<&str>,
        body: &str,
        now: i64,
        want: Result<(), SignatureError>,
    ) {
        assert_eq!(verify(SECRET, ts, sig, body.as_bytes(), now), want);
    }

    #[test]
    fn slacks_published_example_verifies_and_every_alteration_fails() {
        let now = 1_531_420_618;
        assert_eq!(sign(SECRET, now, BODY.as_bytes()), SIG);
        check(Some(TS), Some(SIG), BODY, now, Ok(()));
        check(Some(TS), Some(SIG), BODY, now + 300, Ok(()));
        check(
            Some(TS),
            Some(SIG),
            BODY,
            now + 301,
            Err(SignatureError::Stale),
        );
        check(
            Some(TS),
            Some(SIG),
            BODY,
            now - 301,
            Err(SignatureError::Stale),
        );
        check(
            Some(TS),
            Some(SIG),
            &BODY.replace("roadrunner", "coyote"),
            now,
            Err(SignatureError::Mismatch),
        );
        check(
            Some("1531420619"),
            Some(SIG),
            BODY,
            now,
            Err(SignatureError::Mismatch),
        );
        check(
            Some(TS),
            Some(&SIG.replace("v0=", "v1=")),
            BODY,
            now,
            Err(SignatureError::Mismatch),
        );
        check(
            Some(TS),
            Some("v0=zz"),
            BODY,
            now,
            Err(SignatureError::Mismatch),
        );
        check(None, Some(SIG), BODY, now, Err(SignatureError::Missing));
        check(Some(TS), None, BODY, now, Err(SignatureError::Missing));
        check(
            Some("soon"),
            Some(SIG),
            BODY,
            now,
            Err(SignatureError::BadTimestamp),
        );
    }

    #[test]
    fn extreme_timestamps_are_stale_not_an_overflow() {
        let now = 1_531_420_618;
        for ts in [
            i64::MIN,
            i64::MIN + 1,
            now + i64::MIN,
            i64::MAX,
            now + 301,
            253_402_300_800,
        ] {
            let t = ts.to_string();
            let sig = sign(SECRET, ts, BODY.as_bytes());
            check(Some(&t), Some(&sig), BODY, now, Err(SignatureError::Stale));
        }
        let sig = sign(SECRET, 0, BODY.as_bytes());
        for now in [i64::MIN, i64::MAX] {
            check(Some("0"), Some(&sig), BODY, now, Err(SignatureError::Stale));
        }
    }
}
