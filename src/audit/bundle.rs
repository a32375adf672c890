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
use super::merkle::{leaf_hash, verify_consistency, Hash, RangeHasher};

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
    "model.requested",
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
    /// One past the last exported sequence number.
    pub to: u64,
    /// The events' leaf bytes, `from` first, read as they are written out: an export holds one
    /// event at a time, not the range.
    pub events: &'a mut dyn Iterator<Item = Result<Vec<u8>, EventSourceError>>,
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
    /// Told how many events are written so far, every [`PROGRESS_EVERY`] events.
    pub progress: Option<Progress<'a>>,
}

/// Told how many events an export wrote, or a verification checked, so far.
pub type Progress<'a> = &'a (dyn Fn(u64) + Sync);

/// How many events an export writes between two calls of its [`Progress`].
pub const PROGRESS_EVERY: u64 = 1 << 16;

/// Why the events of an export could not be read, from whatever [`Contents::events`] reads.
pub type EventSourceError = Box<dyn std::error::Error + Send + Sync>;

/// Why a bundle could not be written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The output directory exists and is not empty.
    #[error("{0} exists and is not empty; choose a new directory")]
    NotEmpty(PathBuf),
    /// The output path names no directory that could be created (`/`, or one ending in `..`).
    #[error("{0} does not name a directory to create; choose a new directory")]
    NoName(PathBuf),
    /// A file could not be written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
    /// The events could not be read.
    #[error("reading the events to export: {0}")]
    Events(#[source] EventSourceError),
    /// The events ended before the range did, or went on after it.
    #[error("the log gave {got} events for the range {from}..{to}")]
    EventCount {
        /// The first sequence number of the range.
        from: u64,
        /// One past its last.
        to: u64,
        /// How many events there were.
        got: u64,
    },
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Leading characters that a spreadsheet may take for the start of a formula.
const FORMULA_STARTS: [char; 6] = ['=', '+', '-', '@', '\t', '\r'];

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
    // The characters that start a formula in a spreadsheet, tab and CR included (OWASP's list):
    // a leading `'` makes the cell text. Inside the quotes, so that the quoting stays intact.
    if s.starts_with(FORMULA_STARTS) {
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
        push_csv_event(&mut out, bytes);
    }
    out
}

/// Appends the CSV row of one event's leaf bytes.
fn push_csv_event(out: &mut String, bytes: &[u8]) {
    match canonical::object(bytes) {
        Some(o) => push_csv_row(out, &o),
        None => {
            let v: Value = serde_json::from_slice(bytes).unwrap_or(Value::Null);
            out.push_str(&csv_row(&v));
        }
    }
}

/// A bundle file being written, and the SHA-256 of what was written so far.
struct HashingFile {
    path: PathBuf,
    out: std::io::BufWriter<fs::File>,
    hasher: Sha256,
}

impl HashingFile {
    fn create(path: PathBuf) -> Result<Self, WriteError> {
        match fs::File::create(&path) {
            Ok(f) => Ok(HashingFile {
                path,
                out: std::io::BufWriter::with_capacity(1 << 20, f),
                hasher: Sha256::new(),
            }),
            Err(source) => Err(WriteError::Io { path, source }),
        }
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), WriteError> {
        use std::io::Write;
        self.hasher.update(bytes);
        self.out.write_all(bytes).map_err(|source| WriteError::Io {
            path: self.path.clone(),
            source,
        })
    }

    /// Flushes the file and returns its SHA-256 in hex.
    fn finish(self) -> Result<String, WriteError> {
        let path = self.path;
        self.out
            .into_inner()
            .map_err(|e| WriteError::Io {
                path: path.clone(),
                source: e.into_error(),
            })?
            .sync_all()
            .map_err(|source| WriteError::Io { path, source })?;
        Ok(hex::encode(self.hasher.finalize()))
    }
}

/// The README of every bundle of [`FORMAT`]; [`verify`] requires it byte for byte, and
/// docs/AUDIT-FORMAT.md section 4 holds a copy (tests/audit_bundle.rs checks the two agree).
const README: &str = "\
agentgate audit bundle

This directory is a self-contained export of one tenant's audit log.
To verify it offline with agentgate:

    agentgate audit verify . --trusted-key '<the deployment's verifier key>'

Obtain that key from the deployment's operator, not from this directory: keyring.txt
lists the deployment's keys, but whoever altered a bundle can alter it too. This README
is part of the format and verification checks it byte for byte.

A verified bundle proves that its events are the entries manifest.from to manifest.to - 1
of the tenant's log, exactly as the log holds them, and that the log held
manifest.tree_size entries when the checkpoint was signed; agentgate prints both. A bundle
can be a sub-range: compare the range with what you asked for. To prove that the log only
grew since an earlier export, keep that export's checkpoint.txt and pass it with
--since-checkpoint.

Without agentgate, follow docs/AUDIT-FORMAT.md of the agentgate repository:
1. Check that this directory holds exactly the files of the format (section 4), each
   listed in manifest.json but the manifest, and the SHA-256 of every listed file.
2. Check that checkpoint.txt is an Ed25519 signed note by a key you trust, whose origin
   is manifest.origin and whose size is manifest.tree_size.
3. Each line of events.jsonl is one event's exact leaf bytes. Leaf hash = SHA-256(0x00 || line).
   Check seq runs from manifest.from to manifest.to - 1 and tenant is manifest.tenant.
4. With proofs.json's range_proof, rebuild the RFC 9162 root of manifest.tree_size from the
   leaf hashes and compare it with the checkpoint's root.
5. With an earlier checkpoint (yours, or since-checkpoint.txt), verify proofs.json's
   consistency_proof from it to checkpoint.txt (RFC 9162 section 2.1.4).
6. Check that events.csv is exactly the CSV of events.jsonl (section 4), so that the
   spreadsheet says what was verified.
";

/// A bundle being written: a hidden directory beside where the bundle goes, renamed into place
/// once every file in it is written and synced, so that a bundle at its path is always whole (a
/// crash or a failed write leaves at most the hidden directory, never a partial bundle).
pub struct Staging {
    /// The hidden directory, removed when dropped unless the bundle was moved into place.
    tmp: tempfile::TempDir,
    /// Where the bundle goes.
    out: PathBuf,
}

/// Checks that a bundle can be written at `out` (it does not exist, or is an empty directory),
/// creates its parent if needed and the hidden directory the bundle is written into. An exporter
/// calls this before it records anything, so that an unusable `out` costs the log nothing.
///
/// # Errors
/// [`WriteError::NotEmpty`] when `out` is not empty, [`WriteError::NoName`] for a path that names
/// no directory, [`WriteError::Io`] when `out` is not a directory or a directory cannot be made.
pub fn stage(out: &Path) -> Result<Staging, WriteError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| WriteError::Io { path, source }
    };
    let out = match fs::read_dir(out) {
        Ok(mut entries) => match entries.next() {
            Some(_) => return Err(WriteError::NotEmpty(out.to_owned())),
            // An existing empty directory (`.`, say) is replaced by the bundle: by its real name.
            None => fs::canonicalize(out).map_err(io(out))?,
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => out.to_owned(),
        Err(source) => {
            return Err(WriteError::Io {
                path: out.to_owned(),
                source,
            })
        }
    };
    let Some(name) = out.file_name() else {
        return Err(WriteError::NoName(out));
    };
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&parent).map_err(io(&parent))?;
    // The mode is the umask's, as for any directory made with `mkdir`.
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{}.partial-", name.to_string_lossy()))
        .permissions(fs::Permissions::from_mode(0o777))
        .tempdir_in(&parent)
        .map_err(io(&parent))?;
    Ok(Staging { tmp, out })
}

impl Staging {
    /// Writes the bundle and moves it into place.
    ///
    /// # Errors
    /// [`WriteError`] when a file cannot be written, the events are not the range, or the bundle
    /// cannot be moved into place (something was put at its path meanwhile: `NotEmpty`).
    pub fn write(self, c: Contents<'_>) -> Result<Manifest, WriteError> {
        let manifest = write_files(self.tmp.path(), c)?;
        let tmp = self.tmp.keep();
        // A rename onto an empty directory replaces it; onto anything else it fails, and then
        // the bundle is removed rather than left beside it.
        if let Err(source) = fs::rename(&tmp, &self.out) {
            let _ = fs::remove_dir_all(&tmp);
            let occupied = fs::read_dir(&self.out).is_ok_and(|mut d| d.next().is_some());
            return Err(match occupied {
                true => WriteError::NotEmpty(self.out),
                false => WriteError::Io {
                    path: self.out,
                    source,
                },
            });
        }
        // The rename is durable once the directory holding it is synced.
        // A bare name's parent is "", which names no directory: it is the current one.
        let parent = match self.out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        fs::File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(|source| WriteError::Io {
                path: parent.to_owned(),
                source,
            })?;
        Ok(manifest)
    }
}

/// Writes a bundle at `dir` (it must not exist or be empty): [`stage`], then [`Staging::write`].
///
/// # Errors
/// [`WriteError`] when the directory is not empty or a file cannot be written.
pub fn write(dir: &Path, c: Contents<'_>) -> Result<Manifest, WriteError> {
    stage(dir)?.write(c)
}

/// Writes the files of a bundle into the empty directory `dir`.
fn write_files(dir: &Path, c: Contents<'_>) -> Result<Manifest, WriteError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| WriteError::Io { path, source }
    };
    let mut hashes = BTreeMap::new();
    // The events and their CSV in one pass over the events, one event in memory at a time.
    let mut events = HashingFile::create(dir.join(files::EVENTS))?;
    let mut csv = HashingFile::create(dir.join(files::CSV))?;
    csv.write(csv_header().as_bytes())?;
    let mut row = String::new();
    let mut got = 0;
    // One event past the range at most: a source that runs on is an error, not written out.
    let want = c.to.saturating_sub(c.from);
    let limit = usize::try_from(want).map_or(usize::MAX, |n| n.saturating_add(1));
    for e in c.events.take(limit) {
        let e = e.map_err(WriteError::Events)?;
        events.write(&e)?;
        events.write(b"\n")?;
        row.clear();
        push_csv_event(&mut row, &e);
        csv.write(row.as_bytes())?;
        got += 1;
        if got % PROGRESS_EVERY == 0 {
            if let Some(p) = c.progress {
                p(got);
            }
        }
    }
    if got != want {
        return Err(WriteError::EventCount {
            from: c.from,
            to: c.to,
            got,
        });
    }
    hashes.insert(files::EVENTS.to_owned(), events.finish()?);
    hashes.insert(files::CSV.to_owned(), csv.finish()?);
    let hexes = |hs: &[Hash]| hs.iter().map(hex::encode).collect::<Vec<_>>();
    let proofs = Proofs {
        range_proof: hexes(c.range_proof),
        consistency_proof: c.since.map(|(_, _, p)| hexes(p)),
    };
    let mut contents: Vec<(&str, Vec<u8>)> = vec![
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
    for (name, bytes) in &contents {
        let mut f = HashingFile::create(dir.join(name))?;
        f.write(bytes)?;
        hashes.insert((*name).to_owned(), f.finish()?);
    }
    let manifest = Manifest {
        format: FORMAT.to_owned(),
        tenant: c.tenant.to_owned(),
        origin: c.origin.to_owned(),
        from: c.from,
        to: c.to,
        tree_size: c.tree_size,
        since_size: c.since.map(|(_, s, _)| s),
        files: hashes,
    };
    // The manifest last, and the directory synced after it: the bundle is whole before it is
    // moved into place.
    let mut text = serde_json::to_vec_pretty(&manifest).expect("the manifest serialises");
    text.push(b'\n');
    let mut f = HashingFile::create(dir.join(files::MANIFEST))?;
    f.write(&text)?;
    f.finish()?;
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))?;
    Ok(manifest)
}

/// What every event of a bundle is checked against.
struct EventCheck<'a> {
    from: u64,
    tenant: &'a str,
}

/// What checking one run of consecutive events found.
struct Checked {
    /// The leaf hashes of the events before `failure`.
    leaves: Vec<Hash>,
    /// The CSV rows those events must have, concatenated.
    rows: String,
    /// The first event that failed.
    failure: Option<Failure>,
}

impl EventCheck<'_> {
    /// Checks the events `part`, which start at index `start` of the bundle's events.
    fn check(&self, start: usize, part: &[&[u8]]) -> Checked {
        let mut out = Checked {
            leaves: Vec::with_capacity(part.len()),
            rows: String::new(),
            failure: None,
        };
        for (k, line) in part.iter().enumerate() {
            match self.check_one(start + k, line, &mut out.rows) {
                Ok(()) => out.leaves.push(leaf_hash(line)),
                Err(f) => {
                    out.failure = Some(f);
                    break;
                }
            }
        }
        out
    }

    /// Checks event `i`, and appends its CSV row to `rows` if it passes.
    fn check_one(&self, i: usize, line: &[u8], rows: &mut String) -> Result<(), Failure> {
        // The same rule as for a line whose end was not found, so that where chunks end does not
        // decide which failure a long line gets.
        if line.len() > MAX_LINE_BYTES {
            return Err(too_long(i));
        }
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
        push_csv_row(rows, &ev);
        Ok(())
    }
}

/// What a successful verification established.
///
/// The range is the bundle's own claim, checked against the signed tree but not signed itself: a
/// legitimate sub-range export and a bundle cut short by someone who rebuilt its range proof look
/// the same. So what was verified always comes with `range` and `tree_size`, which tell a reader
/// what the log held beyond the bundle (docs/AUDIT-FORMAT.md section 5, "What a verified bundle
/// proves").
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
    /// The size of the tree the checkpoint signs: how many events the log held when it was
    /// signed, of which the bundle holds `range`.
    pub tree_size: u64,
    /// The size of the earlier checkpoint the log was proved consistent with, if any.
    pub consistent_since: Option<u64>,
    /// True when the checkpoint was checked against a key given by the reader, not only the
    /// bundle's own keyring.
    pub trusted_key: bool,
}

impl std::fmt::Display for Verified {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The range is stated in full, so that a bundle cut short shows what it left out.
        write!(
            f,
            "verified: {} events (seq {} to {} of {} in the log), tenant {}, root {}, signed by {}",
            self.events,
            self.range.0,
            self.range.1.saturating_sub(1),
            self.tree_size,
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

/// Bytes of `events.jsonl` checked at a time, and of every streamed file read at a time. This
/// bounds what [`verify`] holds in memory: a few chunks per file in flight and a few hashes per
/// level of the tree ([`RangeHasher`]), whatever the size of the bundle.
pub const CHUNK_BYTES: usize = 2 << 20;

/// Longest event line [`verify`] accepts, and about the most it buffers while looking for a line's
/// end: twice the audit log's default largest record (16 MiB), so that a hostile file without
/// newlines cannot make it buffer without bound. The audit log refuses a longer event whatever
/// `segment_log::Options::max_record_bytes` says, so that every bundle it writes can pass.
pub(crate) const MAX_LINE_BYTES: usize = 32 << 20;

/// Files small enough to be read whole, and checked whole; the events and the CSV are streamed.
const READ_WHOLE: [&str; 5] = [
    files::CHECKPOINT,
    files::KEYRING,
    files::PROOFS,
    files::SINCE,
    files::README,
];

/// Largest manifest or small file [`verify`] reads whole; those of a real bundle are a few KiB.
const MAX_SMALL_BYTES: u64 = 16 << 20;

/// Opens a listed file, which must be a regular file: a device (`/dev/zero`, say) would never end,
/// and a named pipe would not even open until something wrote to it.
///
/// So the name is looked at first, and anything else is refused unopened (opening some devices
/// acts on its own: a watchdog starts, a tape rewinds). The name could still be swapped between
/// that look and the open, so the open does not wait (`O_NONBLOCK`) nor take a terminal
/// (`O_NOCTTY`), and what it opened must be the regular file that was looked at. Then reads wait
/// again (`O_NONBLOCK` cleared): Linux's local filesystems ignore it for regular files, but some
/// FUSE filesystems honour it, and there a read that had to wait would fail.
fn open_regular(dir: &Path, name: &str) -> Result<fs::File, Failure> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let regular = |m: std::io::Result<fs::Metadata>| match m {
        Ok(m) if m.is_file() => Ok(m),
        Ok(_) => Err(fail(name, "is not a regular file")),
        Err(e) => Err(cannot_read(name, &e)),
    };
    let path = dir.join(name);
    let looked = regular(fs::metadata(&path))?;
    #[cfg(test)]
    tests::AFTER_LOOK.with(|hook| hook.borrow_mut().as_mut().map(|f| f(&path)));
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(&path)
        .map_err(|e| cannot_read(name, &e))?;
    let opened = regular(file.metadata())?;
    if (opened.dev(), opened.ino()) != (looked.dev(), looked.ino()) {
        return Err(fail(name, "was replaced while it was being opened"));
    }
    let flags = rustix::fs::fcntl_getfl(&file).map_err(|e| cannot_read(name, &e.into()))?;
    rustix::fs::fcntl_setfl(&file, flags - rustix::fs::OFlags::NONBLOCK)
        .map_err(|e| cannot_read(name, &e.into()))?;
    Ok(file)
}

/// Reads a small listed file whole, refusing one over [`MAX_SMALL_BYTES`].
fn read(dir: &Path, name: &str) -> Result<Vec<u8>, Failure> {
    use std::io::Read;
    let mut bytes = Vec::new();
    open_regular(dir, name)?
        .take(MAX_SMALL_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| cannot_read(name, &e))?;
    if bytes.len() as u64 > MAX_SMALL_BYTES {
        return Err(fail(
            name,
            format!("is larger than {MAX_SMALL_BYTES} bytes, more than any bundle writes"),
        ));
    }
    Ok(bytes)
}

fn cannot_read(name: &str, e: &std::io::Error) -> Failure {
    fail(name, format!("cannot be read: {e}"))
}

/// Reads `file` in blocks of `block` bytes, computing its SHA-256 and handing each block to
/// `blocks`; once the receiver hangs up (the checks are done) it goes on hashing alone.
/// Returns the digest, or the read failure.
fn stream(
    mut file: fs::File,
    name: &str,
    block: usize,
    blocks: std::sync::mpsc::SyncSender<Vec<u8>>,
) -> Result<String, Failure> {
    use std::io::Read;
    let mut blocks = Some(blocks);
    let mut hasher = Sha256::new();
    // Hashing alone, one buffer serves every block; handed on, each block is a new one.
    let mut spare = Vec::new();
    loop {
        let mut buf = std::mem::take(&mut spare);
        buf.resize(block, 0);
        let mut n = 0;
        while n < block {
            match file.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(cannot_read(name, &e)),
            }
        }
        if n == 0 {
            return Ok(hex::encode(hasher.finalize()));
        }
        buf.truncate(n);
        hasher.update(&buf);
        match &blocks {
            Some(tx) => {
                if let Err(back) = tx.send(buf) {
                    blocks = None;
                    spare = back.0;
                }
            }
            None => spare = buf,
        }
    }
}

/// The blocks of one file, from its reader.
type Blocks = std::sync::mpsc::Receiver<Vec<u8>>;

/// Whole lines of `events.jsonl`, about a chunk at a time, put together from its reader's blocks.
struct LineChunks {
    blocks: Blocks,
    pending: Vec<u8>,
    /// Where in `pending` its last newline is; each block is searched once, when it arrives.
    last_newline: Option<usize>,
    chunk: usize,
    done: bool,
}

impl LineChunks {
    /// The next run of whole lines, each ending in `\n`, or `None` at the end of the file; `seen`
    /// is how many lines came before, to name a line that fails.
    fn next(&mut self, seen: u64) -> Result<Option<Vec<u8>>, Failure> {
        loop {
            if self.pending.len() >= self.chunk || self.done {
                if let Some(nl) = self.last_newline.take() {
                    let rest = self.pending.split_off(nl + 1);
                    return Ok(Some(std::mem::replace(&mut self.pending, rest)));
                }
                // `pending` is now one line without its newline. Too long is too long whether its
                // end was found or not (as `EventCheck` rules for a terminated line).
                if self.pending.len() > MAX_LINE_BYTES {
                    return Err(too_long(seen as usize));
                }
                if self.done {
                    return match self.pending.is_empty() {
                        true => Ok(None),
                        false => Err(fail(
                            files::EVENTS,
                            "the last line is not terminated (truncated?)",
                        )),
                    };
                }
            }
            match self.blocks.recv() {
                Ok(b) => {
                    let base = self.pending.len();
                    if let Some(i) = b.iter().rposition(|c| *c == b'\n') {
                        self.last_newline = Some(base + i);
                    }
                    if base == 0 {
                        self.pending = b;
                    } else {
                        self.pending.extend_from_slice(&b);
                    }
                }
                Err(_) => self.done = true,
            }
        }
    }
}

/// The failure of event line `i` (0-based) for being longer than [`MAX_LINE_BYTES`].
fn too_long(i: usize) -> Failure {
    fail(
        files::EVENTS,
        format!(
            "line {} is longer than {MAX_LINE_BYTES} bytes, more than any event",
            i + 1
        ),
    )
}

/// `events.csv` as its reader hands it over, compared with the rows the events must have.
struct CsvStream {
    blocks: Blocks,
    buf: Vec<u8>,
    pos: usize,
}

impl CsvStream {
    /// Consumes `want` from the file, or fails if the file does not go on with exactly it. Rows are
    /// compared as bytes, not split at newlines, so a quoted field may hold one.
    fn expect(&mut self, want: &[u8]) -> Result<(), Failure> {
        let mut at = 0;
        while at < want.len() {
            if self.pos == self.buf.len() && !self.refill() {
                return Err(fail(files::CSV, CSV_DIFFERS));
            }
            let n = (self.buf.len() - self.pos).min(want.len() - at);
            if self.buf[self.pos..self.pos + n] != want[at..at + n] {
                return Err(fail(files::CSV, CSV_DIFFERS));
            }
            self.pos += n;
            at += n;
        }
        Ok(())
    }

    /// Whether the file has nothing left.
    fn at_end(&mut self) -> bool {
        self.pos == self.buf.len() && !self.refill()
    }

    /// Takes the next non-empty block; false at the end of the file.
    fn refill(&mut self) -> bool {
        while let Ok(b) = self.blocks.recv() {
            if !b.is_empty() {
                self.buf = b;
                self.pos = 0;
                return true;
            }
        }
        false
    }
}

/// Why the CSV failed when its rows are not the events'.
const CSV_DIFFERS: &str = "does not match events.jsonl";

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

/// The files of a bundle of [`FORMAT`] with this manifest, the manifest aside: a fixed set, with
/// the earlier checkpoint exactly when the manifest says the bundle proves consistency from one.
fn file_set(manifest: &Manifest) -> Vec<&'static str> {
    let mut set = vec![
        files::EVENTS,
        files::CSV,
        files::CHECKPOINT,
        files::KEYRING,
        files::PROOFS,
        files::README,
    ];
    if manifest.since_size.is_some() {
        set.push(files::SINCE);
    }
    set
}

/// Checks that the manifest lists exactly the [`file_set`], and that the directory holds nothing
/// else. A file a reader may open must not go unchecked: were a listing optional, dropping
/// `events.csv` from it would let a forged CSV (the file a spreadsheet opens) pass, and dropping
/// `since-checkpoint.txt` would skip the consistency proof.
fn check_file_set(dir: &Path, manifest: &Manifest) -> Result<(), Failure> {
    let want = file_set(manifest);
    if let Some(missing) = want.iter().find(|n| !manifest.files.contains_key(**n)) {
        return Err(fail(files::MANIFEST, format!("does not list {missing}")));
    }
    for name in manifest.files.keys() {
        if name.contains('/') || name.contains('\\') || name.starts_with('.') {
            return Err(fail(
                files::MANIFEST,
                format!("lists a file outside the bundle: {name}"),
            ));
        }
        if name == files::SINCE && manifest.since_size.is_none() {
            return Err(fail(
                files::MANIFEST,
                format!("lists {name} but has no since_size"),
            ));
        }
        if !want.contains(&name.as_str()) {
            return Err(fail(
                files::MANIFEST,
                format!("lists {name}, which is not a file of {FORMAT}"),
            ));
        }
    }
    let place = "the bundle directory";
    let listing = |e: std::io::Error| fail(place, format!("cannot be listed: {e}"));
    let mut present = Vec::new();
    for entry in fs::read_dir(dir).map_err(listing)? {
        // A name that is not UTF-8 is shown with replacement characters, and is listed by no
        // manifest, so it is refused like any other unlisted entry.
        present.push(
            entry
                .map_err(listing)?
                .file_name()
                .to_string_lossy()
                .into_owned(),
        );
    }
    present.sort();
    match present
        .iter()
        .find(|n| n.as_str() != files::MANIFEST && !manifest.files.contains_key(n.as_str()))
    {
        Some(extra) => Err(fail(
            extra.as_str(),
            "is in the bundle directory but not in the manifest",
        )),
        None => Ok(()),
    }
}

/// Verifies a bundle offline.
///
/// `trusted` replaces the bundle's own keyring for the bundle's checkpoints: a reader who obtained
/// the deployment's key independently should pass it. `since` is a checkpoint the reader kept from
/// an earlier export; the bundle must then prove the log grew from it by appending only. Without
/// `trusted`, `since` is the trust anchor: the new checkpoint must be signed by a key that signed
/// it. With `trusted`, `since` may verify under the bundle's keyring too (after a key rotation it
/// is an earlier key's), since the reader vouches for it.
///
/// The events are read and checked a chunk at a time ([`CHUNK_BYTES`]) and their leaf hashes go
/// straight into the range's root, so memory stays bounded however large the bundle is.
///
/// # Errors
/// The first [`Failure`]: a file that cannot be read, then a file whose SHA-256 differs from the
/// manifest (which explains any later failure), then an event, a signature or a proof, and why.
pub fn verify(
    dir: &Path,
    trusted: Option<&VerifierKey>,
    since: Option<&str>,
) -> Result<Verified, Failure> {
    verify_in_chunks(dir, trusted, since, CHUNK_BYTES, None)
}

/// [`verify`], telling `progress` how many events passed their checks after each chunk.
///
/// # Errors
/// As [`verify`].
pub fn verify_with_progress(
    dir: &Path,
    trusted: Option<&VerifierKey>,
    since: Option<&str>,
    progress: Progress<'_>,
) -> Result<Verified, Failure> {
    verify_in_chunks(dir, trusted, since, CHUNK_BYTES, Some(progress))
}

/// [`verify`], reading and checking `chunk_bytes` at a time; public so that tests can show that
/// the result does not depend on where chunks end.
#[doc(hidden)]
pub fn verify_in_chunks(
    dir: &Path,
    trusted: Option<&VerifierKey>,
    since: Option<&str>,
    chunk_bytes: usize,
    progress: Option<Progress<'_>>,
) -> Result<Verified, Failure> {
    let chunk_bytes = chunk_bytes.max(1);
    let manifest_bytes = read(dir, files::MANIFEST)?;
    let manifest: Manifest = serde_json::from_slice(&manifest_bytes)
        .map_err(|e| fail(files::MANIFEST, format!("is not a bundle manifest: {e}")))?;
    if manifest.format != FORMAT {
        return Err(fail(
            files::MANIFEST,
            format!("unknown format {:?}", manifest.format),
        ));
    }
    check_file_set(dir, &manifest)?;
    // Each listed file is read once: the bytes whose SHA-256 is checked are the bytes checked
    // below, so a file swapped meanwhile cannot pass as the one that was hashed. The small files
    // are read whole; the others are opened here and streamed below.
    let mut small = BTreeMap::new();
    let mut opened = Vec::new();
    for name in manifest.files.keys() {
        if READ_WHOLE.contains(&name.as_str()) {
            small.insert(name.as_str(), read(dir, name)?);
        } else {
            // The file set was checked: this is the events or the CSV.
            opened.push((name.as_str(), open_regular(dir, name)?));
        }
    }
    std::thread::scope(|scope| {
        // One reader per streamed file, hashing as it reads, beside the checks (about a tenth of
        // the work at 10^6 events), handing its blocks on to the checks.
        let mut events = None;
        let mut csv = None;
        let mut readers = BTreeMap::new();
        for (name, file) in opened {
            let (tx, rx) = std::sync::mpsc::sync_channel(2);
            match name {
                files::EVENTS => events = Some(rx),
                _ => csv = Some(rx),
            }
            readers.insert(
                name,
                scope.spawn(move || stream(file, name, chunk_bytes, tx)),
            );
        }
        let events = events.expect("events.jsonl is listed, so it was opened");
        let csv = csv.expect("events.csv is listed, so it was opened");
        let checked = verify_contents(
            &manifest,
            &small,
            (trusted, since),
            (events, csv),
            chunk_bytes,
            progress,
        );
        // The receivers are gone with `verify_contents`, so the readers finish hashing alone.
        let mut digests = BTreeMap::new();
        for (name, reader) in readers {
            digests.insert(name, reader.join().expect("a reader does not panic"));
        }
        // A file that could not be read, then one that was altered, explain any later failure.
        let mut altered = None;
        for (name, want) in &manifest.files {
            let got = match digests.remove(name.as_str()) {
                Some(d) => d?,
                None => sha256_hex(&small[name.as_str()]),
            };
            if &got != want && altered.is_none() {
                altered = Some(fail(
                    name.as_str(),
                    "its SHA-256 differs from the manifest (the file was altered)",
                ));
            }
        }
        match altered {
            Some(f) => Err(f),
            None => checked,
        }
    })
}

/// The checks of [`verify`] once the manifest is read: everything but the files' digests. The
/// events and the CSV come as blocks from their readers.
fn verify_contents(
    manifest: &Manifest,
    small: &BTreeMap<&str, Vec<u8>>,
    (trusted, since): (Option<&VerifierKey>, Option<&str>),
    (events, csv): (Blocks, Blocks),
    chunk_bytes: usize,
    progress: Option<Progress<'_>>,
) -> Result<Verified, Failure> {
    // Every small file read below is listed (the file set was checked; the earlier checkpoint is
    // looked up only when `since_size` says it is there), so each is in `small`.
    let bytes = |name: &str| -> Result<&[u8], Failure> {
        small
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
    // A reader follows the README, and only the manifest's hash covered it: rewritten, it could
    // tell them to trust whatever key signed the bundle. It is the writer's, byte for byte.
    if bytes(files::README)? != README.as_bytes() {
        return Err(fail(
            files::README,
            "is not the README of agentgate-audit-bundle/1 (rewritten; see docs/AUDIT-FORMAT.md section 4)",
        ));
    }

    // The keys: the reader's own, when given, else the bundle's keyring.
    let bundle_ring = parse_keyring(text(files::KEYRING)?, files::KEYRING)
        .map_err(|e| fail(files::KEYRING, e.to_string()))?;
    let ring = match trusted {
        Some(k) => {
            Keyring::from_keys([k.clone()]).map_err(|e| fail("--trusted-key", e.to_string()))?
        }
        None => bundle_ring.clone(),
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

    // The events: canonical, in order, of this tenant, of known types; every line ends in a
    // newline, and the file is exactly the lines. Nothing held grows with a number a (possibly
    // hostile) manifest claims.
    let want = manifest.to - manifest.from;
    // The CSV is a convenience copy, but a reader may trust it: it must say what the events say.
    // Each chunk's rows are rendered as its events are checked, so each event is parsed once.
    let mut csv = CsvStream {
        blocks: csv,
        buf: Vec::new(),
        pos: 0,
    };
    csv.expect(csv_header().as_bytes())?;
    let ctx = EventCheck {
        from: manifest.from,
        tenant: &manifest.tenant,
    };
    // A chunk's events are checked in parallel parts: each event is independent of the others,
    // and the first failure in line order is the one reported.
    let threads = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .min(8);
    let mut chunks = LineChunks {
        blocks: events,
        pending: Vec::new(),
        last_newline: None,
        chunk: chunk_bytes,
        done: false,
    };
    let mut seen: usize = 0;
    // The leaf hashes go into the range's root as they are checked, so that the verifier holds a
    // few hashes per tree level and not one per event. The range was checked against the
    // checkpoint above, so this cannot fail; were it to, the range proof is what is wrong.
    let mut ranged = RangeHasher::new(manifest.from, manifest.to, cp.size)
        .map_err(|e| fail(files::PROOFS, format!("range proof: {e}")))?;
    while let Some(chunk) = chunks.next(seen as u64)? {
        let lines: Vec<&[u8]> = chunk[..chunk.len() - 1].split(|b| *b == b'\n').collect();
        let room = usize::try_from(want)
            .unwrap_or(usize::MAX)
            .saturating_sub(seen);
        let in_range = &lines[..lines.len().min(room)];
        let part = in_range.len().div_ceil(threads).max(64);
        let results: Vec<Checked> = if in_range.len() <= part {
            vec![ctx.check(seen, in_range)]
        } else {
            std::thread::scope(|scope| {
                let handles: Vec<_> = in_range
                    .chunks(part)
                    .enumerate()
                    .map(|(c, events)| {
                        let ctx = &ctx;
                        scope.spawn(move || ctx.check(seen + c * part, events))
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("a verifier thread does not panic"))
                    .collect()
            })
        };
        for r in results {
            // The rows stop before a failed event, so a CSV difference here came first.
            csv.expect(r.rows.as_bytes())?;
            for leaf in r.leaves {
                ranged.push(leaf);
            }
            if let Some(f) = r.failure {
                return Err(f);
            }
        }
        if lines.len() > in_range.len() {
            let i = seen + in_range.len();
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
        seen += lines.len();
        if let Some(p) = progress {
            p(seen as u64);
        }
    }
    if (seen as u64) < want {
        return Err(fail(
            files::EVENTS,
            format!("holds {seen} events but the manifest's range has {want}"),
        ));
    }
    if !csv.at_end() {
        return Err(fail(files::CSV, CSV_DIFFERS));
    }

    // The events must rebuild the signed root.
    let proofs: Proofs = serde_json::from_slice(bytes(files::PROOFS)?)
        .map_err(|e| fail(files::PROOFS, format!("does not parse: {e}")))?;
    let range = hashes(files::PROOFS, &proofs.range_proof)?;
    let root = ranged
        .finish(&range)
        .map_err(|e| fail(files::PROOFS, format!("range proof: {e}")))?;
    if root != cp.root {
        return Err(fail(
            files::EVENTS,
            "the events do not reproduce the checkpoint's root (an event was altered, or the checkpoint swapped)",
        ));
    }

    // Consistency from the reader's earlier checkpoint, or the bundle's own.
    let bundled_since = match manifest.since_size {
        Some(_) => Some(text(files::SINCE)?),
        None => None,
    };
    let since_note = since.or(bundled_since);
    if since_note.is_none() && proofs.consistency_proof.is_some() {
        return Err(fail(
            files::PROOFS,
            "has a consistency proof but the manifest has no since_size",
        ));
    }
    let mut consistent_since = None;
    if let Some(since_note) = since_note {
        // The reader's own checkpoint is theirs to vouch for: its signature only shows that it is
        // one of this deployment's, and what matters is that the trusted new checkpoint extends
        // it. So beside a --trusted-key the bundle's keyring may serve for it too; the trusted key
        // alone would refuse, after a rotation, the checkpoint an earlier key signed. A bundled
        // earlier checkpoint is the bundle's, checked under the new checkpoint's keys.
        let since_ring = match (since, trusted) {
            (Some(_), Some(k)) => {
                let mut r = bundle_ring;
                r.add(k.clone())
                    .map_err(|e| fail("--trusted-key", e.to_string()))?;
                r
            }
            _ => ring,
        };
        let (old, old_signers) = open_checkpoint(since_note, &since_ring, &manifest.origin)
            .map_err(|e| fail("since-checkpoint", format!("does not verify: {e}")))?;
        // Without a trusted key, the keys are the bundle's own, which anyone can add to: the
        // reader's earlier checkpoint is then the trust anchor, and the new one must be signed by
        // a key that signed it, or an added key could sign a forged history that extends it.
        if since.is_some() && trusted.is_none() && !signers.iter().any(|k| old_signers.contains(k))
        {
            let names = |keys: &[VerifierKey]| {
                keys.iter()
                    .map(VerifierKey::to_vkey_text)
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            return Err(fail(
                files::CHECKPOINT,
                format!(
                    "is signed by {}, and your earlier checkpoint by {}: no key signed both; \
                     after a key rotation, name the new key with --trusted-key",
                    names(&signers),
                    names(&old_signers)
                ),
            ));
        }
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
        events: seen as u64,
        tenant: manifest.tenant.clone(),
        root,
        signed_by: signers.iter().map(VerifierKey::to_vkey_text).collect(),
        range: (manifest.from, manifest.to),
        tree_size: cp.size,
        consistent_since,
        trusted_key: trusted.is_some(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    type Hook = Box<dyn FnMut(&Path)>;

    thread_local! {
        /// Runs in [`open_regular`] between its look at a name and its open, on this thread.
        pub(super) static AFTER_LOOK: std::cell::RefCell<Option<Hook>> =
            std::cell::RefCell::new(None);
    }

    /// `open_regular(dir, "f")` on a thread of its own, with `swap` run between its look at the
    /// regular file `f` and its open; `None` if it has not returned after 20 s.
    fn open_swapped(swap: fn(&Path)) -> Option<Result<(), Failure>> {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("f"), b"listed").unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let path = dir.path().to_owned();
        std::thread::spawn(move || {
            AFTER_LOOK.with(|hook| *hook.borrow_mut() = Some(Box::new(swap)));
            let _ = tx.send(open_regular(&path, "f").map(|_| ()));
        });
        let got = rx.recv_timeout(std::time::Duration::from_secs(20)).ok();
        if got.is_none() {
            // Unblock the open so that the thread can end.
            let _ = fs::write(dir.path().join("f"), b"x");
        }
        got
    }

    /// A name swapped for a named pipe after the look neither blocks the open (no writer ever
    /// comes) nor passes; one swapped for another regular file is refused too.
    #[test]
    fn a_name_swapped_between_the_look_and_the_open_is_refused() {
        let to_pipe = |path: &Path| {
            fs::remove_file(path).unwrap();
            let made = std::process::Command::new("mkfifo")
                .arg(path)
                .status()
                .unwrap();
            assert!(made.success());
        };
        let err = open_swapped(to_pipe)
            .expect("the open returned, without waiting for a writer")
            .unwrap_err();
        assert!(err.why.contains("is not a regular file"), "{err}");
        let to_other_file = |path: &Path| {
            // Moved aside, not removed, so that the new file cannot reuse its inode number.
            fs::rename(path, path.with_extension("old")).unwrap();
            fs::write(path, b"other").unwrap();
        };
        let err = open_swapped(to_other_file).unwrap().unwrap_err();
        assert!(
            err.why.contains("was replaced while it was being opened"),
            "{err}"
        );
        assert!(open_swapped(|_| {}).unwrap().is_ok());
    }

    /// The opened file's reads wait again: the `O_NONBLOCK` that kept the open from waiting is
    /// cleared, so a filesystem that honours it for regular files cannot fail a read midway.
    #[test]
    fn an_opened_listed_file_reads_blocking() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("f"), b"listed").unwrap();
        let file = open_regular(dir.path(), "f").unwrap();
        let flags = rustix::fs::fcntl_getfl(&file).unwrap();
        assert!(!flags.contains(rustix::fs::OFlags::NONBLOCK), "{flags:?}");
    }

    /// Writes a bundle of `events` claimed to be the range `0..to`.
    fn write_from(
        dir: &Path,
        to: u64,
        events: &mut dyn Iterator<Item = Result<Vec<u8>, EventSourceError>>,
    ) -> Result<Manifest, WriteError> {
        write_telling(dir, to, events, None)
    }

    /// [`write_from`], telling `progress`.
    fn write_telling(
        dir: &Path,
        to: u64,
        events: &mut dyn Iterator<Item = Result<Vec<u8>, EventSourceError>>,
        progress: Option<Progress<'_>>,
    ) -> Result<Manifest, WriteError> {
        let key = super::super::checkpoint::SigningKey::generate("test").unwrap();
        let ring = Keyring::from_keys([key.verifier()]).unwrap();
        write(
            dir,
            Contents {
                tenant: "t",
                origin: "example.test/audit/t",
                from: 0,
                to,
                events,
                checkpoint: "",
                tree_size: to,
                keyring: &ring,
                range_proof: &[],
                since: None,
                progress,
            },
        )
    }

    /// An export tells its progress every `PROGRESS_EVERY` events, with the count written.
    #[test]
    fn write_tells_its_progress() {
        let scratch = tempfile::tempdir().unwrap();
        let told = std::sync::Mutex::new(Vec::new());
        let tell = |n| told.lock().unwrap().push(n);
        let n = 2 * PROGRESS_EVERY + 5;
        write_telling(
            &scratch.path().join("b"),
            n,
            &mut (0..n).map(|i| Ok(event(i))),
            Some(&tell),
        )
        .unwrap();
        assert_eq!(*told.lock().unwrap(), [PROGRESS_EVERY, 2 * PROGRESS_EVERY]);
    }

    fn event(seq: u64) -> Vec<u8> {
        format!(r#"{{"seq":{seq},"type":"role.granted","v":1}}"#).into_bytes()
    }

    /// The writer streams the events into both files and hashes what it wrote; an event source
    /// that fails, ends early or runs on is an error, not a bundle that claims the range.
    #[test]
    fn write_streams_the_events_and_refuses_a_short_long_or_failing_source() {
        let scratch = tempfile::tempdir().unwrap();
        let ok = scratch.path().join("ok");
        let m = write_from(&ok, 3, &mut (0..3).map(|i| Ok(event(i)))).unwrap();
        let events = fs::read(ok.join(files::EVENTS)).unwrap();
        assert_eq!(
            events,
            [event(0), event(1), event(2)]
                .join(&b'\n')
                .into_iter()
                .chain([b'\n'])
                .collect::<Vec<u8>>()
        );
        assert_eq!(m.files[files::EVENTS], sha256_hex(&events));
        let csv_text = fs::read(ok.join(files::CSV)).unwrap();
        assert_eq!(csv_text, csv(&[event(0), event(1), event(2)]).into_bytes());
        assert_eq!(m.files[files::CSV], sha256_hex(&csv_text));

        let short = write_from(
            &scratch.path().join("short"),
            3,
            &mut (0..2).map(|i| Ok(event(i))),
        );
        assert!(
            matches!(
                short,
                Err(WriteError::EventCount {
                    from: 0,
                    to: 3,
                    got: 2
                })
            ),
            "{short:?}"
        );
        let long = write_from(
            &scratch.path().join("long"),
            3,
            &mut (0..4).map(|i| Ok(event(i))),
        );
        assert!(
            matches!(long, Err(WriteError::EventCount { got: 4, .. })),
            "{long:?}"
        );
        // A source that would never end is read one event past the range, no further.
        let endless = write_from(
            &scratch.path().join("endless"),
            3,
            &mut (0u64..).map(|i| {
                assert!(i < 4, "read past the range and one more");
                Ok(event(i))
            }),
        );
        assert!(
            matches!(endless, Err(WriteError::EventCount { got: 4, .. })),
            "{endless:?}"
        );
        let failing = write_from(
            &scratch.path().join("failing"),
            3,
            &mut (0..3).map(|i| match i {
                1 => Err("segment unreadable".into()),
                i => Ok(event(i)),
            }),
        );
        match failing {
            Err(WriteError::Events(e)) => assert_eq!(e.to_string(), "segment unreadable"),
            other => panic!("{other:?}"),
        }
        // None of the failed ones is there, not even in part, nor is the directory each was
        // written in: only the one that succeeded.
        let left: Vec<String> = fs::read_dir(scratch.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left, ["ok"]);
    }

    #[test]
    fn csv_quotes_and_defuses() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("=SUM(A1)"), "'=SUM(A1)");
        let out = csv(&[br#"{"data":{"a":1},"seq":0,"type":"x"}"#.to_vec()]);
        assert_eq!(out.lines().nth(1).unwrap(), "0,,x,,,,,,\"{\"\"a\"\":1}\"");
    }

    /// Every leading formula character is defused, tab and CR too; the `'` goes inside the quotes
    /// when the field is quoted, and a formula character elsewhere is left alone.
    #[test]
    fn csv_defuses_every_formula_start() {
        for (value, field) in [
            ("=1+1", "'=1+1"),
            ("+1", "'+1"),
            ("-1", "'-1"),
            ("@SUM(A1)", "'@SUM(A1)"),
            ("\t=1+1", "'\t=1+1"),
            ("\r=1+1", "\"'\r=1+1\""),
            ("=1,2", "\"'=1,2\""),
            ("-\"x\"", "\"'-\"\"x\"\"\""),
            ("a=1", "a=1"),
            ("a\t", "a\t"),
            ("", ""),
        ] {
            assert_eq!(csv_field(value), field, "{value:?}");
        }
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
