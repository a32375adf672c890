//! Export bundles for regulators and their offline verification (format: docs/AUDIT-FORMAT.md).
//!
//! A bundle is a directory: the events as JSON Lines (their exact leaf bytes), the signed checkpoint
//! that covers them, the keyring, a range proof tying the exported events to the checkpoint's root,
//! optionally a consistency proof from a checkpoint the reader kept from an earlier export, a CSV of
//! the events, a manifest with every file's SHA-256, and a README. [`verify`] needs nothing else.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::canonical;
use super::checkpoint::{open_checkpoint, Checkpoint, Keyring, VerifierKey};
use super::keys::{keyring_text, parse_keyring};
use super::merkle::{leaf_hash, root_from_range, verify_consistency, Hash};

/// The bundle format written into every manifest.
pub const FORMAT: &str = "agentgate-audit-bundle/1";

/// Every event type of format version 1, so that a verifier refuses an event it cannot interpret.
pub const EVENT_TYPES: &[&str] = &[
    "tenant.provisioned",
    "installation.created",
    "installation.updated",
    "installation.revoked",
    "settings.changed",
    "role.granted",
    "role.revoked",
    "command.received",
    "run.started",
    "model.called",
    "tool.authorized",
    "tool.invoked",
    "tool.refused",
    "budget.exceeded",
    "run.completed",
    "run.failed",
    "export.created",
    "checkpoint.signed",
];

/// The files of a bundle.
pub mod files {
    /// The manifest.
    pub const MANIFEST: &str = "manifest.json";
    /// The events, one leaf per line.
    pub const EVENTS: &str = "events.jsonl";
    /// The events for spreadsheets and SIEM import.
    pub const CSV: &str = "events.csv";
    /// The signed checkpoint covering the events.
    pub const CHECKPOINT: &str = "checkpoint.txt";
    /// Every verifier key of the deployment.
    pub const KEYRING: &str = "keyring.txt";
    /// The range and consistency proofs.
    pub const PROOFS: &str = "proofs.json";
    /// The earlier checkpoint the consistency proof starts from.
    pub const SINCE: &str = "since-checkpoint.txt";
    /// How to verify, for a human reader.
    pub const README: &str = "README.txt";
}

/// The manifest of a bundle.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: String,
    /// The tenant whose log this is.
    pub tenant: String,
    /// The log's origin line.
    pub origin: String,
    /// The first exported sequence number.
    pub from: u64,
    /// One past the last exported sequence number.
    pub to: u64,
    /// The size of the tree the checkpoint signs.
    pub tree_size: u64,
    /// The size of the earlier checkpoint, when the bundle proves consistency from one.
    pub since_size: Option<u64>,
    /// SHA-256 (hex) of every other file, by name.
    pub files: BTreeMap<String, String>,
}

/// The proofs of a bundle.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Proofs {
    /// Hex hashes that, with the exported leaves, rebuild the root of `tree_size`.
    pub range_proof: Vec<String>,
    /// Hex hashes of the RFC 9162 consistency proof from `since_size` to `tree_size`.
    pub consistency_proof: Option<Vec<String>>,
}

/// What an exporter hands to [`write`].
pub struct Contents<'a> {
    /// The tenant.
    pub tenant: &'a str,
    /// The origin line.
    pub origin: &'a str,
    /// The first exported sequence number.
    pub from: u64,
    /// The events' leaf bytes, from `from` on.
    pub events: &'a [Vec<u8>],
    /// The signed checkpoint.
    pub checkpoint: &'a str,
    /// Its tree size.
    pub tree_size: u64,
    /// The keyring.
    pub keyring: &'a Keyring,
    /// The range proof.
    pub range_proof: &'a [Hash],
    /// The earlier checkpoint and the consistency proof from it.
    pub since: Option<(&'a str, u64, &'a [Hash])>,
}

/// Why a bundle could not be written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The output directory exists and is not empty.
    #[error("{0} exists and is not empty; choose a new directory")]
    NotEmpty(PathBuf),
    /// A file could not be written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Quotes a CSV field when needed, and defuses a leading formula character for spreadsheets.
fn csv_field(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    push_csv_field(&mut out, s);
    out
}

/// Appends `s` to `out` as [`csv_field`] renders it.
fn push_csv_field(out: &mut String, s: &str) {
    let quote = s.contains([',', '"', '\n', '\r']);
    if quote {
        out.push('"');
    }
    if s.starts_with(['=', '+', '-', '@']) {
        out.push('\'');
    }
    if quote {
        for c in s.chars() {
            if c == '"' {
                out.push('"');
            }
            out.push(c);
        }
        out.push('"');
    } else {
        out.push_str(s);
    }
}

const CSV_COLUMNS: [&str; 8] = [
    "seq",
    "time",
    "type",
    "principal",
    "principal_kind",
    "initiator",
    "run_id",
    "correlation_id",
];

fn csv_header() -> String {
    format!("{},data\n", CSV_COLUMNS.join(","))
}

/// One event's CSV row, newline included.
fn csv_row(v: &Value) -> String {
    let mut row: Vec<String> = CSV_COLUMNS
        .iter()
        .map(|c| match &v[*c] {
            Value::String(s) => csv_field(s),
            Value::Null => String::new(),
            other => csv_field(&other.to_string()),
        })
        .collect();
    row.push(csv_field(&v["data"].to_string()));
    let mut out = row.join(",");
    out.push('\n');
    out
}

/// Appends one canonical event's CSV row, newline included; the same text as [`csv_row`] of its
/// parsed value, without parsing it (`canonical` checks it matches).
fn push_csv_row(out: &mut String, event: &canonical::Object<'_>) {
    for (i, c) in CSV_COLUMNS.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        if let Some(m) = event.get(c) {
            if m.kind != canonical::Kind::Null {
                push_csv_field(out, &m.text());
            }
        }
    }
    out.push(',');
    // The canonical text of `data` is what serde_json prints for it; absent, that is `null`.
    push_csv_field(out, event.get("data").map_or("null", |m| m.raw));
    out.push('\n');
}

/// Renders events as CSV: one header row, then one row per event with its `data` as JSON.
pub fn csv(events: &[Vec<u8>]) -> String {
    let mut out = csv_header();
    for bytes in events {
        match canonical::object(bytes) {
            Some(o) => push_csv_row(&mut out, &o),
            None => {
                let v: Value = serde_json::from_slice(bytes).unwrap_or(Value::Null);
                out.push_str(&csv_row(&v));
            }
        }
    }
    out
}

const README: &str = "\
agentgate audit bundle

This directory is a self-contained export of one tenant's audit log.
To verify it offline with agentgate:

    agentgate audit verify . --trusted-key '<the deployment's verifier key>'

Without agentgate, follow docs/AUDIT-FORMAT.md of the agentgate repository:
1. Check the SHA-256 of every file listed in manifest.json.
2. Check that checkpoint.txt is an Ed25519 signed note by a key you trust (keyring.txt lists the
   deployment's keys; trust one you obtained independently), whose origin is manifest.origin.
3. Each line of events.jsonl is one event's exact leaf bytes. Leaf hash = SHA-256(0x00 || line).
   Check seq runs from manifest.from to manifest.to - 1 and tenant is manifest.tenant.
4. With proofs.json's range_proof, rebuild the RFC 9162 root of manifest.tree_size from the
   leaf hashes and compare it with the checkpoint's root.
5. If since-checkpoint.txt is present, verify proofs.json's consistency_proof from it to
   checkpoint.txt (RFC 9162 section 2.1.4).
events.csv holds the same events for spreadsheets; agentgate checks that it says exactly what events.jsonl says.
";

/// Writes a bundle into `dir` (created; it must not exist or be empty).
///
/// # Errors
/// [`WriteError`] when the directory is not empty or a file cannot be written.
pub fn write(dir: &Path, c: &Contents<'_>) -> Result<Manifest, WriteError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| WriteError::Io { path, source }
    };
    if dir.exists() && fs::read_dir(dir).map_err(io(dir))?.next().is_some() {
        return Err(WriteError::NotEmpty(dir.to_owned()));
    }
    fs::create_dir_all(dir).map_err(io(dir))?;
    let mut events = Vec::with_capacity(c.events.iter().map(|e| e.len() + 1).sum());
    for e in c.events {
        events.extend_from_slice(e);
        events.push(b'\n');
    }
    let hexes = |hs: &[Hash]| hs.iter().map(hex::encode).collect::<Vec<_>>();
    let proofs = Proofs {
        range_proof: hexes(c.range_proof),
        consistency_proof: c.since.map(|(_, _, p)| hexes(p)),
    };
    let mut contents: Vec<(&str, Vec<u8>)> = vec![
        (files::EVENTS, events),
        (files::CSV, csv(c.events).into_bytes()),
        (files::CHECKPOINT, c.checkpoint.as_bytes().to_vec()),
        (files::KEYRING, keyring_text(c.keyring).into_bytes()),
        (
            files::PROOFS,
            serde_json::to_vec_pretty(&proofs).expect("proofs serialise"),
        ),
        (files::README, README.as_bytes().to_vec()),
    ];
    if let Some((note, _, _)) = c.since {
        contents.push((files::SINCE, note.as_bytes().to_vec()));
    }
    let mut hashes = BTreeMap::new();
    for (name, bytes) in &contents {
        let path = dir.join(name);
        fs::write(&path, bytes).map_err(io(&path))?;
        hashes.insert((*name).to_owned(), sha256_hex(bytes));
    }
    let manifest = Manifest {
        format: FORMAT.to_owned(),
        tenant: c.tenant.to_owned(),
        origin: c.origin.to_owned(),
        from: c.from,
        to: c.from + c.events.len() as u64,
        tree_size: c.tree_size,
        since_size: c.since.map(|(_, s, _)| s),
        files: hashes,
    };
    let path = dir.join(files::MANIFEST);
    let mut text = serde_json::to_vec_pretty(&manifest).expect("the manifest serialises");
    text.push(b'\n');
    fs::write(&path, text).map_err(io(&path))?;
    Ok(manifest)
}

/// What every event of a bundle is checked against.
struct EventCheck<'a> {
    from: u64,
    tenant: &'a str,
    csv_rows: Option<&'a [&'a str]>,
}

impl EventCheck<'_> {
    /// Checks the events `part`, which start at index `start`; returns their leaf hashes.
    fn check(&self, start: usize, part: &[&[u8]]) -> Result<Vec<Hash>, Failure> {
        let mut leaves = Vec::with_capacity(part.len());
        let mut row = String::with_capacity(512);
        for (k, line) in part.iter().enumerate() {
            let i = start + k;
            let want_seq = self.from + i as u64;
            let place = || format!("{} line {} (seq {want_seq})", files::EVENTS, i + 1);
            // One pass over the bytes: canonical form, and the members read below.
            let Some(ev) = canonical::object(line) else {
                return Err(fail(
                    place(),
                    "is not canonical JSON (altered or re-encoded)",
                ));
            };
            let raw = |key: &str| ev.get(key).map_or("null", |m| m.raw);
            if raw("v") != "1" {
                return Err(fail(place(), format!("unknown event version {}", raw("v"))));
            }
            if raw("seq").parse::<u64>().ok() != Some(want_seq) {
                return Err(fail(
                    place(),
                    format!(
                        "has seq {} (events dropped, duplicated or reordered)",
                        raw("seq")
                    ),
                ));
            }
            let text = |key: &str| {
                ev.get(key)
                    .filter(|m| m.kind == canonical::Kind::String)
                    .map(|m| m.text())
            };
            if text("tenant").as_deref() != Some(self.tenant) {
                return Err(fail(
                    place(),
                    format!("belongs to tenant {}", raw("tenant")),
                ));
            }
            let ty = text("type").unwrap_or_default();
            if !EVENT_TYPES.contains(&ty.as_ref()) {
                return Err(fail(place(), format!("unknown event type {ty:?}")));
            }
            if let Some(rows) = self.csv_rows {
                row.clear();
                push_csv_row(&mut row, &ev);
                if rows.get(i).copied() != Some(row.as_str()) {
                    return Err(fail(files::CSV, "does not match events.jsonl"));
                }
            }
            leaves.push(leaf_hash(line));
        }
        Ok(leaves)
    }
}

/// What a successful verification established.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    /// How many events were checked.
    pub events: u64,
    /// The tenant.
    pub tenant: String,
    /// The root the checkpoint signs.
    pub root: Hash,
    /// The keys whose signatures verified.
    pub signed_by: Vec<String>,
    /// The first and one-past-last sequence numbers.
    pub range: (u64, u64),
    /// The size of the earlier checkpoint the log was proved consistent with, if any.
    pub consistent_since: Option<u64>,
    /// True when the checkpoint was checked against a key given by the reader, not only the
    /// bundle's own keyring.
    pub trusted_key: bool,
}

impl std::fmt::Display for Verified {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "verified: {} events, tenant {}, root {}, signed by {}",
            self.events,
            self.tenant,
            hex::encode(self.root),
            self.signed_by.join(", ")
        )
    }
}

/// The first thing in a bundle that failed, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{place}: {why}")]
pub struct Failure {
    /// The file, or the file and event (`events.jsonl line 3 (seq 2)`).
    pub place: String,
    /// What is wrong.
    pub why: String,
}

fn fail(place: impl Into<String>, why: impl Into<String>) -> Failure {
    Failure {
        place: place.into(),
        why: why.into(),
    }
}

fn read(dir: &Path, name: &str) -> Result<Vec<u8>, Failure> {
    fs::read(dir.join(name)).map_err(|e| fail(name, format!("cannot be read: {e}")))
}

fn hashes(place: &str, hexes: &[String]) -> Result<Vec<Hash>, Failure> {
    hexes
        .iter()
        .enumerate()
        .map(|(i, h)| {
            hex::decode(h)
                .ok()
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| fail(place, format!("entry {i} is not a 32-byte hex hash")))
        })
        .collect()
}

/// Verifies a bundle offline.
///
/// `trusted` replaces the bundle's own keyring for the checkpoints: a reader who obtained the
/// deployment's key independently should pass it. `since` is a checkpoint the reader kept from an
/// earlier export; the bundle must then prove the log grew from it by appending only.
///
/// # Errors
/// The first [`Failure`]: a file, an event, a signature or a proof, and why.
pub fn verify(
    dir: &Path,
    trusted: Option<&VerifierKey>,
    since: Option<&str>,
) -> Result<Verified, Failure> {
    let manifest_bytes = read(dir, files::MANIFEST)?;
    let manifest: Manifest = serde_json::from_slice(&manifest_bytes)
        .map_err(|e| fail(files::MANIFEST, format!("is not a bundle manifest: {e}")))?;
    if manifest.format != FORMAT {
        return Err(fail(
            files::MANIFEST,
            format!("unknown format {:?}", manifest.format),
        ));
    }
    for required in [
        files::EVENTS,
        files::CHECKPOINT,
        files::KEYRING,
        files::PROOFS,
    ] {
        if !manifest.files.contains_key(required) {
            return Err(fail(files::MANIFEST, format!("does not list {required}")));
        }
    }
    // Each listed file is read once: the bytes whose SHA-256 is checked are the bytes checked
    // below, so a file swapped meanwhile cannot pass as the one that was hashed.
    let mut contents = BTreeMap::new();
    for name in manifest.files.keys() {
        if name.contains('/') || name.contains('\\') || name.starts_with('.') {
            return Err(fail(
                files::MANIFEST,
                format!("lists a file outside the bundle: {name}"),
            ));
        }
        contents.insert(name.as_str(), read(dir, name)?);
    }
    // The digests are computed beside the checks of the contents (about a tenth of the work at
    // 10^6 events), and a mismatch is reported first, as it explains any later failure.
    std::thread::scope(|scope| {
        let digests = scope.spawn(|| {
            for (name, want) in &manifest.files {
                if &sha256_hex(&contents[name.as_str()]) != want {
                    return Err(fail(
                        name.as_str(),
                        "its SHA-256 differs from the manifest (the file was altered)",
                    ));
                }
            }
            Ok(())
        });
        let checked = verify_contents(&manifest, &contents, trusted, since);
        digests.join().expect("hashing does not panic")?;
        checked
    })
}

/// The checks of [`verify`] after the manifest's files are read: everything but their digests.
fn verify_contents(
    manifest: &Manifest,
    contents: &BTreeMap<&str, Vec<u8>>,
    trusted: Option<&VerifierKey>,
    since: Option<&str>,
) -> Result<Verified, Failure> {
    // Every file read below is listed (the required ones were checked, the others are looked up
    // only when listed), so each is in `contents`.
    let bytes = |name: &str| -> Result<&[u8], Failure> {
        contents
            .get(name)
            .map(Vec::as_slice)
            .ok_or_else(|| fail(files::MANIFEST, format!("does not list {name}")))
    };
    let text = |name: &str| -> Result<&str, Failure> {
        std::str::from_utf8(bytes(name)?).map_err(|_| fail(name, "is not UTF-8"))
    };
    if !manifest.origin.ends_with(&format!("/{}", manifest.tenant)) {
        return Err(fail(files::MANIFEST, "the origin does not name the tenant"));
    }

    // The keys: the reader's own, when given, else the bundle's keyring.
    let bundle_ring = parse_keyring(text(files::KEYRING)?, files::KEYRING)
        .map_err(|e| fail(files::KEYRING, e.to_string()))?;
    let ring = match trusted {
        Some(k) => {
            Keyring::from_keys([k.clone()]).map_err(|e| fail("--trusted-key", e.to_string()))?
        }
        None => bundle_ring,
    };
    let note = text(files::CHECKPOINT)?;
    let (cp, signers): (Checkpoint, Vec<VerifierKey>) =
        open_checkpoint(note, &ring, &manifest.origin)
            .map_err(|e| fail(files::CHECKPOINT, format!("does not verify: {e}")))?;
    if cp.size != manifest.tree_size {
        return Err(fail(
            files::CHECKPOINT,
            format!(
                "signs size {} but the manifest says {}",
                cp.size, manifest.tree_size
            ),
        ));
    }
    if manifest.from >= manifest.to || manifest.to > cp.size {
        return Err(fail(
            files::MANIFEST,
            format!(
                "range {}..{} is not within the checkpoint's {} events",
                manifest.from, manifest.to, cp.size
            ),
        ));
    }

    // The events: canonical, in order, of this tenant, of known types.
    let events = bytes(files::EVENTS)?;
    if !events.is_empty() && !events.ends_with(b"\n") {
        return Err(fail(
            files::EVENTS,
            "the last line is not terminated (truncated?)",
        ));
    }
    // Every line ends in a newline; the file is exactly the lines, nothing before or after. The
    // vector grows with the file, never with a number a (possibly hostile) manifest claims.
    let body = events.strip_suffix(b"\n").unwrap_or(events);
    let lines: Vec<&[u8]> = if events.is_empty() {
        Vec::new()
    } else {
        body.split(|b| *b == b'\n').collect()
    };
    let want = manifest.to - manifest.from;
    // The CSV is a convenience copy, but a reader may trust it: it must say what the events say.
    // It is compared row by row as the events are checked, so each event is parsed once.
    let csv_text = match manifest.files.contains_key(files::CSV) {
        true => Some(text(files::CSV)?),
        false => None,
    };
    // The CSV's rows, after its header; it must have exactly one per event.
    let csv_rows: Option<Vec<&str>> = match csv_text {
        None => None,
        Some(t) => {
            let mut rows = t.split_inclusive('\n');
            if rows.next() != Some(csv_header().as_str()) {
                return Err(fail(files::CSV, "does not match events.jsonl"));
            }
            Some(rows.collect())
        }
    };
    // Events are checked in parallel chunks: each event is independent of the others, and the
    // first failure in line order is the one reported.
    let threads = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .min(8);
    let in_range = &lines[..lines.len().min(usize::try_from(want).unwrap_or(usize::MAX))];
    let chunk = in_range.len().div_ceil(threads).max(1);
    let ctx = EventCheck {
        from: manifest.from,
        tenant: &manifest.tenant,
        csv_rows: csv_rows.as_deref(),
    };
    let results: Vec<Result<Vec<Hash>, Failure>> = std::thread::scope(|scope| {
        let handles: Vec<_> = in_range
            .chunks(chunk)
            .enumerate()
            .map(|(c, part)| {
                let ctx = &ctx;
                scope.spawn(move || ctx.check(c * chunk, part))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a verifier thread does not panic"))
            .collect()
    });
    let mut leaves = Vec::with_capacity(in_range.len());
    for r in results {
        leaves.extend(r?);
    }
    if lines.len() > in_range.len() {
        let i = in_range.len();
        return Err(fail(
            format!(
                "{} line {} (seq {})",
                files::EVENTS,
                i + 1,
                manifest.from + i as u64
            ),
            "more events than the manifest's range",
        ));
    }
    if (lines.len() as u64) < want {
        return Err(fail(
            files::EVENTS,
            format!(
                "holds {} events but the manifest's range has {want}",
                lines.len()
            ),
        ));
    }
    if csv_rows
        .as_ref()
        .is_some_and(|rows| rows.len() != lines.len())
    {
        return Err(fail(files::CSV, "does not match events.jsonl"));
    }

    // The events must rebuild the signed root.
    let proofs: Proofs = serde_json::from_slice(bytes(files::PROOFS)?)
        .map_err(|e| fail(files::PROOFS, format!("does not parse: {e}")))?;
    let range = hashes(files::PROOFS, &proofs.range_proof)?;
    let root = root_from_range(manifest.from, &leaves, cp.size, &range)
        .map_err(|e| fail(files::PROOFS, format!("range proof: {e}")))?;
    if root != cp.root {
        return Err(fail(
            files::EVENTS,
            "the events do not reproduce the checkpoint's root (an event was altered, or the checkpoint swapped)",
        ));
    }

    // Consistency from the reader's earlier checkpoint, or the bundle's own.
    let bundled_since = match manifest.files.contains_key(files::SINCE) {
        true => Some(text(files::SINCE)?),
        false => None,
    };
    let since_note = since.or(bundled_since);
    let mut consistent_since = None;
    if let Some(since_note) = since_note {
        let (old, _) = open_checkpoint(since_note, &ring, &manifest.origin)
            .map_err(|e| fail("since-checkpoint", format!("does not verify: {e}")))?;
        let proof = proofs.consistency_proof.as_deref().ok_or_else(|| {
            fail(
                files::PROOFS,
                "no consistency proof for the earlier checkpoint",
            )
        })?;
        if manifest.since_size != Some(old.size) {
            return Err(fail(
                files::PROOFS,
                format!(
                    "the consistency proof starts at {:?}, not at the earlier checkpoint's size {}",
                    manifest.since_size, old.size
                ),
            ));
        }
        let proof = hashes(files::PROOFS, proof)?;
        verify_consistency(old.size, cp.size, &proof, &old.root, &cp.root).map_err(|e| {
            fail(
                files::PROOFS,
                format!("the log is not an extension of the earlier checkpoint: {e}"),
            )
        })?;
        consistent_since = Some(old.size);
    }

    Ok(Verified {
        events: leaves.len() as u64,
        tenant: manifest.tenant.clone(),
        root,
        signed_by: signers.iter().map(VerifierKey::to_vkey_text).collect(),
        range: (manifest.from, manifest.to),
        consistent_since,
        trusted_key: trusted.is_some(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quotes_and_defuses() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("=SUM(A1)"), "'=SUM(A1)");
        let out = csv(&[br#"{"data":{"a":1},"seq":0,"type":"x"}"#.to_vec()]);
        assert_eq!(out.lines().nth(1).unwrap(), "0,,x,,,,,,\"{\"\"a\"\":1}\"");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        /// The row the verifier renders from the scanned bytes is the row of the parsed value.
        #[test]
        fn the_scanned_csv_row_is_the_parsed_one(
            principal in "[=+@,\"\n\r a-z\u{e9}-]{0,12}",
            run in proptest::option::of("[a-z0-9]{1,8}"),
            note in "[=,\"\n\\\u{1}a-z]{0,12}",
            seq in proptest::prelude::any::<u64>(),
        ) {
            let event = serde_json::json!({
                "data": {"note": note, "n": -1},
                "initiator": "user",
                "principal": principal,
                "run_id": run,
                "seq": seq,
                "time": "2026-01-01T00:00:00.000000Z",
                "type": "settings.changed",
                "v": 1,
            });
            let bytes = crate::audit::event::canonical_json(&event).unwrap();
            let mut row = String::new();
            push_csv_row(&mut row, &canonical::object(&bytes).unwrap());
            // What the verifier compared before: the row of the value parsed from the leaf bytes.
            let parsed: Value = serde_json::from_slice(&bytes).unwrap();
            proptest::prop_assert_eq!(row, csv_row(&parsed));
        }
    }
}
