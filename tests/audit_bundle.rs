//! Export bundles end to end: a real deployment (`Services::open`) exports tenant logs, and
//! `bundle::verify` must accept the bundles as written and reject every tampering, naming the
//! check that caught it (`Failure.place` / `Failure.why`).
//!
//! Two attacker models: a raw edit of a file (caught by the manifest's SHA-256 list), and an
//! attacker who also regenerates `events.csv` from the edited events and rewrites the manifest's
//! hashes, so that the deeper checks (canonical form, sequence numbers, tenant, the CSV, the signed
//! root, the proofs, the signature) must catch it.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use agentgate::app::Services;
use agentgate::audit::bundle::{self, files, Failure, Manifest, Proofs};
use agentgate::audit::checkpoint::{
    open_checkpoint, parse_signed_note, sign_checkpoint, Checkpoint, Keyring, SigningKey,
    TlogProof, VerifierKey,
};
use agentgate::audit::keys::{keyring_text, parse_keyring};
use agentgate::audit::merkle::{leaf_hash, verify_inclusion, MemNodeStore, Tree};
use agentgate::audit::AuditError;
use agentgate::config::AuditOptions;
use agentgate::installation::{InstallSource, NewInstallation, Workspace};
use agentgate::tenant::{PrincipalId, Role, TenantContext, TenantId};
use secrecy::SecretString;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// `bundle::verify`, run with the default chunk size and with chunks of 5, 97 and 4096 bytes
/// (about one event a chunk, read 5 bytes at a time; chunks ending mid-line; several events a
/// chunk), which must all give
/// the same answer: every check below thereby also proves that where chunks end does not matter.
fn verify(
    dir: &Path,
    trusted: Option<&VerifierKey>,
    since: Option<&str>,
) -> Result<bundle::Verified, Failure> {
    let result = bundle::verify(dir, trusted, since);
    for chunk in [5, 97, 4096] {
        assert_eq!(
            bundle::verify_in_chunks(dir, trusted, since, chunk, None),
            result,
            "chunks of {chunk} bytes give another answer for {}",
            dir.display()
        );
    }
    result
}

// ---------------------------------------------------------------------------------------------
// A deployment with tenants
// ---------------------------------------------------------------------------------------------

/// A deployment over a temporary data directory, with the verifier key of its signer.
struct Deployment {
    dir: tempfile::TempDir,
    services: Services,
    /// The deployment's signer, read from `audit/keyring.txt` as a reader would obtain it.
    trusted: VerifierKey,
}

impl Deployment {
    async fn open() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let services = Services::open(
            dir.path(),
            Some(&SecretString::from("42".repeat(32))),
            &AuditOptions::default(),
        )
        .expect("services open");
        let ring = fs::read_to_string(dir.path().join("audit").join("keyring.txt"))
            .expect("the keyring is written at open");
        let line = ring
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#'))
            .expect("the keyring holds the signer's key");
        let trusted = VerifierKey::from_vkey_text(line).expect("a verifier key");
        Deployment {
            dir,
            services,
            trusted,
        }
    }

    /// A fresh bundle path (it does not exist yet).
    fn bundle_path(&self, name: &str) -> PathBuf {
        self.dir.path().join("bundles").join(name)
    }

    async fn close(self) {
        self.services.close().await.expect("services close");
    }
}

struct Tenant {
    id: TenantId,
    ctx: TenantContext,
}

/// A Slack team installation as an OAuth install would bring it (after tests/api/helpers.rs).
fn slack_install(team: &str, installer: &str, token: Option<&str>) -> NewInstallation {
    NewInstallation {
        workspace: Workspace::slack_team(None, team).unwrap(),
        app_id: "A0TEST".into(),
        bot_user_id: Some("U0BOT".into()),
        bot_token: token.map(|t| t.to_owned().into()),
        refresh_token: None,
        token_expires_at: None,
        scopes: vec!["commands".into()],
        installer: PrincipalId::qualified("slack", installer).unwrap(),
        source: InstallSource::OAuth,
    }
}

/// Installs a tenant for `team` and grants `members` the member role, one event each.
async fn tenant(d: &Deployment, team: &str, members: &[&str]) -> Tenant {
    let id = d
        .services
        .tenants
        .install(
            slack_install(team, "U0OWNER", Some("xoxb-test")),
            team,
            None,
        )
        .await
        .expect("install")
        .tenant;
    let ctx = d.services.tenants.operator_context(&id).unwrap();
    let t = Tenant { id, ctx };
    grant(d, &t, members).await;
    t
}

async fn grant(d: &Deployment, t: &Tenant, members: &[&str]) {
    for m in members {
        let p = PrincipalId::qualified("slack", m).unwrap();
        let changed = d
            .services
            .tenants
            .grant_role(&t.ctx, &p, Role::Member)
            .await
            .expect("grant");
        assert!(changed, "{m} was granted a new role");
    }
}

async fn log_size(d: &Deployment, t: &Tenant) -> u64 {
    let repo = d.services.store.for_tenant(&t.ctx).unwrap();
    d.services.audit.head(&t.ctx, repo).await.unwrap().size
}

/// The exact leaf bytes of events `[from, to)` of the tenant's log.
async fn log_events(d: &Deployment, t: &Tenant, from: u64, to: u64) -> Vec<Vec<u8>> {
    let repo = d.services.store.for_tenant(&t.ctx).unwrap();
    d.services
        .audit
        .read_range(&t.ctx, repo, from, to)
        .await
        .unwrap()
}

async fn export(
    d: &Deployment,
    t: &Tenant,
    from: u64,
    to: Option<u64>,
    since: Option<&str>,
    out: &Path,
) -> Result<Manifest, AuditError> {
    let repo = d.services.store.for_tenant(&t.ctx).unwrap();
    d.services
        .audit
        .export(&t.ctx, repo, from, to, since, out)
        .await
}

/// Exports and checks that the bundle verifies as written, with and without the trusted key.
async fn export_ok(d: &Deployment, t: &Tenant, from: u64, to: Option<u64>, name: &str) -> PathBuf {
    let out = d.bundle_path(name);
    export(d, t, from, to, None, &out)
        .await
        .unwrap_or_else(|e| panic!("export {name}: {e}"));
    verify(&out, None, None).unwrap_or_else(|e| panic!("{name} verifies: {e}"));
    verify(&out, Some(&d.trusted), None)
        .unwrap_or_else(|e| panic!("{name} verifies with the trusted key: {e}"));
    out
}

fn ring_of(key: &VerifierKey) -> Keyring {
    Keyring::from_keys([key.clone()]).unwrap()
}

fn attacker_key() -> SigningKey {
    SigningKey::generate("attacker").unwrap()
}

// ---------------------------------------------------------------------------------------------
// Reading and rewriting bundles
// ---------------------------------------------------------------------------------------------

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn read_manifest(dir: &Path) -> Manifest {
    serde_json::from_slice(&fs::read(dir.join(files::MANIFEST)).unwrap()).unwrap()
}

fn write_manifest(dir: &Path, m: &Manifest) {
    let mut text = serde_json::to_vec_pretty(m).unwrap();
    text.push(b'\n');
    fs::write(dir.join(files::MANIFEST), text).unwrap();
}

fn edit_manifest(dir: &Path, edit: impl FnOnce(&mut Manifest)) {
    let mut m = read_manifest(dir);
    edit(&mut m);
    write_manifest(dir, &m);
}

fn read_proofs(dir: &Path) -> Proofs {
    serde_json::from_slice(&fs::read(dir.join(files::PROOFS)).unwrap()).unwrap()
}

fn edit_proofs(dir: &Path, edit: impl FnOnce(&mut Proofs)) {
    let mut p = read_proofs(dir);
    edit(&mut p);
    fs::write(
        dir.join(files::PROOFS),
        serde_json::to_vec_pretty(&p).unwrap(),
    )
    .unwrap();
}

/// The lines of `events.jsonl` as `verify` splits them (one final `\n` stripped, then split at
/// every `\n`), or `None` when the file is unreadable or its last line is not terminated.
fn split_events(dir: &Path) -> Option<Vec<Vec<u8>>> {
    let bytes = fs::read(dir.join(files::EVENTS)).ok()?;
    if bytes.is_empty() {
        return Some(Vec::new());
    }
    let body = bytes.strip_suffix(b"\n")?;
    Some(body.split(|b| *b == b'\n').map(<[u8]>::to_vec).collect())
}

/// What a careful attacker does after editing the events: rewrite `events.csv` to say what the
/// edited `events.jsonl` says (when the bundle has a CSV and the events split into lines).
fn regenerate_csv(dir: &Path) {
    let path = dir.join(files::CSV);
    if !path.exists() {
        return;
    }
    if let Some(lines) = split_events(dir) {
        fs::write(path, bundle::csv(&lines)).unwrap();
    }
}

/// What an attacker who also controls the manifest does: recompute every listed file's SHA-256.
fn rehash(dir: &Path) {
    edit_manifest(dir, |m| {
        for (name, hash) in m.files.iter_mut() {
            if let Ok(bytes) = fs::read(dir.join(name)) {
                *hash = sha256_hex(&bytes);
            }
        }
    });
}

/// The lines of `events.jsonl`, without their newlines (the file must end in one).
fn event_lines(dir: &Path) -> Vec<Vec<u8>> {
    let bytes = fs::read(dir.join(files::EVENTS)).unwrap();
    let body = bytes.strip_suffix(b"\n").expect("events.jsonl ends in \\n");
    body.split(|b| *b == b'\n').map(<[u8]>::to_vec).collect()
}

fn write_event_lines(dir: &Path, lines: &[Vec<u8>]) {
    let mut out = Vec::new();
    for l in lines {
        out.extend_from_slice(l);
        out.push(b'\n');
    }
    fs::write(dir.join(files::EVENTS), out).unwrap();
}

fn edit_event_lines(dir: &Path, edit: impl FnOnce(&mut Vec<Vec<u8>>)) {
    let mut lines = event_lines(dir);
    edit(&mut lines);
    write_event_lines(dir, &lines);
}

fn checkpoint_text(dir: &Path) -> String {
    fs::read_to_string(dir.join(files::CHECKPOINT)).unwrap()
}

/// A full export `first` of `t`, its checkpoint's text, and a second full export `second` made
/// after one more grant, with the first's checkpoint as its earlier one.
async fn exports_one_grant_apart(
    d: &Deployment,
    t: &Tenant,
    first: &str,
    second: &str,
) -> (PathBuf, String, PathBuf) {
    let out1 = export_ok(d, t, 0, None, first).await;
    let cp1 = checkpoint_text(&out1);
    grant(d, t, &["U3"]).await;
    let out2 = d.bundle_path(second);
    export(d, t, 0, None, Some(&cp1), &out2).await.unwrap();
    (out1, cp1, out2)
}

/// Every entry of the bundle directory and its bytes; a directory (which only a tamper puts
/// there) as its name and a `/`, without its contents.
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            match e.file_type().unwrap().is_dir() {
                true => (format!("{name}/"), Vec::new()),
                false => (name, fs::read(e.path()).unwrap()),
            }
        })
        .collect()
}

/// A copy of the bundle `out` in a new temporary directory (kept while the guard lives).
fn copy_of(out: &Path) -> (tempfile::TempDir, PathBuf) {
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().join("bundle");
    copy_bundle(out, &dir);
    (scratch, dir)
}

fn copy_bundle(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for (name, bytes) in snapshot(from) {
        match name.strip_suffix('/') {
            Some(sub) => fs::create_dir(to.join(sub)).unwrap(),
            None => fs::write(to.join(name), bytes).unwrap(),
        }
    }
}

/// The place `verify` names for line `index` (0-based) holding sequence number `seq`.
fn line_place(index: usize, seq: u64) -> String {
    format!("{} line {} (seq {seq})", files::EVENTS, index + 1)
}

/// Where the value of `"key":"` starts in a canonical event line, and where it ends (the quote).
fn string_value(line: &[u8], key: &str) -> (usize, usize) {
    let needle = format!("\"{key}\":\"");
    let start = line
        .windows(needle.len())
        .position(|w| w == needle.as_bytes())
        .unwrap_or_else(|| panic!("no string field {key}"))
        + needle.len();
    let end = start
        + line[start..]
            .iter()
            .position(|b| *b == b'"')
            .expect("a closing quote");
    assert!(end > start, "{key} is not empty");
    (start, end)
}

/// Another ASCII alphanumeric of the same class: the JSON stays valid and canonical.
fn other_char(c: u8) -> u8 {
    assert!(c.is_ascii_alphanumeric(), "{:?} is alphanumeric", c as char);
    let (first, second) = match c {
        b'0'..=b'9' => (b'0', b'1'),
        b'A'..=b'Z' => (b'A', b'B'),
        _ => (b'a', b'b'),
    };
    if c == first {
        second
    } else {
        first
    }
}

/// Changes the last character of the string value of `key`; the line stays canonical JSON.
fn flip_string(line: &mut [u8], key: &str) {
    let (_, end) = string_value(line, key);
    line[end - 1] = other_char(line[end - 1]);
}

/// Replaces the first character of the string value of `key` by its `\u` escape: the same JSON
/// value, but not the canonical encoding.
fn escape_first_char(line: &mut Vec<u8>, key: &str) {
    let (start, _) = string_value(line, key);
    let esc = format!("\\u{:04x}", line[start]);
    line.splice(start..=start, esc.into_bytes());
}

/// Replaces the number value of the top-level member `key` by the token `to`, in place (whatever
/// the order of the members).
fn set_number(line: &mut Vec<u8>, key: &str, to: &str) {
    let needle = format!("\"{key}\":");
    let at: Vec<usize> = (0..line.len())
        .filter(|&i| line[i..].starts_with(needle.as_bytes()))
        .collect();
    assert_eq!(at.len(), 1, "one {key} member");
    let start = at[0] + needle.len();
    let end = start
        + line[start..]
            .iter()
            .position(|b| !b.is_ascii_digit())
            .unwrap();
    assert!(end > start, "{key} holds a number");
    line.splice(start..end, to.bytes());
}

/// The Merkle root an attacker computes over their own leaves.
fn root_of(lines: &[Vec<u8>]) -> [u8; 32] {
    let mut tree = Tree::new(MemNodeStore::new());
    for l in lines {
        tree.append(l).unwrap();
    }
    tree.root()
}

// ---------------------------------------------------------------------------------------------
// The tamper check
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Attacker {
    /// Edits files; leaves the manifest's hashes as they were.
    Raw,
    /// Edits files, regenerates `events.csv` from the edited `events.jsonl`, then rewrites the
    /// manifest's SHA-256 entries to match.
    RewritesManifest,
    /// Edits files and rewrites the manifest's SHA-256 entries, but leaves `events.csv` as the
    /// edit left it (a stale or altered CSV).
    RewritesManifestKeepsCsv,
}

/// How a check runs: the reader's trusted key and earlier checkpoint.
#[derive(Clone, Copy, Default)]
struct Reader<'a> {
    trusted: Option<&'a VerifierKey>,
    since: Option<&'a str>,
}

/// A copy of `pristine` with `tamper` applied by `attacker`; asserts the tamper changed something.
fn tampered(
    label: &str,
    pristine: &Path,
    attacker: Attacker,
    tamper: impl FnOnce(&Path),
) -> (tempfile::TempDir, PathBuf) {
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().join("bundle");
    copy_bundle(pristine, &dir);
    let before = snapshot(&dir);
    tamper(&dir);
    match attacker {
        Attacker::Raw => {}
        Attacker::RewritesManifest => {
            regenerate_csv(&dir);
            rehash(&dir);
        }
        Attacker::RewritesManifestKeepsCsv => rehash(&dir),
    }
    assert_ne!(
        snapshot(&dir),
        before,
        "{label}: the tamper changed nothing"
    );
    (scratch, dir)
}

/// Tampers with a copy of `pristine` (which must verify for `reader`), and asserts that `verify`
/// then fails at `place` with a reason containing `why`, so that the test proves which check fired.
fn check_tamper(
    label: &str,
    pristine: &Path,
    attacker: Attacker,
    reader: Reader<'_>,
    tamper: impl FnOnce(&Path),
    place: &str,
    why: &str,
) -> Failure {
    verify(pristine, reader.trusted, reader.since)
        .unwrap_or_else(|e| panic!("{label}: the pristine bundle does not verify: {e}"));
    let (_scratch, dir) = tampered(label, pristine, attacker, tamper);
    let err = match verify(&dir, reader.trusted, reader.since) {
        Ok(v) => panic!("{label}: the tampered bundle verified: {v}"),
        Err(e) => e,
    };
    assert_eq!(
        err.place, place,
        "{label}: caught by the wrong check: {err}"
    );
    assert!(
        err.why.contains(why),
        "{label}: expected a reason containing {why:?}, got: {err}"
    );
    err
}

const HASH_DIFFERS: &str = "its SHA-256 differs from the manifest";
const ROOT_DIFFERS: &str = "do not reproduce the checkpoint's root";
const CSV_DIFFERS: &str = "does not match events.jsonl";

// ---------------------------------------------------------------------------------------------
// 1. A full export verifies
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_full_export_verifies_and_only_against_the_deployments_key() {
    let d = Deployment::open().await;
    let a = tenant(&d, "T0A", &["U1", "U2", "U3"]).await;
    let size = log_size(&d, &a).await;
    assert_eq!(size, 6, "provisioned, owner, installation, three members");
    let expected = log_events(&d, &a, 0, size).await;

    let out = d.bundle_path("full");
    let m = export(&d, &a, 0, None, None, &out).await.unwrap();
    let origin = d.services.audit.origin(&a.id);
    assert_eq!((m.from, m.to), (0, size), "to is the log's size at export");
    assert_eq!(
        m.tree_size,
        size + 1,
        "the checkpoint covers export.created"
    );
    assert_eq!(m.tenant, a.id.as_str());
    assert_eq!(m.origin, origin);
    assert_eq!(m.since_size, None);
    assert_eq!(
        m,
        read_manifest(&out),
        "the manifest on disk is the one returned"
    );
    let listed: Vec<&str> = m.files.keys().map(String::as_str).collect();
    assert_eq!(
        listed,
        [
            files::README,
            files::CHECKPOINT,
            files::CSV,
            files::EVENTS,
            files::KEYRING,
            files::PROOFS
        ]
    );
    assert_eq!(
        event_lines(&out),
        expected,
        "events.jsonl holds the exact leaf bytes"
    );
    assert_eq!(
        log_size(&d, &a).await,
        size + 2,
        "export.created and checkpoint.signed were appended"
    );

    let v = verify(&out, None, None).unwrap();
    assert_eq!(v.events, size);
    assert_eq!(v.range, (0, size));
    assert_eq!(v.tenant, a.id.as_str());
    assert!(!v.signed_by.is_empty());
    assert_eq!(v.signed_by, [d.trusted.to_vkey_text()]);
    assert_eq!(v.consistent_since, None);
    assert!(!v.trusted_key);
    let (cp, _) = open_checkpoint(&checkpoint_text(&out), &ring_of(&d.trusted), &origin).unwrap();
    assert_eq!((cp.size, cp.root), (size + 1, v.root));

    assert_eq!(v.tree_size, size + 1);
    assert_eq!(
        v.to_string(),
        format!(
            "verified: {size} events (seq 0 to {} of {} in the log), tenant {}, root {}, signed by {}",
            size - 1,
            size + 1,
            a.id,
            hex::encode(v.root),
            d.trusted.to_vkey_text()
        )
    );

    let vt = verify(&out, Some(&d.trusted), None).unwrap();
    assert!(vt.trusted_key);
    assert_eq!(
        (vt.events, vt.root, vt.range, &vt.tenant),
        (v.events, v.root, v.range, &v.tenant)
    );
    assert_eq!(vt.signed_by, [d.trusted.to_vkey_text()]);

    // A key the reader trusts but that did not sign: the checkpoint does not verify.
    for stranger in [
        SigningKey::generate("agentgate-dev").unwrap().verifier(),
        SigningKey::generate("someone-else").unwrap().verifier(),
    ] {
        let err = verify(&out, Some(&stranger), None).unwrap_err();
        assert_eq!(err.place, files::CHECKPOINT, "{err}");
        assert!(err.why.starts_with("does not verify"), "{err}");
        assert!(err.why.contains("no signature from a known key"), "{err}");
    }
    d.close().await;
}

/// The range is the manifest's claim, not signed: whoever has a bundle can cut events off its end,
/// rebuild the range proof from the dropped events' hashes, re-hash the manifest, and it verifies,
/// just as a legitimate sub-range export would. What protects the reader is that the verified line
/// states the range and the size of the signed tree, so the events beyond the bundle show.
#[tokio::test]
async fn a_bundle_cut_short_still_verifies_but_says_what_the_log_held() {
    let d = Deployment::open().await;
    let a = tenant(&d, "T0A", &["U1", "U2", "U3", "U4", "U5", "U6", "U7"]).await;
    let size = log_size(&d, &a).await;
    let out = export_ok(&d, &a, 0, None, "full").await;
    let m = read_manifest(&out);
    assert_eq!((m.to, m.tree_size), (size, size + 1));
    let cut = 6;
    // The attacker knows the dropped events, so the hashes the new range proof needs; the test
    // takes them from the whole log for brevity.
    let mut tree = Tree::new(MemNodeStore::new());
    for l in log_events(&d, &a, 0, m.tree_size).await {
        tree.append(&l).unwrap();
    }
    let proof = tree.range_proof(0, cut, tree.size()).unwrap();
    let (_s, short) = tampered("cut short", &out, Attacker::RewritesManifest, |dir| {
        edit_event_lines(dir, |l| l.truncate(cut as usize));
        edit_manifest(dir, |m| m.to = cut);
        edit_proofs(dir, |p| {
            p.range_proof = proof.iter().map(hex::encode).collect()
        });
    });
    let v = verify(&short, Some(&d.trusted), None).expect("a cut bundle is a valid sub-range");
    assert_eq!(
        (v.events, v.range, v.tree_size),
        (cut, (0, cut), m.tree_size)
    );
    let line = v.to_string();
    assert!(
        line.starts_with(&format!(
            "verified: {cut} events (seq 0 to {} of {} in the log), tenant {}, ",
            cut - 1,
            m.tree_size,
            a.id
        )),
        "{line}"
    );
    d.close().await;
}

// ---------------------------------------------------------------------------------------------
// 2a. Raw edits: the manifest's hash check names the file
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_raw_edit_is_named_by_the_manifest_hash_check() {
    let d = Deployment::open().await;
    let a = tenant(&d, "T0A", &["U1", "U2"]).await;
    let out = export_ok(&d, &a, 0, None, "full").await;
    let raw = Attacker::Raw;
    let r = Reader::default();

    for name in read_manifest(&out).files.keys() {
        let label = format!("raw flip in {name}");
        check_tamper(
            &label,
            &out,
            raw,
            r,
            |dir| {
                let path = dir.join(name);
                let mut bytes = fs::read(&path).unwrap();
                let i = bytes.len() / 2;
                bytes[i] ^= 0x01;
                fs::write(&path, bytes).unwrap();
            },
            name,
            HASH_DIFFERS,
        );
        let label = format!("raw append to {name}");
        check_tamper(
            &label,
            &out,
            raw,
            r,
            |dir| {
                let path = dir.join(name);
                let mut bytes = fs::read(&path).unwrap();
                bytes.push(b'\n');
                fs::write(&path, bytes).unwrap();
            },
            name,
            HASH_DIFFERS,
        );
        let label = format!("{name} deleted");
        check_tamper(
            &label,
            &out,
            raw,
            r,
            |dir| fs::remove_file(dir.join(name)).unwrap(),
            name,
            "cannot be read",
        );
    }
    // The same raw edit with the trusted key: still the hash check, first.
    check_tamper(
        "raw edit of an event, trusted key",
        &out,
        raw,
        Reader {
            trusted: Some(&d.trusted),
            since: None,
        },
        |dir| edit_event_lines(dir, |l| flip_string(&mut l[1], "run_id")),
        files::EVENTS,
        HASH_DIFFERS,
    );

    // The manifest itself.
    let man = files::MANIFEST;
    check_tamper(
        "manifest not JSON",
        &out,
        raw,
        r,
        |dir| fs::write(dir.join(man), b"{ not json").unwrap(),
        man,
        "is not a bundle manifest",
    );
    check_tamper(
        "manifest deleted",
        &out,
        raw,
        r,
        |dir| fs::remove_file(dir.join(man)).unwrap(),
        man,
        "cannot be read",
    );
    check_tamper(
        "manifest with an unknown field",
        &out,
        raw,
        r,
        |dir| {
            let mut v: Value = serde_json::from_slice(&fs::read(dir.join(man)).unwrap()).unwrap();
            v["signed"] = Value::Bool(true);
            fs::write(dir.join(man), serde_json::to_vec(&v).unwrap()).unwrap();
        },
        man,
        "is not a bundle manifest",
    );
    check_tamper(
        "manifest of another format",
        &out,
        raw,
        r,
        |dir| edit_manifest(dir, |m| m.format = "agentgate-audit-bundle/2".into()),
        man,
        "unknown format",
    );
    for required in [
        files::EVENTS,
        files::CHECKPOINT,
        files::KEYRING,
        files::PROOFS,
    ] {
        check_tamper(
            &format!("manifest does not list {required}"),
            &out,
            raw,
            r,
            |dir| {
                edit_manifest(dir, |m| {
                    m.files.remove(required).unwrap();
                })
            },
            man,
            &format!("does not list {required}"),
        );
    }
    for outside in ["../escape.txt", "sub/file.txt", ".hidden", "..\\escape.txt"] {
        check_tamper(
            &format!("manifest lists {outside}"),
            &out,
            raw,
            r,
            |dir| {
                edit_manifest(dir, |m| {
                    m.files.insert(outside.into(), sha256_hex(b""));
                })
            },
            man,
            "lists a file outside the bundle",
        );
    }
    d.close().await;
}

// ---------------------------------------------------------------------------------------------
// 2b. The attacker also rewrites the manifest: events
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn every_event_line_altered_under_a_rewritten_manifest_is_caught() {
    let d = Deployment::open().await;
    let a = tenant(&d, "T0A", &["U1", "U2", "U3", "U4"]).await;
    let out = export_ok(&d, &a, 0, None, "full").await;
    let n = event_lines(&out).len();
    assert_eq!(n, 7);
    let rw = Attacker::RewritesManifest;
    let r = Reader::default();
    let t = Reader {
        trusted: Some(&d.trusted),
        since: None,
    };

    for i in 0..n {
        let seq = i as u64;
        // Still canonical, right seq, tenant and type: only the signed root can tell.
        for (field, reader) in [("run_id", r), ("time", r), ("principal", r), ("run_id", t)] {
            check_tamper(
                &format!("line {i}: {field} changed"),
                &out,
                rw,
                reader,
                |dir| edit_event_lines(dir, |l| flip_string(&mut l[i], field)),
                files::EVENTS,
                ROOT_DIFFERS,
            );
        }
        // The same value encoded differently: not the leaf bytes.
        check_tamper(
            &format!("line {i}: whitespace"),
            &out,
            rw,
            r,
            |dir| edit_event_lines(dir, |l| l[i].insert(1, b' ')),
            &line_place(i, seq),
            "is not canonical JSON",
        );
        check_tamper(
            &format!("line {i}: \\u escape"),
            &out,
            rw,
            r,
            |dir| edit_event_lines(dir, |l| escape_first_char(&mut l[i], "type")),
            &line_place(i, seq),
            "is not canonical JSON",
        );
        check_tamper(
            &format!("line {i}: CRLF"),
            &out,
            rw,
            r,
            |dir| edit_event_lines(dir, |l| l[i].push(b'\r')),
            &line_place(i, seq),
            "is not canonical JSON",
        );
    }

    // The line-specific checks, each on its own.
    let place = line_place(2, 2);
    check_tamper(
        "tenant changed",
        &out,
        rw,
        r,
        |dir| edit_event_lines(dir, |l| flip_string(&mut l[2], "tenant")),
        &place,
        "belongs to tenant",
    );
    check_tamper(
        "unknown type",
        &out,
        rw,
        r,
        |dir| edit_event_lines(dir, |l| flip_string(&mut l[2], "type")),
        &place,
        "unknown event type",
    );
    check_tamper(
        "version 2",
        &out,
        rw,
        r,
        |dir| edit_event_lines(dir, |l| set_number(&mut l[2], "v", "2")),
        &place,
        "unknown event version 2",
    );
    check_tamper(
        "version 1.0 (a fraction has no canonical form)",
        &out,
        rw,
        r,
        |dir| edit_event_lines(dir, |l| set_number(&mut l[2], "v", "1.0")),
        &place,
        "is not canonical JSON",
    );
    check_tamper(
        "seq 2.0 (a fraction has no canonical form)",
        &out,
        rw,
        r,
        |dir| edit_event_lines(dir, |l| set_number(&mut l[2], "seq", "2.0")),
        &place,
        "is not canonical JSON",
    );
    check_tamper(
        "seq changed",
        &out,
        rw,
        r,
        |dir| edit_event_lines(dir, |l| set_number(&mut l[2], "seq", "20")),
        &place,
        "has seq 20",
    );
    check_tamper(
        "not JSON",
        &out,
        rw,
        r,
        |dir| edit_event_lines(dir, |l| l[2] = b"garbage".to_vec()),
        &place,
        "is not canonical JSON",
    );
    check_tamper(
        "empty line",
        &out,
        rw,
        r,
        |dir| edit_event_lines(dir, |l| l[2].clear()),
        &place,
        "is not canonical JSON",
    );
    check_tamper(
        "data re-encoded canonically with another principal",
        &out,
        rw,
        r,
        |dir| {
            edit_event_lines(dir, |l| {
                let mut v: Value = serde_json::from_slice(&l[4]).unwrap();
                assert_eq!(v["type"], "role.granted");
                v["data"]["principal"] = "slack:UEVIL".into();
                l[4] = serde_json::to_vec(&v).unwrap();
            })
        },
        files::EVENTS,
        ROOT_DIFFERS,
    );
    d.close().await;
}

#[tokio::test]
async fn dropped_duplicated_reordered_truncated_or_extra_events_are_caught() {
    let d = Deployment::open().await;
    let a = tenant(&d, "T0A", &["U1", "U2", "U3", "U4"]).await;
    let out = export_ok(&d, &a, 0, None, "full").await;
    let n = event_lines(&out).len();
    let rw = Attacker::RewritesManifest;
    let r = Reader::default();

    for i in 0..n - 1 {
        check_tamper(
            &format!("line {i} dropped"),
            &out,
            rw,
            r,
            |dir| {
                edit_event_lines(dir, |l| {
                    l.remove(i);
                })
            },
            &line_place(i, i as u64),
            &format!(
                "has seq {} (events dropped, duplicated or reordered)",
                i + 1
            ),
        );
    }
    check_tamper(
        "last line dropped",
        &out,
        rw,
        r,
        |dir| {
            edit_event_lines(dir, |l| {
                l.pop();
            })
        },
        files::EVENTS,
        &format!("holds {} events but the manifest's range has {n}", n - 1),
    );
    for i in 0..n {
        // The last line duplicated is one line too many; any other, a repeated seq.
        let why = match i == n - 1 {
            true => "more events than the manifest's range".to_owned(),
            false => format!("has seq {i} (events dropped, duplicated or reordered)"),
        };
        check_tamper(
            &format!("line {i} duplicated"),
            &out,
            rw,
            r,
            |dir| edit_event_lines(dir, |l| l.insert(i, l[i].clone())),
            &line_place(i + 1, i as u64 + 1),
            &why,
        );
    }
    check_tamper(
        "lines 1 and 4 swapped",
        &out,
        rw,
        r,
        |dir| edit_event_lines(dir, |l| l.swap(1, 4)),
        &line_place(1, 1),
        "has seq 4",
    );
    check_tamper(
        "the last two lines swapped",
        &out,
        rw,
        r,
        |dir| edit_event_lines(dir, |l| l.swap(n - 2, n - 1)),
        &line_place(n - 2, n as u64 - 2),
        &format!("has seq {}", n - 1),
    );
    check_tamper(
        "truncated mid-line",
        &out,
        rw,
        r,
        |dir| {
            let path = dir.join(files::EVENTS);
            let bytes = fs::read(&path).unwrap();
            fs::write(&path, &bytes[..bytes.len() - 20]).unwrap();
        },
        files::EVENTS,
        "the last line is not terminated",
    );
    check_tamper(
        "the final newline removed",
        &out,
        rw,
        r,
        |dir| {
            let path = dir.join(files::EVENTS);
            let bytes = fs::read(&path).unwrap();
            fs::write(&path, bytes.strip_suffix(b"\n").unwrap()).unwrap();
        },
        files::EVENTS,
        "the last line is not terminated",
    );
    check_tamper(
        "truncated mid-line, newline kept",
        &out,
        rw,
        r,
        |dir| {
            edit_event_lines(dir, |l| {
                let half = l[3].len() / 2;
                l[3].truncate(half);
            })
        },
        &line_place(3, 3),
        "is not canonical JSON",
    );
    check_tamper(
        "cut after line 2",
        &out,
        rw,
        r,
        |dir| edit_event_lines(dir, |l| l.truncate(3)),
        files::EVENTS,
        &format!("holds 3 events but the manifest's range has {n}"),
    );
    check_tamper(
        "emptied",
        &out,
        rw,
        r,
        |dir| fs::write(dir.join(files::EVENTS), b"").unwrap(),
        files::EVENTS,
        &format!("holds 0 events but the manifest's range has {n}"),
    );
    check_tamper(
        "a lone newline",
        &out,
        rw,
        r,
        |dir| fs::write(dir.join(files::EVENTS), b"\n").unwrap(),
        &line_place(0, 0),
        "is not canonical JSON",
    );

    // The genuine next event of the log (the export's own record) appended.
    let next = log_events(&d, &a, n as u64, n as u64 + 1).await;
    let v: Value = serde_json::from_slice(&next[0]).unwrap();
    assert_eq!(v["type"], "export.created");
    check_tamper(
        "the next genuine event appended",
        &out,
        rw,
        r,
        |dir| edit_event_lines(dir, |l| l.push(next[0].clone())),
        &line_place(n, n as u64),
        "more events than the manifest's range",
    );
    check_tamper(
        "the next genuine event appended and the manifest's to extended",
        &out,
        rw,
        r,
        |dir| {
            edit_event_lines(dir, |l| l.push(next[0].clone()));
            edit_manifest(dir, |m| m.to += 1);
        },
        files::PROOFS,
        "range proof",
    );
    d.close().await;
}

/// A verification tells its progress after every chunk: the events checked so far, rising to
/// all of them.
#[tokio::test]
async fn verification_tells_its_progress() {
    let d = Deployment::open().await;
    let t = tenant(&d, "TPROGRESS", &["U1", "U2", "U3"]).await;
    let out = export_ok(&d, &t, 0, None, "progress").await;
    let told = std::sync::Mutex::new(Vec::new());
    let tell = |n| told.lock().unwrap().push(n);
    let v = bundle::verify_in_chunks(&out, None, None, 97, Some(&tell)).unwrap();
    let told = told.into_inner().unwrap();
    assert!(told.len() > 1, "one report per chunk: {told:?}");
    assert!(told.windows(2).all(|w| w[0] < w[1]), "{told:?}");
    assert_eq!(told.last().copied(), Some(v.events));
    d.close().await;
}

/// A listed file that is not a regular file (a device that never ends, a named pipe) is refused
/// before it is read, and a small file too large for any bundle is refused without being read
/// whole.
#[tokio::test]
async fn a_device_or_an_oversized_small_file_is_refused() {
    let d = Deployment::open().await;
    let t = tenant(&d, "TDEVICE", &["U1"]).await;
    let out = export_ok(&d, &t, 0, None, "device").await;
    for name in [files::EVENTS, files::README, files::PROOFS] {
        let (_scratch, dir) = copy_of(&out);
        fs::remove_file(dir.join(name)).unwrap();
        std::os::unix::fs::symlink("/dev/zero", dir.join(name)).unwrap();
        let err = bundle::verify(&dir, None, None).unwrap_err();
        assert_eq!(err.place, name, "{err}");
        assert!(err.why.contains("is not a regular file"), "{name}: {err}");
    }
    // A named pipe nobody writes to would block an ordinary open itself: it must be refused
    // unopened (checked on a thread, so that a regression fails here instead of hanging the
    // suite; a pipe swapped in after the look is a unit test of `open_regular`).
    for name in [files::EVENTS, files::CHECKPOINT] {
        let (scratch, dir) = copy_of(&out);
        fs::remove_file(dir.join(name)).unwrap();
        let made = std::process::Command::new("mkfifo")
            .arg(dir.join(name))
            .status()
            .unwrap();
        assert!(made.success());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _keep = scratch;
            let _ = tx.send(bundle::verify(&dir, None, None));
        });
        let err = rx
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("verify does not hang on a named pipe")
            .unwrap_err();
        assert_eq!(err.place, name, "{err}");
        assert!(err.why.contains("is not a regular file"), "{name}: {err}");
    }
    let (_scratch, dir) = copy_of(&out);
    fs::write(dir.join(files::PROOFS), vec![b' '; (16 << 20) + 1]).unwrap();
    rehash(&dir);
    let err = bundle::verify(&dir, None, None).unwrap_err();
    assert_eq!(err.place, files::PROOFS, "{err}");
    assert!(err.why.contains("is larger than 16777216 bytes"), "{err}");
    d.close().await;
}

/// A line longer than any event (a file without newlines, say) is refused once it passes the
/// limit, instead of being buffered whole; the hash check still comes first for a raw edit.
#[tokio::test]
async fn an_over_long_event_line_is_refused_without_buffering_it() {
    let d = Deployment::open().await;
    let t = tenant(&d, "TLONG", &["U1"]).await;
    let out = export_ok(&d, &t, 0, None, "long").await;
    let (_scratch, dir) = copy_of(&out);
    // 40 MiB after the first line, never a newline.
    let mut bytes = fs::read(dir.join(files::EVENTS)).unwrap();
    let first_end = bytes.iter().position(|b| *b == b'\n').unwrap() + 1;
    bytes.truncate(first_end);
    bytes.extend(std::iter::repeat_n(b'a', 40 << 20));
    fs::write(dir.join(files::EVENTS), &bytes).unwrap();
    let raw = bundle::verify(&dir, None, None).unwrap_err();
    assert_eq!(raw.place, files::EVENTS, "{raw}");
    assert!(raw.why.contains(HASH_DIFFERS), "{raw}");
    rehash(&dir);
    for chunk in [bundle::CHUNK_BYTES, 1 << 20] {
        let err = bundle::verify_in_chunks(&dir, None, None, chunk, None).unwrap_err();
        assert_eq!(err.place, files::EVENTS, "{err}");
        assert!(
            err.why.contains("line 2 is longer than 33554432 bytes"),
            "chunks of {chunk}: {err}"
        );
    }
    // One byte over the limit, newline and all, is refused the same at any chunk size (the end
    // may arrive in the block that crosses the limit, or after it).
    bytes.truncate(first_end);
    bytes.extend(std::iter::repeat_n(b'a', (32 << 20) + 1));
    bytes.push(b'\n');
    fs::write(dir.join(files::EVENTS), &bytes).unwrap();
    rehash(&dir);
    for chunk in [bundle::CHUNK_BYTES, 1 << 20, 3 << 20] {
        let err = bundle::verify_in_chunks(&dir, None, None, chunk, None).unwrap_err();
        assert!(
            err.why.contains("line 2 is longer than 33554432 bytes"),
            "terminated, chunks of {chunk}: {err}"
        );
    }
    d.close().await;
}

/// Spec (docs/AUDIT-FORMAT.md section 5 step 7): `events.jsonl` must hold exactly `to - from`
/// lines. A blank line after the last expected event is one line too many, and so is anything
/// after it (here a whole extra event): nothing in the file goes unchecked.
#[tokio::test]
async fn bytes_after_a_trailing_blank_line_are_rejected() {
    let d = Deployment::open().await;
    let a = tenant(&d, "T0A", &["U1"]).await;
    let out = export_ok(&d, &a, 0, None, "full").await;
    let n = event_lines(&out).len();
    let next = log_events(&d, &a, n as u64, n as u64 + 1).await;
    check_tamper(
        "a blank line, then an extra event",
        &out,
        Attacker::RewritesManifest,
        Reader::default(),
        |dir| edit_event_lines(dir, |l| l.extend([Vec::new(), next[0].clone()])),
        &line_place(n, n as u64),
        "more events than the manifest's range",
    );
    check_tamper(
        "a blank line appended",
        &out,
        Attacker::RewritesManifest,
        Reader::default(),
        |dir| edit_event_lines(dir, |l| l.push(Vec::new())),
        &line_place(n, n as u64),
        "more events than the manifest's range",
    );
    check_tamper(
        "a blank line before the last event",
        &out,
        Attacker::RewritesManifest,
        Reader::default(),
        |dir| edit_event_lines(dir, |l| l.insert(n - 1, Vec::new())),
        &line_place(n - 1, n as u64 - 1),
        "is not canonical JSON",
    );
    d.close().await;
}

/// Encodes `v` as docs/AUDIT-FORMAT.md section 1 specifies: members sorted by key at every
/// depth (or, with `reverse_at`, in reverse order in the objects at that depth, 0 being the top
/// level), no whitespace.
fn spec_encoding(v: &Value, reverse_at: Option<u32>) -> String {
    let inner = reverse_at.and_then(|d| d.checked_sub(1));
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            if reverse_at == Some(0) {
                keys.reverse();
            }
            let members: Vec<String> = keys
                .iter()
                .map(|k| {
                    let key = serde_json::to_string(k).unwrap();
                    format!("{key}:{}", spec_encoding(&map[k.as_str()], inner))
                })
                .collect();
            format!("{{{}}}", members.join(","))
        }
        Value::Array(items) => {
            let items: Vec<String> = items.iter().map(|i| spec_encoding(i, inner)).collect();
            format!("[{}]", items.join(","))
        }
        other => serde_json::to_string(other).unwrap(),
    }
}

/// Spec (docs/AUDIT-FORMAT.md, "Canonical encoding"): object members sorted by key, and a verifier
/// must reject leaf bytes that are not canonical. cedar-policy-core turns on serde_json's
/// `preserve_order` feature for the whole build, so the encoding must sort keys itself, and
/// `is_canonical` must refuse any other member order, at the top level or nested.
#[tokio::test]
async fn event_lines_use_the_specified_canonical_encoding() {
    let d = Deployment::open().await;
    let a = tenant(&d, "T0A", &["U1"]).await;
    let out = export_ok(&d, &a, 0, None, "full").await;
    let lines = event_lines(&out);
    for (i, line) in lines.iter().enumerate() {
        let v: Value = serde_json::from_slice(line).unwrap();
        assert_eq!(
            String::from_utf8(line.clone()).unwrap(),
            spec_encoding(&v, None),
            "line {i} is not in the specified canonical form"
        );
    }
    check_tamper(
        "members reordered",
        &out,
        Attacker::RewritesManifest,
        Reader::default(),
        |dir| {
            edit_event_lines(dir, |l| {
                let v: Value = serde_json::from_slice(&l[1]).unwrap();
                l[1] = spec_encoding(&v, Some(0)).into_bytes();
            })
        },
        &line_place(1, 1),
        "is not canonical JSON",
    );
    // The members of `data` reordered, the top level left sorted.
    let k = lines
        .iter()
        .position(|l| {
            let v: Value = serde_json::from_slice(l).unwrap();
            v["data"].as_object().is_some_and(|d| d.len() >= 2)
        })
        .expect("an event whose data has two members");
    check_tamper(
        "data members reordered",
        &out,
        Attacker::RewritesManifest,
        Reader::default(),
        |dir| {
            edit_event_lines(dir, |l| {
                let v: Value = serde_json::from_slice(&l[k]).unwrap();
                l[k] = spec_encoding(&v, Some(1)).into_bytes();
            })
        },
        &line_place(k, k as u64),
        "is not canonical JSON",
    );
    d.close().await;
}

/// One CSV row of an event, written from the rules of docs/AUDIT-FORMAT.md section 4 as stated
/// there, independently of `bundle::csv`:
/// - the columns seq, time, type, principal, principal_kind, initiator, run_id, correlation_id,
///   then data; each row ends in LF;
/// - a column's value: absent or null is empty, a string is itself (decoded), anything else is
///   its canonical encoding; `data` is its canonical encoding, `null` when absent;
/// - a value starting with = + - @ tab or CR gets a leading `'`; a value containing , " LF or CR
///   is quoted, the `'` inside the quotes, each `"` doubled.
fn spec_csv_row(event: &Value) -> String {
    let field = |value: String| {
        let defuse = match value.starts_with(['=', '+', '-', '@', '\t', '\r']) {
            true => "'",
            false => "",
        };
        match value.contains([',', '"', '\n', '\r']) {
            true => format!("\"{defuse}{}\"", value.replace('"', "\"\"")),
            false => format!("{defuse}{value}"),
        }
    };
    let columns = [
        "seq",
        "time",
        "type",
        "principal",
        "principal_kind",
        "initiator",
        "run_id",
        "correlation_id",
    ];
    let mut fields: Vec<String> = columns
        .iter()
        .map(|c| match event.get(*c) {
            None | Some(Value::Null) => field(String::new()),
            Some(Value::String(s)) => field(s.clone()),
            Some(other) => field(spec_encoding(other, None)),
        })
        .collect();
    fields.push(field(
        event
            .get("data")
            .map_or("null".to_owned(), |d| spec_encoding(d, None)),
    ));
    format!("{}\n", fields.join(","))
}

const SPEC_CSV_HEADER: &str =
    "seq,time,type,principal,principal_kind,initiator,run_id,correlation_id,data\n";

/// Spec (docs/AUDIT-FORMAT.md section 4, events.csv): the CSV is the header and one row per event
/// by the stated rules, both for the events an export writes and for values that exercise every
/// rule (formula starts, quoting, null, absent members, non-strings, escapes in `data`).
#[tokio::test]
async fn events_csv_follows_the_specified_rules() {
    let d = Deployment::open().await;
    let a = tenant(&d, "T0A", &["U1", "U2"]).await;
    let out = export_ok(&d, &a, 0, None, "full").await;
    let mut want = SPEC_CSV_HEADER.to_owned();
    for line in event_lines(&out) {
        want.push_str(&spec_csv_row(&serde_json::from_slice(&line).unwrap()));
    }
    assert_eq!(fs::read_to_string(out.join(files::CSV)).unwrap(), want);

    let base = serde_json::json!({
        "correlation_id": null,
        "data": {"note": "a \"b\""},
        "initiator": "user",
        "principal": "=cmd",
        "principal_kind": "user",
        "run_id": "01J",
        "seq": 7,
        "tenant": "t_x",
        "time": "2026-01-01T00:00:00.000000Z",
        "type": "settings.changed",
        "v": 1,
    });
    // The example of the document: its event (as `base`, but for the tenant) and its row.
    let doc =
        fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/AUDIT-FORMAT.md"))
            .unwrap();
    let example = &doc[doc
        .find("For example, the event `")
        .expect("the CSV example")..];
    let row = example
        .split("```text\n")
        .nth(1)
        .unwrap()
        .lines()
        .next()
        .unwrap();
    let leaf = spec_encoding(&base, None).into_bytes();
    assert!(
        example.starts_with(&format!(
            "For example, the event `{}`",
            String::from_utf8(leaf.clone())
                .unwrap()
                .replace("t_x", "t_…")
        )),
        "{}",
        &example[..200]
    );
    assert_eq!(
        bundle::csv(std::slice::from_ref(&leaf)),
        format!("{SPEC_CSV_HEADER}{row}\n")
    );
    assert_eq!(spec_csv_row(&base), format!("{row}\n"));
    let cases: Vec<(&str, Value)> = vec![
        ("+1", "+1".into()),
        ("-1", "-1".into()),
        ("@x", "@x".into()),
        ("tab first", "\t=1+1".into()),
        ("CR first", "\r=1+1".into()),
        ("tab inside", "a\tb".into()),
        ("comma", "a,b".into()),
        ("quote", "say \"hi\"".into()),
        ("LF", "two\nlines".into()),
        ("CR", "a\rb".into()),
        ("formula and comma", "=1,2".into()),
        ("non-ASCII", "caf\u{e9} \u{1F600}".into()),
        ("control", "\u{1}x".into()),
        ("empty", "".into()),
        ("null", Value::Null),
        ("number", 5.into()),
        ("negative number", (-5).into()),
        ("boolean", true.into()),
        ("object", serde_json::json!({"b": "=x", "a": [1, "y,z"]})),
    ];
    for (label, value) in cases {
        for column in ["principal", "initiator", "correlation_id"] {
            let mut v = base.clone();
            v[column] = value.clone();
            v["data"] = serde_json::json!({"text": value.clone(), "n": -1});
            let leaf = spec_encoding(&v, None).into_bytes();
            assert_eq!(
                bundle::csv(std::slice::from_ref(&leaf)),
                format!("{SPEC_CSV_HEADER}{}", spec_csv_row(&v)),
                "{label} in {column}"
            );
        }
    }
    for absent in ["run_id", "correlation_id", "data"] {
        let mut v = base.clone();
        v.as_object_mut().unwrap().remove(absent);
        let leaf = spec_encoding(&v, None).into_bytes();
        let csv = bundle::csv(std::slice::from_ref(&leaf));
        assert_eq!(
            csv,
            format!("{SPEC_CSV_HEADER}{}", spec_csv_row(&v)),
            "{absent} absent"
        );
    }
    d.close().await;
}

/// events.csv is a convenience copy, but a reader may open it instead of events.jsonl: it must be
/// exactly `bundle::csv` of the event lines, checked before the root.
#[tokio::test]
async fn an_altered_or_stale_events_csv_under_a_rewritten_manifest_is_caught() {
    let d = Deployment::open().await;
    let a = tenant(&d, "T0A", &["U1", "U2", "U3"]).await;
    let full = export_ok(&d, &a, 0, None, "full").await;
    let part = export_ok(&d, &a, 2, Some(5), "part").await;
    for out in [&full, &part] {
        assert_eq!(
            fs::read_to_string(out.join(files::CSV)).unwrap(),
            bundle::csv(&event_lines(out)),
            "the exporter writes the CSV the verifier expects"
        );
    }
    let n = event_lines(&full).len();
    // Only the CSV is edited: an attacker who rewrote it from events.jsonl would undo the edit.
    let kc = Attacker::RewritesManifestKeepsCsv;
    let r = Reader::default();
    let t = Reader {
        trusted: Some(&d.trusted),
        since: None,
    };
    let edit_csv = |dir: &Path, edit: &dyn Fn(&mut Vec<String>)| {
        let text = fs::read_to_string(dir.join(files::CSV)).unwrap();
        let mut rows: Vec<String> = text.lines().map(str::to_owned).collect();
        edit(&mut rows);
        let mut out = rows.join("\n");
        out.push('\n');
        fs::write(dir.join(files::CSV), out).unwrap();
    };
    // Row `k` (1-based after the header) holds seq `from + k - 1` in its first column.
    let bump_seq = |rows: &mut Vec<String>, k: usize, seq: u64| {
        let prefix = format!("{seq},");
        assert!(rows[k].starts_with(&prefix), "{:?}", rows[k]);
        rows[k] = format!("{},{}", seq + 100, &rows[k][prefix.len()..]);
    };

    for (label, pristine, from) in [("full", &full, 0u64), ("part", &part, 2)] {
        for reader in [r, t] {
            check_tamper(
                &format!("{label}: a CSV cell altered"),
                pristine,
                kc,
                reader,
                |dir| edit_csv(dir, &|rows| bump_seq(rows, 2, from + 1)),
                files::CSV,
                CSV_DIFFERS,
            );
        }
        check_tamper(
            &format!("{label}: a CSV row dropped"),
            pristine,
            kc,
            r,
            |dir| {
                edit_csv(dir, &|rows| {
                    rows.remove(1);
                })
            },
            files::CSV,
            CSV_DIFFERS,
        );
    }
    check_tamper(
        "the last CSV row duplicated",
        &full,
        kc,
        r,
        |dir| edit_csv(dir, &|rows| rows.push(rows[n].clone())),
        files::CSV,
        CSV_DIFFERS,
    );
    check_tamper(
        "the CSV header renamed",
        &full,
        kc,
        r,
        |dir| {
            edit_csv(dir, &|rows| {
                rows[0] = rows[0].replacen("seq", "sequence", 1)
            })
        },
        files::CSV,
        CSV_DIFFERS,
    );
    check_tamper(
        "the CSV with CRLF line ends",
        &full,
        kc,
        r,
        |dir| {
            let text = fs::read_to_string(dir.join(files::CSV)).unwrap();
            fs::write(dir.join(files::CSV), text.replace('\n', "\r\n")).unwrap();
        },
        files::CSV,
        CSV_DIFFERS,
    );
    check_tamper(
        "the CSV emptied",
        &full,
        kc,
        r,
        |dir| fs::write(dir.join(files::CSV), "").unwrap(),
        files::CSV,
        CSV_DIFFERS,
    );
    check_tamper(
        "the CSV not UTF-8",
        &full,
        kc,
        r,
        |dir| fs::write(dir.join(files::CSV), b"seq\xff\n").unwrap(),
        files::CSV,
        CSV_DIFFERS,
    );
    check_tamper(
        "the CSV deleted, still listed",
        &full,
        kc,
        r,
        |dir| fs::remove_file(dir.join(files::CSV)).unwrap(),
        files::CSV,
        "cannot be read",
    );
    // An event altered and the CSV left as exported: caught at the CSV, before the root.
    check_tamper(
        "an event altered, the CSV stale",
        &full,
        kc,
        r,
        |dir| edit_event_lines(dir, |l| flip_string(&mut l[1], "run_id")),
        files::CSV,
        CSV_DIFFERS,
    );
    // The same under the full attacker model: the CSV is regenerated, the root catches it.
    check_tamper(
        "an event altered, the CSV regenerated",
        &full,
        Attacker::RewritesManifest,
        r,
        |dir| edit_event_lines(dir, |l| flip_string(&mut l[1], "run_id")),
        files::EVENTS,
        ROOT_DIFFERS,
    );

    // The CSV is not optional: unlisted, removed or not, the bundle fails (were it optional, a
    // forged CSV left in the directory would go unchecked).
    for reader in [r, t] {
        check_tamper(
            "the CSV unlisted and removed",
            &full,
            kc,
            reader,
            |dir| {
                fs::remove_file(dir.join(files::CSV)).unwrap();
                edit_manifest(dir, |m| {
                    m.files.remove(files::CSV).unwrap();
                });
            },
            files::MANIFEST,
            "does not list events.csv",
        );
        check_tamper(
            "the CSV unlisted and forged",
            &full,
            kc,
            reader,
            |dir| {
                edit_csv(dir, &|rows| bump_seq(rows, 2, 1));
                edit_manifest(dir, |m| {
                    m.files.remove(files::CSV).unwrap();
                });
            },
            files::MANIFEST,
            "does not list events.csv",
        );
    }
    d.close().await;
}

/// The README a reader follows was covered only by the manifest's hash, which whoever rewrites the
/// bundle recomputes: it must be the writer's, byte for byte, and the format document holds the
/// same text, so that an independent verifier can compare it too.
#[tokio::test]
async fn the_readme_is_the_writers_byte_for_byte_and_the_documents() {
    let d = Deployment::open().await;
    let a = tenant(&d, "T0A", &["U1"]).await;
    let out = export_ok(&d, &a, 0, None, "full").await;
    let readme = fs::read_to_string(out.join(files::README)).unwrap();

    let doc =
        fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/AUDIT-FORMAT.md"))
            .unwrap();
    let after = &doc[doc
        .find("**README.txt** is exactly this text")
        .expect("the README section")..];
    let start = after.find("```text\n").expect("its text block") + "```text\n".len();
    let len = after[start..].find("\n```\n").expect("the block's end") + 1;
    assert_eq!(
        &after[start..start + len],
        readme,
        "docs/AUDIT-FORMAT.md section 4 holds the README the writer writes"
    );

    let attacker = attacker_key().verifier().to_vkey_text();
    for reader in [
        Reader::default(),
        Reader {
            trusted: Some(&d.trusted),
            since: None,
        },
    ] {
        check_tamper(
            "README rewritten to trust another key",
            &out,
            Attacker::RewritesManifest,
            reader,
            |dir| {
                let text = readme.replace(
                    "'<the deployment's verifier key>'",
                    &format!("'{attacker}'"),
                );
                fs::write(dir.join(files::README), text).unwrap();
            },
            files::README,
            "is not the README of agentgate-audit-bundle/1",
        );
    }
    check_tamper(
        "README with a line added",
        &out,
        Attacker::RewritesManifest,
        Reader::default(),
        |dir| fs::write(dir.join(files::README), format!("{readme}\n")).unwrap(),
        files::README,
        "is not the README",
    );
    d.close().await;
}

/// Spec (docs/AUDIT-FORMAT.md section 4 and section 5 step 1): a bundle of format 1 is exactly its
/// fixed set of files, `since-checkpoint.txt` among them exactly when `since_size` is set, and
/// the directory holds nothing else: nothing a reader may open goes unchecked.
#[tokio::test]
async fn a_bundle_is_exactly_its_file_set() {
    let d = Deployment::open().await;
    let a = tenant(&d, "T0A", &["U1", "U2"]).await;
    let (full, _, since) = exports_one_grant_apart(&d, &a, "full", "since").await;
    let r = Reader::default();
    let t = Reader {
        trusted: Some(&d.trusted),
        since: None,
    };
    let rw = Attacker::RewritesManifest;

    for name in [files::README, files::CSV, files::EVENTS, files::KEYRING] {
        check_tamper(
            &format!("{name} unlisted, left in place"),
            &full,
            rw,
            t,
            |dir| {
                edit_manifest(dir, |m| {
                    m.files.remove(name).unwrap();
                })
            },
            files::MANIFEST,
            &format!("does not list {name}"),
        );
    }
    // Something beside the bundle's files, under either attacker: named, whatever it is.
    for attacker in [Attacker::Raw, rw] {
        check_tamper(
            "an extra file",
            &full,
            attacker,
            t,
            |dir| fs::write(dir.join("notes.txt"), "trust this key instead").unwrap(),
            "notes.txt",
            "is in the bundle directory but not in the manifest",
        );
    }
    check_tamper(
        "an extra directory",
        &full,
        rw,
        r,
        |dir| fs::create_dir(dir.join("more")).unwrap(),
        "more",
        "is in the bundle directory but not in the manifest",
    );
    check_tamper(
        "a hidden file",
        &full,
        rw,
        r,
        |dir| fs::write(dir.join(".events.csv"), "x").unwrap(),
        ".events.csv",
        "is in the bundle directory but not in the manifest",
    );
    check_tamper(
        "an extra file, listed",
        &full,
        rw,
        r,
        |dir| {
            fs::write(dir.join("notes.txt"), "trust this key instead").unwrap();
            edit_manifest(dir, |m| {
                m.files.insert("notes.txt".into(), String::new());
            })
        },
        files::MANIFEST,
        "lists notes.txt, which is not a file of agentgate-audit-bundle/1",
    );

    // The earlier checkpoint: listed exactly when since_size is set.
    let ts = Reader {
        trusted: Some(&d.trusted),
        since: None,
    };
    check_tamper(
        "since-checkpoint.txt unlisted, since_size kept",
        &since,
        rw,
        ts,
        |dir| {
            edit_manifest(dir, |m| {
                m.files.remove(files::SINCE).unwrap();
            })
        },
        files::MANIFEST,
        "does not list since-checkpoint.txt",
    );
    check_tamper(
        "since-checkpoint.txt unlisted, since_size cleared, file kept",
        &since,
        rw,
        ts,
        |dir| {
            edit_manifest(dir, |m| {
                m.files.remove(files::SINCE).unwrap();
                m.since_size = None;
            })
        },
        files::SINCE,
        "is in the bundle directory but not in the manifest",
    );
    check_tamper(
        "since-checkpoint.txt removed, since_size cleared, the proof kept",
        &since,
        rw,
        ts,
        |dir| {
            fs::remove_file(dir.join(files::SINCE)).unwrap();
            edit_manifest(dir, |m| {
                m.files.remove(files::SINCE).unwrap();
                m.since_size = None;
            })
        },
        files::PROOFS,
        "has a consistency proof but the manifest has no since_size",
    );
    d.close().await;
}

// ---------------------------------------------------------------------------------------------
// 2b. The attacker also rewrites the manifest: checkpoint, keyring, manifest fields, proofs
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_swapped_or_edited_checkpoint_is_caught() {
    let d = Deployment::open().await;
    let a = tenant(&d, "T0A", &["U1", "U2"]).await;
    let b = tenant(&d, "T0B", &["U7"]).await;
    let repo = d.services.store.for_tenant(&a.ctx).unwrap();
    let older = d.services.audit.checkpoint_now(&a.ctx, repo).await.unwrap();
    grant(&d, &a, &["U3", "U4"]).await;
    let out = export_ok(&d, &a, 0, None, "a").await;
    let out_b = export_ok(&d, &b, 0, None, "b").await;
    let m = read_manifest(&out);
    let origin_a = d.services.audit.origin(&a.id);
    let (old, _) = open_checkpoint(&older, &ring_of(&d.trusted), &origin_a).unwrap();
    assert!(old.size < m.to, "the older checkpoint is smaller");
    let rw = Attacker::RewritesManifest;
    let r = Reader::default();
    let t = Reader {
        trusted: Some(&d.trusted),
        since: None,
    };

    let b_note = checkpoint_text(&out_b);
    for reader in [r, t] {
        check_tamper(
            "B's checkpoint",
            &out,
            rw,
            reader,
            |dir| fs::write(dir.join(files::CHECKPOINT), &b_note).unwrap(),
            files::CHECKPOINT,
            &format!(
                "does not verify: checkpoint origin {:?} differs from expected {origin_a:?}",
                d.services.audit.origin(&b.id)
            ),
        );
    }
    check_tamper(
        "an older checkpoint of the same tenant",
        &out,
        rw,
        r,
        |dir| fs::write(dir.join(files::CHECKPOINT), &older).unwrap(),
        files::CHECKPOINT,
        &format!(
            "signs size {} but the manifest says {}",
            old.size, m.tree_size
        ),
    );
    check_tamper(
        "an older checkpoint, tree_size rewritten to match",
        &out,
        rw,
        r,
        |dir| {
            fs::write(dir.join(files::CHECKPOINT), &older).unwrap();
            edit_manifest(dir, |m| m.tree_size = old.size);
        },
        files::MANIFEST,
        &format!(
            "range 0..{} is not within the checkpoint's {} events",
            m.to, old.size
        ),
    );
    let edit_body = |dir: &Path, from: &str, to: &str| {
        let note = checkpoint_text(dir);
        assert_eq!(note.matches(from).count(), 1, "{from:?} in {note:?}");
        fs::write(dir.join(files::CHECKPOINT), note.replacen(from, to, 1)).unwrap();
    };
    let size_line = format!("\n{}\n", m.tree_size);
    check_tamper(
        "the signed size edited",
        &out,
        rw,
        r,
        |dir| edit_body(dir, &size_line, &format!("\n{}\n", m.tree_size + 1)),
        files::CHECKPOINT,
        "invalid signature from known key",
    );
    check_tamper(
        "the signed origin edited",
        &out,
        rw,
        r,
        |dir| edit_body(dir, &format!("{origin_a}\n"), "agentgate/evil\n"),
        files::CHECKPOINT,
        "invalid signature from known key",
    );
    check_tamper(
        "the signature removed",
        &out,
        rw,
        r,
        |dir| {
            let note = checkpoint_text(dir);
            let body = &note[..note.find("\n\n").unwrap() + 2];
            fs::write(dir.join(files::CHECKPOINT), body).unwrap();
        },
        files::CHECKPOINT,
        "does not verify",
    );
    check_tamper(
        "the checkpoint emptied",
        &out,
        rw,
        r,
        |dir| fs::write(dir.join(files::CHECKPOINT), "").unwrap(),
        files::CHECKPOINT,
        "does not verify",
    );
    d.close().await;
}

/// The bundle's own keyring proves only that the bundle is internally consistent: whoever rewrites
/// it can re-sign anything. This is why `verify --trusted-key` exists.
#[tokio::test]
async fn an_attacker_keyring_passes_alone_and_fails_under_the_trusted_key() {
    let d = Deployment::open().await;
    let a = tenant(&d, "T0A", &["U1", "U2", "U3"]).await;
    let out = export_ok(&d, &a, 0, None, "full").await;
    let m = read_manifest(&out);
    let attacker = attacker_key();
    let attacker_ring = keyring_text(&ring_of(&attacker.verifier()));
    let rw = Attacker::RewritesManifest;
    let t = Reader {
        trusted: Some(&d.trusted),
        since: None,
    };
    let resign = |dir: &Path| {
        let note = checkpoint_text(dir);
        let body = parse_signed_note(&note).unwrap().text;
        let cp = Checkpoint::parse_body(&body).unwrap();
        let forged = sign_checkpoint(&cp, &[&attacker]).unwrap();
        assert_ne!(forged, note);
        fs::write(dir.join(files::CHECKPOINT), forged).unwrap();
    };

    // Re-signed by a key the bundle's keyring does not hold: fails even without a trusted key.
    check_tamper(
        "re-signed, keyring kept",
        &out,
        rw,
        Reader::default(),
        resign,
        files::CHECKPOINT,
        "no signature from a known key",
    );
    // A keyring that does not parse.
    check_tamper(
        "keyring garbage",
        &out,
        rw,
        Reader::default(),
        |dir| fs::write(dir.join(files::KEYRING), "not a key\n").unwrap(),
        files::KEYRING,
        "keyring.txt line 1",
    );

    // Keyring replaced and the same body re-signed: the events still match the root.
    let swap_keys = |dir: &Path| {
        fs::write(dir.join(files::KEYRING), &attacker_ring).unwrap();
        resign(dir);
    };
    let (_s, forged) = tampered("attacker keyring", &out, rw, swap_keys);
    let v = verify(&forged, None, None).expect("the bundle's own keyring cannot tell");
    assert_eq!(v.signed_by, [attacker.verifier().to_vkey_text()]);
    assert_eq!(v.events, m.to);
    assert!(!v.trusted_key);
    check_tamper(
        "attacker keyring, trusted key",
        &out,
        rw,
        t,
        swap_keys,
        files::CHECKPOINT,
        "does not verify: checkpoint note: no signature from a known key",
    );

    // Worse: an altered event, a checkpoint over the attacker's own root, no range proof needed,
    // and (in `forge`) an events.csv that tells the same forged story.
    let forge_keeping_csv = |dir: &Path| {
        let mut lines = event_lines(dir);
        let mut v: Value = serde_json::from_slice(&lines[3]).unwrap();
        assert_eq!(v["type"], "role.granted");
        v["data"]["role"] = "owner".into();
        lines[3] = serde_json::to_vec(&v).unwrap();
        write_event_lines(dir, &lines);
        let mut cp = Checkpoint::new(m.origin.clone(), lines.len() as u64, root_of(&lines));
        cp.extensions
            .push("time 2000-01-01T00:00:00.000000Z".into());
        fs::write(
            dir.join(files::CHECKPOINT),
            sign_checkpoint(&cp, &[&attacker]).unwrap(),
        )
        .unwrap();
        fs::write(dir.join(files::KEYRING), &attacker_ring).unwrap();
        edit_manifest(dir, |m| m.tree_size = m.to);
        edit_proofs(dir, |p| p.range_proof.clear());
    };
    let forge = |dir: &Path| {
        forge_keeping_csv(dir);
        fs::write(dir.join(files::CSV), bundle::csv(&event_lines(dir))).unwrap();
    };
    let (_s, forged) = tampered("forged history", &out, rw, forge);
    let v = verify(&forged, None, None).expect("a self-consistent forgery");
    assert_eq!(v.signed_by, [attacker.verifier().to_vkey_text()]);
    assert_eq!(v.events, m.to);
    let line: Value = serde_json::from_slice(&event_lines(&forged)[3]).unwrap();
    assert_eq!(line["data"]["role"], "owner", "the forged event verified");
    let forged_csv = fs::read_to_string(forged.join(files::CSV)).unwrap();
    assert_ne!(
        forged_csv,
        fs::read_to_string(out.join(files::CSV)).unwrap(),
        "the forged CSV tells the forged story"
    );
    assert!(forged_csv.contains("owner"), "{forged_csv}");
    // The same forgery with the CSV left as exported: the CSV no longer matches the events.
    check_tamper(
        "forged history, CSV left stale",
        &out,
        Attacker::RewritesManifestKeepsCsv,
        Reader::default(),
        forge_keeping_csv,
        files::CSV,
        CSV_DIFFERS,
    );
    check_tamper(
        "forged history, trusted key",
        &out,
        rw,
        t,
        forge,
        files::CHECKPOINT,
        "no signature from a known key",
    );
    // The same forgery signed with the real key's name but another key: still refused.
    let impostor = SigningKey::generate(d.trusted.name()).unwrap();
    check_tamper(
        "impostor under the real key's name, trusted key",
        &out,
        rw,
        t,
        |dir| {
            let note = checkpoint_text(dir);
            let cp = Checkpoint::parse_body(&parse_signed_note(&note).unwrap().text).unwrap();
            fs::write(
                dir.join(files::CHECKPOINT),
                sign_checkpoint(&cp, &[&impostor]).unwrap(),
            )
            .unwrap();
        },
        files::CHECKPOINT,
        "does not verify",
    );
    d.close().await;
}

/// A bundle from an untrusted source must fail, not crash the verifier: here a self-signed
/// checkpoint claims an enormous tree and the manifest an enormous range.
#[tokio::test]
async fn an_enormous_claimed_range_fails_without_panicking() {
    let d = Deployment::open().await;
    let a = tenant(&d, "T0A", &[]).await;
    let out = export_ok(&d, &a, 0, None, "full").await;
    let m = read_manifest(&out);
    let attacker = attacker_key();
    let huge = 1u64 << 62;
    let (_s, forged) = tampered("huge", &out, Attacker::RewritesManifest, |dir| {
        let cp = Checkpoint::new(m.origin.clone(), huge, [7; 32]);
        fs::write(
            dir.join(files::CHECKPOINT),
            sign_checkpoint(&cp, &[&attacker]).unwrap(),
        )
        .unwrap();
        fs::write(
            dir.join(files::KEYRING),
            keyring_text(&ring_of(&attacker.verifier())),
        )
        .unwrap();
        edit_manifest(dir, |m| {
            m.tree_size = huge;
            m.to = huge;
        });
    });
    let outcome = std::panic::catch_unwind(|| verify(&forged, None, None));
    let err = outcome
        .expect("verify must not panic on a hostile bundle")
        .expect_err("the bundle holds far fewer events than it claims");
    assert_eq!(err.place, files::EVENTS, "{err}");
    assert_eq!(
        err.why,
        format!("holds {} events but the manifest's range has {huge}", m.to),
        "{err}"
    );
    d.close().await;
}

#[tokio::test]
async fn edited_manifest_fields_and_proofs_are_caught() {
    let d = Deployment::open().await;
    let a = tenant(&d, "T0A", &["U1", "U2", "U3", "U4"]).await;
    let b = tenant(&d, "T0B", &["U7"]).await;
    let full = export_ok(&d, &a, 0, None, "full").await;
    let part = export_ok(&d, &a, 2, Some(5), "part").await;
    let mf = read_manifest(&full);
    let mp = read_manifest(&part);
    assert_eq!((mp.from, mp.to), (2, 5));
    let rw = Attacker::RewritesManifest;
    let r = Reader::default();
    let origin_b = d.services.audit.origin(&b.id);

    check_tamper(
        "from + 1",
        &full,
        rw,
        r,
        |dir| edit_manifest(dir, |m| m.from += 1),
        &line_place(0, 1),
        "has seq 0",
    );
    check_tamper(
        "from - 1 (sub-range)",
        &part,
        rw,
        r,
        |dir| edit_manifest(dir, |m| m.from -= 1),
        &line_place(0, 1),
        "has seq 2",
    );
    check_tamper(
        "from = to",
        &full,
        rw,
        r,
        |dir| edit_manifest(dir, |m| m.from = m.to),
        files::MANIFEST,
        "is not within the checkpoint's",
    );
    check_tamper(
        "to - 1",
        &full,
        rw,
        r,
        |dir| edit_manifest(dir, |m| m.to -= 1),
        &line_place(mf.to as usize - 1, mf.to - 1),
        "more events than the manifest's range",
    );
    check_tamper(
        "to + 1 (sub-range, still within the tree)",
        &part,
        rw,
        r,
        |dir| edit_manifest(dir, |m| m.to += 1),
        files::EVENTS,
        "holds 3 events but the manifest's range has 4",
    );
    check_tamper(
        "to beyond the tree",
        &full,
        rw,
        r,
        |dir| edit_manifest(dir, |m| m.to = m.tree_size + 1),
        files::MANIFEST,
        &format!(
            "range 0..{} is not within the checkpoint's {} events",
            mf.tree_size + 1,
            mf.tree_size
        ),
    );
    check_tamper(
        "tenant B",
        &full,
        rw,
        r,
        |dir| edit_manifest(dir, |m| m.tenant = b.id.to_string()),
        files::MANIFEST,
        "the origin does not name the tenant",
    );
    check_tamper(
        "tenant and origin B",
        &full,
        rw,
        r,
        |dir| {
            edit_manifest(dir, |m| {
                m.tenant = b.id.to_string();
                m.origin = origin_b.clone();
            })
        },
        files::CHECKPOINT,
        "differs from expected",
    );
    check_tamper(
        "origin under another prefix",
        &full,
        rw,
        r,
        |dir| edit_manifest(dir, |m| m.origin = format!("evil/{}", m.tenant)),
        files::CHECKPOINT,
        "differs from expected",
    );
    check_tamper(
        "tree_size + 1",
        &full,
        rw,
        r,
        |dir| edit_manifest(dir, |m| m.tree_size += 1),
        files::CHECKPOINT,
        &format!(
            "signs size {} but the manifest says {}",
            mf.tree_size,
            mf.tree_size + 1
        ),
    );
    check_tamper(
        "tree_size - 1",
        &part,
        rw,
        r,
        |dir| edit_manifest(dir, |m| m.tree_size -= 1),
        files::CHECKPOINT,
        "signs size",
    );

    // proofs.json
    for (label, pristine) in [("full", &full), ("part", &part)] {
        let len = read_proofs(pristine).range_proof.len();
        assert!(len >= 1, "{label}: a proof with entries");
        for i in 0..len {
            check_tamper(
                &format!("{label}: proof entry {i} deleted"),
                pristine,
                rw,
                r,
                |dir| {
                    edit_proofs(dir, |p| {
                        p.range_proof.remove(i);
                    })
                },
                files::PROOFS,
                &format!("range proof: proof has {} hashes, want", len - 1),
            );
            check_tamper(
                &format!("{label}: proof entry {i} altered"),
                pristine,
                rw,
                r,
                |dir| {
                    edit_proofs(dir, |p| {
                        let mut h = hex::decode(&p.range_proof[i]).unwrap();
                        h[0] ^= 0x80;
                        p.range_proof[i] = hex::encode(h);
                    })
                },
                files::EVENTS,
                ROOT_DIFFERS,
            );
        }
        check_tamper(
            &format!("{label}: proof entry added"),
            pristine,
            rw,
            r,
            |dir| edit_proofs(dir, |p| p.range_proof.push(sha256_hex(b"extra"))),
            files::PROOFS,
            &format!("range proof: proof has {} hashes, want {len}", len + 1),
        );
        check_tamper(
            &format!("{label}: proof entry not a hash"),
            pristine,
            rw,
            r,
            |dir| edit_proofs(dir, |p| p.range_proof[0] = "abcd".into()),
            files::PROOFS,
            "entry 0 is not a 32-byte hex hash",
        );
    }
    check_tamper(
        "proofs.json not JSON",
        &full,
        rw,
        r,
        |dir| fs::write(dir.join(files::PROOFS), "[]").unwrap(),
        files::PROOFS,
        "does not parse",
    );
    check_tamper(
        "the manifest claims a since-checkpoint that is not there",
        &full,
        rw,
        r,
        |dir| {
            edit_manifest(dir, |m| {
                m.files.insert(files::SINCE.into(), sha256_hex(b""));
                m.since_size = Some(1);
            })
        },
        files::SINCE,
        "cannot be read",
    );
    check_tamper(
        "the manifest lists a since-checkpoint without since_size",
        &full,
        rw,
        r,
        |dir| {
            fs::write(dir.join(files::SINCE), checkpoint_text(dir)).unwrap();
            edit_manifest(dir, |m| {
                m.files.insert(files::SINCE.into(), String::new());
            })
        },
        files::MANIFEST,
        "lists since-checkpoint.txt but has no since_size",
    );
    d.close().await;
}

// ---------------------------------------------------------------------------------------------
// 3. Cross-tenant
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn tenants_bundles_share_nothing_and_do_not_mix() {
    let d = Deployment::open().await;
    let a = tenant(&d, "T0A", &["U1", "U2", "U3"]).await;
    let b = tenant(&d, "T0B", &["U7", "U8"]).await;
    let out_a = export_ok(&d, &a, 0, None, "a").await;
    let out_b = export_ok(&d, &b, 0, None, "b").await;
    let (ma, mb) = (read_manifest(&out_a), read_manifest(&out_b));
    let origin_a = d.services.audit.origin(&a.id);

    for (out, me, other) in [(&out_a, &a, &b), (&out_b, &b, &a)] {
        let lines = event_lines(out);
        assert!(!lines.is_empty());
        for l in &lines {
            let v: Value = serde_json::from_slice(l).unwrap();
            assert_eq!(v["tenant"], me.id.as_str());
        }
        for (name, bytes) in snapshot(out) {
            let needle = other.id.as_str().as_bytes();
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle),
                "{name} of {} mentions {}",
                me.id,
                other.id
            );
        }
        let needle = me.id.as_str().as_bytes();
        let events = fs::read(out.join(files::EVENTS)).unwrap();
        assert!(events.windows(needle.len()).any(|w| w == needle));
    }

    let rw = Attacker::RewritesManifest;
    let r = Reader::default();
    let t = Reader {
        trusted: Some(&d.trusted),
        since: None,
    };
    let b_note = checkpoint_text(&out_b);
    check_tamper(
        "A's bundle with B's checkpoint",
        &out_a,
        rw,
        t,
        |dir| fs::write(dir.join(files::CHECKPOINT), &b_note).unwrap(),
        files::CHECKPOINT,
        &format!("differs from expected {origin_a:?}"),
    );
    check_tamper(
        "A's events under B's checkpoint, proofs and manifest",
        &out_a,
        rw,
        t,
        |dir| {
            for f in [files::CHECKPOINT, files::PROOFS] {
                fs::copy(out_b.join(f), dir.join(f)).unwrap();
            }
            edit_manifest(dir, |m| {
                m.tenant = mb.tenant.clone();
                m.origin = mb.origin.clone();
                m.tree_size = mb.tree_size;
                m.to = ma.to.min(mb.to);
            });
            edit_event_lines(dir, |l| l.truncate(ma.to.min(mb.to) as usize));
        },
        &line_place(0, 0),
        &format!("belongs to tenant \"{}\"", a.id),
    );
    check_tamper(
        "B's events in A's bundle",
        &out_a,
        rw,
        t,
        |dir| {
            fs::copy(out_b.join(files::EVENTS), dir.join(files::EVENTS)).unwrap();
        },
        &line_place(0, 0),
        &format!("belongs to tenant \"{}\"", b.id),
    );
    for k in 0..mb.to as usize {
        check_tamper(
            &format!("B's event {k} in place of A's"),
            &out_a,
            rw,
            r,
            |dir| {
                let theirs = event_lines(&out_b);
                edit_event_lines(dir, |l| l[k] = theirs[k].clone());
            },
            &line_place(k, k as u64),
            &format!("belongs to tenant \"{}\"", b.id),
        );
    }
    check_tamper(
        "B's events relabelled as A's",
        &out_a,
        rw,
        t,
        |dir| {
            let theirs = event_lines(&out_b);
            edit_event_lines(dir, |l| {
                for (k, line) in theirs.iter().enumerate() {
                    let text = String::from_utf8(line.clone()).unwrap();
                    l[k] = text.replace(b.id.as_str(), a.id.as_str()).into_bytes();
                }
            });
        },
        files::EVENTS,
        ROOT_DIFFERS,
    );

    // An export of A cannot start from B's checkpoint.
    let err = export(&d, &a, 0, None, Some(&b_note), &d.bundle_path("a-since-b"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, AuditError::Export(why) if why.contains("not this log's")),
        "{err}"
    );
    assert!(!d.bundle_path("a-since-b").exists());
    d.close().await;
}

// ---------------------------------------------------------------------------------------------
// 4. Sub-ranges
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn sub_range_exports_verify_and_out_of_range_is_an_export_error() {
    let d = Deployment::open().await;
    let a = tenant(&d, "T0A", &["U1", "U2", "U3", "U4", "U5"]).await;
    let n = log_size(&d, &a).await;
    assert_eq!(n, 8);

    // (from, to) with `None` for "to the end"; each export adds two events to the log.
    let ranges: [(u64, Option<u64>); 8] = [
        (0, Some(1)),
        (n - 1, Some(n)),
        (3, Some(4)),
        (1, Some(n - 1)),
        (2, Some(6)),
        (0, Some(n)),
        (5, None),
        (0, None),
    ];
    for (i, (from, to)) in ranges.into_iter().enumerate() {
        let size = log_size(&d, &a).await;
        let out = export_ok(&d, &a, from, to, &format!("range-{i}")).await;
        let to = to.unwrap_or(size);
        let m = read_manifest(&out);
        assert_eq!(
            (m.from, m.to, m.tree_size),
            (from, to, size + 1),
            "range {i}"
        );
        let v = verify(&out, Some(&d.trusted), None).unwrap();
        assert_eq!(v.range, (from, to));
        assert_eq!(v.events, to - from);
        assert_eq!(event_lines(&out), log_events(&d, &a, from, to).await);
        let csv = fs::read_to_string(out.join(files::CSV)).unwrap();
        assert_eq!(csv.lines().count() as u64, 1 + to - from, "header + rows");
    }

    // The very last event of the log as it stands (a checkpoint.signed record).
    let size = log_size(&d, &a).await;
    let out = export_ok(&d, &a, size - 1, None, "last").await;
    let lines = event_lines(&out);
    assert_eq!(lines.len(), 1);
    let v: Value = serde_json::from_slice(&lines[0]).unwrap();
    assert_eq!(v["type"], "checkpoint.signed");
    assert_eq!(v["seq"], size - 1);
    let rw = Attacker::RewritesManifest;
    check_tamper(
        "single-event bundle: event altered",
        &out,
        rw,
        Reader::default(),
        |dir| edit_event_lines(dir, |l| flip_string(&mut l[0], "run_id")),
        files::EVENTS,
        ROOT_DIFFERS,
    );
    check_tamper(
        "single-event bundle: moved one back",
        &out,
        rw,
        Reader::default(),
        |dir| {
            edit_manifest(dir, |m| {
                m.from -= 1;
                m.to -= 1;
            })
        },
        &line_place(0, size - 2),
        &format!("has seq {}", size - 1),
    );

    // Ranges the log cannot give: an Export error, nothing written, nothing recorded.
    let size = log_size(&d, &a).await;
    let bad: [(u64, Option<u64>); 6] = [
        (0, Some(size + 1)),
        (size - 1, Some(size + 5)),
        (size, None),
        (size + 3, None),
        (3, Some(3)),
        (4, Some(2)),
    ];
    for (i, (from, to)) in bad.into_iter().enumerate() {
        let out = d.bundle_path(&format!("bad-{i}"));
        let err = export(&d, &a, from, to, None, &out).await.unwrap_err();
        assert!(
            matches!(&err, AuditError::Export(why) if why.contains("is not within the log's")),
            "{from}..{to:?}: {err}"
        );
        assert!(!out.exists(), "{from}..{to:?}: nothing written");
    }
    assert_eq!(
        log_size(&d, &a).await,
        size,
        "a refused export is not recorded"
    );
    d.close().await;
}

// ---------------------------------------------------------------------------------------------
// 5. Since-checkpoint
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn an_export_since_an_earlier_checkpoint_proves_the_log_only_grew() {
    let d = Deployment::open().await;
    let a = tenant(&d, "T0A", &["U1", "U2"]).await;
    let b = tenant(&d, "T0B", &["U7"]).await;
    let out1 = export_ok(&d, &a, 0, None, "one").await;
    let cp1 = checkpoint_text(&out1);
    let size1 = read_manifest(&out1).tree_size;
    let cp_b = checkpoint_text(&export_ok(&d, &b, 0, None, "b").await);

    grant(&d, &a, &["U3", "U4", "U5"]).await;
    let repo = d.services.store.for_tenant(&a.ctx).unwrap();
    let cp_mid = d.services.audit.checkpoint_now(&a.ctx, repo).await.unwrap();
    grant(&d, &a, &["U6"]).await;

    let out2 = d.bundle_path("two");
    let m2 = export(&d, &a, 0, None, Some(&cp1), &out2).await.unwrap();
    assert_eq!(m2.since_size, Some(size1));
    assert!(m2.tree_size > size1);
    assert!(m2.files.contains_key(files::SINCE));
    assert_eq!(fs::read_to_string(out2.join(files::SINCE)).unwrap(), cp1);
    assert!(read_proofs(&out2).consistency_proof.is_some());
    assert!(read_proofs(&out1).consistency_proof.is_none());

    let t = Reader {
        trusted: Some(&d.trusted),
        since: Some(&cp1),
    };
    let v = verify(&out2, t.trusted, t.since).unwrap();
    assert_eq!(v.consistent_since, Some(size1));
    assert_eq!(v.events, m2.to);
    let v = verify(&out2, None, Some(&cp1)).unwrap();
    assert_eq!(v.consistent_since, Some(size1));
    let v = verify(&out2, None, None).unwrap();
    assert_eq!(
        v.consistent_since,
        Some(size1),
        "the bundled since-checkpoint"
    );
    let v = verify(&out1, None, None).unwrap();
    assert_eq!(v.consistent_since, None);

    // The reader's earlier checkpoint is another tenant's, edited, or not the one proved from.
    let err = verify(&out2, Some(&d.trusted), Some(&cp_b)).unwrap_err();
    assert_eq!(err.place, "since-checkpoint", "{err}");
    assert!(err.why.contains("differs from expected"), "{err}");
    let size_line = format!("\n{size1}\n");
    assert_eq!(cp1.matches(&size_line).count(), 1);
    for edited in [
        cp1.replacen(&size_line, &format!("\n{}\n", size1 - 1), 1),
        cp1.replacen(&size_line, &format!("\n{}\n", size1 + 1), 1),
    ] {
        let err = verify(&out2, Some(&d.trusted), Some(&edited)).unwrap_err();
        assert_eq!(err.place, "since-checkpoint", "{err}");
        assert!(
            err.why.contains("invalid signature from known key"),
            "{err}"
        );
    }
    let err = verify(&out2, Some(&d.trusted), Some(&cp_mid)).unwrap_err();
    assert_eq!(err.place, files::PROOFS, "{err}");
    assert!(
        err.why.contains(&format!("starts at Some({size1})")),
        "{err}"
    );
    let err = verify(&out1, Some(&d.trusted), Some(&cp1)).unwrap_err();
    assert_eq!(err.place, files::PROOFS, "{err}");
    assert!(err.why.contains("no consistency proof"), "{err}");

    // Under a rewritten manifest: the consistency proof and since_size.
    let rw = Attacker::RewritesManifest;
    let n_proof = read_proofs(&out2).consistency_proof.unwrap().len();
    assert!(n_proof >= 1);
    for i in 0..n_proof {
        check_tamper(
            &format!("consistency entry {i} altered"),
            &out2,
            rw,
            t,
            |dir| {
                edit_proofs(dir, |p| {
                    let c = p.consistency_proof.as_mut().unwrap();
                    let mut h = hex::decode(&c[i]).unwrap();
                    h[31] ^= 1;
                    c[i] = hex::encode(h);
                })
            },
            files::PROOFS,
            "the log is not an extension of the earlier checkpoint",
        );
    }
    check_tamper(
        "consistency proof removed",
        &out2,
        rw,
        t,
        |dir| edit_proofs(dir, |p| p.consistency_proof = None),
        files::PROOFS,
        "no consistency proof",
    );
    check_tamper(
        "since_size edited",
        &out2,
        rw,
        t,
        |dir| edit_manifest(dir, |m| m.since_size = Some(size1 + 1)),
        files::PROOFS,
        "starts at",
    );
    check_tamper(
        "bundled since-checkpoint swapped for B's",
        &out2,
        rw,
        Reader::default(),
        |dir| fs::write(dir.join(files::SINCE), &cp_b).unwrap(),
        "since-checkpoint",
        "differs from expected",
    );

    // The exporter refuses an earlier checkpoint that is not this log's.
    for (label, note) in [
        ("B's", cp_b.clone()),
        ("edited", cp1.replacen(&size_line, "\n1\n", 1)),
    ] {
        let out = d.bundle_path(&format!("since-{label}"));
        let err = export(&d, &a, 0, None, Some(&note), &out)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, AuditError::Export(why) if why.contains("not this log's")),
            "{label}: {err}"
        );
        assert!(!out.exists());
    }
    d.close().await;
}

/// Without `--trusted-key`, the keys are the bundle's own keyring, to which whoever rewrites the
/// bundle can add a key: the reader's earlier checkpoint is then the trust anchor, and the new
/// checkpoint must be signed by a key that signed it.
#[tokio::test]
async fn without_a_trusted_key_the_readers_checkpoint_anchors_the_keys() {
    let d = Deployment::open().await;
    let a = tenant(&d, "T0A", &["U1", "U2"]).await;
    let (out1, cp1, out2) = exports_one_grant_apart(&d, &a, "one", "two").await;
    let attacker = attacker_key();
    let both = Keyring::from_keys([d.trusted.clone(), attacker.verifier()]).unwrap();
    // The new checkpoint's body (consistent with the reader's), signed by the added key alone,
    // or by it and the real one.
    let resign = |dir: &Path, keys: &[&SigningKey]| {
        let note = checkpoint_text(dir);
        let cp = Checkpoint::parse_body(&parse_signed_note(&note).unwrap().text).unwrap();
        fs::write(
            dir.join(files::CHECKPOINT),
            sign_checkpoint(&cp, keys).unwrap(),
        )
        .unwrap();
        fs::write(dir.join(files::KEYRING), keyring_text(&both)).unwrap();
    };
    let reader = Reader {
        trusted: None,
        since: Some(&cp1),
    };
    let err = check_tamper(
        "the checkpoint signed by an added key",
        &out2,
        Attacker::RewritesManifest,
        reader,
        |dir| resign(dir, &[&attacker]),
        files::CHECKPOINT,
        "no key signed both; after a key rotation, name the new key with --trusted-key",
    );
    assert!(
        err.why.starts_with(&format!(
            "is signed by {}, and your earlier checkpoint by {}",
            attacker.verifier().to_vkey_text(),
            d.trusted.to_vkey_text()
        )),
        "{err}"
    );
    // Without the reader's checkpoint there is no anchor: the bundle's keyring alone, as the
    // verified line's note says.
    let (_s, forged) = tampered("added key", &out2, Attacker::RewritesManifest, |dir| {
        resign(dir, &[&attacker])
    });
    let v = verify(&forged, None, None).expect("the bundle's own keys and checkpoint");
    assert_eq!(v.signed_by, [attacker.verifier().to_vkey_text()]);
    // Signed by the real key too: it signed both, so it passes.
    let real = SigningKey::from_skey_text(
        fs::read_to_string(d.dir.path().join("audit").join("signing.key"))
            .unwrap()
            .trim(),
    )
    .unwrap();
    let (_s, cosigned) = tampered("co-signed", &out2, Attacker::RewritesManifest, |dir| {
        resign(dir, &[&attacker, &real])
    });
    let v = verify(&cosigned, None, Some(&cp1)).expect("a key signed both");
    assert_eq!(v.consistent_since, Some(read_manifest(&out1).tree_size));
    d.close().await;
}

/// After a key rotation, the reader's earlier checkpoint (old key) cannot anchor the new one (new
/// key) without a trusted key: that is refused, saying so; with the new key as `--trusted-key`
/// the bundle proves continuity from the reader's checkpoint, whichever key signed it.
#[tokio::test]
async fn after_a_key_rotation_the_new_trusted_key_verifies_continuity() {
    let dir = tempfile::tempdir().unwrap();
    let old_key = SigningKey::generate("ops-old").unwrap();
    let new_key = SigningKey::generate("ops-new").unwrap();
    let open = |k: &SigningKey| {
        Services::open(
            dir.path(),
            Some(&SecretString::from("42".repeat(32))),
            &AuditOptions {
                signing_key: Some(k.to_skey_text().into()),
                ..AuditOptions::default()
            },
        )
        .unwrap()
    };
    let services = open(&old_key);
    let d = Deployment {
        dir: tempfile::tempdir().unwrap(),
        services,
        trusted: old_key.verifier(),
    };
    let a = tenant(&d, "T0A", &["U1"]).await;
    let out1 = export_ok(&d, &a, 0, None, "one").await;
    let cp1 = checkpoint_text(&out1);
    let size1 = read_manifest(&out1).tree_size;
    // Its bundles go with it; the reader keeps the checkpoint.
    d.close().await;
    let d = Deployment {
        dir: tempfile::tempdir().unwrap(),
        services: open(&new_key),
        trusted: new_key.verifier(),
    };
    grant(&d, &a, &["U2"]).await;
    let out2 = d.bundle_path("two");
    export(&d, &a, 0, None, Some(&cp1), &out2).await.unwrap();

    let err = verify(&out2, None, Some(&cp1)).unwrap_err();
    assert_eq!(err.place, files::CHECKPOINT, "{err}");
    assert_eq!(
        err.why,
        format!(
            "is signed by {}, and your earlier checkpoint by {}: no key signed both; \
             after a key rotation, name the new key with --trusted-key",
            new_key.verifier().to_vkey_text(),
            old_key.verifier().to_vkey_text()
        )
    );
    let v = verify(&out2, Some(&new_key.verifier()), Some(&cp1)).unwrap();
    assert_eq!(v.consistent_since, Some(size1));
    assert_eq!(v.signed_by, [new_key.verifier().to_vkey_text()]);
    let err = verify(&out2, Some(&old_key.verifier()), Some(&cp1)).unwrap_err();
    assert_eq!(
        err.place,
        files::CHECKPOINT,
        "the old key did not sign it: {err}"
    );
    // The bundled earlier checkpoint is checked under the trusted key, like the new one.
    let err = verify(&out2, Some(&new_key.verifier()), None).unwrap_err();
    assert_eq!(err.place, "since-checkpoint", "{err}");
    d.close().await;
}

/// An export is refused before it is recorded when its `out` is unusable or its earlier checkpoint
/// is not of this log's history (signed by the deployment, but over another root, or beyond the
/// log): the log keeps its size and nothing is written.
#[tokio::test]
async fn a_refused_export_records_nothing_and_writes_nothing() {
    let d = Deployment::open().await;
    let a = tenant(&d, "T0A", &["U1", "U2"]).await;
    let real = SigningKey::from_skey_text(
        fs::read_to_string(d.dir.path().join("audit").join("signing.key"))
            .unwrap()
            .trim(),
    )
    .unwrap();
    let origin = d.services.audit.origin(&a.id);
    let scratch = tempfile::tempdir().unwrap();

    // A directory with something in it, a regular file, a path under a regular file.
    let full = scratch.path().join("full");
    fs::create_dir(&full).unwrap();
    fs::write(full.join("keep.txt"), "mine").unwrap();
    let file = scratch.path().join("file");
    fs::write(&file, "mine").unwrap();
    for out in [full.clone(), file.clone(), file.join("bundle")] {
        let size = log_size(&d, &a).await;
        let err = export(&d, &a, 0, None, None, &out).await.unwrap_err();
        assert!(
            matches!(err, AuditError::Bundle(_)),
            "{}: {err}",
            out.display()
        );
        assert_eq!(
            log_size(&d, &a).await,
            size,
            "{}: nothing recorded",
            out.display()
        );
    }
    assert!(
        matches!(
            export(&d, &a, 0, None, None, &full).await.unwrap_err(),
            AuditError::Bundle(bundle::WriteError::NotEmpty(_))
        ),
        "a non-empty directory is named as such"
    );
    assert_eq!(
        fs::read_dir(&full).unwrap().count(),
        1,
        "the non-empty directory is left as it was"
    );
    assert_eq!(fs::read_to_string(&file).unwrap(), "mine");

    // Earlier checkpoints the deployment signed, but not of this history: another root at a size
    // the log has, a size the log does not have.
    let size = log_size(&d, &a).await;
    let mut other = Checkpoint::new(origin.clone(), size - 1, [7; 32]);
    other
        .extensions
        .push("time 2026-01-01T00:00:00.000000Z".into());
    let mut beyond = Checkpoint::new(origin.clone(), size + 5, [7; 32]);
    beyond
        .extensions
        .push("time 2026-01-01T00:00:00.000000Z".into());
    for (label, cp, why) in [
        ("another root", other, "is not this log's root at size"),
        ("beyond the log", beyond, "is beyond the log's"),
    ] {
        let note = sign_checkpoint(&cp, &[&real]).unwrap();
        let out = d.bundle_path(label);
        let err = export(&d, &a, 0, None, Some(&note), &out)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, AuditError::Export(m) if m.contains(why)),
            "{label}: {err}"
        );
        assert_eq!(log_size(&d, &a).await, size, "{label}: nothing recorded");
        assert!(!out.exists(), "{label}: nothing written");
    }

    // An existing empty directory takes the bundle, and nothing else is left beside it.
    let empty = scratch.path().join("empty");
    fs::create_dir(&empty).unwrap();
    export(&d, &a, 0, None, None, &empty).await.unwrap();
    verify(&empty, Some(&d.trusted), None).unwrap();
    let mut names: Vec<String> = fs::read_dir(scratch.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["empty", "file", "full"]);
    d.close().await;
}

// ---------------------------------------------------------------------------------------------
// 6. The export is audited
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn an_export_is_recorded_before_the_checkpoint_that_covers_it() {
    let d = Deployment::open().await;
    let a = tenant(&d, "T0A", &["U1", "U2"]).await;
    let n = log_size(&d, &a).await;
    let full = export_ok(&d, &a, 0, None, "full").await;
    let part = export_ok(&d, &a, 1, Some(3), "part").await;
    let size = log_size(&d, &a).await;
    assert_eq!(size, n + 4);
    let events: Vec<Value> = log_events(&d, &a, 0, size)
        .await
        .iter()
        .map(|b| serde_json::from_slice(b).unwrap())
        .collect();
    let origin = d.services.audit.origin(&a.id);
    let ring = ring_of(&d.trusted);

    let exports: Vec<&Value> = events
        .iter()
        .filter(|e| e["type"] == "export.created")
        .collect();
    assert_eq!(exports.len(), 2);
    for (bundle_dir, (from, to), record) in
        [(&full, (0, n), exports[0]), (&part, (1, 3), exports[1])]
    {
        let m = read_manifest(bundle_dir);
        assert_eq!(record["data"]["from"], from);
        assert_eq!(record["data"]["to"], to);
        assert_eq!(record["principal"], "operator:cli");
        assert_eq!(record["tenant"], a.id.as_str());
        // The checkpoint in the bundle covers the export's own record, as its last leaf.
        let seq = record["seq"].as_u64().unwrap();
        assert_eq!(seq + 1, m.tree_size);
        let (cp, _) = open_checkpoint(&checkpoint_text(bundle_dir), &ring, &origin).unwrap();
        let signed = &events[seq as usize + 1];
        assert_eq!(signed["type"], "checkpoint.signed");
        assert_eq!(signed["data"]["size"], cp.size);
        assert_eq!(signed["data"]["root"], hex::encode(cp.root));
        assert_eq!(signed["principal"], "system:audit-log");
    }
    d.close().await;
}

// ---------------------------------------------------------------------------------------------
// 7. tlog proofs
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_tlog_proof_proves_each_event_and_no_other() {
    let d = Deployment::open().await;
    let a = tenant(&d, "T0A", &["U1", "U2", "U3", "U4"]).await;
    let origin = d.services.audit.origin(&a.id);
    let keyring_file = fs::read_to_string(d.dir.path().join("audit").join("keyring.txt")).unwrap();
    let ring = parse_keyring(&keyring_file, "keyring.txt").unwrap();
    let stranger = ring_of(&attacker_key().verifier());
    let repo = || d.services.store.for_tenant(&a.ctx).unwrap();
    let n = log_size(&d, &a).await;

    // The first proof signs a checkpoint over the n events (and records it as event n); the
    // proof of that record signs one more.
    for seq in 0..=n {
        let text = d
            .services
            .audit
            .tlog_proof(&a.ctx, repo(), seq)
            .await
            .unwrap();
        let proof = TlogProof::parse(&text).unwrap();
        assert_eq!(proof.to_text(), text);
        assert_eq!(proof.index, seq);
        let (cp, signers) = proof.open_checkpoint(&ring, &origin).unwrap();
        assert_eq!(signers, std::slice::from_ref(&d.trusted));
        assert_eq!(cp.size, if seq < n { n } else { n + 1 });
        let events = log_events(&d, &a, 0, cp.size).await;
        let leaf = leaf_hash(&events[seq as usize]);
        verify_inclusion(&leaf, seq, cp.size, &proof.hashes, &cp.root)
            .unwrap_or_else(|e| panic!("seq {seq}: {e}"));

        // Another position, another event, another root, a damaged path: each fails.
        let other = (seq + 1) % cp.size;
        assert!(verify_inclusion(&leaf, other, cp.size, &proof.hashes, &cp.root).is_err());
        let other_leaf = leaf_hash(&events[other as usize]);
        assert!(verify_inclusion(&other_leaf, seq, cp.size, &proof.hashes, &cp.root).is_err());
        assert!(verify_inclusion(&leaf, seq, cp.size, &proof.hashes, &[0u8; 32]).is_err());
        if let Some(first) = proof.hashes.first() {
            let mut bad = proof.hashes.clone();
            bad[0] = leaf_hash(first);
            assert!(verify_inclusion(&leaf, seq, cp.size, &bad, &cp.root).is_err());
        }
        assert!(proof.open_checkpoint(&stranger, &origin).is_err());
        let b_origin = format!("{origin}x");
        assert!(proof.open_checkpoint(&ring, &b_origin).is_err());
        let beyond = TlogProof {
            index: cp.size,
            ..proof.clone()
        };
        assert!(beyond.open_checkpoint(&ring, &origin).is_err());
    }

    let size = log_size(&d, &a).await;
    assert_eq!(
        size,
        n + 1,
        "only the first proof appended checkpoint.signed"
    );
    let err = d
        .services
        .audit
        .tlog_proof(&a.ctx, repo(), size)
        .await
        .unwrap_err();
    assert!(matches!(err, AuditError::Tree(_)), "{err}");
    d.close().await;
}
