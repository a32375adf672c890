//! The master key and the authenticated encryption that keeps tokens encrypted at rest.
//!
//! Tokens are sealed with ChaCha20-Poly1305 under a 32-byte master key. Every ciphertext is bound to
//! where it lives (tenant, record, field) through the associated data, so a sealed token copied into
//! another tenant's record fails to open instead of quietly working there.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use rand::RngCore;
use secrecy::{ExposeSecret, SecretBox, SecretString};

/// Why the master key could not be had, or a ciphertext could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// `AGENTGATE_MASTER_KEY` (or the key file) did not hold 32 bytes in hex or base64.
    #[error("the master key must be 32 bytes, written as 64 hex digits or base64")]
    BadKey,
    /// The key file could not be read or created.
    #[error("master key file {path}: {source}")]
    KeyFile {
        /// The file.
        path: PathBuf,
        /// The I/O failure.
        source: std::io::Error,
    },
    /// The key file exists but others can read it.
    #[error("master key file {0} is readable by group or others; run chmod 600 on it")]
    KeyFileMode(PathBuf),
    /// A ciphertext failed authentication: wrong key, wrong record, or tampered bytes.
    #[error("a sealed secret failed to open (wrong master key, or the record was altered)")]
    Open,
}

/// Where the master key came from, so startup can warn about a development key file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// The `AGENTGATE_MASTER_KEY` setting.
    Configured,
    /// An existing key file in the data directory.
    KeyFile(PathBuf),
    /// A key file generated just now in the data directory.
    Generated(PathBuf),
}

/// The 32-byte master key. It never prints.
pub struct MasterKey(SecretBox<[u8; 32]>);

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey([REDACTED])")
    }
}

impl MasterKey {
    /// The file name of the generated development key inside the data directory.
    pub const KEY_FILE: &'static str = "master.key";

    /// Parses a key written as 64 hex digits or as base64 of 32 bytes.
    ///
    /// # Errors
    /// [`CryptoError::BadKey`] for any other text.
    pub fn parse(text: &str) -> Result<Self, CryptoError> {
        let text = text.trim();
        let bytes = if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            hex::decode(text).map_err(|_| CryptoError::BadKey)?
        } else {
            B64.decode(text).map_err(|_| CryptoError::BadKey)?
        };
        let key: [u8; 32] = bytes.try_into().map_err(|_| CryptoError::BadKey)?;
        Ok(MasterKey(SecretBox::new(Box::new(key))))
    }

    /// Uses the configured key when there is one; otherwise reads, or generates with mode 0600,
    /// `master.key` in the data directory. The caller warns when the source is not `Configured`.
    ///
    /// # Errors
    /// A bad configured key, an unreadable key file, or a key file that others can read.
    pub fn load_or_generate(
        configured: Option<&SecretString>,
        data_dir: &Path,
    ) -> Result<(Self, KeySource), CryptoError> {
        if let Some(text) = configured {
            return Ok((Self::parse(text.expose_secret())?, KeySource::Configured));
        }
        let path = data_dir.join(Self::KEY_FILE);
        let io = |source| CryptoError::KeyFile {
            path: path.clone(),
            source,
        };
        match fs::read_to_string(&path) {
            Ok(text) => {
                check_private(&path)?;
                Ok((Self::parse(&text)?, KeySource::KeyFile(path)))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                fs::create_dir_all(data_dir).map_err(io)?;
                let mut key = [0u8; 32];
                rand::rngs::OsRng.fill_bytes(&mut key);
                let mut opts = fs::OpenOptions::new();
                opts.write(true).create_new(true);
                #[cfg(unix)]
                {
                    use std::os::unix::fs::OpenOptionsExt;
                    opts.mode(0o600);
                }
                let mut file = opts.open(&path).map_err(io)?;
                file.write_all(hex::encode(key).as_bytes()).map_err(io)?;
                file.sync_all().map_err(io)?;
                Ok((
                    MasterKey(SecretBox::new(Box::new(key))),
                    KeySource::Generated(path),
                ))
            }
            Err(e) => Err(io(e)),
        }
    }

    /// A key for another purpose (e.g. signing OAuth states), derived as HMAC-SHA256(master, label),
    /// so the master key itself is used for one thing only.
    pub fn derive(&self, label: &str) -> SecretString {
        use hmac::{Hmac, Mac};
        let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(self.0.expose_secret())
            .expect("HMAC takes keys of any length");
        mac.update(label.as_bytes());
        SecretString::from(hex::encode(mac.finalize().into_bytes()))
    }

    fn cipher(&self) -> ChaCha20Poly1305 {
        ChaCha20Poly1305::new(Key::from_slice(self.0.expose_secret()))
    }
}

#[cfg(unix)]
fn check_private(path: &Path) -> Result<(), CryptoError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = fs::metadata(path).map_err(|source| CryptoError::KeyFile {
        path: path.to_owned(),
        source,
    })?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(CryptoError::KeyFileMode(path.to_owned()));
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_private(_path: &Path) -> Result<(), CryptoError> {
    Ok(())
}

/// Seals and opens secrets under the master key.
#[derive(Clone)]
pub struct Cipher(std::sync::Arc<ChaCha20Poly1305>);

impl std::fmt::Debug for Cipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Cipher([REDACTED])")
    }
}

const NONCE_LEN: usize = 12;

impl Cipher {
    /// A cipher under `key`.
    pub fn new(key: &MasterKey) -> Self {
        Cipher(std::sync::Arc::new(key.cipher()))
    }

    /// Encrypts `secret` bound to `context` (for example `t_…/i_…/bot_token`), as base64 of nonce and ciphertext.
    pub fn seal(&self, context: &str, secret: &SecretString) -> String {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let ct = self
            .0
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: secret.expose_secret().as_bytes(),
                    aad: context.as_bytes(),
                },
            )
            .expect("ChaCha20-Poly1305 encryption cannot fail for in-memory buffers");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&ct);
        B64.encode(out)
    }

    /// Decrypts what [`Cipher::seal`] produced for the same `context`.
    ///
    /// # Errors
    /// [`CryptoError::Open`] when the text is malformed, the key differs, or the context differs.
    pub fn open(&self, context: &str, sealed: &str) -> Result<SecretString, CryptoError> {
        let bytes = B64.decode(sealed).map_err(|_| CryptoError::Open)?;
        if bytes.len() < NONCE_LEN {
            return Err(CryptoError::Open);
        }
        let (nonce, ct) = bytes.split_at(NONCE_LEN);
        let plain = self
            .0
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ct,
                    aad: context.as_bytes(),
                },
            )
            .map_err(|_| CryptoError::Open)?;
        let text = String::from_utf8(plain).map_err(|_| CryptoError::Open)?;
        Ok(SecretString::from(text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> MasterKey {
        MasterKey::parse(&"11".repeat(32)).unwrap()
    }

    #[test]
    fn seal_open_round_trip_is_bound_to_context() {
        let c = Cipher::new(&key());
        let sealed = c.seal("t_A/i_1/bot_token", &SecretString::from("xoxb-123"));
        assert!(!sealed.contains("xoxb"));
        assert_eq!(
            c.open("t_A/i_1/bot_token", &sealed)
                .unwrap()
                .expose_secret(),
            "xoxb-123"
        );
        assert!(matches!(
            c.open("t_B/i_1/bot_token", &sealed),
            Err(CryptoError::Open)
        ));
        let other = Cipher::new(&MasterKey::parse(&"22".repeat(32)).unwrap());
        assert!(matches!(
            other.open("t_A/i_1/bot_token", &sealed),
            Err(CryptoError::Open)
        ));
        assert!(matches!(
            c.open("t_A/i_1/bot_token", "AAAA"),
            Err(CryptoError::Open)
        ));
    }

    #[test]
    fn parses_hex_and_base64_and_rejects_the_rest() {
        assert!(MasterKey::parse(&"ab".repeat(32)).is_ok());
        assert!(MasterKey::parse(&B64.encode([7u8; 32])).is_ok());
        for bad in ["", "abc", &"ab".repeat(31), &B64.encode([7u8; 31])] {
            assert!(
                matches!(MasterKey::parse(bad), Err(CryptoError::BadKey)),
                "{bad:?}"
            );
        }
        assert_eq!(format!("{:?}", key()), "MasterKey([REDACTED])");
    }

    #[test]
    fn generated_key_file_is_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let (k1, src) = MasterKey::load_or_generate(None, dir.path()).unwrap();
        let path = dir.path().join(MasterKey::KEY_FILE);
        assert_eq!(src, KeySource::Generated(path.clone()));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                fs::metadata(&path).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
        let (k2, src2) = MasterKey::load_or_generate(None, dir.path()).unwrap();
        assert_eq!(src2, KeySource::KeyFile(path.clone()));
        let sealed = Cipher::new(&k1).seal("x", &SecretString::from("s"));
        assert_eq!(
            Cipher::new(&k2).open("x", &sealed).unwrap().expose_secret(),
            "s"
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
            assert!(matches!(
                MasterKey::load_or_generate(None, dir.path()),
                Err(CryptoError::KeyFileMode(_))
            ));
        }
    }
}
