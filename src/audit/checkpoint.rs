//! Signed checkpoints for the per-tenant audit logs: C2SP signed notes with
//! Ed25519 keys, the C2SP `tlog-checkpoint` body, and the C2SP `tlog-proof`
//! text format that bundles an inclusion proof with its signed checkpoint.
//!
//! # Formats
//!
//! **Signed note** (<https://c2sp.org/signed-note>, golang.org/x/mod/sumdb/note):
//!
//! ```text
//! <text, ending in "\n", may contain blank lines>
//! <blank line>
//! — <key name> base64(key_id_be32 || ed25519_signature64)
//! — <more signature lines...>
//! ```
//!
//! The signature covers the text including its final newline, but not the
//! separating blank line. The whole note must be UTF-8 without ASCII control
//! characters other than `\n`. The text is separated from the signatures by
//! the *last* blank line, exactly as the Go package does.
//!
//! **Keys**: key ID = `SHA-256(name || 0x0A || 0x01 || pubkey32)[:4]` read as a
//! big-endian `u32`. Verifier key text: `name+hex8(key_id)+base64(0x01 || pubkey32)`;
//! signer key text: `PRIVATE+KEY+name+hex8(key_id)+base64(0x01 || seed32)`.
//! Standard base64 may itself contain `+`, so a verifier key is split on its
//! first two `+` and a signer key on its first four. Names must be non-empty
//! and contain no Unicode whitespace and no `+`; this module additionally
//! rejects ASCII control characters in names, because a note carrying such a
//! name could never be opened.
//!
//! **Checkpoint body** (<https://c2sp.org/tlog-checkpoint>):
//!
//! ```text
//! <origin>
//! <tree size, ASCII decimal, no leading zeros unless "0">
//! <root hash, standard base64 of 32 bytes>
//! [<extension line>...]   (opaque, non-empty, kept verbatim)
//! ```
//!
//! **Proof** (<https://c2sp.org/tlog-proof>):
//!
//! ```text
//! c2sp.org/tlog-proof@v1
//! [extra <base64 opaque data>]        (optional, unauthenticated)
//! index <leaf index, ASCII decimal, no leading zeros unless "0">
//! <inclusion proof hash, standard base64, one per line, leaf side first>
//! <blank line>
//! <signed checkpoint note, verbatim>
//! ```
//!
//! # Deliberate strictness versus the Go reference
//!
//! * Base64 is decoded with canonical padding and zero trailing bits; Go's
//!   decoder also tolerates embedded `\r`/`\n` and non-zero trailing bits.
//!   Honest signers never produce those, and rejecting them removes a way to
//!   produce several textual encodings of one signature.
//! * Every signature line from a known key is verified, including repeated
//!   lines from the same key (Go skips repeats without verifying them).
//! * Ed25519 verification uses `ed25519_dalek::VerifyingKey::verify`, the same
//!   cofactorless check with canonical-`S` rejection that Go's
//!   `crypto/ed25519.Verify` performs, so notes accepted by Go are accepted here.
//!
//! This module does not verify the Merkle inclusion proof itself; that is the
//! Merkle-tree code's job. [`TlogProof::open_checkpoint`] only authenticates the
//! checkpoint and checks that the index lies inside the tree.

use std::fmt;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use ed25519_dalek::{Signer as _, Verifier as _};
use sha2::{Digest, Sha256};

/// Signature type byte for Ed25519 assigned by the signed-note spec.
const ALG_ED25519: u8 = 0x01;

/// Prefix of every signature line: em dash (U+2014) followed by a space.
const SIG_PREFIX: &str = "\u{2014} ";

/// Cap on signature lines per note. The spec requires accepting at least 16;
/// Go uses 100, and we match it so both sides agree on what is acceptable.
pub const MAX_SIGNATURES: usize = 100;

/// First line of every C2SP tlog-proof.
pub const TLOG_PROOF_HEADER: &str = "c2sp.org/tlog-proof@v1";

/// An inclusion proof in a tree of at most 2^64 leaves has at most 64 hashes;
/// anything longer cannot be a valid proof, so refuse to allocate for it.
const MAX_PROOF_HASHES: usize = 64;

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// Errors from parsing, building or collecting note keys.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The key name is empty, or contains whitespace, `+`, or an ASCII control character.
    #[error(
        "invalid key name {0:?}: must be non-empty without whitespace, '+' or control characters"
    )]
    InvalidName(String),
    /// The key text does not have the expected `+`-separated shape.
    #[error("malformed key text: {0}")]
    Malformed(&'static str),
    /// The key ID field is not exactly eight hexadecimal digits.
    #[error("key id {0:?} is not exactly eight hex digits")]
    InvalidKeyId(String),
    /// The public key material of a verifier key is not valid standard base64.
    #[error("verifier key material is not valid base64")]
    Base64(#[source] base64::DecodeError),
    /// The key material names a signature algorithm other than Ed25519 (0x01).
    #[error("unsupported key algorithm byte {0:#04x} (only Ed25519, 0x01, is supported)")]
    UnsupportedAlgorithm(u8),
    /// The decoded key material (algorithm byte included) has the wrong length.
    #[error("key material is {got} bytes, expected {expected}")]
    KeyLength {
        /// Required length in bytes, algorithm byte included.
        expected: usize,
        /// Length that was found.
        got: usize,
    },
    /// The 32 public key bytes do not encode a point on the Ed25519 curve.
    #[error("public key is not a valid Ed25519 point")]
    InvalidPublicKey,
    /// The key ID written in the text differs from the one computed from name and key.
    #[error("key id mismatch: text says {stated:08x}, name and key give {computed:08x}")]
    KeyIdMismatch {
        /// Key ID written in the key text.
        stated: u32,
        /// Key ID computed from the name and public key.
        computed: u32,
    },
    /// A different key with the same name and key ID is already in the keyring,
    /// so signatures could not be attributed unambiguously.
    #[error("keyring already holds a different key named {name:?} with id {key_id:08x}")]
    AmbiguousKey {
        /// Name shared by both keys.
        name: String,
        /// Key ID shared by both keys.
        key_id: u32,
    },
}

/// Errors from signing, parsing or verifying a signed note.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoteError {
    /// The note text to sign is empty.
    #[error("note text is empty")]
    EmptyText,
    /// The note text to sign does not end in a newline.
    #[error("note text does not end in a newline")]
    TextMissingNewline,
    /// The note contains an ASCII control character other than newline.
    #[error("note contains control character {byte:#04x} at byte {offset}")]
    ControlCharacter {
        /// Offending byte value.
        byte: u8,
        /// Byte offset of the character in the input.
        offset: usize,
    },
    /// No signing key was supplied.
    #[error("no signing keys supplied")]
    NoSigners,
    /// The same key (name and key ID) was supplied twice for signing.
    #[error("signing key {name:?} ({key_id:08x}) supplied more than once")]
    DuplicateSigner {
        /// Name of the repeated key.
        name: String,
        /// Key ID of the repeated key.
        key_id: u32,
    },
    /// More signatures than [`MAX_SIGNATURES`] were supplied or found.
    #[error("too many signatures (more than {max})")]
    TooManySignatures {
        /// The limit that was exceeded.
        max: usize,
    },
    /// There is no blank line followed by a newline-terminated signature block.
    #[error("note has no blank line followed by a newline-terminated signature block")]
    MissingSignatureBlock,
    /// A line of the signature block is not `— <name> <base64>`.
    #[error("malformed signature line {line}: {reason}")]
    MalformedSignatureLine {
        /// 1-based index of the line within the signature block.
        line: usize,
        /// What was wrong with it.
        reason: &'static str,
    },
    /// A signature from a known key (same name and key ID) failed to verify.
    #[error("invalid signature from known key {name:?} ({key_id:08x})")]
    InvalidSignature {
        /// Name on the failing signature line.
        name: String,
        /// Key ID on the failing signature line.
        key_id: u32,
    },
    /// No signature was made by a key in the keyring.
    #[error("no signature from a known key ({unknown} signature(s) from unknown keys)")]
    NoVerifiedSignature {
        /// Number of distinct signature lines from unknown keys.
        unknown: usize,
    },
}

/// Why an ASCII decimal field (tree size, leaf index) was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NumberError {
    /// The field is empty.
    #[error("empty")]
    Empty,
    /// The field contains something other than ASCII digits (a sign, space, ...).
    #[error("contains a character other than ASCII digits")]
    NotDigits,
    /// The field has a leading zero but is not exactly `0`.
    #[error("has a leading zero")]
    LeadingZero,
    /// The value does not fit in a `u64`.
    #[error("does not fit in 64 bits")]
    Overflow,
}

/// Errors from encoding, parsing or opening a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointError {
    /// The signed note around the checkpoint was malformed or did not verify.
    #[error("checkpoint note: {0}")]
    Note(#[from] NoteError),
    /// The body does not end in a newline.
    #[error("checkpoint body does not end in a newline")]
    MissingTrailingNewline,
    /// The body contains an ASCII control character other than newline.
    #[error("checkpoint body contains control character {byte:#04x}")]
    ControlCharacter {
        /// Offending byte value.
        byte: u8,
    },
    /// The body has fewer than the three mandatory lines.
    #[error("checkpoint body has {got} line(s), need at least 3")]
    TooFewLines {
        /// Number of lines found.
        got: usize,
    },
    /// The origin line is empty.
    #[error("checkpoint origin is empty")]
    EmptyOrigin,
    /// The tree size line is not a canonical decimal `u64`.
    #[error("checkpoint size {text:?} {reason}")]
    InvalidSize {
        /// The size line as found.
        text: String,
        /// Why it was rejected.
        reason: NumberError,
    },
    /// The root hash line is not valid standard base64.
    #[error("checkpoint root hash is not valid base64")]
    RootBase64(#[source] base64::DecodeError),
    /// The root hash does not decode to exactly 32 bytes.
    #[error("checkpoint root hash is {got} bytes, expected 32")]
    RootLength {
        /// Decoded length.
        got: usize,
    },
    /// An extension line is empty (the spec requires them to be non-empty).
    #[error("checkpoint extension line {index} is empty")]
    EmptyExtension {
        /// 0-based index among the extension lines.
        index: usize,
    },
    /// The checkpoint does not survive an encode/parse round trip (an origin or
    /// extension line containing a newline), so signing it would be ambiguous.
    #[error("checkpoint fields do not encode unambiguously (newline inside a field?)")]
    NotCanonical,
    /// The origin differs from the one the caller expects.
    #[error("checkpoint origin {got:?} differs from expected {expected:?}")]
    OriginMismatch {
        /// Origin the caller asked for.
        expected: String,
        /// Origin found in the checkpoint.
        got: String,
    },
}

/// Errors from parsing or opening a C2SP tlog-proof.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    /// The text does not start with the `c2sp.org/tlog-proof@v1` line.
    #[error("missing '{TLOG_PROOF_HEADER}' header line")]
    MissingHeader,
    /// The `extra` payload is not valid standard base64.
    #[error("extra data is not valid base64")]
    ExtraBase64(#[source] base64::DecodeError),
    /// The `index N` line is missing or misplaced.
    #[error("missing 'index' line")]
    MissingIndex,
    /// The index is not a canonical decimal `u64`.
    #[error("proof index {text:?} {reason}")]
    InvalidIndex {
        /// The index field as found.
        text: String,
        /// Why it was rejected.
        reason: NumberError,
    },
    /// A proof hash line is not valid standard base64.
    #[error("proof hash {index} is not valid base64")]
    HashBase64 {
        /// 0-based index of the hash within the proof.
        index: usize,
        /// Underlying decoding error.
        #[source]
        source: base64::DecodeError,
    },
    /// A proof hash does not decode to exactly 32 bytes.
    #[error("proof hash {index} is {got} bytes, expected 32")]
    HashLength {
        /// 0-based index of the hash within the proof.
        index: usize,
        /// Decoded length.
        got: usize,
    },
    /// More hashes than any tree of at most 2^64 leaves can need.
    #[error("proof has more than {MAX_PROOF_HASHES} hashes")]
    TooManyHashes,
    /// No blank line separates the proof hashes from the checkpoint.
    #[error("no blank line before the checkpoint")]
    MissingSeparator,
    /// The embedded checkpoint is malformed, fails to verify, or has another origin.
    #[error("embedded checkpoint: {0}")]
    Checkpoint(#[from] CheckpointError),
    /// The index does not fall inside the checkpointed tree.
    #[error("index {index} is outside the checkpointed tree of size {size}")]
    IndexOutOfRange {
        /// Leaf index from the proof.
        index: u64,
        /// Tree size from the checkpoint.
        size: u64,
    },
}

// ---------------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------------

/// Computes the signed-note key ID of an Ed25519 key:
/// `SHA-256(name || 0x0A || 0x01 || pubkey)[:4]` as a big-endian `u32`.
pub fn key_id(name: &str, public_key: &[u8; 32]) -> u32 {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update([b'\n', ALG_ED25519]);
    h.update(public_key);
    let d = h.finalize();
    u32::from_be_bytes([d[0], d[1], d[2], d[3]])
}

/// Checks the signed-note key name rules.
fn validate_name(name: &str) -> Result<(), KeyError> {
    // Control characters are not forbidden in names by the spec itself, but a
    // note carrying one is unparseable, so such a key would be useless.
    let bad = name.is_empty()
        || name
            .chars()
            .any(|c| c.is_whitespace() || c == '+' || c < '\u{20}');
    if bad {
        Err(KeyError::InvalidName(name.to_owned()))
    } else {
        Ok(())
    }
}

fn is_valid_name(name: &str) -> bool {
    validate_name(name).is_ok()
}

/// Parses the 8-hex-digit key ID field of a key text.
fn parse_key_id(hex: &str) -> Result<u32, KeyError> {
    // `from_str_radix` alone would accept a leading '+', so check digits first.
    if hex.len() != 8 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(KeyError::InvalidKeyId(hex.to_owned()));
    }
    u32::from_str_radix(hex, 16).map_err(|_| KeyError::InvalidKeyId(hex.to_owned()))
}

/// Splits `0x01 || key32` into the key bytes, checking algorithm and length.
fn split_ed25519_material(raw: &[u8]) -> Result<[u8; 32], KeyError> {
    let (&alg, key) = raw.split_first().ok_or(KeyError::KeyLength {
        expected: 33,
        got: 0,
    })?;
    if alg != ALG_ED25519 {
        return Err(KeyError::UnsupportedAlgorithm(alg));
    }
    key.try_into().map_err(|_| KeyError::KeyLength {
        expected: 33,
        got: raw.len(),
    })
}

/// Best-effort wipe of a temporary buffer that held secret key bytes.
fn wipe(buf: &mut [u8]) {
    buf.fill(0);
    // Keep the optimiser from dropping the dead store above.
    std::hint::black_box(&buf);
}

/// A public note verifier key: a name plus an Ed25519 public key.
#[derive(Clone, PartialEq, Eq)]
pub struct VerifierKey {
    name: String,
    key_id: u32,
    key: ed25519_dalek::VerifyingKey,
}

impl VerifierKey {
    /// Builds a verifier key from a name and an Ed25519 public key.
    ///
    /// # Errors
    ///
    /// [`KeyError::InvalidName`] if `name` breaks the key name rules.
    pub fn new(name: &str, key: ed25519_dalek::VerifyingKey) -> Result<Self, KeyError> {
        validate_name(name)?;
        Ok(Self {
            name: name.to_owned(),
            key_id: key_id(name, key.as_bytes()),
            key,
        })
    }

    /// Parses a verifier key text `name+hex8+base64(0x01 || pubkey32)`.
    ///
    /// # Errors
    ///
    /// A [`KeyError`] if the text is not of that shape, the name is invalid,
    /// the key is not Ed25519 or not a curve point, or the stated key ID does
    /// not match the name and key.
    pub fn from_vkey_text(text: &str) -> Result<Self, KeyError> {
        // Split on the first two '+' only: the base64 part may contain '+'.
        let mut parts = text.splitn(3, '+');
        let (Some(name), Some(hex), Some(b64)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(KeyError::Malformed("verifier key must be name+hex8+base64"));
        };
        validate_name(name)?;
        let stated = parse_key_id(hex)?;
        let raw = STANDARD.decode(b64).map_err(KeyError::Base64)?;
        let bytes = split_ed25519_material(&raw)?;
        let key = ed25519_dalek::VerifyingKey::from_bytes(&bytes)
            .map_err(|_| KeyError::InvalidPublicKey)?;
        let computed = key_id(name, &bytes);
        if stated != computed {
            return Err(KeyError::KeyIdMismatch { stated, computed });
        }
        Ok(Self {
            name: name.to_owned(),
            key_id: computed,
            key,
        })
    }

    /// Formats the key as `name+hex8+base64(0x01 || pubkey32)`.
    pub fn to_vkey_text(&self) -> String {
        let mut raw = Vec::with_capacity(33);
        raw.push(ALG_ED25519);
        raw.extend_from_slice(self.key.as_bytes());
        format!("{}+{:08x}+{}", self.name, self.key_id, STANDARD.encode(raw))
    }

    /// The key name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The 32-bit key ID (shown as 8 lowercase hex digits in key texts).
    pub fn key_id(&self) -> u32 {
        self.key_id
    }

    /// The raw 32-byte Ed25519 public key.
    pub fn public_key_bytes(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    /// Checks an Ed25519 signature over `msg`; false on any malformation.
    fn verify(&self, msg: &[u8], sig: &[u8]) -> bool {
        let Ok(sig) = ed25519_dalek::Signature::from_slice(sig) else {
            return false;
        };
        // `verify` (not `verify_strict`) matches Go's crypto/ed25519 checks.
        self.key.verify(msg, &sig).is_ok()
    }
}

impl fmt::Debug for VerifierKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("VerifierKey")
            .field(&self.to_vkey_text())
            .finish()
    }
}

/// A note signing key: a name plus an Ed25519 secret key.
///
/// `Debug` redacts the secret; the inner `ed25519_dalek::SigningKey` wipes
/// its memory on drop. `Clone` is intentionally not implemented so secret
/// copies are explicit (`from_skey_text(&k.to_skey_text())`).
pub struct SigningKey {
    name: String,
    key_id: u32,
    key: ed25519_dalek::SigningKey,
}

impl SigningKey {
    /// Generates a fresh key with the operating system's CSPRNG.
    ///
    /// # Errors
    ///
    /// [`KeyError::InvalidName`] if `name` breaks the key name rules.
    pub fn generate(name: &str) -> Result<Self, KeyError> {
        validate_name(name)?;
        let key = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
        Ok(Self::from_parts(name, key))
    }

    fn from_parts(name: &str, key: ed25519_dalek::SigningKey) -> Self {
        Self {
            name: name.to_owned(),
            key_id: key_id(name, key.verifying_key().as_bytes()),
            key,
        }
    }

    /// Parses a signer key text `PRIVATE+KEY+name+hex8+base64(0x01 || seed32)`.
    ///
    /// Errors never echo the secret material.
    ///
    /// # Errors
    ///
    /// A [`KeyError`] if the text is not of that shape, the name is invalid,
    /// the key is not Ed25519, or the stated key ID does not match the name and
    /// the public key derived from the seed.
    pub fn from_skey_text(text: &str) -> Result<Self, KeyError> {
        // Split on the first four '+' only: the base64 part may contain '+'.
        let mut parts = text.splitn(5, '+');
        let (Some("PRIVATE"), Some("KEY"), Some(name), Some(hex), Some(b64)) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(KeyError::Malformed(
                "signer key must be PRIVATE+KEY+name+hex8+base64",
            ));
        };
        validate_name(name)?;
        let stated = parse_key_id(hex)?;
        // The decode error would quote part of the secret text, so drop it.
        let mut raw = STANDARD
            .decode(b64)
            .map_err(|_| KeyError::Malformed("signer key material is not valid base64"))?;
        let seed = split_ed25519_material(&raw);
        wipe(&mut raw);
        let mut seed = seed?;
        let key = ed25519_dalek::SigningKey::from_bytes(&seed);
        wipe(&mut seed);
        // The text carries the ID of the *public* key, so derive it to check.
        let computed = key_id(name, key.verifying_key().as_bytes());
        if stated != computed {
            return Err(KeyError::KeyIdMismatch { stated, computed });
        }
        Ok(Self::from_parts(name, key))
    }

    /// Formats the key as `PRIVATE+KEY+name+hex8+base64(0x01 || seed32)`.
    ///
    /// The returned string is secret; the caller is responsible for it.
    pub fn to_skey_text(&self) -> String {
        let mut raw = [0u8; 33];
        raw[0] = ALG_ED25519;
        raw[1..].copy_from_slice(self.key.as_bytes());
        let text = format!(
            "PRIVATE+KEY+{}+{:08x}+{}",
            self.name,
            self.key_id,
            STANDARD.encode(raw)
        );
        wipe(&mut raw);
        text
    }

    /// The matching public verifier key.
    pub fn verifier(&self) -> VerifierKey {
        VerifierKey {
            name: self.name.clone(),
            key_id: self.key_id,
            key: self.key.verifying_key(),
        }
    }

    /// The key name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The 32-bit key ID of the public half.
    pub fn key_id(&self) -> u32 {
        self.key_id
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("name", &self.name)
            .field("key_id", &format_args!("{:08x}", self.key_id))
            .field("secret", &"<redacted>")
            .finish()
    }
}

// ---------------------------------------------------------------------------
// Signed notes
// ---------------------------------------------------------------------------

/// One signature line of a note, not (yet) verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoteSignature {
    /// Key name on the line.
    pub name: String,
    /// Key ID (first four bytes of the decoded signature, big-endian).
    pub key_id: u32,
    /// Signature bytes after the key ID.
    pub signature: Vec<u8>,
}

/// A syntactically valid signed note whose signatures have not been checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedNote {
    /// The signed text, final newline included, separator excluded.
    pub text: String,
    /// Signature lines in order of appearance.
    pub signatures: Vec<NoteSignature>,
}

/// A note with at least one signature verified by a [`Keyring`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedNote {
    /// The authenticated text, final newline included.
    pub text: String,
    /// Keys whose signatures verified, in order of appearance, without repeats.
    pub verified_by: Vec<VerifierKey>,
    /// Distinct signature lines from keys not in the keyring (e.g. witnesses).
    pub unverified: Vec<NoteSignature>,
}

/// Rejects ASCII control characters other than newline, as the note spec requires.
fn check_control_chars(s: &str) -> Result<(), NoteError> {
    match s.bytes().enumerate().find(|&(_, b)| b < 0x20 && b != b'\n') {
        Some((offset, byte)) => Err(NoteError::ControlCharacter { byte, offset }),
        None => Ok(()),
    }
}

/// Signs `text` with every key in `signers` and returns the signed note.
///
/// # Errors
///
/// [`NoteError::EmptyText`], [`NoteError::TextMissingNewline`] or
/// [`NoteError::ControlCharacter`] for a text no verifier would accept;
/// [`NoteError::NoSigners`], [`NoteError::DuplicateSigner`] or
/// [`NoteError::TooManySignatures`] for a bad signer list.
pub fn sign_note(text: &str, signers: &[&SigningKey]) -> Result<String, NoteError> {
    if text.is_empty() {
        return Err(NoteError::EmptyText);
    }
    if !text.ends_with('\n') {
        return Err(NoteError::TextMissingNewline);
    }
    check_control_chars(text)?;
    if signers.is_empty() {
        return Err(NoteError::NoSigners);
    }
    if signers.len() > MAX_SIGNATURES {
        return Err(NoteError::TooManySignatures {
            max: MAX_SIGNATURES,
        });
    }
    let mut out = String::with_capacity(text.len() + 1 + signers.len() * 128);
    out.push_str(text);
    out.push('\n');
    for (i, s) in signers.iter().enumerate() {
        if signers[..i]
            .iter()
            .any(|p| p.name == s.name && p.key_id == s.key_id)
        {
            return Err(NoteError::DuplicateSigner {
                name: s.name.clone(),
                key_id: s.key_id,
            });
        }
        let sig = s.key.sign(text.as_bytes());
        let mut blob = Vec::with_capacity(68);
        blob.extend_from_slice(&s.key_id.to_be_bytes());
        blob.extend_from_slice(&sig.to_bytes());
        out.push_str(SIG_PREFIX);
        out.push_str(&s.name);
        out.push(' ');
        out.push_str(&STANDARD.encode(blob));
        out.push('\n');
    }
    Ok(out)
}

/// Splits a signed note into text and signature lines without verifying anything.
///
/// # Errors
///
/// [`NoteError::ControlCharacter`], [`NoteError::MissingSignatureBlock`],
/// [`NoteError::MalformedSignatureLine`] or [`NoteError::TooManySignatures`].
pub fn parse_signed_note(msg: &str) -> Result<ParsedNote, NoteError> {
    check_control_chars(msg)?;
    // The text may itself contain blank lines; signature lines never are
    // blank, so the *last* "\n\n" is the separator (same rule as Go).
    let split = msg.rfind("\n\n").ok_or(NoteError::MissingSignatureBlock)?;
    let (text, sigs) = (&msg[..split + 1], &msg[split + 2..]);
    let Some(sigs) = sigs.strip_suffix('\n') else {
        return Err(NoteError::MissingSignatureBlock);
    };
    let mut signatures = Vec::new();
    for (i, line) in sigs.split('\n').enumerate() {
        let malformed = |reason| NoteError::MalformedSignatureLine {
            line: i + 1,
            reason,
        };
        if i >= MAX_SIGNATURES {
            return Err(NoteError::TooManySignatures {
                max: MAX_SIGNATURES,
            });
        }
        let rest = line
            .strip_prefix(SIG_PREFIX)
            .ok_or_else(|| malformed("does not start with em dash and space"))?;
        let (name, b64) = rest
            .split_once(' ')
            .ok_or_else(|| malformed("no space between name and signature"))?;
        if !is_valid_name(name) {
            return Err(malformed("invalid key name"));
        }
        let blob = STANDARD
            .decode(b64)
            .map_err(|_| malformed("signature is not valid base64"))?;
        // Four bytes of key ID plus at least one byte of signature.
        if blob.len() < 5 {
            return Err(malformed("signature too short"));
        }
        let key_id = u32::from_be_bytes([blob[0], blob[1], blob[2], blob[3]]);
        signatures.push(NoteSignature {
            name: name.to_owned(),
            key_id,
            signature: blob[4..].to_vec(),
        });
    }
    Ok(ParsedNote {
        text: text.to_owned(),
        signatures,
    })
}

/// A set of trusted verifier keys, e.g. a log's current key plus rotated-out
/// keys whose old checkpoints must still verify.
#[derive(Debug, Clone, Default)]
pub struct Keyring {
    keys: Vec<VerifierKey>,
}

impl Keyring {
    /// An empty keyring (opens nothing).
    pub fn new() -> Self {
        Self::default()
    }

    /// Builds a keyring from several keys.
    ///
    /// # Errors
    ///
    /// [`KeyError::AmbiguousKey`] if two different keys share name and key ID.
    pub fn from_keys<I: IntoIterator<Item = VerifierKey>>(keys: I) -> Result<Self, KeyError> {
        let mut ring = Self::new();
        for k in keys {
            ring.add(k)?;
        }
        Ok(ring)
    }

    /// Adds a key; adding a key already present is a no-op.
    ///
    /// # Errors
    ///
    /// [`KeyError::AmbiguousKey`] if a *different* key with the same name and
    /// key ID is present: signature lines are looked up by (name, key ID), so
    /// such a pair could not be told apart.
    pub fn add(&mut self, key: VerifierKey) -> Result<(), KeyError> {
        match self.lookup(&key.name, key.key_id) {
            Some(existing) if *existing == key => Ok(()),
            Some(_) => Err(KeyError::AmbiguousKey {
                name: key.name,
                key_id: key.key_id,
            }),
            None => {
                self.keys.push(key);
                Ok(())
            }
        }
    }

    /// The keys in the ring.
    pub fn keys(&self) -> &[VerifierKey] {
        &self.keys
    }

    fn lookup(&self, name: &str, key_id: u32) -> Option<&VerifierKey> {
        self.keys
            .iter()
            .find(|k| k.key_id == key_id && k.name == name)
    }

    /// Parses a signed note and verifies it against the keyring.
    ///
    /// Signatures from keys not in the ring (matching name *and* key ID) are
    /// ignored and reported in [`VerifiedNote::unverified`]; at least one
    /// signature from a known key must verify, and every signature from a
    /// known key must verify.
    ///
    /// # Errors
    ///
    /// Any [`parse_signed_note`] error, [`NoteError::InvalidSignature`] if a
    /// known key's signature fails, or [`NoteError::NoVerifiedSignature`] if
    /// no known key signed the note.
    pub fn open(&self, msg: &str) -> Result<VerifiedNote, NoteError> {
        let parsed = parse_signed_note(msg)?;
        let mut verified_by: Vec<VerifierKey> = Vec::new();
        let mut unverified: Vec<NoteSignature> = Vec::new();
        for sig in parsed.signatures {
            match self.lookup(&sig.name, sig.key_id) {
                Some(key) => {
                    if !key.verify(parsed.text.as_bytes(), &sig.signature) {
                        return Err(NoteError::InvalidSignature {
                            name: sig.name,
                            key_id: sig.key_id,
                        });
                    }
                    if !verified_by.contains(key) {
                        verified_by.push(key.clone());
                    }
                }
                None => {
                    // Repeated identical lines count once, as in Go.
                    if !unverified.contains(&sig) {
                        unverified.push(sig);
                    }
                }
            }
        }
        if verified_by.is_empty() {
            return Err(NoteError::NoVerifiedSignature {
                unknown: unverified.len(),
            });
        }
        Ok(VerifiedNote {
            text: parsed.text,
            verified_by,
            unverified,
        })
    }
}

// ---------------------------------------------------------------------------
// Checkpoints
// ---------------------------------------------------------------------------

/// Parses a canonical ASCII decimal `u64` (no sign, no leading zeros but "0").
fn parse_decimal(s: &str) -> Result<u64, NumberError> {
    if s.is_empty() {
        return Err(NumberError::Empty);
    }
    // `str::parse` would accept a leading '+', so check the digits ourselves.
    if !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(NumberError::NotDigits);
    }
    if s.len() > 1 && s.starts_with('0') {
        return Err(NumberError::LeadingZero);
    }
    s.parse::<u64>().map_err(|_| NumberError::Overflow)
}

/// A C2SP tlog-checkpoint: a log's Merkle tree head at some size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// Unique identifier of the log (first line), non-empty.
    pub origin: String,
    /// Number of leaves in the tree.
    pub size: u64,
    /// RFC 6962/9162 Merkle tree hash at `size`.
    pub root: [u8; 32],
    /// Opaque extension lines, each non-empty, kept verbatim and uninterpreted.
    pub extensions: Vec<String>,
}

impl Checkpoint {
    /// A checkpoint without extension lines.
    pub fn new(origin: impl Into<String>, size: u64, root: [u8; 32]) -> Self {
        Self {
            origin: origin.into(),
            size,
            root,
            extensions: Vec::new(),
        }
    }

    /// Encodes the note body: origin, size, base64 root, extensions, each
    /// terminated by `\n`.
    ///
    /// Does not validate; [`sign_checkpoint`] checks that the body parses
    /// back to the same checkpoint before signing it.
    pub fn to_body(&self) -> String {
        let mut body = format!(
            "{}\n{}\n{}\n",
            self.origin,
            self.size,
            STANDARD.encode(self.root)
        );
        for ext in &self.extensions {
            body.push_str(ext);
            body.push('\n');
        }
        body
    }

    /// Strictly parses a checkpoint note body.
    ///
    /// # Errors
    ///
    /// A [`CheckpointError`] describing the first violation: missing final
    /// newline, control characters, fewer than three lines, empty origin,
    /// non-canonical size, root not 32 bytes of standard base64, or an empty
    /// extension line.
    pub fn parse_body(body: &str) -> Result<Self, CheckpointError> {
        let stripped = body
            .strip_suffix('\n')
            .ok_or(CheckpointError::MissingTrailingNewline)?;
        if let Some(byte) = stripped.bytes().find(|&b| b < 0x20 && b != b'\n') {
            return Err(CheckpointError::ControlCharacter { byte });
        }
        let lines: Vec<&str> = stripped.split('\n').collect();
        if lines.len() < 3 {
            return Err(CheckpointError::TooFewLines { got: lines.len() });
        }
        let origin = lines[0];
        if origin.is_empty() {
            return Err(CheckpointError::EmptyOrigin);
        }
        let size = parse_decimal(lines[1]).map_err(|reason| CheckpointError::InvalidSize {
            text: lines[1].to_owned(),
            reason,
        })?;
        let root_bytes = STANDARD
            .decode(lines[2])
            .map_err(CheckpointError::RootBase64)?;
        let root: [u8; 32] =
            root_bytes
                .as_slice()
                .try_into()
                .map_err(|_| CheckpointError::RootLength {
                    got: root_bytes.len(),
                })?;
        let mut extensions = Vec::with_capacity(lines.len() - 3);
        for (index, ext) in lines[3..].iter().enumerate() {
            if ext.is_empty() {
                return Err(CheckpointError::EmptyExtension { index });
            }
            extensions.push((*ext).to_owned());
        }
        Ok(Self {
            origin: origin.to_owned(),
            size,
            root,
            extensions,
        })
    }
}

/// Signs a checkpoint with one or more keys (e.g. the new and the old key
/// during a rotation) and returns the signed note.
///
/// # Errors
///
/// A [`CheckpointError`] if the checkpoint would not parse back identically
/// (empty origin, newline inside a field, empty extension), or
/// [`CheckpointError::Note`] for signing errors such as an empty key list.
pub fn sign_checkpoint(
    checkpoint: &Checkpoint,
    signers: &[&SigningKey],
) -> Result<String, CheckpointError> {
    let body = checkpoint.to_body();
    // Never sign something a verifier would read differently from what we meant.
    if Checkpoint::parse_body(&body)? != *checkpoint {
        return Err(CheckpointError::NotCanonical);
    }
    Ok(sign_note(&body, signers)?)
}

/// Verifies a signed checkpoint against `keyring`, parses it, and checks its origin.
///
/// Returns the checkpoint and the keys whose signatures verified.
///
/// # Errors
///
/// [`CheckpointError::Note`] if the note is malformed or not validly signed
/// by a key in the ring, a body parsing error, or
/// [`CheckpointError::OriginMismatch`] if the origin is not `expected_origin`.
pub fn open_checkpoint(
    signed_note: &str,
    keyring: &Keyring,
    expected_origin: &str,
) -> Result<(Checkpoint, Vec<VerifierKey>), CheckpointError> {
    // Authenticate first so nothing unauthenticated is interpreted.
    let note = keyring.open(signed_note)?;
    let checkpoint = Checkpoint::parse_body(&note.text)?;
    if checkpoint.origin != expected_origin {
        return Err(CheckpointError::OriginMismatch {
            expected: expected_origin.to_owned(),
            got: checkpoint.origin,
        });
    }
    Ok((checkpoint, note.verified_by))
}

// ---------------------------------------------------------------------------
// tlog-proof
// ---------------------------------------------------------------------------

/// A C2SP tlog-proof: an inclusion proof bundled with the signed checkpoint
/// it was computed against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlogProof {
    /// Optional opaque, *unauthenticated* application data (`extra` line).
    pub extra: Option<Vec<u8>>,
    /// Zero-based index of the entry in the log.
    pub index: u64,
    /// Inclusion proof hashes, from the leaf's sibling up to the root's child.
    pub hashes: Vec<[u8; 32]>,
    /// The signed checkpoint note, verbatim (ends in `\n`).
    pub checkpoint_note: String,
}

impl TlogProof {
    /// Encodes the proof in the `c2sp.org/tlog-proof@v1` text format.
    ///
    /// Does not validate the fields; [`TlogProof::parse`] of the result gives
    /// back `self` when `checkpoint_note` is a well-formed signed checkpoint.
    pub fn to_text(&self) -> String {
        let mut out =
            String::with_capacity(64 + self.hashes.len() * 45 + self.checkpoint_note.len());
        out.push_str(TLOG_PROOF_HEADER);
        out.push('\n');
        if let Some(extra) = &self.extra {
            out.push_str("extra ");
            out.push_str(&STANDARD.encode(extra));
            out.push('\n');
        }
        out.push_str("index ");
        out.push_str(&self.index.to_string());
        out.push('\n');
        for h in &self.hashes {
            out.push_str(&STANDARD.encode(h));
            out.push('\n');
        }
        out.push('\n');
        out.push_str(&self.checkpoint_note);
        out
    }

    /// Parses a `c2sp.org/tlog-proof@v1` text.
    ///
    /// The embedded checkpoint is checked for syntax only (signed-note shape
    /// and checkpoint body); use [`TlogProof::open_checkpoint`] to authenticate it.
    ///
    /// # Errors
    ///
    /// A [`ProofError`] describing the first violation of the format.
    pub fn parse(text: &str) -> Result<Self, ProofError> {
        let rest = text
            .strip_prefix(TLOG_PROOF_HEADER)
            .and_then(|r| r.strip_prefix('\n'))
            .ok_or(ProofError::MissingHeader)?;
        let (mut line, mut rest) = rest.split_once('\n').ok_or(ProofError::MissingIndex)?;

        let mut extra = None;
        if let Some(b64) = line.strip_prefix("extra ") {
            extra = Some(STANDARD.decode(b64).map_err(ProofError::ExtraBase64)?);
            (line, rest) = rest.split_once('\n').ok_or(ProofError::MissingIndex)?;
        }

        let index_text = line
            .strip_prefix("index ")
            .ok_or(ProofError::MissingIndex)?;
        let index = parse_decimal(index_text).map_err(|reason| ProofError::InvalidIndex {
            text: index_text.to_owned(),
            reason,
        })?;

        let mut hashes = Vec::new();
        loop {
            let (line, after) = rest.split_once('\n').ok_or(ProofError::MissingSeparator)?;
            rest = after;
            if line.is_empty() {
                break;
            }
            let i = hashes.len();
            if i >= MAX_PROOF_HASHES {
                return Err(ProofError::TooManyHashes);
            }
            let raw = STANDARD
                .decode(line)
                .map_err(|source| ProofError::HashBase64 { index: i, source })?;
            let hash: [u8; 32] = raw
                .as_slice()
                .try_into()
                .map_err(|_| ProofError::HashLength {
                    index: i,
                    got: raw.len(),
                })?;
            hashes.push(hash);
        }

        // Syntax-check the checkpoint now so a garbled file fails at parse time.
        let note = parse_signed_note(rest).map_err(CheckpointError::Note)?;
        Checkpoint::parse_body(&note.text)?;

        Ok(Self {
            extra,
            index,
            hashes,
            checkpoint_note: rest.to_owned(),
        })
    }

    /// Authenticates the embedded checkpoint (see [`open_checkpoint`]) and
    /// checks that `index` lies inside the checkpointed tree.
    ///
    /// The caller must still verify `hashes` as an RFC 6962 inclusion proof
    /// of its leaf at `index` against the returned checkpoint's root.
    ///
    /// # Errors
    ///
    /// [`ProofError::Checkpoint`] if the checkpoint does not open, or
    /// [`ProofError::IndexOutOfRange`] if `index >= size`.
    pub fn open_checkpoint(
        &self,
        keyring: &Keyring,
        expected_origin: &str,
    ) -> Result<(Checkpoint, Vec<VerifierKey>), ProofError> {
        let (checkpoint, keys) = open_checkpoint(&self.checkpoint_note, keyring, expected_origin)?;
        if self.index >= checkpoint.size {
            return Err(ProofError::IndexOutOfRange {
                index: self.index,
                size: checkpoint.size,
            });
        }
        Ok((checkpoint, keys))
    }
}
