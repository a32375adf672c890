//! Checkpoints of unfinished agent runs in plain files: per tenant, a set of reused two-slot
//! "lanes" and a journal of finished runs, so that saving one costs a `pwrite` instead of a sled
//! flush, and starting or finishing a run creates no file.
//!
//! Why not sled: a checkpoint must reach the operating system before the step it precedes has
//! effects, and sled gets there only through `flush()`, which waits for the write-back of its whole
//! buffer (`sync_file_range`): about 300 µs a call, three calls a step (docs/PERFORMANCE.md). A
//! `pwrite` into the page cache gives the same guarantee (it survives a crash of the process, not a
//! power loss; the audit log, which is `fdatasync`ed, is what survives that) for a few µs.
//!
//! Why lanes, not a pair of files per run: creating and removing two files a run was 15% of the
//! loop's CPU with 32 concurrent runs (ext4's inode allocation), more than the saves themselves.
//!
//! Layout, under `<root>/<tenant>/`:
//! - `lane.<n>.0` and `lane.<n>.1`: one run at a time. Each save writes the slot the lane's latest
//!   frame is *not* in, at offset 0, as one frame: magic, generation, length, CRC-32, payload (the
//!   run id's length in one byte, the run id, the state). A frame torn by a crash in the middle of
//!   its write fails its CRC, and the other slot still holds the previous one. Bytes after a frame
//!   (left from a longer earlier one) are ignored. Reading takes the valid frame with the higher
//!   generation; generations go on across the runs a lane holds, so a new run's first frame always
//!   wins over the last frame of the one before.
//! - `finished.journal.0` and `.1`: frames of finished runs' final states, appended. A run that
//!   finishes gets a frame here and a "free" frame in its lane, which the next run can take at
//!   once. The final state also goes to sled, unflushed; [`RunFiles::sweep`] switches appends to
//!   the other journal, flushes sled once for every run finished since the last sweep, and then
//!   empties the journal it switched from. A crash before that flush leaves the journal frame,
//!   from which the listing restores sled's copy.
//! - `<run id>.0` and `<run id>.1`: a run's two slots as earlier versions wrote them (with no run
//!   id in the frame). They are still read, and removed at the sweep after their run finishes.

use std::collections::{BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::{Result, StoreError};
use crate::tenant::TenantId;

/// A lane's frame: an unfinished run's checkpoint.
const RUNNING: [u8; 4] = *b"AGLR";
/// A lane's frame: the lane is free (its last run finished).
const FREE: [u8; 4] = *b"AGL0";
/// A journal frame: a finished run's final state.
const FINISHED: [u8; 4] = *b"AGLF";
/// Earlier versions' per-run files: a checkpoint, and a finished run's final state.
const LEGACY_RUNNING: [u8; 4] = *b"AGRC";
const LEGACY_FINISHED: [u8; 4] = *b"AGRF";
/// Lanes whose files stay open between saves, over all tenants (two descriptors each).
const MAX_OPEN: usize = 512;
/// Free lanes a tenant keeps for its next runs; the files of any more are removed.
const KEEP_FREE: usize = 64;
/// magic (4) + generation (8) + payload length (4) + CRC-32 of magic, generation, length and
/// payload (4).
const HEADER: usize = 20;

/// The run files of every tenant used since start.
#[derive(Debug)]
pub(crate) struct RunFiles {
    root: PathBuf,
    tenants: Mutex<HashMap<TenantId, Arc<Mutex<Tenant>>>>,
    /// How many lanes may keep their files open, over all tenants.
    max_open: usize,
    /// Lanes whose files are open now.
    open_lanes: AtomicUsize,
    /// Runs finished (or found finished or empty by a listing) since the last sweep.
    finished: Mutex<Vec<(TenantId, String)>>,
    /// Held by a sweep: two at once could empty the journal the other just switched to.
    sweeping: Mutex<()>,
}

/// A run's latest frame.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Saved {
    /// The state, as it was given.
    pub(crate) state: Vec<u8>,
    /// Whether it is a finished run's final state.
    pub(crate) finished: bool,
}

/// One tenant's lanes and journals, read from its directory on first use.
#[derive(Debug)]
struct Tenant {
    dir: Arc<Path>,
    /// Lanes holding an unfinished run, by run id.
    busy: HashMap<String, Arc<Mutex<Lane>>>,
    /// Lanes a run can take.
    free: Vec<Arc<Mutex<Lane>>>,
    /// The number the next new lane gets.
    next_lane: u64,
    /// The journal that finished runs are appended to (0 or 1).
    journal: usize,
    /// Finished runs found in the journals when the tenant was read: a crash came before the
    /// sled flush that would have emptied them, so sled's copy may be missing.
    recovered: HashMap<String, Vec<u8>>,
    /// Runs with files as earlier versions wrote them.
    legacy: BTreeSet<String>,
}

/// One lane: its tenant's directory, its number, its slot files while open, and the generation of
/// its latest frame.
#[derive(Debug)]
struct Lane {
    dir: Arc<Path>,
    number: u64,
    files: Option<[File; 2]>,
    generation: u64,
}

/// A decoded frame.
struct Frame<'a> {
    magic: [u8; 4],
    generation: u64,
    payload: &'a [u8],
}

fn io(what: &str, path: &Path, e: &std::io::Error) -> StoreError {
    StoreError::Engine(format!("run checkpoint {what} {}: {e}", path.display()))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Run ids go into file names (earlier versions' files) and frames, and one comes from a URL
/// path: anything but a plain id is refused before it can name a path.
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

/// A frame whose payload is the run id (length-prefixed) and the state.
fn encode_frame(magic: [u8; 4], generation: u64, run_id: &str, state: &[u8]) -> Vec<u8> {
    let mut payload = Vec::with_capacity(1 + run_id.len() + state.len());
    payload.push(u8::try_from(run_id.len()).expect("a checked run id is at most 64 bytes"));
    payload.extend_from_slice(run_id.as_bytes());
    payload.extend_from_slice(state);
    let len = u32::try_from(payload.len()).expect("a run checkpoint is under 4 GiB");
    let crc = crc(&magic, generation, len, &payload);
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(&magic);
    out.extend_from_slice(&generation.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

/// The frame at the start of `bytes` and its length, or `None` for a short, torn or foreign one.
fn decode_frame(bytes: &[u8]) -> Option<(Frame<'_>, usize)> {
    let header = bytes.get(..HEADER)?;
    let magic: [u8; 4] = header[..4].try_into().ok()?;
    let generation = u64::from_le_bytes(header[4..12].try_into().ok()?);
    let len = u32::from_le_bytes(header[12..16].try_into().ok()?);
    let want = u32::from_le_bytes(header[16..20].try_into().ok()?);
    let end = HEADER.checked_add(len as usize)?;
    let payload = bytes.get(HEADER..end)?;
    (crc(&magic, generation, len, payload) == want).then_some((
        Frame {
            magic,
            generation,
            payload,
        },
        end,
    ))
}

/// The run id and state of a lane or journal frame's payload.
fn split_payload(payload: &[u8]) -> Option<(&str, &[u8])> {
    let (&n, rest) = payload.split_first()?;
    let id = std::str::from_utf8(rest.get(..n as usize)?).ok()?;
    Some((checked(id).ok()?, &rest[n as usize..]))
}

/// The latest valid frame of two slots, with the highest valid generation (0 when none is valid).
fn latest(slots: &[Vec<u8>; 2]) -> (u64, Option<Frame<'_>>) {
    let mut best: (u64, Option<Frame<'_>>) = (0, None);
    for bytes in slots {
        if let Some((frame, _)) = decode_frame(bytes) {
            if best.1.is_none() || frame.generation > best.0 {
                best = (frame.generation, Some(frame));
            }
        }
    }
    best
}

fn read_or_empty(path: &Path) -> Result<Vec<u8>> {
    match std::fs::read(path) {
        Ok(b) => Ok(b),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(io("read", path, &e)),
    }
}

fn remove_if_there(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io("remove", path, &e)),
    }
}

fn lane_path(dir: &Path, number: u64, slot: usize) -> PathBuf {
    dir.join(format!("lane.{number}.{slot}"))
}

impl Lane {
    fn path(&self, slot: usize) -> PathBuf {
        lane_path(&self.dir, self.number, slot)
    }

    /// Reads both slots from disk.
    fn read(&self) -> Result<[Vec<u8>; 2]> {
        Ok([read_or_empty(&self.path(0))?, read_or_empty(&self.path(1))?])
    }

    /// Writes a frame into the slot the latest frame is not in, opening the file for this write
    /// only (when the tenant's lanes are read back).
    fn write_unopened(&mut self, magic: [u8; 4], run_id: &str, state: &[u8]) -> Result<()> {
        let generation = self.generation + 1;
        let slot = (generation % 2) as usize;
        let path = self.path(slot);
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .and_then(|f| f.write_all_at(&encode_frame(magic, generation, run_id, state), 0))
            .map_err(|e| io("write", &path, &e))?;
        self.generation = generation;
        Ok(())
    }

    /// Removes both slot files, the one without the latest frame first: a crash between the two
    /// leaves the latest frame (a free one, for a free lane), never an older checkpoint.
    fn remove(&self) -> Result<()> {
        let latest = (self.generation % 2) as usize;
        remove_if_there(&self.path(1 - latest))?;
        remove_if_there(&self.path(latest))
    }
}

impl Tenant {
    fn new_lane(&mut self) -> Arc<Mutex<Lane>> {
        let number = self.next_lane;
        self.next_lane += 1;
        Arc::new(Mutex::new(Lane {
            dir: Arc::clone(&self.dir),
            number,
            files: None,
            generation: 0,
        }))
    }

    fn journal_path(&self, journal: usize) -> PathBuf {
        self.dir.join(format!("finished.journal.{journal}"))
    }

    fn legacy_path(&self, run_id: &str, slot: usize) -> PathBuf {
        self.dir.join(format!("{run_id}.{slot}"))
    }

    /// Reads a tenant's directory: its lanes, what its journals hold, and earlier versions' files.
    fn load(dir: PathBuf) -> Result<Tenant> {
        let mut t = Tenant {
            dir: dir.into(),
            busy: HashMap::new(),
            free: Vec::new(),
            next_lane: 0,
            journal: 0,
            recovered: HashMap::new(),
            legacy: BTreeSet::new(),
        };
        let entries = match std::fs::read_dir(&t.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(t),
            Err(e) => return Err(io("list", &t.dir, &e)),
        };
        let mut lanes = BTreeSet::new();
        // Lanes whose latest frame is the checkpoint of a run that is not theirs to resume.
        let mut stale: Vec<(Arc<Mutex<Lane>>, String)> = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| io("list", &t.dir, &e))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let Some(stem) = name.strip_suffix(".0").or_else(|| name.strip_suffix(".1")) else {
                continue;
            };
            if let Some(n) = stem.strip_prefix("lane.") {
                if let Ok(n) = n.parse::<u64>() {
                    lanes.insert(n);
                }
            } else if checked(stem).is_ok() {
                // A run id has no '.', so neither `lane.<n>` nor `finished.journal` is one.
                t.legacy.insert(stem.to_owned());
            }
        }
        for n in lanes {
            let mut lane = Lane {
                dir: Arc::clone(&t.dir),
                number: n,
                files: None,
                generation: 0,
            };
            let slots = lane.read()?;
            let (generation, frame) = latest(&slots);
            lane.generation = generation;
            let lane = Arc::new(Mutex::new(lane));
            let running = frame
                .filter(|f| f.magic == RUNNING)
                .and_then(|f| split_payload(f.payload))
                .map(|(id, _)| id.to_owned());
            match running {
                Some(id) if !t.busy.contains_key(&id) => {
                    t.busy.insert(id, lane);
                }
                // Another lane names the same run (only a crash can leave that): this one's
                // checkpoint must not come back once the other is gone.
                Some(id) => stale.push((lane, id)),
                None => t.free.push(lane),
            }
            t.next_lane = n + 1;
        }
        for journal in 0..2 {
            let path = t.journal_path(journal);
            let bytes = read_or_empty(&path)?;
            let mut at = 0;
            while let Some((frame, len)) = decode_frame(&bytes[at..]) {
                if frame.magic != FINISHED {
                    break;
                }
                let Some((id, state)) = split_payload(frame.payload) else {
                    break;
                };
                t.recovered.insert(id.to_owned(), state.to_vec());
                at += len;
            }
            if at < bytes.len() {
                // A frame torn by a crash: cut it, so that later appends are read.
                let f = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(|e| io("open", &path, &e))?;
                f.set_len(at as u64).map_err(|e| io("cut", &path, &e))?;
            }
        }
        // A crash between a run's journal frame and its lane's free frame: the journal says it
        // finished, so its lane is free.
        let done: Vec<String> = t
            .busy
            .keys()
            .filter(|id| t.recovered.contains_key(*id))
            .cloned()
            .collect();
        for id in done {
            if let Some(lane) = t.busy.remove(&id) {
                stale.push((lane, id));
            }
        }
        // Each gets the free frame the crash kept from it, before the journal that says its run
        // finished can be emptied: else a restart after the next sweep would find the run's last
        // checkpoint, and nothing saying it finished, and resume it.
        for (lane, id) in stale {
            lock(&lane).write_unopened(FREE, &id, &[])?;
            t.free.push(lane);
        }
        Ok(t)
    }

    /// Removes an earlier version's files of a run, the one without its latest frame first, so
    /// that a crash between the two never leaves only an older checkpoint.
    fn remove_legacy(&self, run_id: &str) -> Result<()> {
        let generation = |slot| -> Result<Option<u64>> {
            let bytes = read_or_empty(&self.legacy_path(run_id, slot))?;
            Ok(decode_frame(&bytes).map(|(f, _)| f.generation))
        };
        let latest = if generation(1)? > generation(0)? {
            1
        } else {
            0
        };
        remove_if_there(&self.legacy_path(run_id, 1 - latest))?;
        remove_if_there(&self.legacy_path(run_id, latest))
    }

    /// Appends a finished run's final state to the current journal.
    fn append_finished(&self, run_id: &str, state: &[u8]) -> Result<()> {
        let path = self.journal_path(self.journal);
        let mut f = OpenOptions::new()
            .append(true)
            .create(true)
            .open(&path)
            .map_err(|e| io("open", &path, &e))?;
        let before = f.metadata().map_err(|e| io("stat", &path, &e))?.len();
        let written = std::io::Write::write_all(&mut f, &encode_frame(FINISHED, 0, run_id, state));
        if let Err(e) = written {
            // A part-written frame would end the journal for whoever reads it back, hiding every
            // frame appended after it: take it off.
            if let Err(te) = f.set_len(before) {
                tracing::error!(error = %te, path = %path.display(), "could not take a part-written frame off a journal of finished runs");
            }
            return Err(io("write", &path, &e));
        }
        Ok(())
    }
}

impl RunFiles {
    /// Run files under `root` (created on the first save).
    pub(crate) fn new(root: PathBuf) -> Self {
        Self::with_max_open(root, MAX_OPEN)
    }

    fn with_max_open(root: PathBuf, max_open: usize) -> Self {
        RunFiles {
            root,
            tenants: Mutex::new(HashMap::new()),
            max_open,
            open_lanes: AtomicUsize::new(0),
            finished: Mutex::new(Vec::new()),
            sweeping: Mutex::new(()),
        }
    }

    /// The tenant's lanes, read from its directory the first time.
    fn tenant(&self, tenant: &TenantId) -> Result<Arc<Mutex<Tenant>>> {
        let mut tenants = lock(&self.tenants);
        if let Some(t) = tenants.get(tenant) {
            return Ok(Arc::clone(t));
        }
        // Read under the map's lock (once per tenant and process): reading writes (it cuts a
        // torn journal frame, frees lanes), which must not race a save of the same tenant.
        let loaded = Arc::new(Mutex::new(Tenant::load(self.root.join(tenant.as_str()))?));
        tenants.insert(tenant.clone(), Arc::clone(&loaded));
        Ok(loaded)
    }

    /// Opens a lane's slot files if they are closed, first closing the idle lanes of every tenant
    /// when too many are open (they reopen on their next save).
    fn open_lane(&self, lane: &mut Lane) -> Result<()> {
        if lane.files.is_some() {
            return Ok(());
        }
        if self.open_lanes.load(Ordering::Relaxed) >= self.max_open {
            self.close_idle_lanes();
        }
        std::fs::create_dir_all(&lane.dir).map_err(|e| io("create", &lane.dir, &e))?;
        let open = |slot| {
            let path = lane.path(slot);
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(|e| io("open", &path, &e))
        };
        lane.files = Some([open(0)?, open(1)?]);
        self.open_lanes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Lets go of the files of free lanes, and if that is not enough, of runs' lanes not being
    /// written now (a run that never finishes, its driver gone, must not hold its files forever).
    /// Lanes and tenants in use are skipped: the bound is loose by as many.
    fn close_idle_lanes(&self) {
        let tenants: Vec<_> = lock(&self.tenants).values().cloned().collect();
        for busy_too in [false, true] {
            for t in &tenants {
                let Ok(t) = t.try_lock() else { continue };
                let busy = t.busy.values().filter(|_| busy_too);
                for lane in t.free.iter().chain(busy) {
                    if let Ok(mut l) = lane.try_lock() {
                        if l.files.take().is_some() {
                            self.open_lanes.fetch_sub(1, Ordering::Relaxed);
                        }
                    }
                }
            }
            if self.open_lanes.load(Ordering::Relaxed) < self.max_open {
                return;
            }
        }
    }

    /// Writes a frame into the lane's slot its latest frame is not in.
    fn write_lane(
        &self,
        lane: &mut Lane,
        magic: [u8; 4],
        run_id: &str,
        state: &[u8],
    ) -> Result<()> {
        self.open_lane(lane)?;
        let generation = lane.generation + 1;
        let slot = (generation % 2) as usize;
        let frame = encode_frame(magic, generation, run_id, state);
        let files = lane.files.as_ref().expect("opened above");
        files[slot]
            .write_all_at(&frame, 0)
            .map_err(|e| io("write", &lane.path(slot), &e))?;
        lane.generation = generation;
        Ok(())
    }

    /// Saves a run's checkpoint, or its final state when `finished` (then the run's lane is free
    /// and the run is queued for the next [`RunFiles::sweep`]); once this returns it survives a
    /// crash of the process.
    pub(crate) fn put(
        &self,
        tenant: &TenantId,
        run_id: &str,
        state: &[u8],
        finished: bool,
    ) -> Result<()> {
        let run_id = checked(run_id)?;
        let t = self.tenant(tenant)?;
        let mut g = lock(&t);
        if finished {
            std::fs::create_dir_all(&g.dir).map_err(|e| io("create", &g.dir, &e))?;
            g.append_finished(run_id, state)?;
            if let Some(lane) = g.busy.remove(run_id) {
                // Only after the journal has the final state: a crash between the two leaves the
                // lane's last checkpoint, which the journal overrides.
                let written = self.write_lane(&mut lock(&lane), FREE, run_id, &[]);
                match written {
                    Ok(()) => g.free.push(lane),
                    Err(e) => {
                        g.busy.insert(run_id.to_owned(), lane);
                        return Err(e);
                    }
                }
            }
            drop(g);
            self.queue_removal(tenant, run_id);
            return Ok(());
        }
        let lane = match g.busy.get(run_id) {
            Some(lane) => Arc::clone(lane),
            None => {
                let lane = match g.free.pop() {
                    Some(lane) => lane,
                    None => g.new_lane(),
                };
                g.busy.insert(run_id.to_owned(), Arc::clone(&lane));
                lane
            }
        };
        // The lane's own lock is enough for the write: other runs of the tenant go on meanwhile.
        drop(g);
        let mut l = lock(&lane);
        self.write_lane(&mut l, RUNNING, run_id, state)
    }

    /// The latest frame of a run that has files: its lane's checkpoint, the final state a journal
    /// kept across a crash, or an earlier version's files.
    pub(crate) fn get(&self, tenant: &TenantId, run_id: &str) -> Result<Option<Saved>> {
        let Ok(run_id) = checked(run_id) else {
            return Ok(None);
        };
        let t = self.tenant(tenant)?;
        let g = lock(&t);
        if let Some(lane) = g.busy.get(run_id) {
            let slots = lock(lane).read()?;
            if let (_, Some(frame)) = latest(&slots) {
                if let Some((id, state)) = split_payload(frame.payload) {
                    if frame.magic == RUNNING && id == run_id {
                        return Ok(Some(Saved {
                            state: state.to_vec(),
                            finished: false,
                        }));
                    }
                }
            }
        }
        if let Some(state) = g.recovered.get(run_id) {
            return Ok(Some(Saved {
                state: state.clone(),
                finished: true,
            }));
        }
        if g.legacy.contains(run_id) {
            let slots = [
                read_or_empty(&g.legacy_path(run_id, 0))?,
                read_or_empty(&g.legacy_path(run_id, 1))?,
            ];
            let saved = latest(&slots).1.and_then(|frame| {
                let finished = match frame.magic {
                    LEGACY_RUNNING => false,
                    LEGACY_FINISHED => true,
                    _ => return None,
                };
                Some(Saved {
                    state: frame.payload.to_vec(),
                    finished,
                })
            });
            return Ok(saved);
        }
        Ok(None)
    }

    /// Queues a run for the next sweep; its final state must be in sled.
    pub(crate) fn queue_removal(&self, tenant: &TenantId, run_id: &str) {
        lock(&self.finished).push((tenant.clone(), run_id.to_owned()));
    }

    /// Forgets every run finished since the last sweep, once `flush` has made their final states
    /// in sled survive a crash: empties the journals they were appended to and removes earlier
    /// versions' files. Returns how many runs it forgot.
    pub(crate) fn sweep(&self, flush: impl FnOnce() -> Result<()>) -> Result<usize> {
        let _one_at_a_time = lock(&self.sweeping);
        let mut done = std::mem::take(&mut *lock(&self.finished));
        // A run is queued again each time a listing finds it before a sweep.
        done.sort();
        done.dedup();
        if done.is_empty() {
            return Ok(0);
        }
        // Finished runs from here on go to the other journal, which this sweep leaves alone; the
        // one switched from holds only runs whose sled copies were written before the flush below.
        let mut switched = Vec::new();
        let mut tenants: Vec<&TenantId> = done.iter().map(|(t, _)| t).collect();
        tenants.dedup();
        for tenant in tenants {
            let t = self.tenant(tenant)?;
            let mut g = lock(&t);
            let old = g.journal;
            g.journal = 1 - old;
            drop(g);
            switched.push((tenant.clone(), t, old));
        }
        if let Err(e) = flush() {
            // Keep them for the next sweep, and switch back, so that it empties the journal
            // they are in. What was appended meanwhile stays in the other one.
            for (_, t, old) in switched {
                lock(&t).journal = old;
            }
            lock(&self.finished).extend(done);
            return Err(e);
        }
        let mut result = Ok(());
        let mut kept = BTreeSet::new();
        for (tenant, run_id) in &done {
            let t = self.tenant(tenant)?;
            let mut g = lock(&t);
            g.recovered.remove(run_id);
            if g.legacy.contains(run_id) {
                match g.remove_legacy(run_id) {
                    Ok(()) => {
                        g.legacy.remove(run_id);
                    }
                    Err(e) => {
                        lock(&self.finished).push((tenant.clone(), run_id.clone()));
                        kept.insert(tenant.clone());
                        result = Err(e);
                    }
                }
            }
        }
        for (tenant, t, old) in switched {
            let mut g = lock(&t);
            // Runs read back from a journal at start may sit in either file; until each of them
            // has been restored to sled and swept, both journals are kept. So are they while an
            // earlier version's files of a run in them are still there.
            if g.recovered.is_empty() && !kept.contains(&tenant) {
                let path = g.journal_path(old);
                if let Ok(f) = OpenOptions::new().write(true).open(&path) {
                    f.set_len(0).map_err(|e| io("empty", &path, &e))?;
                }
            }
            // Free lanes past what the tenant keeps go, so that a burst of runs does not leave
            // its lanes behind for good.
            while g.free.len() > KEEP_FREE {
                let lane = g.free.pop().expect("longer than KEEP_FREE");
                let mut l = lock(&lane);
                if l.files.take().is_some() {
                    self.open_lanes.fetch_sub(1, Ordering::Relaxed);
                }
                l.remove()?;
            }
        }
        result.map(|()| done.len())
    }

    /// The ids of the tenant's runs that have files (unfinished, or finished before a crash that
    /// came before the sweep), sorted (run ids are ULIDs, so this is oldest first).
    pub(crate) fn runs(&self, tenant: &TenantId) -> Result<Vec<String>> {
        let t = self.tenant(tenant)?;
        let g = lock(&t);
        let mut ids: Vec<String> = g
            .busy
            .keys()
            .chain(g.recovered.keys())
            .chain(g.legacy.iter())
            .cloned()
            .collect();
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

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
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
        let third = RunFiles::new(dir.path().join("runs"));
        assert_eq!(state(&third, &t, "r1").as_deref(), Some(&b"four"[..]));
    }

    #[test]
    fn a_torn_slot_falls_back_to_the_previous_checkpoint() {
        let (dir, f, t) = files();
        f.put(&t, "r1", b"first checkpoint", false).unwrap();
        f.put(&t, "r1", b"second checkpoint", false).unwrap();
        // The second save went to slot 0 (generation 2) of lane 0; tear it in its payload.
        let path = dir.path().join("runs").join(t.as_str()).join("lane.0.0");
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[HEADER + 5] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let reopened = || RunFiles::new(dir.path().join("runs"));
        assert_eq!(
            state(&reopened(), &t, "r1").as_deref(),
            Some(&b"first checkpoint"[..])
        );
        std::fs::write(&path, &bytes[..HEADER + 2]).unwrap();
        assert_eq!(
            state(&reopened(), &t, "r1").as_deref(),
            Some(&b"first checkpoint"[..])
        );
        // A frame whose magic was changed (running to free) fails its CRC too.
        let mut whole =
            std::fs::read(dir.path().join("runs").join(t.as_str()).join("lane.0.1")).unwrap();
        whole[..4].copy_from_slice(&FREE);
        std::fs::write(&path, &whole).unwrap();
        assert_eq!(
            state(&reopened(), &t, "r1").as_deref(),
            Some(&b"first checkpoint"[..])
        );
    }

    #[test]
    fn lanes_are_reused_and_a_new_runs_first_frame_wins_over_the_last_ones() {
        let (dir, f, t) = files();
        let tdir = dir.path().join("runs").join(t.as_str());
        for round in 0..20 {
            let run = format!("r{round:02}");
            f.put(&t, &run, b"step", false).unwrap();
            f.put(&t, &run, b"final", true).unwrap();
            f.put(&t, "long", &[round], false).unwrap();
        }
        // Two lanes in all (the long run's and one for the short runs in turn), and no per-run file.
        assert_eq!(
            names(&tdir),
            vec![
                "finished.journal.0",
                "lane.0.0",
                "lane.0.1",
                "lane.1.0",
                "lane.1.1"
            ]
        );
        // A run that takes a used lane and saves once: its one frame wins over the last run's two.
        f.put(&t, "fresh", b"only frame", false).unwrap();
        let again = RunFiles::new(dir.path().join("runs"));
        assert_eq!(
            state(&again, &t, "fresh").as_deref(),
            Some(&b"only frame"[..])
        );
        assert_eq!(state(&again, &t, "long").as_deref(), Some(&[19u8][..]));
        assert_eq!(
            again.runs(&t).unwrap().len(),
            22,
            "20 finished, unswept, and two running"
        );
    }

    #[test]
    fn finished_runs_are_read_back_from_the_journal_until_a_sweep_empties_it() {
        let (dir, f, a) = files();
        let b = TenantId::generate();
        f.put(&a, "r2", b"x", false).unwrap();
        f.put(&a, "r1", b"x", false).unwrap();
        f.put(&a, "r1", b"y", true).unwrap();
        f.put(&b, "r3", b"x", false).unwrap();
        assert_eq!(
            f.runs(&a).unwrap(),
            vec!["r2"],
            "r1 finished in this process"
        );
        assert_eq!(f.runs(&b).unwrap(), vec!["r3"]);
        assert_eq!(
            f.get(&b, "r1").unwrap(),
            None,
            "another tenant's run is not seen"
        );
        // As after a crash before the sweep: a new process reads r1's final state back.
        let after_crash = RunFiles::new(dir.path().join("runs"));
        assert_eq!(after_crash.runs(&a).unwrap(), vec!["r1", "r2"]);
        assert_eq!(
            after_crash.get(&a, "r1").unwrap(),
            Some(Saved {
                state: b"y".to_vec(),
                finished: true
            })
        );
        // A failed flush forgets nothing and keeps the run for the next sweep.
        assert!(f
            .sweep(|| Err(StoreError::Engine("disk full".into())))
            .is_err());
        assert_eq!(
            RunFiles::new(dir.path().join("runs")).runs(&a).unwrap(),
            vec!["r1", "r2"]
        );
        let mut flushed = false;
        let swept = f.sweep(|| {
            flushed = true;
            Ok(())
        });
        assert_eq!(swept.unwrap(), 1);
        assert!(flushed);
        assert_eq!(
            RunFiles::new(dir.path().join("runs")).runs(&a).unwrap(),
            vec!["r2"]
        );
        assert_eq!(f.sweep(|| panic!("nothing to flush for")).unwrap(), 0);
        // The process that read r1 back keeps it until r1 is queued (the listing restores it to
        // sled) and swept.
        after_crash.queue_removal(&a, "r1");
        assert_eq!(after_crash.sweep(|| Ok(())).unwrap(), 1);
        assert_eq!(after_crash.runs(&a).unwrap(), vec!["r2"]);
    }

    #[test]
    fn a_run_finished_after_the_journal_switch_survives_the_sweep() {
        let (dir, f, t) = files();
        f.put(&t, "r1", b"final", true).unwrap();
        let swept = f.sweep(|| {
            // Finishes while sled is flushing: its frame goes to the other journal.
            f.put(&t, "r2", b"final two", true).unwrap();
            Ok(())
        });
        assert_eq!(swept.unwrap(), 1);
        let after_crash = RunFiles::new(dir.path().join("runs"));
        assert_eq!(after_crash.runs(&t).unwrap(), vec!["r2"]);
        assert_eq!(
            state(&after_crash, &t, "r2").as_deref(),
            Some(&b"final two"[..])
        );
    }

    #[test]
    fn a_torn_journal_frame_is_cut_and_later_ones_are_read() {
        let (dir, f, t) = files();
        f.put(&t, "r1", b"final one", true).unwrap();
        let path = dir
            .path()
            .join("runs")
            .join(t.as_str())
            .join("finished.journal.0");
        let whole = std::fs::read(&path).unwrap();
        // A second frame torn by a crash in the middle of its write.
        let mut torn = whole.clone();
        torn.extend_from_slice(&encode_frame(FINISHED, 0, "r2", b"final two")[..HEADER + 4]);
        std::fs::write(&path, &torn).unwrap();
        let again = RunFiles::new(dir.path().join("runs"));
        assert_eq!(again.runs(&t).unwrap(), vec!["r1"]);
        assert_eq!(
            std::fs::read(&path).unwrap(),
            whole,
            "the torn frame is cut"
        );
        again.put(&t, "r3", b"final three", true).unwrap();
        let third = RunFiles::new(dir.path().join("runs"));
        assert_eq!(third.runs(&t).unwrap(), vec!["r1", "r3"]);
    }

    #[test]
    fn a_crash_between_the_journal_and_the_free_frame_frees_the_lane_for_good() {
        let (dir, f, t) = files();
        f.put(&t, "r1", b"step", false).unwrap();
        // As if the process died after the journal frame and before the lane's free frame.
        let tenant = f.tenant(&t).unwrap();
        lock(&tenant).append_finished("r1", b"final").unwrap();
        drop((tenant, f));
        let second = RunFiles::new(dir.path().join("runs"));
        let saved = second.get(&t, "r1").unwrap().unwrap();
        assert!(
            saved.finished,
            "the journal wins over the lane's checkpoint"
        );
        assert_eq!(saved.state, b"final");
        // The listing restores sled's copy and queues the run; the sweep then empties the
        // journal. A restart after that must not find r1's checkpoint and resume it.
        second.queue_removal(&t, "r1");
        assert_eq!(second.sweep(|| Ok(())).unwrap(), 1);
        drop(second);
        let third = RunFiles::new(dir.path().join("runs"));
        assert_eq!(third.get(&t, "r1").unwrap(), None);
        assert_eq!(third.runs(&t).unwrap(), Vec::<String>::new());
        third.put(&t, "r2", b"step", false).unwrap();
        let tdir = dir.path().join("runs").join(t.as_str());
        assert!(
            !names(&tdir).contains(&"lane.1.0".to_owned()),
            "r2 took r1's lane"
        );
    }

    #[test]
    fn a_lane_naming_a_run_another_lane_holds_is_freed_for_good() {
        let (dir, f, t) = files();
        f.put(&t, "r1", b"in lane 0", false).unwrap();
        // As only a crash could leave it: lane 1 holds a checkpoint of the same run.
        let tdir = dir.path().join("runs").join(t.as_str());
        std::fs::write(
            tdir.join("lane.1.1"),
            encode_frame(RUNNING, 1, "r1", b"in lane 1"),
        )
        .unwrap();
        let again = RunFiles::new(dir.path().join("runs"));
        assert_eq!(again.runs(&t).unwrap(), vec!["r1"]);
        let kept = state(&again, &t, "r1").unwrap();
        again.put(&t, "r1", b"final", true).unwrap();
        assert_eq!(again.sweep(|| Ok(())).unwrap(), 1);
        let after = RunFiles::new(dir.path().join("runs"));
        assert_eq!(
            after.runs(&t).unwrap(),
            Vec::<String>::new(),
            "kept {kept:?}"
        );
    }

    #[test]
    fn earlier_versions_files_are_read_and_removed_after_their_run_finishes() {
        let (dir, f, t) = files();
        let tdir = dir.path().join("runs").join(t.as_str());
        std::fs::create_dir_all(&tdir).unwrap();
        let legacy = |magic: [u8; 4], generation: u64, payload: &[u8]| {
            let len = payload.len() as u32;
            let mut out = magic.to_vec();
            out.extend_from_slice(&generation.to_le_bytes());
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(&crc(&magic, generation, len, payload).to_le_bytes());
            out.extend_from_slice(payload);
            out
        };
        std::fs::write(tdir.join("old1.1"), legacy(LEGACY_RUNNING, 1, b"one")).unwrap();
        std::fs::write(tdir.join("old1.0"), legacy(LEGACY_RUNNING, 2, b"two")).unwrap();
        std::fs::write(tdir.join("old2.1"), legacy(LEGACY_FINISHED, 1, b"done")).unwrap();
        assert_eq!(f.runs(&t).unwrap(), vec!["old1", "old2"]);
        assert_eq!(state(&f, &t, "old1").as_deref(), Some(&b"two"[..]));
        assert!(f.get(&t, "old2").unwrap().unwrap().finished);
        // old1 resumes in a lane; its lane frame wins over its old files.
        f.put(&t, "old1", b"three", false).unwrap();
        assert_eq!(state(&f, &t, "old1").as_deref(), Some(&b"three"[..]));
        f.put(&t, "old1", b"final", true).unwrap();
        f.queue_removal(&t, "old2");
        assert_eq!(f.sweep(|| Ok(())).unwrap(), 2);
        assert!(
            names(&tdir).iter().all(|n| !n.starts_with("old")),
            "{:?}",
            names(&tdir)
        );
        assert_eq!(f.runs(&t).unwrap(), Vec::<String>::new());
    }

    #[test]
    fn a_run_id_that_is_not_a_plain_id_is_refused() {
        let (_dir, f, t) = files();
        for bad in ["../x", "a/b", "", ".", "a.b", &"x".repeat(65)] {
            assert!(f.put(&t, bad, b"x", false).is_err(), "{bad:?}");
            assert_eq!(f.get(&t, bad).unwrap(), None, "{bad:?}");
        }
    }

    #[test]
    fn past_the_open_bound_lanes_reopen_and_keep_their_generations() {
        let dir = tempfile::tempdir().unwrap();
        let f = RunFiles::with_max_open(dir.path().join("runs"), 2);
        let tenants = [TenantId::generate(), TenantId::generate()];
        for round in 0..3u8 {
            for t in &tenants {
                for run in ["r1", "r2", "r3"] {
                    f.put(t, run, &[round], false).unwrap();
                }
            }
        }
        assert!(
            f.open_lanes.load(Ordering::Relaxed) <= 4,
            "the bound holds, give or take the tenant being written"
        );
        for t in &tenants {
            for run in ["r1", "r2", "r3"] {
                assert_eq!(state(&f, t, run).as_deref(), Some(&[2u8][..]), "{run}");
            }
        }
    }

    #[test]
    fn free_lanes_past_the_kept_number_are_removed_at_the_sweep() {
        let (dir, f, t) = files();
        let runs: Vec<String> = (0..KEEP_FREE + 10).map(|i| format!("r{i:03}")).collect();
        for run in &runs {
            f.put(&t, run, b"step", false).unwrap();
        }
        for run in &runs {
            f.put(&t, run, b"final", true).unwrap();
        }
        assert_eq!(f.sweep(|| Ok(())).unwrap(), runs.len());
        let tdir = dir.path().join("runs").join(t.as_str());
        let lanes = names(&tdir)
            .iter()
            .filter(|n| n.starts_with("lane."))
            .count();
        assert_eq!(lanes, 2 * KEEP_FREE);
        assert_eq!(f.open_lanes.load(Ordering::Relaxed), KEEP_FREE);
    }
}
