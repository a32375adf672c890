//! The checkpoint signing key and the keyring of every key that ever signed for this deployment.
//!
//! The signing key comes from configuration (`AGENTGATE_AUDIT_SIGNING_KEY`, a note signer key text)
//! or from a key file; in development a key file is generated in the data directory with mode 0600.
//! Every key that signs is added to `keyring.txt` beside the logs and never removed, so that a
//! rotated key's old checkpoints still verify, and every export carries the whole keyring.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use secrecy::{ExposeSecret, SecretString};

use super::checkpoint::{KeyError, Keyring, SigningKey, VerifierKey};

/// Why the signing key or the keyring could not be had.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    /// A key text did not parse.
    #[error("{what}: {source}")]
    Key {
        /// Which key.
        what: String,
        /// Why.
        source: KeyError,
    },
    /// A key file or the keyring could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
}

/// Where the signing key came from, so startup can warn about a development key file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SigningKeySource {
    /// `AGENTGATE_AUDIT_SIGNING_KEY`.
    Configured,
    /// A key file named by configuration, or one generated earlier.
    File(PathBuf),
    /// A key file generated just now.
    Generated(PathBuf),
}

/// The name generated development keys sign under.
pub const DEV_KEY_NAME: &str = "agentgate-dev";

/// The file of the generated development key inside the audit directory.
pub const DEV_KEY_FILE: &str = "signing.key";

/// The keyring file inside the audit directory.
pub const KEYRING_FILE: &str = "keyring.txt";

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> KeysError + '_ {
    move |source| KeysError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Loads the signing key: the configured text, else the configured file, else the development file
/// in `audit_dir` (generated when missing).
///
/// # Errors
/// [`KeysError`] for a key that does not parse or a file that cannot be read or created.
pub fn load_signing_key(
    configured: Option<&SecretString>,
    file: Option<&Path>,
    audit_dir: &Path,
) -> Result<(SigningKey, SigningKeySource), KeysError> {
    if let Some(text) = configured {
        let key = SigningKey::from_skey_text(text.expose_secret().trim()).map_err(|source| {
            KeysError::Key {
                what: "AGENTGATE_AUDIT_SIGNING_KEY".into(),
                source,
            }
        })?;
        return Ok((key, SigningKeySource::Configured));
    }
    let (path, explicit) = match file {
        Some(f) => (f.to_owned(), true),
        None => (audit_dir.join(DEV_KEY_FILE), false),
    };
    match fs::read_to_string(&path) {
        Ok(text) => {
            let key = SigningKey::from_skey_text(text.trim()).map_err(|source| KeysError::Key {
                what: path.display().to_string(),
                source,
            })?;
            Ok((key, SigningKeySource::File(path)))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
            fs::create_dir_all(audit_dir).map_err(io(audit_dir))?;
            let key = SigningKey::generate(DEV_KEY_NAME).map_err(|source| KeysError::Key {
                what: "generated key".into(),
                source,
            })?;
            let mut opts = fs::OpenOptions::new();
            opts.write(true).create_new(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                opts.mode(0o600);
            }
            let mut f = opts.open(&path).map_err(io(&path))?;
            f.write_all(key.to_skey_text().as_bytes())
                .map_err(io(&path))?;
            f.sync_all().map_err(io(&path))?;
            Ok((key, SigningKeySource::Generated(path)))
        }
        Err(e) => Err(io(&path)(e)),
    }
}

/// Parses a keyring text: one verifier key per line; blank lines and `#` comments are skipped.
///
/// # Errors
/// [`KeysError::Key`] naming the first line that does not parse, or two different keys that share
/// a name and key id.
pub fn parse_keyring(text: &str, what: &str) -> Result<Keyring, KeysError> {
    let mut ring = Keyring::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let key = VerifierKey::from_vkey_text(line).map_err(|source| KeysError::Key {
            what: format!("{what} line {}", n + 1),
            source,
        })?;
        ring.add(key).map_err(|source| KeysError::Key {
            what: format!("{what} line {}", n + 1),
            source,
        })?;
    }
    Ok(ring)
}

/// Writes a keyring in the text form [`parse_keyring`] reads.
pub fn keyring_text(ring: &Keyring) -> String {
    let mut out = String::from(
        "# agentgate audit keyring: every key that has signed checkpoints, oldest first\n",
    );
    for k in ring.keys() {
        out.push_str(&k.to_vkey_text());
        out.push('\n');
    }
    out
}

/// Reads the keyring in `audit_dir`, adds `current`'s verifier key if it is new, and writes it back
/// durably. Returns the keyring.
///
/// # Errors
/// [`KeysError`] when the file cannot be read, parsed or written.
pub fn update_keyring(audit_dir: &Path, current: &SigningKey) -> Result<Keyring, KeysError> {
    let path = audit_dir.join(KEYRING_FILE);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(io(&path)(e)),
    };
    let mut ring = parse_keyring(&text, &path.display().to_string())?;
    let before = ring.keys().len();
    ring.add(current.verifier())
        .map_err(|source| KeysError::Key {
            what: "the signing key".into(),
            source,
        })?;
    if ring.keys().len() != before {
        fs::create_dir_all(audit_dir).map_err(io(audit_dir))?;
        let tmp = audit_dir.join(format!("{KEYRING_FILE}.tmp"));
        let mut f = fs::File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(keyring_text(&ring).as_bytes())
            .map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        fs::rename(&tmp, &path).map_err(io(&path))?;
        fs::File::open(audit_dir)
            .and_then(|d| d.sync_all())
            .map_err(io(audit_dir))?;
    }
    Ok(ring)
}
