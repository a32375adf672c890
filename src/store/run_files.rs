//! Checkpoints of unfinished agent runs in plain files, two slots per run, so that saving one costs
//! a `pwrite` instead of a sled flush.
//!
//! Why not sled: a checkpoint must reach the operating system before the step it precedes has
//! effects, and sled gets there only through `flush()`, which waits for the write-back of its whole
//! buffer (`sync_file_range`): about 300 µs a call, three calls a step (docs/PERFORMANCE.md). A
//! `pwrite` into the page cache gives the same guarantee (it survives a crash of the process, not a
//! power loss; the audit log, which is `fdatasync`ed, is what survives that) for a few µs.
//!
//! Layout: `<root>/<tenant>/<run id>.0` and `.1`. Each save writes the slot the latest checkpoint is
//! *not* in, at offset 0, as one frame: magic, generation, length, CRC-32, payload. A frame torn by a
//! crash in the middle of its write fails its CRC, and the other slot still holds the previous
//! checkpoint. Bytes after a frame (left from a longer earlier one) are ignored. Reading takes the
//! valid frame with the higher generation.
//!
//! A finished run's final state goes to sled (unflushed) and, with its own magic, to its slot; the
//! files are removed by [`RunFiles::sweep`] after a sled flush, which covers every run finished
//! since the last sweep: one flush per sweep instead of one per run. A crash before the flush
//! leaves the finished frame, from which the listing restores sled's copy.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use super::{Result, StoreError};
use crate::tenant::TenantId;

/// An unfinished run's checkpoint.
const RUNNING: [u8; 4] = *b"AGRC";
/// A finished run's final state.
const FINISHED: [u8; 4] = *b"AGRF";
/// Runs whose slot files stay open between saves (two descriptors each).
const MAX_OPEN: usize = 512;
/// magic (4) + generation (8) + payload length (4) + CRC-32 of magic, generation, length and
/// payload (4).
const HEADER: usize = 20;

/// The run files of every tenant, with the open slots of the runs saved since start.
#[derive(Debug)]
pub(crate) struct RunFiles {
    root: PathBuf,
    open: Mutex<OpenRuns>,
    /// How many runs may keep their slot files open.
    max_open: usize,
    /// Runs finished since the last sweep, whose files go once sled has flushed their final state.
    finished: Mutex<Vec<(TenantId, String)>>,
}

/// A run's latest frame.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Saved {
    /// The state, as it was given.
    pub(crate) state: Vec<u8>,
    /// Whether it is a finished run's final state.
    pub(crate) finished: bool,
}

/// The open slots by (tenant, run id).
type OpenRuns = HashMap<(TenantId, String), Arc<Mutex<Slots>>>;

/// The two open slot files of one run and the generation of its latest checkpoint.
#[derive(Debug)]
struct Slots {
    files: [File; 2],
    generation: u64,
}

fn io(what: &str, path: &Path, e: &std::io::Error) -> StoreError {
    StoreError::Engine(format!("run checkpoint {what} {}: {e}", path.display()))
}

/// Run ids become file names, and one comes from a URL path: anything but a plain id is refused
/// before it can name a path.
fn checked(run_id: &str) -> Result<&str> {
    let ok = !run_id.is_empty()
        && run_id.len() <= 64
        && run_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(run_id)
    } else {
        Err(StoreError::Engine(format!(
            "not a run id: {:?}",
            run_id.chars().take(80).collect::<String>()
        )))
    }
}

fn crc(magic: &[u8], generation: u64, len: u32, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(magic);
    h.update(&generation.to_le_bytes());
    h.update(&len.to_le_bytes());
    h.update(payload);
    h.finalize()
}

fn encode_frame(magic: [u8; 4], generation: u64, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).expect("a run checkpoint is under 4 GiB");
    let crc = crc(&magic, generation, len, payload);
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(&magic);
    out.extend_from_slice(&generation.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// The generation, payload and finished flag of a slot's frame, or `None` for an empty, torn or
/// foreign slot.
fn decode_frame(bytes: &[u8]) -> Option<(u64, &[u8], bool)> {
    if bytes.len() < HEADER {
        return None;
    }
    let magic = &bytes[..4];
    let finished = match magic {
        m if m == RUNNING => false,
        m if m == FINISHED => true,
        _ => return None,
    };
    let generation = u64::from_le_bytes(bytes[4..12].try_into().ok()?);
    let len = u32::from_le_bytes(bytes[12..16].try_into().ok()?);
    let want = u32::from_le_bytes(bytes[16..20].try_into().ok()?);
    let payload = bytes.get(HEADER..HEADER + len as usize)?;
    (crc(magic, generation, len, payload) == want).then_some((generation, payload, finished))
}

impl RunFiles {
    /// Run files under `root` (created on the first save).
    pub(crate) fn new(root: PathBuf) -> Self {
        Self::with_max_open(root, MAX_OPEN)
    }

    fn with_max_open(root: PathBuf, max_open: usize) -> Self {
        RunFiles {
            root,
            open: Mutex::new(HashMap::new()),
            max_open,
            finished: Mutex::new(Vec::new()),
        }
    }

    fn dir(&self, tenant: &TenantId) -> PathBuf {
        self.root.join(tenant.as_str())
    }

    fn slot_path(&self, tenant: &TenantId, run_id: &str, slot: usize) -> PathBuf {
        self.dir(tenant).join(format!("{run_id}.{slot}"))
    }

    /// Reads both slots: the latest valid frame and its generation (0 and `None` when there is
    /// none).
    fn read_slots(&self, tenant: &TenantId, run_id: &str) -> Result<(u64, Option<Saved>)> {
        let mut best: (u64, Option<Saved>) = (0, None);
        for slot in 0..2 {
            let path = self.slot_path(tenant, run_id, slot);
            let bytes = match std::fs::read(&path) {
                Ok(b) => b,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(io("read", &path, &e)),
            };
            if let Some((generation, payload, finished)) = decode_frame(&bytes) {
                if best.1.is_none() || generation > best.0 {
                    let saved = Saved {
                        state: payload.to_vec(),
                        finished,
                    };
                    best = (generation, Some(saved));
                }
            }
        }
        Ok(best)
    }

    fn slots(&self, tenant: &TenantId, run_id: &str) -> Result<Arc<Mutex<Slots>>> {
        let key = (tenant.clone(), run_id.to_owned());
        if let Some(s) = self
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
        {
            return Ok(Arc::clone(s));
        }
        let dir = self.dir(tenant);
        std::fs::create_dir_all(&dir).map_err(|e| io("create", &dir, &e))?;
        // A run saved before a restart continues from its latest generation.
        let (generation, _) = self.read_slots(tenant, run_id)?;
        let open = |slot| {
            let path = self.slot_path(tenant, run_id, slot);
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(|e| io("open", &path, &e))
        };
        let slots = Arc::new(Mutex::new(Slots {
            files: [open(0)?, open(1)?],
            generation,
        }));
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        // Runs that never finish (their driver failed) would keep their files open forever: past
        // the bound, every handle is let go, and the runs still going reopen theirs on their next
        // save, reading their generation back from the slots.
        if open.len() >= self.max_open {
            open.clear();
        }
        Ok(Arc::clone(open.entry(key).or_insert(slots)))
    }

    /// Saves a run's checkpoint, or its final state when `finished` (the run is then queued for
    /// the next [`RunFiles::sweep`]); once this returns it survives a crash of the process.
    pub(crate) fn put(
        &self,
        tenant: &TenantId,
        run_id: &str,
        state: &[u8],
        finished: bool,
    ) -> Result<()> {
        let run_id = checked(run_id)?;
        let slots = self.slots(tenant, run_id)?;
        let mut s = slots.lock().unwrap_or_else(PoisonError::into_inner);
        let generation = s.generation + 1;
        let slot = (generation % 2) as usize;
        let magic = if finished { FINISHED } else { RUNNING };
        s.files[slot]
            .write_all_at(&encode_frame(magic, generation, state), 0)
            .map_err(|e| io("write", &self.slot_path(tenant, run_id, slot), &e))?;
        s.generation = generation;
        drop(s);
        if finished {
            self.close(tenant, run_id);
            self.queue_removal(tenant, run_id);
        }
        Ok(())
    }

    /// The latest frame of a run that has files.
    pub(crate) fn get(&self, tenant: &TenantId, run_id: &str) -> Result<Option<Saved>> {
        let Ok(run_id) = checked(run_id) else {
            return Ok(None);
        };
        Ok(self.read_slots(tenant, run_id)?.1)
    }

    fn close(&self, tenant: &TenantId, run_id: &str) {
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&(tenant.clone(), run_id.to_owned()));
    }

    /// Queues a run's files for removal at the next sweep; its final state must be in sled.
    pub(crate) fn queue_removal(&self, tenant: &TenantId, run_id: &str) {
        self.finished
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((tenant.clone(), run_id.to_owned()));
    }

    /// Removes the files of every run finished since the last sweep, once `flush` has made their
    /// final states in sled survive a crash. Returns how many runs it removed.
    pub(crate) fn sweep(&self, flush: impl FnOnce() -> Result<()>) -> Result<usize> {
        let mut done =
            std::mem::take(&mut *self.finished.lock().unwrap_or_else(PoisonError::into_inner));
        // A run is queued again each time a listing finds its files before a sweep.
        done.sort();
        done.dedup();
        if done.is_empty() {
            return Ok(0);
        }
        if let Err(e) = flush() {
            // Keep them for the next sweep.
            self.finished
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .extend(done);
            return Err(e);
        }
        for (i, (tenant, run_id)) in done.iter().enumerate() {
            if let Err(e) = self.remove(tenant, run_id) {
                // Keep what was not removed for the next sweep.
                self.finished
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .extend(done[i..].iter().cloned());
                return Err(e);
            }
        }
        Ok(done.len())
    }

    /// Forgets a run whose final state is stored elsewhere.
    fn remove(&self, tenant: &TenantId, run_id: &str) -> Result<()> {
        let run_id = checked(run_id)?;
        self.close(tenant, run_id);
        for slot in 0..2 {
            let path = self.slot_path(tenant, run_id, slot);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(io("remove", &path, &e)),
            }
        }
        Ok(())
    }

    /// The ids of the tenant's runs that have a checkpoint file, sorted (run ids are ULIDs, so this
    /// is oldest first).
    pub(crate) fn runs(&self, tenant: &TenantId) -> Result<Vec<String>> {
        let dir = self.dir(tenant);
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => return Err(io("list", &dir, &e)),
        };
        let mut ids = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| io("list", &dir, &e))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(id) = name
                .strip_suffix(".0")
                .or_else(|| name.strip_suffix(".1"))
                .filter(|id| checked(id).is_ok())
            {
                ids.push(id.to_owned());
            }
        }
        ids.sort();
        ids.dedup();
        Ok(ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files() -> (tempfile::TempDir, RunFiles, TenantId) {
        let dir = tempfile::tempdir().unwrap();
        let f = RunFiles::new(dir.path().join("runs"));
        (dir, f, TenantId::generate())
    }

    fn state(f: &RunFiles, t: &TenantId, run: &str) -> Option<Vec<u8>> {
        f.get(t, run).unwrap().map(|s| s.state)
    }

    #[test]
    fn the_latest_save_wins_across_a_reopen() {
        let (dir, f, t) = files();
        f.put(&t, "r1", b"one", false).unwrap();
        f.put(&t, "r1", b"two, longer", false).unwrap();
        f.put(&t, "r1", b"3", false).unwrap();
        assert_eq!(state(&f, &t, "r1").as_deref(), Some(&b"3"[..]));
        let again = RunFiles::new(dir.path().join("runs"));
        assert_eq!(state(&again, &t, "r1").as_deref(), Some(&b"3"[..]));
        // A save after the reopen continues the generations instead of losing to the old slot.
        again.put(&t, "r1", b"four", false).unwrap();
        assert_eq!(state(&again, &t, "r1").as_deref(), Some(&b"four"[..]));
        assert_eq!(state(&f, &t, "r1").as_deref(), Some(&b"four"[..]));
    }

    #[test]
    fn a_torn_slot_falls_back_to_the_previous_checkpoint() {
        let (_dir, f, t) = files();
        f.put(&t, "r1", b"first checkpoint", false).unwrap();
        f.put(&t, "r1", b"second checkpoint", false).unwrap();
        // The second save went to slot 0 (generation 2); tear it in the middle of its payload.
        let path = f.slot_path(&t, "r1", 0);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[HEADER + 3] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(
            state(&f, &t, "r1").as_deref(),
            Some(&b"first checkpoint"[..])
        );
        std::fs::write(&path, &bytes[..HEADER + 2]).unwrap();
        assert_eq!(
            state(&f, &t, "r1").as_deref(),
            Some(&b"first checkpoint"[..])
        );
        // A frame whose magic was changed (running to finished) fails its CRC too.
        f.put(&t, "r2", b"first", false).unwrap();
        f.put(&t, "r2", b"second", false).unwrap();
        let path = f.slot_path(&t, "r2", 0);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[..4].copy_from_slice(&FINISHED);
        std::fs::write(&path, &bytes).unwrap();
        let saved = f.get(&t, "r2").unwrap().unwrap();
        assert_eq!(
            (saved.state.as_slice(), saved.finished),
            (&b"first"[..], false)
        );
    }

    #[test]
    fn runs_are_listed_per_tenant_and_swept_after_the_flush() {
        let (_dir, f, a) = files();
        let b = TenantId::generate();
        f.put(&a, "r2", b"x", false).unwrap();
        f.put(&a, "r1", b"x", false).unwrap();
        f.put(&a, "r1", b"y", true).unwrap();
        f.put(&b, "r3", b"x", false).unwrap();
        assert_eq!(f.runs(&a).unwrap(), vec!["r1", "r2"]);
        assert_eq!(f.runs(&b).unwrap(), vec!["r3"]);
        assert_eq!(
            f.get(&b, "r1").unwrap(),
            None,
            "another tenant's run is not seen"
        );
        assert_eq!(
            f.get(&a, "r1").unwrap(),
            Some(Saved {
                state: b"y".to_vec(),
                finished: true
            })
        );
        // A failed flush removes nothing and keeps the run for the next sweep.
        let failed = f.sweep(|| Err(StoreError::Engine("disk full".into())));
        assert!(failed.is_err());
        assert_eq!(f.runs(&a).unwrap(), vec!["r1", "r2"]);
        let mut flushed = false;
        assert_eq!(
            f.sweep(|| {
                flushed = true;
                Ok(())
            })
            .unwrap(),
            1
        );
        assert!(flushed);
        assert_eq!(f.runs(&a).unwrap(), vec!["r2"]);
        assert_eq!(f.get(&a, "r1").unwrap(), None);
        assert_eq!(f.sweep(|| panic!("nothing to flush for")).unwrap(), 0);
    }

    #[test]
    fn a_run_id_that_is_not_a_plain_id_names_no_path() {
        let (_dir, f, t) = files();
        for bad in ["../x", "a/b", "", ".", "a.b", &"x".repeat(65)] {
            assert!(f.put(&t, bad, b"x", false).is_err(), "{bad:?}");
            assert_eq!(f.get(&t, bad).unwrap(), None, "{bad:?}");
        }
    }

    #[test]
    fn past_the_open_bound_runs_reopen_their_slots_and_keep_their_generations() {
        let dir = tempfile::tempdir().unwrap();
        let f = RunFiles::with_max_open(dir.path().join("runs"), 2);
        let t = TenantId::generate();
        for round in 0..3u8 {
            for run in ["r1", "r2", "r3", "r4"] {
                f.put(&t, run, &[round], false).unwrap();
            }
        }
        assert!(f.open.lock().unwrap().len() <= 2, "the bound holds");
        for run in ["r1", "r2", "r3", "r4"] {
            assert_eq!(state(&f, &t, run).as_deref(), Some(&[2u8][..]), "{run}");
        }
    }
}
