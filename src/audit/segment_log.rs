//! Durable append-only record log with group commit: the source of truth for one tenant's audit events.
//!
//! sled 0.34's `flush()` issues `sync_file_range`, which does not make data durable against power
//! loss, so audit events are first written here and sled only holds projections rebuildable from
//! these files.
//!
//! # On-disk format
//!
//! A log is one directory of segment files named `{first_seq:020}.seg`. Each segment is a sequence
//! of frames `[u32 LE payload length][u32 LE CRC-32 (IEEE) of payload][payload]`. Sequence numbers
//! are 0-based and dense across segments. A zero-length frame is never written, so an all-zero
//! region (what a filesystem may show for a write that never reached the disk) never parses as a
//! record.
//!
//! # Durability
//!
//! [`SegmentLog::append`] resolves only after the record has been written and `fdatasync`ed
//! ([`File::sync_data`]). Concurrent appends are grouped: one writer takes every queued request,
//! writes them with one `pwrite` and covers them all with one `fdatasync`. A new segment file is
//! followed by an `fsync` of the directory so the file's name is durable too. Readers only ever
//! see records that are already durable.
//!
//! The writer keeps zeroed space, written and synced, ahead of the active segment's end
//! ([`Options::preallocate_bytes`]), so that a batch's `fdatasync` writes its data only instead of
//! also recording a new file size and block allocation. A sealed segment is trimmed to its frames.
//!
//! # Recovery
//!
//! [`SegmentLog::open`] validates every frame. Zeros after the last frame of a segment are unused
//! space (allocated ahead, or a write that never reached the disk): they are kept and are not a
//! torn tail. Any other damaged tail of the *last* segment (short header, short payload, bad
//! checksum, a zero length followed by something that is not zero) is what a crash during an
//! unacknowledged write leaves behind, so it is cut off and reported in [`RecoveryReport`]. Damage
//! anywhere else (a non-last segment, a missing segment, or a bad frame in the last segment that is
//! followed by a valid one) cannot come from a torn write and is returned as an error instead of
//! being dropped; except that a bad frame holding a whole zeroed sector is torn even then (an
//! unsynced batch in zeroed space may reach the disk out of order; see `valid_frame_after`).
//!
//! # Ownership
//!
//! Exactly one [`SegmentLog`] (and its clones) may own a directory at a time, in one process. This
//! module takes no file lock; the caller's per-tenant registry must guarantee it.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use tokio::sync::{mpsc, oneshot};

/// Bytes in a frame header: payload length then payload CRC, both `u32` little-endian.
pub const HEADER_LEN: usize = 8;

/// Default size at which the writer rolls to a new segment.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 << 20;

/// Default most zeroed bytes kept ahead of the active segment's end; see
/// [`Options::preallocate_bytes`].
pub const DEFAULT_PREALLOCATE_BYTES: u64 = 1 << 20;

/// Smallest zeroed region written ahead at once; also the unit the region grows by doubling.
const PREALLOCATE_MIN_BYTES: u64 = 64 << 10;

/// Zeros written ahead come from this buffer, one `pwrite` per 64 KiB.
static ZEROS: [u8; PREALLOCATE_MIN_BYTES as usize] = [0; PREALLOCATE_MIN_BYTES as usize];

/// File name suffix of segment files; anything else in the directory is ignored.
const SEGMENT_SUFFIX: &str = ".seg";

/// Digits in a segment file's stem; fixed width so names sort like their numbers and one sequence
/// number has exactly one file name.
const SEGMENT_NAME_DIGITS: usize = 20;

/// Once the batch buffer holds this much, it is handed to the kernel before more frames are added,
/// which bounds the writer's memory without adding syncs (one sync still covers the whole batch).
const WRITE_CHUNK_BYTES: usize = 4 << 20;

/// Read buffer for sequential scans (recovery and iteration); large enough that a scan of a
/// 64 MiB segment costs a few dozen `read` calls rather than one per frame.
const SCAN_BUFFER_BYTES: usize = 1 << 20;

/// Errors from opening, reading or appending to a [`SegmentLog`].
///
/// `Debug` prints the whole `source()` chain so a log line shows the underlying I/O error.
#[derive(thiserror::Error)]
pub enum Error {
    /// A file system operation failed; `op` names the step so the log line says which one.
    #[error("failed to {op} {path}")]
    Io {
        /// The operation that failed, e.g. `"fdatasync"`.
        op: &'static str,
        /// The file or directory it was applied to.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A frame failed validation at a place a torn write cannot explain (a non-last segment, or
    /// followed by a valid frame, or at read time), so acknowledged data may be damaged.
    #[error("corrupt record in segment {segment} at byte offset {offset}")]
    Corrupt {
        /// The segment file holding the bad frame.
        segment: PathBuf,
        /// Byte offset of the bad frame's header within that file.
        offset: u64,
    },
    /// The segment files do not form one dense run of sequence numbers starting at 0, so records
    /// are missing (for example a segment file was deleted).
    #[error("segment files are not contiguous: expected a segment starting at sequence {expected}, found one starting at {found}")]
    MissingSegment {
        /// The first sequence number the next segment should have held.
        expected: u64,
        /// The first sequence number of the segment actually found.
        found: u64,
    },
    /// The requested sequence number has not been (durably) appended yet.
    #[error("sequence number {seq} is out of range (log holds {len} records)")]
    OutOfRange {
        /// The sequence number asked for.
        seq: u64,
        /// Records in the log when the request was served.
        len: u64,
    },
    /// A range's start lies after its end.
    #[error("invalid range {from}..{to}")]
    BadRange {
        /// Start of the range (inclusive).
        from: u64,
        /// End of the range (exclusive).
        to: u64,
    },
    /// Empty payloads are refused because a zero-length frame is how recovery recognises a
    /// zero-filled (never written) tail.
    #[error("empty payloads cannot be appended")]
    EmptyPayload,
    /// The payload is longer than [`Options::max_record_bytes`].
    #[error("payload of {len} bytes exceeds the limit of {max} bytes")]
    RecordTooLarge {
        /// The payload's length.
        len: usize,
        /// The configured limit.
        max: u32,
    },
    /// An [`Options`] field is out of range; the message names it.
    #[error("invalid options: {0}")]
    InvalidOptions(&'static str),
    /// [`SegmentLog::open`] was called outside a Tokio runtime, which the writer task needs.
    #[error("SegmentLog::open must be called from within a Tokio runtime")]
    NoRuntime,
    /// The log was closed (or its writer task stopped) before the append was taken.
    #[error("the log is closed")]
    Closed,
    /// A write or sync failed earlier; after a failed `fdatasync` the page cache state is unknown,
    /// so the writer refuses all further appends and the log must be reopened (which re-validates
    /// the files). Records of the failed batch may or may not be present after reopening.
    #[error("the log writer failed and accepts no more appends; reopen the log")]
    WriterFailed(#[source] Arc<Error>),
    /// The writer panicked (a bug); given as the cause of [`Error::WriterFailed`].
    #[error("the log writer stopped unexpectedly")]
    WriterPanicked,
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")?;
        let mut cause = std::error::Error::source(self);
        while let Some(c) = cause {
            write!(f, "\n\nCaused by:\n    {c}")?;
            cause = c.source();
        }
        Ok(())
    }
}

/// Builds an [`Error::Io`] mapper for `?`, so each call site names its operation and path.
fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> Error + 'a {
    move |source| Error::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Tunables of a [`SegmentLog`].
#[derive(Debug, Clone)]
pub struct Options {
    /// Roll to a new segment once the next frame would push the active one past this size; bounds
    /// the size of one file to scan, copy or archive. A single larger record gets a segment alone.
    pub segment_bytes: u64,
    /// Largest accepted payload; stops one bad caller from forcing huge allocations on every later
    /// read and recovery.
    pub max_record_bytes: u32,
    /// Most queued requests folded into one write and sync; bounds the writer's bookkeeping per
    /// batch. Concurrency, not this number, usually decides the batch size.
    pub max_batch_requests: usize,
    /// Requests that may wait in front of the writer; when full, `append` waits, which gives
    /// backpressure instead of unbounded memory growth.
    pub queue_depth: usize,
    /// Most bytes of zeros the writer keeps written and synced ahead of the active segment's end
    /// (0 turns it off). An append that overwrites blocks already allocated and on disk needs an
    /// `fdatasync` of its data only; one that grows the file also makes the sync write the new
    /// size and allocation, which measured 1.5 to 2 times slower here for batch-sized writes.
    /// The region starts at 64 KiB and doubles with the segment up to this size, so an idle log
    /// holds little unused space.
    pub preallocate_bytes: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            max_record_bytes: 16 << 20,
            max_batch_requests: 4096,
            queue_depth: 8192,
            preallocate_bytes: DEFAULT_PREALLOCATE_BYTES,
        }
    }
}

impl Options {
    fn validate(&self) -> Result<(), Error> {
        if self.segment_bytes <= HEADER_LEN as u64 {
            return Err(Error::InvalidOptions(
                "segment_bytes must exceed the frame header",
            ));
        }
        if self.max_record_bytes == 0 {
            return Err(Error::InvalidOptions("max_record_bytes must be at least 1"));
        }
        if self.max_batch_requests == 0 {
            return Err(Error::InvalidOptions(
                "max_batch_requests must be at least 1",
            ));
        }
        if self.queue_depth == 0 {
            return Err(Error::InvalidOptions("queue_depth must be at least 1"));
        }
        Ok(())
    }
}

/// What kind of damage was found at the end of the last segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TailDamage {
    /// Fewer than [`HEADER_LEN`] bytes remained for a header.
    ShortHeader,
    /// The header's length field is zero, and what follows is not all zeros.
    ZeroLength,
    /// The header promises more payload bytes than the file holds.
    ShortPayload,
    /// The payload does not match the header's CRC.
    BadChecksum,
}

/// A torn tail that [`SegmentLog::open`] cut off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornTail {
    /// The segment file that was truncated (always the last one).
    pub segment: PathBuf,
    /// Byte offset the file was truncated to: the end of its last valid frame.
    pub offset: u64,
    /// Bytes removed; they held no acknowledged record.
    pub bytes_cut: u64,
    /// What made the first removed frame invalid.
    pub damage: TailDamage,
}

/// What [`SegmentLog::open`] found and repaired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Segment files in the log after opening, including one created for a new log.
    pub segments: usize,
    /// Valid records found; also the next sequence number.
    pub records: u64,
    /// The torn tail that was cut off, if there was one.
    pub torn_tail: Option<TornTail>,
}

impl RecoveryReport {
    /// Bytes cut off the last segment (0 if the log was clean).
    pub fn truncated_bytes(&self) -> u64 {
        self.torn_tail.as_ref().map_or(0, |t| t.bytes_cut)
    }
}

/// Counters since [`SegmentLog::open`], for monitoring and for checking that commits are grouped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Records made durable.
    pub records: u64,
    /// `append` / `append_batch` calls completed successfully.
    pub requests: u64,
    /// Write batches performed (one per wake-up of the writer that found work).
    pub batches: u64,
    /// `fdatasync` calls on segment files; at most one per batch plus one per segment roll.
    pub syncs: u64,
    /// Frame bytes written (headers included).
    pub bytes: u64,
    /// Segment files created after `open`.
    pub segments_created: u64,
    /// Zeroed regions written (and synced) ahead of the active segment's end; their syncs are not
    /// counted in `syncs`.
    pub preallocations: u64,
}

/// Atomic twin of [`Stats`], updated by the writer and read by anyone.
#[derive(Default)]
struct Counters {
    records: AtomicU64,
    requests: AtomicU64,
    batches: AtomicU64,
    syncs: AtomicU64,
    bytes: AtomicU64,
    segments_created: AtomicU64,
    preallocations: AtomicU64,
}

impl Counters {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    fn snapshot(&self) -> Stats {
        Stats {
            records: self.records.load(Ordering::Relaxed),
            requests: self.requests.load(Ordering::Relaxed),
            batches: self.batches.load(Ordering::Relaxed),
            syncs: self.syncs.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            segments_created: self.segments_created.load(Ordering::Relaxed),
            preallocations: self.preallocations.load(Ordering::Relaxed),
        }
    }
}

/// Where the frames of one segment start.
struct SegmentIndex {
    /// Sequence number of the segment's first record; also its file name.
    base: u64,
    /// Path of the segment file, kept so sealed segments can be reopened on demand.
    path: PathBuf,
    /// Byte offset of each durable frame; 8 bytes per record is the index's whole cost.
    offsets: Vec<u64>,
    /// Bytes of durable frames; the end of the last frame, so a frame's length is known without
    /// reading its header first.
    end: u64,
}

impl SegmentIndex {
    /// Byte range of the frame for `seq`, which must lie in this segment.
    fn frame_range(&self, seq: u64) -> Option<(u64, u64)> {
        let i = usize::try_from(seq.checked_sub(self.base)?).ok()?;
        let start = *self.offsets.get(i)?;
        let end = self.offsets.get(i + 1).copied().unwrap_or(self.end);
        Some((start, end))
    }

    fn next_seq(&self) -> u64 {
        self.base + self.offsets.len() as u64
    }
}

/// The in-memory offset index of all durable records.
struct Index {
    /// Full segments, oldest first. Their files are opened per read so that a long-lived log does
    /// not pin one descriptor per segment (many tenants times many segments).
    sealed: Vec<SegmentIndex>,
    /// The segment the writer appends to.
    active: SegmentIndex,
    /// Shared handle to the active segment, so hot reads of recent records need no `open`.
    active_file: Arc<File>,
}

impl Index {
    fn segment_for(&self, seq: u64) -> Option<&SegmentIndex> {
        if seq >= self.active.base {
            return Some(&self.active);
        }
        // Sealed bases are strictly increasing, so the segment is the last one starting at or
        // before `seq`.
        let i = self.sealed.partition_point(|s| s.base <= seq);
        self.sealed.get(i.checked_sub(1)?)
    }
}

/// State shared by every handle, iterator and the writer.
struct Shared {
    /// The log's directory, for error messages and new segment names.
    dir: PathBuf,
    /// Offsets of durable records; written only by the writer, after `fdatasync`.
    index: RwLock<Index>,
    /// Number of durable records, duplicated from the index so `len()` takes no lock.
    len: AtomicU64,
    /// Payload limit, checked by `append` before anything is queued.
    max_record_bytes: u32,
    /// Set once by the writer when a write or sync fails; reported by `close`.
    failure: Mutex<Option<Arc<Error>>>,
    /// Counters behind [`SegmentLog::stats`].
    counters: Counters,
}

impl Shared {
    // A panic while holding the lock can only interrupt a push onto the offset vectors, which
    // leaves them consistent, so poisoning is ignored rather than turned into a panic.
    fn read_index(&self) -> RwLockReadGuard<'_, Index> {
        self.index.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_index(&self) -> RwLockWriteGuard<'_, Index> {
        self.index.write().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Payloads of one append request; `One` avoids allocating a `Vec` for the common single append.
enum Payloads {
    One(Vec<u8>),
    Many(Vec<Vec<u8>>),
}

impl Payloads {
    fn as_slice(&self) -> &[Vec<u8>] {
        match self {
            Payloads::One(p) => std::slice::from_ref(p),
            Payloads::Many(v) => v,
        }
    }
}

/// A message to the writer task.
enum Command {
    /// Append payloads; `done` receives the first assigned sequence number once durable.
    Append {
        payloads: Payloads,
        done: oneshot::Sender<Result<u64, Error>>,
    },
    /// Stop after committing everything queued before this command.
    Close { done: oneshot::Sender<()> },
}

impl Command {
    fn payloads(&self) -> &[Vec<u8>] {
        match self {
            Command::Append { payloads, .. } => payloads.as_slice(),
            Command::Close { .. } => &[],
        }
    }
}

/// A handle to one durable log. Cheap to clone; all clones share one writer.
///
/// Dropping the last clone lets the writer finish what is queued and stop; [`SegmentLog::close`]
/// does the same explicitly and waits for it.
#[derive(Clone)]
pub struct SegmentLog {
    /// Queue to the writer task. Its closing (all handles dropped) is what stops the writer.
    tx: mpsc::Sender<Command>,
    /// Index and counters, shared with the writer and iterators.
    shared: Arc<Shared>,
}

impl fmt::Debug for SegmentLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SegmentLog")
            .field("dir", &self.shared.dir)
            .field("len", &self.len())
            .finish_non_exhaustive()
    }
}

impl SegmentLog {
    /// Opens (creating if needed) the log in `dir`, validates every frame, cuts a torn tail off the
    /// last segment, and starts the writer task on the current Tokio runtime.
    ///
    /// This does blocking file I/O proportional to the log's size; call it from
    /// `spawn_blocking` (inside a runtime context) if that matters to the caller.
    ///
    /// # Errors
    ///
    /// - [`Error::InvalidOptions`] if `opts` is out of range.
    /// - [`Error::NoRuntime`] outside a Tokio runtime.
    /// - [`Error::Corrupt`] for a bad frame in a non-last segment, or a bad frame in the last
    ///   segment that is followed by a valid frame.
    /// - [`Error::MissingSegment`] if the segments do not start at 0 or have a gap.
    /// - [`Error::Io`] if a directory or file operation fails.
    pub fn open(
        dir: impl AsRef<Path>,
        opts: Options,
    ) -> Result<(SegmentLog, RecoveryReport), Error> {
        opts.validate()?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| Error::NoRuntime)?;
        let dir = dir.as_ref().to_path_buf();
        let Recovered {
            sealed,
            active,
            active_file,
            active_alloc,
            torn_tail,
        } = recover(&dir)?;

        let records = active.next_seq();
        let report = RecoveryReport {
            segments: sealed.len() + 1,
            records,
            torn_tail,
        };
        let active_path = active.path.clone();
        let active_len = active.end;
        let shared = Arc::new(Shared {
            dir,
            index: RwLock::new(Index {
                sealed,
                active,
                active_file: Arc::clone(&active_file),
            }),
            len: AtomicU64::new(records),
            max_record_bytes: opts.max_record_bytes,
            failure: Mutex::new(None),
            counters: Counters::default(),
        });
        let writer = Writer {
            shared: Arc::clone(&shared),
            segment_bytes: opts.segment_bytes,
            file: active_file,
            path: active_path,
            len: active_len,
            alloc_end: active_alloc,
            preallocate_bytes: opts.preallocate_bytes,
            next_seq: records,
            buf: Vec::new(),
            pending: Vec::new(),
            failed: None,
            runtime: runtime.clone(),
            acks: Vec::new(),
        };
        let (tx, rx) = mpsc::channel(opts.queue_depth);
        runtime.spawn(writer_task(writer, rx, opts.max_batch_requests));
        Ok((SegmentLog { tx, shared }, report))
    }

    /// Appends one record and returns its sequence number once it is durable (written and
    /// `fdatasync`ed, possibly together with other concurrent appends).
    ///
    /// If the future is dropped after it was first polled, the record may still be committed.
    ///
    /// # Errors
    ///
    /// - [`Error::EmptyPayload`] / [`Error::RecordTooLarge`] before anything is queued.
    /// - [`Error::Closed`] if the log was closed.
    /// - [`Error::WriterFailed`] if this or an earlier batch failed to write or sync; the record
    ///   may or may not be present after reopening.
    pub async fn append(&self, payload: Vec<u8>) -> Result<u64, Error> {
        self.check_payload(&payload)?;
        self.submit(Payloads::One(payload)).await
    }

    /// Appends `payloads` as consecutive records (committed by the same sync) and returns their
    /// sequence numbers once all are durable. An empty batch returns an empty range at `len()`.
    ///
    /// # Errors
    ///
    /// As [`SegmentLog::append`]; a bad payload rejects the whole batch before anything is queued.
    pub async fn append_batch(&self, payloads: Vec<Vec<u8>>) -> Result<Range<u64>, Error> {
        if payloads.is_empty() {
            let len = self.len();
            return Ok(len..len);
        }
        for p in &payloads {
            self.check_payload(p)?;
        }
        let n = payloads.len() as u64;
        let first = self.submit(Payloads::Many(payloads)).await?;
        Ok(first..first + n)
    }

    fn check_payload(&self, payload: &[u8]) -> Result<(), Error> {
        check_payload(payload, self.shared.max_record_bytes)
    }

    /// Takes a place in the writer's queue, waiting while the queue is full, so that the append
    /// it is spent on ([`Slot::enqueue`]) never waits. A caller that queues under its own lock
    /// reserves before taking the lock, and so never holds it across a wait.
    ///
    /// # Errors
    /// [`Error::Closed`] if the log was closed.
    pub async fn reserve(&self) -> Result<Slot, Error> {
        let permit = self
            .tx
            .clone()
            .reserve_owned()
            .await
            .map_err(|_| Error::Closed)?;
        Ok(Slot {
            permit,
            max_record_bytes: self.shared.max_record_bytes,
        })
    }

    /// Hands checked payloads to the writer.
    async fn queue(&self, payloads: Payloads) -> Result<Pending, Error> {
        let (done, rx) = oneshot::channel();
        self.tx
            .send(Command::Append { payloads, done })
            .await
            .map_err(|_| Error::Closed)?;
        Ok(Pending(rx))
    }

    async fn submit(&self, payloads: Payloads) -> Result<u64, Error> {
        let Pending(rx) = self.queue(payloads).await?;
        // A dropped sender means the writer stopped (close, or runtime shutdown) before it
        // reached this request.
        rx.await.map_err(|_| Error::Closed)?
    }

    /// Commits everything queued before this call, stops the writer and closes its files. Other
    /// clones stay usable for reading; their appends fail with [`Error::Closed`].
    ///
    /// # Errors
    ///
    /// [`Error::WriterFailed`] if a write or sync failed while the log was open, so the caller
    /// learns about it even if no append was waiting at the time.
    pub async fn close(&self) -> Result<(), Error> {
        let (done, rx) = oneshot::channel();
        if self.tx.send(Command::Close { done }).await.is_ok() {
            // An error here means the writer was already stopping for another reason.
            let _ = rx.await;
        }
        let failure = self
            .shared
            .failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        match failure {
            Some(e) => Err(Error::WriterFailed(e)),
            None => Ok(()),
        }
    }

    /// The largest payload an append accepts ([`Options::max_record_bytes`]).
    pub fn max_record_bytes(&self) -> u32 {
        self.shared.max_record_bytes
    }

    /// Number of durable records, which is also the next sequence number to be assigned.
    pub fn len(&self) -> u64 {
        self.shared.len.load(Ordering::Acquire)
    }

    /// Whether the log holds no durable record.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The log's directory.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// Counters since `open`.
    pub fn stats(&self) -> Stats {
        self.shared.counters.snapshot()
    }

    /// Reads the payload of record `seq`, re-checking its CRC (blocking file I/O).
    ///
    /// # Errors
    ///
    /// - [`Error::OutOfRange`] if `seq >= len()`.
    /// - [`Error::Corrupt`] if the frame on disk no longer matches its header or CRC.
    /// - [`Error::Io`] if the segment cannot be opened or read.
    pub fn read(&self, seq: u64) -> Result<Vec<u8>, Error> {
        let (file, path, start, end) = {
            let index = self.shared.read_index();
            let len = self.len();
            let range = match index.segment_for(seq) {
                Some(seg) if seq < len => seg.frame_range(seq).map(|r| (seg, r)),
                _ => None,
            };
            let Some((seg, (start, end))) = range else {
                return Err(Error::OutOfRange { seq, len });
            };
            let file = (seg.base == index.active.base).then(|| Arc::clone(&index.active_file));
            (file, seg.path.clone(), start, end)
        };
        let file = match file {
            Some(f) => f,
            None => Arc::new(File::open(&path).map_err(io_err("open", &path))?),
        };
        let corrupt = || Error::Corrupt {
            segment: path.clone(),
            offset: start,
        };
        let frame_len = usize::try_from(end - start).map_err(|_| corrupt())?;
        if frame_len <= HEADER_LEN {
            return Err(corrupt());
        }
        let mut frame = vec![0u8; frame_len];
        file.read_exact_at(&mut frame, start)
            .map_err(io_err("read", &path))?;
        let (len, crc) = parse_header(&frame[..HEADER_LEN]);
        if len as usize != frame_len - HEADER_LEN || crc32fast::hash(&frame[HEADER_LEN..]) != crc {
            return Err(corrupt());
        }
        frame.drain(..HEADER_LEN);
        Ok(frame)
    }

    /// Iterates over `(seq, payload)` from `from` up to the `len()` at the time of the call,
    /// reading each segment sequentially (blocking file I/O). The iterator stops after the first
    /// error it yields.
    ///
    /// # Errors
    ///
    /// [`Error::OutOfRange`] if `from > len()`. Items carry the errors of [`SegmentLog::read`].
    pub fn iter_from(&self, from: u64) -> Result<Iter, Error> {
        let len = self.len();
        if from > len {
            return Err(Error::OutOfRange { seq: from, len });
        }
        self.iter_range(from, len)
    }

    /// Reads the payloads of records `from..to`.
    ///
    /// # Errors
    ///
    /// [`Error::BadRange`] if `from > to`, [`Error::OutOfRange`] if `to > len()`, and the errors
    /// of [`SegmentLog::read`].
    pub fn read_range(&self, from: u64, to: u64) -> Result<Vec<Vec<u8>>, Error> {
        self.iter_range(from, to)?
            .map(|item| item.map(|(_, payload)| payload))
            .collect()
    }

    /// Iterates over `(seq, payload)` of records `from..to`, reading one record at a time.
    ///
    /// # Errors
    ///
    /// As [`SegmentLog::read_range`]; read errors come from the iterator.
    pub fn iter_range(&self, from: u64, to: u64) -> Result<Iter, Error> {
        if from > to {
            return Err(Error::BadRange { from, to });
        }
        let len = self.len();
        if to > len {
            return Err(Error::OutOfRange { seq: to, len });
        }
        Ok(Iter {
            shared: Arc::clone(&self.shared),
            next: from,
            end: to,
            cursor: None,
        })
    }
}

/// Iterator over `(seq, payload)` returned by [`SegmentLog::iter_from`].
pub struct Iter {
    /// Keeps the index reachable even if every `SegmentLog` handle is dropped.
    shared: Arc<Shared>,
    /// Next sequence number to yield.
    next: u64,
    /// One past the last sequence number to yield; fixed at creation so iteration terminates.
    end: u64,
    /// Open reader on the segment holding `next`, if one is open.
    cursor: Option<Cursor>,
}

/// Sequential read position inside one segment.
struct Cursor {
    reader: BufReader<File>,
    path: PathBuf,
    /// Byte offset of the next frame, for error messages.
    offset: u64,
    /// One past the last sequence number this segment holds durably.
    seg_end: u64,
    /// Header scratch space; payloads are returned by value, so only this can be reused.
    header: [u8; HEADER_LEN],
}

impl Iter {
    fn open_cursor(&self, seq: u64) -> Result<Cursor, Error> {
        let (path, offset, seg_end) = {
            let index = self.shared.read_index();
            let located = index
                .segment_for(seq)
                .and_then(|seg| Some((seg, seg.frame_range(seq)?.0)));
            let Some((seg, offset)) = located else {
                return Err(Error::OutOfRange {
                    seq,
                    len: self.shared.len.load(Ordering::Acquire),
                });
            };
            (seg.path.clone(), offset, seg.next_seq())
        };
        let mut file = File::open(&path).map_err(io_err("open", &path))?;
        file.seek(SeekFrom::Start(offset))
            .map_err(io_err("seek", &path))?;
        Ok(Cursor {
            reader: BufReader::with_capacity(SCAN_BUFFER_BYTES, file),
            path,
            offset,
            seg_end,
            header: [0; HEADER_LEN],
        })
    }

    fn next_record(&mut self) -> Result<Vec<u8>, Error> {
        let seq = self.next;
        let cursor = match &mut self.cursor {
            Some(c) if seq < c.seg_end => c,
            _ => self.cursor.insert(self.open_cursor(seq)?),
        };
        let corrupt = |c: &Cursor| Error::Corrupt {
            segment: c.path.clone(),
            offset: c.offset,
        };
        // Durable frames are complete on disk, so a short read is damage, not a normal end.
        if cursor.reader.read_exact(&mut cursor.header).is_err() {
            return Err(corrupt(cursor));
        }
        let (len, crc) = parse_header(&cursor.header);
        if len == 0 {
            return Err(corrupt(cursor));
        }
        let mut payload = vec![0u8; len as usize];
        if cursor.reader.read_exact(&mut payload).is_err() || crc32fast::hash(&payload) != crc {
            return Err(corrupt(cursor));
        }
        cursor.offset += (HEADER_LEN + payload.len()) as u64;
        Ok(payload)
    }
}

impl Iterator for Iter {
    type Item = Result<(u64, Vec<u8>), Error>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.next >= self.end {
            return None;
        }
        let seq = self.next;
        match self.next_record() {
            Ok(payload) => {
                self.next += 1;
                Some(Ok((seq, payload)))
            }
            Err(e) => {
                // Fuse: after damage the position in the file is unknown.
                self.next = self.end;
                Some(Err(e))
            }
        }
    }
}

fn parse_header(h: &[u8]) -> (u32, u32) {
    let mut len = [0u8; 4];
    let mut crc = [0u8; 4];
    len.copy_from_slice(&h[..4]);
    crc.copy_from_slice(&h[4..HEADER_LEN]);
    (u32::from_le_bytes(len), u32::from_le_bytes(crc))
}

fn encode_frame(buf: &mut Vec<u8>, payload: &[u8]) {
    // INVARIANT: payload.len() <= max_record_bytes <= u32::MAX, checked by `check_payload`.
    buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    buf.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    buf.extend_from_slice(payload);
}

fn segment_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!(
        "{base:0width$}{SEGMENT_SUFFIX}",
        width = SEGMENT_NAME_DIGITS
    ))
}

fn parse_segment_name(name: &str) -> Option<u64> {
    let stem = name.strip_suffix(SEGMENT_SUFFIX)?;
    if stem.len() != SEGMENT_NAME_DIGITS || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    stem.parse().ok()
}

/// Makes a directory's entries (new or removed files) durable.
fn sync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync directory", dir))
}

/// Result of validating one segment file front to back.
struct Scan {
    offsets: Vec<u64>,
    /// End of the last valid frame.
    valid_len: u64,
    file_len: u64,
    /// Why scanning stopped before `file_len`, if it did.
    damage: Option<TailDamage>,
}

fn scan_segment(file: &File, path: &Path) -> Result<Scan, Error> {
    let file_len = file.metadata().map_err(io_err("stat", path))?.len();
    let mut reader = BufReader::with_capacity(SCAN_BUFFER_BYTES, file);
    let mut offsets = Vec::new();
    let mut payload = Vec::new();
    let mut header = [0u8; HEADER_LEN];
    let mut pos = 0u64;
    let damage = loop {
        let remaining = file_len - pos;
        if remaining == 0 {
            break None;
        }
        if remaining < HEADER_LEN as u64 {
            break Some(TailDamage::ShortHeader);
        }
        reader
            .read_exact(&mut header)
            .map_err(io_err("read", path))?;
        let (len, crc) = parse_header(&header);
        if len == 0 {
            break Some(TailDamage::ZeroLength);
        }
        if u64::from(len) > remaining - HEADER_LEN as u64 {
            break Some(TailDamage::ShortPayload);
        }
        payload.resize(len as usize, 0);
        reader
            .read_exact(&mut payload)
            .map_err(io_err("read", path))?;
        if crc32fast::hash(&payload) != crc {
            break Some(TailDamage::BadChecksum);
        }
        offsets.push(pos);
        pos += HEADER_LEN as u64 + u64::from(len);
    };
    Ok(Scan {
        offsets,
        valid_len: pos,
        file_len,
        damage,
    })
}

/// Looks past a bad frame at `bad` for a later valid frame, following the length fields.
///
/// A torn write only damages the end of the file, so a valid frame after the bad one means an
/// acknowledged record in the middle was damaged (e.g. a flipped payload or CRC bit) and cutting
/// the tail would silently drop acknowledged records after it. A damaged *length* field cannot be
/// told apart from a torn tail this way.
///
/// One exception: a bad frame holding a whole zeroed sector (512 bytes, aligned) is taken as torn
/// even if valid frames follow. A batch written into zeroed space and not yet synced can reach the
/// disk in any order, sector by sector, so a crash may leave a later frame whole and an earlier
/// one partly zero; no acknowledged record was in that batch. Event payloads are JSON text, which
/// holds no zero byte, so damage to an acknowledged event still shows as corruption.
fn valid_frame_after(file: &File, path: &Path, bad: u64, file_len: u64) -> Result<bool, Error> {
    let mut at = bad;
    let mut header = [0u8; HEADER_LEN];
    let mut payload = Vec::new();
    if file_len - bad < HEADER_LEN as u64 {
        return Ok(false);
    }
    file.read_exact_at(&mut header, at)
        .map_err(io_err("read", path))?;
    let (len, _) = parse_header(&header);
    let frame_end = (bad + HEADER_LEN as u64 + u64::from(len)).min(file_len);
    if holds_zero_sector(file, path, bad, frame_end)? {
        return Ok(false);
    }
    loop {
        if file_len - at < HEADER_LEN as u64 {
            return Ok(false);
        }
        file.read_exact_at(&mut header, at)
            .map_err(io_err("read", path))?;
        let (len, crc) = parse_header(&header);
        if len == 0 || u64::from(len) > file_len - at - HEADER_LEN as u64 {
            return Ok(false);
        }
        if at != bad {
            payload.resize(len as usize, 0);
            file.read_exact_at(&mut payload, at + HEADER_LEN as u64)
                .map_err(io_err("read", path))?;
            if crc32fast::hash(&payload) == crc {
                return Ok(true);
            }
        }
        at += HEADER_LEN as u64 + u64::from(len);
    }
}

/// Sector size assumed for torn writes: the smallest unit a disk writes whole.
const SECTOR: u64 = 512;

/// Whether `from..to` of `file` contains an aligned sector of zeros.
fn holds_zero_sector(file: &File, path: &Path, from: u64, to: u64) -> Result<bool, Error> {
    let mut sector = from.next_multiple_of(SECTOR);
    let mut buf = [0u8; SECTOR as usize];
    while sector + SECTOR <= to {
        file.read_exact_at(&mut buf, sector)
            .map_err(io_err("read", path))?;
        if buf.iter().all(|&b| b == 0) {
            return Ok(true);
        }
        sector += SECTOR;
    }
    Ok(false)
}

/// Whether the bytes `from..to` of `file` are all zero.
fn all_zero(file: &File, path: &Path, from: u64, to: u64) -> Result<bool, Error> {
    let mut buf = vec![0u8; SCAN_BUFFER_BYTES.min((to - from) as usize)];
    let mut at = from;
    while at < to {
        let n = buf.len().min((to - at) as usize);
        file.read_exact_at(&mut buf[..n], at)
            .map_err(io_err("read", path))?;
        if buf[..n].iter().any(|&b| b != 0) {
            return Ok(false);
        }
        at += n as u64;
    }
    Ok(true)
}

/// The index and active file as rebuilt from disk.
struct Recovered {
    sealed: Vec<SegmentIndex>,
    active: SegmentIndex,
    active_file: Arc<File>,
    /// The active file's length, zeroed space ahead included.
    active_alloc: u64,
    torn_tail: Option<TornTail>,
}

/// One validated segment.
struct Loaded {
    index: SegmentIndex,
    /// Writable for the last segment, which becomes the active one.
    file: File,
    /// The file's length: its frames, then any zeroed space the writer allocated ahead.
    alloc_end: u64,
    torn_tail: Option<TornTail>,
}

fn recover(dir: &Path) -> Result<Recovered, Error> {
    if !dir.exists() {
        fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
        // The new directory's own name lives in its parent.
        let parent = match dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        sync_dir(parent)?;
    }

    let mut bases = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err("list", dir))? {
        let entry = entry.map_err(io_err("list", dir))?;
        let name = entry.file_name();
        match name.to_str().and_then(parse_segment_name) {
            Some(base) => bases.push(base),
            None => tracing::debug!(file = ?name, "ignoring non-segment file in log directory"),
        }
    }
    bases.sort_unstable();

    if bases.is_empty() {
        let path = segment_path(dir, 0);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io_err("create", &path))?;
        sync_dir(dir)?;
        let active = SegmentIndex {
            base: 0,
            path,
            offsets: Vec::new(),
            end: 0,
        };
        return Ok(Recovered {
            sealed: Vec::new(),
            active,
            active_file: Arc::new(file),
            active_alloc: 0,
            torn_tail: None,
        });
    }

    let mut sealed = Vec::with_capacity(bases.len());
    let mut expected = 0u64;
    for &base in &bases[..bases.len() - 1] {
        let seg = load_segment(dir, base, expected, false)?.index;
        expected = seg.next_seq();
        sealed.push(seg);
    }
    let last = load_segment(dir, bases[bases.len() - 1], expected, true)?;
    Ok(Recovered {
        sealed,
        active: last.index,
        active_file: Arc::new(last.file),
        active_alloc: last.alloc_end,
        torn_tail: last.torn_tail,
    })
}

/// Validates one segment. Damage is an error unless the segment is the last one and the damage
/// is a torn tail, which is cut off.
fn load_segment(dir: &Path, base: u64, expected: u64, is_last: bool) -> Result<Loaded, Error> {
    if base != expected {
        return Err(Error::MissingSegment {
            expected,
            found: base,
        });
    }
    let path = segment_path(dir, base);
    let file = OpenOptions::new()
        .read(true)
        .write(is_last)
        .open(&path)
        .map_err(io_err("open", &path))?;
    let scan = scan_segment(&file, &path)?;
    let mut torn_tail = None;
    // Zeros after the last frame are space the writer allocated ahead (or a write that never
    // reached the disk): no frame is zero-length, so they hold no record and nothing is torn. They
    // are left in place, to be written over.
    let damage = match scan.damage {
        Some(_) if all_zero(&file, &path, scan.valid_len, scan.file_len)? => None,
        other => other,
    };
    let mut alloc_end = scan.file_len;
    if let Some(damage) = damage {
        if !is_last || valid_frame_after(&file, &path, scan.valid_len, scan.file_len)? {
            return Err(Error::Corrupt {
                segment: path,
                offset: scan.valid_len,
            });
        }
        let bytes_cut = scan.file_len - scan.valid_len;
        tracing::warn!(
            segment = %path.display(),
            offset = scan.valid_len,
            bytes_cut,
            ?damage,
            "cutting torn tail off audit log segment"
        );
        file.set_len(scan.valid_len)
            .map_err(io_err("truncate", &path))?;
        // sync_all, not sync_data: the change is to the file size itself.
        file.sync_all().map_err(io_err("fsync", &path))?;
        torn_tail = Some(TornTail {
            segment: path.clone(),
            offset: scan.valid_len,
            bytes_cut,
            damage,
        });
        alloc_end = scan.valid_len;
    }
    let index = SegmentIndex {
        base,
        path,
        offsets: scan.offsets,
        end: scan.valid_len,
    };
    Ok(Loaded {
        index,
        file,
        alloc_end,
        torn_tail,
    })
}

/// State owned by the writer: the only code that writes segment files.
struct Writer {
    shared: Arc<Shared>,
    /// Roll threshold, from [`Options::segment_bytes`].
    segment_bytes: u64,
    /// The active segment, written with `pwrite` at explicit offsets so readers sharing the
    /// handle are never affected by a file cursor.
    file: Arc<File>,
    path: PathBuf,
    /// Durable length of the active segment.
    len: u64,
    /// Length of the active segment file: `len`, then zeros written ahead, synced.
    alloc_end: u64,
    /// From [`Options::preallocate_bytes`]; set to 0 after a failed preallocation.
    preallocate_bytes: u64,
    /// Sequence number of the next record to be made durable.
    next_seq: u64,
    /// Frames of the current batch, reused across batches to avoid reallocating.
    buf: Vec<u8>,
    /// Offsets of frames written to the active segment but not yet synced and published.
    pending: Vec<u64>,
    /// Set after the first failed write or sync; every later batch fails with it.
    failed: Option<Arc<Error>>,
    /// The runtime the log was opened in, on which a task wakes each batch's appenders.
    runtime: tokio::runtime::Handle,
    /// Those tasks, until they have run: a close waits for them, so that every append committed
    /// before it has been told so when `close()` returns.
    acks: Vec<tokio::task::JoinHandle<()>>,
}

impl Writer {
    /// Commits every append in `cmds` up to the first `Close`. Returns the close waiters if a
    /// `Close` was found, meaning the writer must stop.
    fn process(&mut self, cmds: &mut Vec<Command>) -> Option<Vec<oneshot::Sender<()>>> {
        let close_at = cmds.iter().position(|c| matches!(c, Command::Close { .. }));
        let after_close = close_at.map(|i| cmds.split_off(i));
        self.commit(cmds);
        let after_close = after_close?;
        let mut closers = Vec::new();
        for cmd in after_close {
            // Appends queued behind a close are dropped, so their callers see `Error::Closed`.
            if let Command::Close { done } = cmd {
                closers.push(done);
            }
        }
        Some(closers)
    }

    fn commit(&mut self, cmds: &mut Vec<Command>) {
        if cmds.is_empty() {
            return;
        }
        #[cfg(test)]
        tests::maybe_panic(cmds);
        let first = self.next_seq;
        let failure = match &self.failed {
            Some(f) => Some(Arc::clone(f)),
            None => {
                Counters::add(&self.shared.counters.batches, 1);
                self.write_and_sync(cmds).err().map(|e| self.poison(e))
            }
        };
        // Requests wholly below `durable` were synced (perhaps before a later step of the batch
        // failed), so they are acknowledged even if the batch as a whole failed.
        let durable = self.next_seq;
        let mut seq = first;
        let mut ok_requests = 0;
        let mut acks = Vec::with_capacity(cmds.len());
        for cmd in cmds.drain(..) {
            if let Command::Append { payloads, done } = cmd {
                let n = payloads.as_slice().len() as u64;
                let result = match &failure {
                    Some(f) if seq + n > durable => Err(Error::WriterFailed(Arc::clone(f))),
                    _ => {
                        ok_requests += 1;
                        Ok(seq)
                    }
                };
                seq += n;
                acks.push((done, result));
            }
        }
        // Counted before anyone hears, so that stats read after an acknowledgement include it.
        Counters::add(&self.shared.counters.requests, ok_requests);
        let acks = Acks(acks);
        // Why a task: waking 30 or so appenders from this thread costs a futex wake each, while
        // the next batch waits for this thread; from a runtime worker a wake is a queue push.
        // Measured at 64 writers, alternating runs: 82,000 to 90,000 events/s against 77,000 to
        // 82,000 sent from here. If the runtime is shutting down the task may never run, but
        // a task that never runs still drops its `Acks`, which answers them.
        self.acks.retain(|h| !h.is_finished());
        self.acks
            .push(self.runtime.spawn(async move { drop(acks) }));
        // After the acknowledgements, so that the batch does not wait for it; the next one may.
        if failure.is_none() {
            self.preallocate();
        }
    }

    /// Keeps zeros written and synced ahead of the active segment's end, so that the next batches
    /// overwrite allocated blocks and their `fdatasync` writes data only. Runs when less than half
    /// a region is left; the region doubles with the segment from 64 KiB up to
    /// [`Options::preallocate_bytes`], and never reaches past the roll threshold.
    fn preallocate(&mut self) {
        let region = self
            .preallocate_bytes
            .min(self.len.max(PREALLOCATE_MIN_BYTES).next_power_of_two());
        let start = self.alloc_end.max(self.len);
        if region == 0 || start >= self.len + region / 2 || start >= self.segment_bytes {
            return;
        }
        // Whole 4 KiB blocks, so that frames never share a block with a partial zero write.
        let end = (self.len + region)
            .next_multiple_of(4096)
            .min(self.segment_bytes);
        let mut at = start;
        let written = (|| {
            while at < end {
                let n = (end - at).min(ZEROS.len() as u64) as usize;
                self.file.write_all_at(&ZEROS[..n], at)?;
                at += n as u64;
            }
            Ok::<(), io::Error>(())
        })();
        if written.is_ok() {
            // A failed sync is the disk reporting an error, as for a batch: the writer stops.
            if let Err(e) = self.file.sync_data() {
                self.poison(io_err("fdatasync", &self.path.clone())(e));
                return;
            }
        }
        match written {
            Ok(()) => {
                self.alloc_end = end;
                Counters::add(&self.shared.counters.preallocations, 1);
            }
            Err(e) => {
                // Nothing acknowledged depends on these zeros (a full disk, say): appends go on
                // growing the file, only slower. Recovery treats any zeros left as unused space.
                tracing::warn!(error = %e, path = %self.path.display(), "could not preallocate audit log space; appends grow the file instead");
                self.preallocate_bytes = 0;
                self.alloc_end = self.len;
            }
        }
    }

    fn poison(&mut self, e: Error) -> Arc<Error> {
        tracing::error!(error = ?e, dir = %self.shared.dir.display(), "audit log write failed; refusing further appends");
        self.pending.clear();
        self.buf.clear();
        // Best effort: drop unacknowledged bytes so a reopen is less likely to resurrect records
        // whose appends reported failure. Recovery re-validates whatever is left.
        if let Err(te) = self.file.set_len(self.len) {
            tracing::error!(error = %te, path = %self.path.display(), "could not truncate after failed write");
        }
        let e = Arc::new(e);
        self.failed = Some(Arc::clone(&e));
        *self
            .shared
            .failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Arc::clone(&e));
        e
    }

    fn write_and_sync(&mut self, cmds: &[Command]) -> Result<(), Error> {
        self.buf.clear();
        // `end` is where the next frame goes; `flushed` is how much has been handed to the kernel.
        let mut end = self.len;
        let mut flushed = self.len;
        for cmd in cmds {
            for payload in cmd.payloads() {
                let frame_len = (HEADER_LEN + payload.len()) as u64;
                // A frame larger than a whole segment still gets written, alone in its segment.
                if end > 0 && end + frame_len > self.segment_bytes {
                    self.flush(&mut flushed)?;
                    self.sync_and_publish(end)?;
                    self.roll()?;
                    end = 0;
                    flushed = 0;
                }
                self.pending.push(end);
                encode_frame(&mut self.buf, payload);
                end += frame_len;
                if self.buf.len() >= WRITE_CHUNK_BYTES {
                    self.flush(&mut flushed)?;
                }
            }
        }
        self.flush(&mut flushed)?;
        if !self.pending.is_empty() {
            self.sync_and_publish(end)?;
        }
        Ok(())
    }

    fn flush(&mut self, flushed: &mut u64) -> Result<(), Error> {
        if self.buf.is_empty() {
            return Ok(());
        }
        self.file
            .write_all_at(&self.buf, *flushed)
            .map_err(io_err("write", &self.path))?;
        *flushed += self.buf.len() as u64;
        Counters::add(&self.shared.counters.bytes, self.buf.len() as u64);
        self.buf.clear();
        Ok(())
    }

    /// Syncs the active segment, then makes its pending frames visible to readers and countable
    /// as acknowledged. Nothing becomes visible before it is durable.
    fn sync_and_publish(&mut self, end: u64) -> Result<(), Error> {
        self.file
            .sync_data()
            .map_err(io_err("fdatasync", &self.path))?;
        let counters = &self.shared.counters;
        Counters::add(&counters.syncs, 1);
        let n = self.pending.len() as u64;
        {
            let mut index = self.shared.write_index();
            index.active.offsets.append(&mut self.pending);
            index.active.end = end;
        }
        self.len = end;
        self.next_seq += n;
        Counters::add(&counters.records, n);
        self.shared.len.store(self.next_seq, Ordering::Release);
        Ok(())
    }

    /// Seals the (synced) active segment and starts a new one named after the next sequence number.
    fn roll(&mut self) -> Result<(), Error> {
        if self.alloc_end > self.len {
            // Best effort and not synced: a sealed segment keeps only its frames, but zeros left
            // after them by a crash are recognised as unused space.
            if let Err(e) = self.file.set_len(self.len) {
                tracing::warn!(error = %e, path = %self.path.display(), "could not trim the zeroed space off a sealed segment");
            }
        }
        let base = self.next_seq;
        let path = segment_path(&self.shared.dir, base);
        // create_new: an existing file of that name would mean two writers or a recovery bug.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io_err("create", &path))?;
        // Without this, a crash could lose the new file's directory entry along with records
        // already acknowledged from it.
        sync_dir(&self.shared.dir)?;
        let file = Arc::new(file);
        {
            let mut index = self.shared.write_index();
            let new_active = SegmentIndex {
                base,
                path: path.clone(),
                offsets: Vec::new(),
                end: 0,
            };
            let mut old = std::mem::replace(&mut index.active, new_active);
            old.offsets.shrink_to_fit();
            index.sealed.push(old);
            index.active_file = Arc::clone(&file);
        }
        tracing::debug!(segment = %path.display(), "rolled to new audit log segment");
        Counters::add(&self.shared.counters.segments_created, 1);
        self.file = file;
        self.path = path;
        self.len = 0;
        self.alloc_end = 0;
        Ok(())
    }
}

/// Waits for requests without holding a thread, then commits them on the blocking pool.
///
/// Under load the blocking closure keeps draining the queue itself, so a busy log behaves like a
/// dedicated writer thread; an idle log holds no thread at all, which matters with many tenants.
async fn writer_task(mut writer: Writer, mut rx: mpsc::Receiver<Command>, max_batch: usize) {
    let mut cmds = Vec::with_capacity(max_batch);
    loop {
        if rx.recv_many(&mut cmds, max_batch).await == 0 {
            // Every handle was dropped and the queue is empty.
            return;
        }
        let job = tokio::task::spawn_blocking(move || {
            // A panic in the writer (a bug) is caught so that the queue outlives it: every append
            // in it, or yet to be sent on a place reserved before, is then failed, not left to wait.
            let stop = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| loop {
                if let Some(closers) = writer.process(&mut cmds) {
                    break Some(closers);
                }
                while cmds.len() < max_batch {
                    match rx.try_recv() {
                        Ok(cmd) => cmds.push(cmd),
                        Err(_) => break,
                    }
                }
                if cmds.is_empty() {
                    break None;
                }
            }));
            (writer, rx, cmds, stop)
        });
        match job.await {
            Ok((w, r, c, Ok(None))) => {
                writer = w;
                rx = r;
                cmds = c;
            }
            Ok((w, r, c, Err(_))) => {
                let failure = {
                    let mut slot = w
                        .shared
                        .failure
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner);
                    Arc::clone(slot.get_or_insert_with(|| Arc::new(Error::WriterPanicked)))
                };
                tracing::error!(dir = %w.shared.dir.display(), "audit log writer panicked; refusing further appends");
                // Appends it had taken and not answered hear `Error::Closed` as their answers drop.
                drop((c, w));
                refuse_queued(r, || Error::WriterFailed(Arc::clone(&failure))).await;
                return;
            }
            Ok((mut w, mut r, _, Ok(Some(closers)))) => {
                // Every append committed before the close hears so first.
                for acks in std::mem::take(&mut w.acks) {
                    let _ = acks.await;
                }
                // Close the files and the queue before telling `close()` callers we are done.
                drop(w);
                r.close();
                for done in closers {
                    let _ = done.send(());
                }
                refuse_queued(r, || Error::Closed).await;
                return;
            }
            Err(e) => {
                // Waiters inside the job see their oneshot dropped and get `Error::Closed`.
                tracing::error!(error = %e, "audit log writer stopped unexpectedly");
                return;
            }
        }
    }
}

/// Fails every append left in a stopped writer's queue with `err()`, and answers every close.
///
/// A place reserved before the stop may still be spent on an append (`Slot::enqueue` cannot fail
/// then), so this goes on until every place is given back, or their callers would wait forever.
async fn refuse_queued(mut rx: mpsc::Receiver<Command>, err: impl Fn() -> Error) {
    rx.close();
    while let Some(cmd) = rx.recv().await {
        match cmd {
            Command::Append { done, .. } => {
                let _ = done.send(Err(err()));
            }
            Command::Close { done } => {
                let _ = done.send(());
            }
        }
    }
}

/// A batch's answers, sent when dropped: by the task that was spawned to send them, or with that
/// task if the runtime drops it unrun, so that no committed append goes unanswered.
struct Acks(Vec<(Answer, Result<u64, Error>)>);

/// Where an append hears its sequence number or why it failed.
type Answer = oneshot::Sender<Result<u64, Error>>;

impl Drop for Acks {
    fn drop(&mut self) {
        for (done, result) in self.0.drain(..) {
            // The caller may have stopped waiting; the record is durable either way.
            let _ = done.send(result);
        }
    }
}

fn check_payload(payload: &[u8], max: u32) -> Result<(), Error> {
    if payload.is_empty() {
        return Err(Error::EmptyPayload);
    }
    if payload.len() > max as usize {
        return Err(Error::RecordTooLarge {
            len: payload.len(),
            max,
        });
    }
    Ok(())
}

/// A place in a log's queue, from [`SegmentLog::reserve`]; dropping it gives the place back.
pub struct Slot {
    permit: mpsc::OwnedPermit<Command>,
    max_record_bytes: u32,
}

impl fmt::Debug for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Slot").finish_non_exhaustive()
    }
}

impl Slot {
    /// Queues `payloads` as consecutive records, committed by the same sync, without waiting, and
    /// returns a [`Pending`] that resolves to the first one's sequence number once all are
    /// durable. Records are committed in the order they are queued, so a caller that queues under
    /// its own lock knows each record's sequence number before it is durable.
    ///
    /// # Errors
    /// [`Error::EmptyPayload`] for an empty batch or payload, [`Error::RecordTooLarge`]; nothing
    /// is queued then.
    pub fn enqueue(self, mut payloads: Vec<Vec<u8>>) -> Result<Pending, Error> {
        if payloads.is_empty() {
            return Err(Error::EmptyPayload);
        }
        for p in &payloads {
            check_payload(p, self.max_record_bytes)?;
        }
        let payloads = match payloads.len() {
            1 => Payloads::One(payloads.pop().expect("one payload")),
            _ => Payloads::Many(payloads),
        };
        let (done, rx) = oneshot::channel();
        // On a closed log the writer, which keeps receiving until every reserved place is given
        // back, fails the append, so the wait ends with `Error::Closed`.
        self.permit.send(Command::Append { payloads, done });
        Ok(Pending(rx))
    }
}

/// A queued record that is not yet known to be durable; see [`Slot::enqueue`].
#[derive(Debug)]
pub struct Pending(oneshot::Receiver<Result<u64, Error>>);

impl Pending {
    /// Waits until the record is durable and returns its sequence number.
    ///
    /// # Errors
    /// [`Error::Closed`] when the writer stopped first; [`Error::WriterFailed`] when the write or
    /// its sync failed.
    pub async fn durable(self) -> Result<u64, Error> {
        self.0.await.map_err(|_| Error::Closed)?
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An append of a payload holding these bytes makes the writer panic, standing in for a bug
    /// (the audit log's tests put it inside an event).
    pub(crate) const PANIC_PAYLOAD: &[u8] = b"test: the writer panics here";

    pub(super) fn maybe_panic(cmds: &[Command]) {
        let poisoned = cmds.iter().any(|c| match c {
            Command::Append { payloads, .. } => payloads
                .as_slice()
                .iter()
                .any(|p| p.windows(PANIC_PAYLOAD.len()).any(|w| w == PANIC_PAYLOAD)),
            Command::Close { .. } => false,
        });
        assert!(!poisoned, "{}", String::from_utf8_lossy(PANIC_PAYLOAD));
    }

    /// A writer that panics answers the append it was writing, the appends queued behind it and
    /// one sent later on a place reserved before, instead of leaving them to wait forever; the
    /// log then refuses appends and keeps what was durable.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_writer_panic_fails_queued_and_reserved_appends_instead_of_hanging() {
        let wait = std::time::Duration::from_secs(10);
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = SegmentLog::open(dir.path(), Options::default()).unwrap();
        assert_eq!(log.append(b"before".to_vec()).await.unwrap(), 0);
        let slot = log.reserve().await.unwrap();
        let failed = tokio::time::timeout(wait, log.append(PANIC_PAYLOAD.to_vec()))
            .await
            .expect("the append that met the panic is answered");
        assert!(failed.is_err(), "{failed:?}");
        let pending = slot.enqueue(vec![b"after".to_vec()]).unwrap();
        let got = tokio::time::timeout(wait, pending.durable())
            .await
            .expect("an append on a place reserved before the panic is answered");
        assert!(matches!(got, Err(Error::WriterFailed(_))), "{got:?}");
        let later = tokio::time::timeout(wait, log.append(b"later".to_vec()))
            .await
            .expect("a later append is answered");
        assert!(matches!(later, Err(Error::Closed)), "{later:?}");
        assert!(matches!(log.close().await, Err(Error::WriterFailed(_))));
        assert_eq!(log.read(0).unwrap(), b"before");
        assert_eq!(log.len(), 1);
    }
}
