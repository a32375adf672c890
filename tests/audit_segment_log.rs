//! Behaviour tests for `segment_log`: durability round trips, group commit, torn-tail recovery,
//! hard corruption errors, segment rolling and argument errors.

use std::collections::HashSet;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use agentgate::audit::segment_log::{Error, Options, SegmentLog, TailDamage, HEADER_LEN};

/// Fixed payload size for the on-disk manipulation tests, so frame offsets are simple arithmetic.
const PAYLOAD_LEN: usize = 32;
const FRAME_LEN: u64 = (HEADER_LEN + PAYLOAD_LEN) as u64;

/// A deterministic, distinguishable payload of `PAYLOAD_LEN` bytes for record `i`.
fn fixed_payload(i: u64) -> Vec<u8> {
    let mut p = format!("record-{i:06}-").into_bytes();
    p.resize(PAYLOAD_LEN, b'a' + (i % 26) as u8);
    p
}

fn seg_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.seg"))
}

fn segment_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".seg"))
        .collect();
    names.sort();
    names
}

/// Options without space allocated ahead, so that a segment file ends at its last frame and the
/// damage tests can work out offsets from the file's length.
fn exact_files() -> Options {
    Options {
        preallocate_bytes: 0,
        ..Options::default()
    }
}

fn small_segments(segment_bytes: u64) -> Options {
    Options {
        segment_bytes,
        ..Options::default()
    }
}

/// Opens `dir`, appends `fixed_payload(0..n)` one at a time, and closes it.
async fn write_fixed(dir: &Path, opts: Options, n: u64) {
    let (log, report) = SegmentLog::open(dir, opts).unwrap();
    assert_eq!(report.records, 0);
    for i in 0..n {
        assert_eq!(log.append(fixed_payload(i)).await.unwrap(), i);
    }
    log.close().await.unwrap();
}

fn flip_byte(path: &Path, offset: u64) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= 0x40;
    f.write_all_at(&b, offset).unwrap();
}

fn append_bytes(path: &Path, bytes: &[u8]) {
    let mut f = OpenOptions::new().append(true).open(path).unwrap();
    f.write_all(bytes).unwrap();
}

fn truncate(path: &Path, len: u64) {
    OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_round_trip_after_reopen() {
    const TASKS: u64 = 32;
    const PER_TASK: u64 = 200;
    let dir = tempfile::tempdir().unwrap();
    let (log, report) = SegmentLog::open(dir.path(), Options::default()).unwrap();
    assert_eq!(report.records, 0);
    assert_eq!(report.segments, 1);

    let mut handles = Vec::new();
    for t in 0..TASKS {
        let log = log.clone();
        handles.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0..PER_TASK {
                // Vary the length so frame boundaries are not all alike.
                let payload = format!("task{t}-item{i}-{}", "x".repeat((i % 17) as usize));
                let seq = log.append(payload.clone().into_bytes()).await.unwrap();
                acked.push((seq, payload.into_bytes()));
            }
            acked
        }));
    }
    let mut acked = Vec::new();
    for h in handles {
        acked.extend(h.await.unwrap());
    }
    let total = TASKS * PER_TASK;
    let seqs: HashSet<u64> = acked.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs.len() as u64, total, "every append got its own seq");
    assert_eq!(
        seqs.iter().max().copied(),
        Some(total - 1),
        "seqs are dense"
    );
    assert_eq!(log.len(), total);
    log.close().await.unwrap();

    let (log, report) = SegmentLog::open(dir.path(), Options::default()).unwrap();
    assert_eq!(report.records, total);
    assert_eq!(report.torn_tail, None);
    for (seq, payload) in &acked {
        assert_eq!(&log.read(*seq).unwrap(), payload, "seq {seq}");
    }
    let mut by_seq = acked.clone();
    by_seq.sort();
    let iterated: Vec<(u64, Vec<u8>)> = log.iter_from(0).unwrap().map(Result::unwrap).collect();
    assert_eq!(iterated, by_seq);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_share_syncs() {
    const TASKS: u64 = 64;
    const PER_TASK: u64 = 100;
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = SegmentLog::open(dir.path(), Options::default()).unwrap();
    let handles: Vec<_> = (0..TASKS)
        .map(|t| {
            let log = log.clone();
            tokio::spawn(async move {
                for i in 0..PER_TASK {
                    log.append(format!("{t}:{i}").into_bytes()).await.unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.await.unwrap();
    }
    let stats = log.stats();
    let appends = TASKS * PER_TASK;
    assert_eq!(stats.records, appends);
    assert_eq!(stats.requests, appends);
    assert_eq!(stats.segments_created, 0);
    // One sync per batch when no segment rolls.
    assert_eq!(stats.syncs, stats.batches);
    // Without grouping there would be one sync per append; with 64 appenders in flight the
    // average batch should be far above 4.
    assert!(
        stats.syncs * 4 < appends,
        "expected grouped syncs, got {} syncs for {appends} appends",
        stats.syncs
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn append_batch_is_dense_and_needs_one_sync() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = SegmentLog::open(dir.path(), Options::default()).unwrap();
    assert_eq!(log.append(b"first".to_vec()).await.unwrap(), 0);
    let before = log.stats().syncs;
    let payloads: Vec<Vec<u8>> = (0..500).map(fixed_payload).collect();
    let range = log.append_batch(payloads.clone()).await.unwrap();
    assert_eq!(range, 1..501);
    assert_eq!(log.stats().syncs - before, 1);
    assert_eq!(log.read_range(1, 501).unwrap(), payloads);
    assert_eq!(log.append_batch(Vec::new()).await.unwrap(), 501..501);
}

/// One way of damaging the tail of a 10-record log and what recovery must report for it.
struct TornCase {
    name: &'static str,
    damage: fn(&Path),
    records_left: u64,
    bytes_cut: u64,
    kind: TailDamage,
}

/// Writes 10 fixed records, applies `case.damage` to the only segment, reopens, and checks the
/// report, the surviving prefix, and that new appends work and survive another reopen.
async fn check_torn(case: TornCase) {
    let name = case.name;
    let dir = tempfile::tempdir().unwrap();
    write_fixed(dir.path(), exact_files(), 10).await;
    let seg = seg_path(dir.path(), 0);
    (case.damage)(&seg);

    let (log, report) = SegmentLog::open(dir.path(), exact_files()).unwrap();
    let torn = report
        .torn_tail
        .clone()
        .unwrap_or_else(|| panic!("{name}: no torn tail reported"));
    assert_eq!(report.records, case.records_left, "{name}");
    assert_eq!(torn.bytes_cut, case.bytes_cut, "{name}");
    assert_eq!(report.truncated_bytes(), case.bytes_cut, "{name}");
    assert_eq!(torn.damage, case.kind, "{name}");
    assert_eq!(torn.segment, seg, "{name}");
    assert_eq!(torn.offset, case.records_left * FRAME_LEN, "{name}");
    assert_eq!(
        fs::metadata(&seg).unwrap().len(),
        torn.offset,
        "{name}: file truncated"
    );
    for i in 0..case.records_left {
        assert_eq!(log.read(i).unwrap(), fixed_payload(i), "{name}: seq {i}");
    }
    assert!(
        matches!(log.read(case.records_left), Err(Error::OutOfRange { .. })),
        "{name}"
    );

    for i in case.records_left..case.records_left + 3 {
        assert_eq!(log.append(fixed_payload(i)).await.unwrap(), i, "{name}");
    }
    log.close().await.unwrap();

    let (log, report) = SegmentLog::open(dir.path(), exact_files()).unwrap();
    assert_eq!(report.torn_tail, None, "{name}: second reopen is clean");
    assert_eq!(report.records, case.records_left + 3, "{name}");
    let all = log.read_range(0, case.records_left + 3).unwrap();
    let expected: Vec<Vec<u8>> = (0..case.records_left + 3).map(fixed_payload).collect();
    assert_eq!(all, expected, "{name}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torn_tails_are_cut_and_reported() {
    let cases = [
        TornCase {
            name: "garbage longer than a header",
            damage: |p| append_bytes(p, &[0xAB; 13]),
            records_left: 10,
            bytes_cut: 13,
            kind: TailDamage::ShortPayload,
        },
        TornCase {
            name: "garbage shorter than a header",
            damage: |p| append_bytes(p, &[0xAB; 5]),
            records_left: 10,
            bytes_cut: 5,
            kind: TailDamage::ShortHeader,
        },
        TornCase {
            name: "garbage after zeros",
            damage: |p| {
                append_bytes(p, &[0; 4096]);
                append_bytes(p, &[0xAB; 3]);
            },
            records_left: 10,
            bytes_cut: 4099,
            kind: TailDamage::ZeroLength,
        },
        TornCase {
            name: "a frame torn inside zeroed space",
            damage: |p| {
                // The header and half the payload reached the disk, the rest is still zeros.
                let mut frame = vec![0u8; 4096];
                frame[..4].copy_from_slice(&(PAYLOAD_LEN as u32).to_le_bytes());
                frame[4..8].copy_from_slice(&crc32fast::hash(&fixed_payload(10)).to_le_bytes());
                frame[8..8 + PAYLOAD_LEN / 2]
                    .copy_from_slice(&fixed_payload(10)[..PAYLOAD_LEN / 2]);
                append_bytes(p, &frame);
            },
            records_left: 10,
            bytes_cut: 4096,
            kind: TailDamage::BadChecksum,
        },
        TornCase {
            name: "cut inside the last header",
            damage: |p| truncate(p, 9 * FRAME_LEN + 3),
            records_left: 9,
            bytes_cut: 3,
            kind: TailDamage::ShortHeader,
        },
        TornCase {
            name: "cut inside the last payload",
            damage: |p| truncate(p, 9 * FRAME_LEN + HEADER_LEN as u64 + 20),
            records_left: 9,
            bytes_cut: HEADER_LEN as u64 + 20,
            kind: TailDamage::ShortPayload,
        },
        TornCase {
            name: "flipped CRC byte in the last frame",
            damage: |p| flip_byte(p, 9 * FRAME_LEN + 5),
            records_left: 9,
            bytes_cut: FRAME_LEN,
            kind: TailDamage::BadChecksum,
        },
        TornCase {
            name: "flipped payload byte in the last frame",
            damage: |p| flip_byte(p, 10 * FRAME_LEN - 1),
            records_left: 9,
            bytes_cut: FRAME_LEN,
            kind: TailDamage::BadChecksum,
        },
    ];
    for case in cases {
        check_torn(case).await;
    }
}

/// Writes `records` fixed records with `opts`, applies `damage`, and checks that opening fails
/// with exactly `expected` (compared through `Debug`, since `Error` holds `io::Error`s).
async fn check_corrupt(records: u64, opts: Options, damage: impl FnOnce(&Path), expected: Error) {
    let dir = tempfile::tempdir().unwrap();
    write_fixed(dir.path(), opts.clone(), records).await;
    damage(dir.path());
    let err = SegmentLog::open(dir.path(), opts).unwrap_err();
    let expected = match expected {
        Error::Corrupt { segment, offset } => Error::Corrupt {
            segment: dir.path().join(segment),
            offset,
        },
        other => other,
    };
    assert_eq!(format!("{err:?}"), format!("{expected:?}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damage_that_a_torn_write_cannot_explain_is_an_error() {
    // 100-byte segments hold two 40-byte frames each: bases 0, 2, 4, ...
    assert_eq!(FRAME_LEN, 40);
    let tiny = || small_segments(100);
    let seg = |base: u64| PathBuf::from(format!("{base:020}.seg"));

    // Middle record of the only (last) segment, with valid frames after it.
    check_corrupt(
        10,
        Options::default(),
        |d| flip_byte(&seg_path(d, 0), 3 * FRAME_LEN + 20),
        Error::Corrupt {
            segment: seg(0),
            offset: 3 * FRAME_LEN,
        },
    )
    .await;
    // CRC of the very first record of the last segment.
    check_corrupt(
        10,
        Options::default(),
        |d| flip_byte(&seg_path(d, 0), 4),
        Error::Corrupt {
            segment: seg(0),
            offset: 0,
        },
    )
    .await;
    // Payload of the last record of a non-last segment.
    check_corrupt(
        9,
        tiny(),
        |d| flip_byte(&seg_path(d, 2), FRAME_LEN + 10),
        Error::Corrupt {
            segment: seg(2),
            offset: FRAME_LEN,
        },
    )
    .await;
    // Non-last segment cut short.
    check_corrupt(
        9,
        tiny(),
        |d| truncate(&seg_path(d, 0), 2 * FRAME_LEN - 10),
        Error::Corrupt {
            segment: seg(0),
            offset: FRAME_LEN,
        },
    )
    .await;
    // Garbage after the frames of a non-last segment (zeros there are unused space, tested below).
    check_corrupt(
        9,
        tiny(),
        |d| append_bytes(&seg_path(d, 4), &[0, 0xAB, 0]),
        Error::Corrupt {
            segment: seg(4),
            offset: 2 * FRAME_LEN,
        },
    )
    .await;
    // A deleted middle segment.
    check_corrupt(
        9,
        tiny(),
        |d| fs::remove_file(seg_path(d, 4)).unwrap(),
        Error::MissingSegment {
            expected: 4,
            found: 6,
        },
    )
    .await;
    // A deleted first segment.
    check_corrupt(
        9,
        tiny(),
        |d| fs::remove_file(seg_path(d, 0)).unwrap(),
        Error::MissingSegment {
            expected: 0,
            found: 2,
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segments_roll_and_reads_cross_them() {
    let dir = tempfile::tempdir().unwrap();
    let opts = small_segments(100);
    let (log, _) = SegmentLog::open(dir.path(), opts.clone()).unwrap();
    for i in 0..25 {
        assert_eq!(log.append(fixed_payload(i)).await.unwrap(), i);
    }
    // A record bigger than a segment gets a segment to itself.
    let big = vec![7u8; 500];
    assert_eq!(log.append(big.clone()).await.unwrap(), 25);
    assert_eq!(log.append(fixed_payload(26)).await.unwrap(), 26);

    let expected_names: Vec<String> = (0..26)
        .step_by(2)
        .chain([25, 26])
        .collect::<std::collections::BTreeSet<u64>>()
        .into_iter()
        .map(|b| format!("{b:020}.seg"))
        .collect();
    assert_eq!(segment_files(dir.path()), expected_names);
    assert_eq!(
        log.stats().segments_created,
        expected_names.len() as u64 - 1
    );
    assert_eq!(fs::metadata(seg_path(dir.path(), 25)).unwrap().len(), 508);

    let mut expected: Vec<Vec<u8>> = (0..25).map(fixed_payload).collect();
    expected.push(big);
    expected.push(fixed_payload(26));
    let check = |log: &SegmentLog| {
        for (i, p) in expected.iter().enumerate() {
            assert_eq!(&log.read(i as u64).unwrap(), p, "seq {i}");
        }
        let from7: Vec<Vec<u8>> = log.iter_from(7).unwrap().map(|r| r.unwrap().1).collect();
        assert_eq!(from7, expected[7..]);
        assert_eq!(log.read_range(3, 19).unwrap(), expected[3..19]);
        assert_eq!(log.read_range(4, 4).unwrap(), Vec::<Vec<u8>>::new());
    };
    check(&log);
    log.close().await.unwrap();

    let (log, report) = SegmentLog::open(dir.path(), opts).unwrap();
    assert_eq!(report.segments, expected_names.len());
    assert_eq!(report.records, 27);
    assert_eq!(report.torn_tail, None);
    check(&log);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_across_rolls_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let opts = small_segments(1000);
    let (log, _) = SegmentLog::open(dir.path(), opts.clone()).unwrap();
    let handles: Vec<_> = (0..64u64)
        .map(|t| {
            let log = log.clone();
            tokio::spawn(async move {
                let mut acked = Vec::new();
                for i in 0..50u64 {
                    let p = format!("t{t}-i{i}").into_bytes();
                    acked.push((log.append(p.clone()).await.unwrap(), p));
                }
                acked
            })
        })
        .collect();
    let mut acked = Vec::new();
    for h in handles {
        acked.extend(h.await.unwrap());
    }
    assert!(log.stats().segments_created > 10);
    // A sync precedes every roll, so rolls add syncs beyond one per batch.
    assert!(log.stats().syncs >= log.stats().batches);
    log.close().await.unwrap();
    let (log, report) = SegmentLog::open(dir.path(), opts).unwrap();
    assert_eq!(report.records, 64 * 50);
    for (seq, p) in acked {
        assert_eq!(log.read(seq).unwrap(), p);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_recheck_the_crc() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = SegmentLog::open(dir.path(), small_segments(100)).unwrap();
    for i in 0..5 {
        log.append(fixed_payload(i)).await.unwrap();
    }
    // Seq 1 is in the sealed segment 0; seq 4 is in the active segment 4.
    flip_byte(&seg_path(dir.path(), 0), FRAME_LEN + 12);
    flip_byte(&seg_path(dir.path(), 4), 12);
    let err = log.read(1).unwrap_err();
    assert!(
        matches!(err, Error::Corrupt { offset, .. } if offset == FRAME_LEN),
        "{err:?}"
    );
    assert!(matches!(log.read(4), Err(Error::Corrupt { offset: 0, .. })));
    assert_eq!(log.read(0).unwrap(), fixed_payload(0));
    assert_eq!(log.read(2).unwrap(), fixed_payload(2));

    let items: Vec<_> = log.iter_from(0).unwrap().collect();
    assert_eq!(items.len(), 2, "iterator stops after the first error");
    assert_eq!(items[0].as_ref().unwrap(), &(0, fixed_payload(0)));
    assert!(matches!(items[1], Err(Error::Corrupt { .. })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_only_see_durable_records_while_appends_run() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = SegmentLog::open(dir.path(), small_segments(4096)).unwrap();
    let writers: Vec<_> = (0..8u64)
        .map(|t| {
            let log = log.clone();
            tokio::spawn(async move {
                for i in 0..300u64 {
                    log.append(format!("{t}/{i}").into_bytes()).await.unwrap();
                }
            })
        })
        .collect();
    let reader = {
        let log = log.clone();
        tokio::task::spawn_blocking(move || {
            let mut reads = 0u64;
            while log.len() < 2400 {
                let len = log.len();
                if len > 0 {
                    let p = log.read(len - 1).unwrap();
                    assert!(String::from_utf8(p).unwrap().contains('/'));
                    reads += 1;
                }
                assert!(matches!(log.read(2400), Err(Error::OutOfRange { .. })));
            }
            reads
        })
    };
    for w in writers {
        w.await.unwrap();
    }
    assert!(reader.await.unwrap() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn argument_and_lifecycle_errors() {
    let dir = tempfile::tempdir().unwrap();
    let opts = Options {
        max_record_bytes: 64,
        ..Options::default()
    };
    let (log, _) = SegmentLog::open(dir.path(), opts).unwrap();
    assert!(matches!(
        log.append(Vec::new()).await,
        Err(Error::EmptyPayload)
    ));
    assert!(matches!(
        log.append(vec![1; 65]).await,
        Err(Error::RecordTooLarge { len: 65, max: 64 })
    ));
    assert!(matches!(
        log.append_batch(vec![vec![1], Vec::new()]).await,
        Err(Error::EmptyPayload)
    ));
    assert_eq!(log.len(), 0, "rejected batches write nothing");
    assert_eq!(log.append(vec![1; 64]).await.unwrap(), 0);
    assert!(matches!(
        log.read(1),
        Err(Error::OutOfRange { seq: 1, len: 1 })
    ));
    assert!(matches!(
        log.iter_from(2),
        Err(Error::OutOfRange { seq: 2, len: 1 })
    ));
    assert!(matches!(
        log.read_range(0, 2),
        Err(Error::OutOfRange { seq: 2, len: 1 })
    ));
    assert!(matches!(
        log.read_range(1, 0),
        Err(Error::BadRange { from: 1, to: 0 })
    ));
    assert_eq!(log.iter_from(1).unwrap().count(), 0);

    let other = log.clone();
    log.close().await.unwrap();
    assert!(matches!(other.append(vec![1]).await, Err(Error::Closed)));
    other.close().await.unwrap();
    assert_eq!(
        other.read(0).unwrap(),
        vec![1; 64],
        "reads work after close"
    );

    let bad = Options {
        segment_bytes: 8,
        ..Options::default()
    };
    assert!(matches!(
        SegmentLog::open(dir.path(), bad),
        Err(Error::InvalidOptions(_))
    ));
}

#[test]
fn open_outside_a_runtime_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(
        SegmentLog::open(dir.path(), Options::default()),
        Err(Error::NoRuntime)
    ));
}

#[tokio::test(flavor = "current_thread")]
async fn works_on_a_current_thread_runtime_and_creates_nested_dirs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit").join("tenant-1");
    let (log, report) = SegmentLog::open(&path, Options::default()).unwrap();
    assert_eq!(report.segments, 1);
    assert_eq!(segment_files(&path), vec![format!("{:020}.seg", 0)]);
    let seqs = futures_join(&log).await;
    assert_eq!(seqs, vec![0, 1, 2]);
    drop(log);
    // Dropping the last handle stops the writer; everything acknowledged is on disk.
    let (log, report) = SegmentLog::open(&path, Options::default()).unwrap();
    assert_eq!(report.records, 3);
    let mut all = log.read_range(0, 3).unwrap();
    all.sort();
    assert_eq!(all, vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]);
}

async fn futures_join(log: &SegmentLog) -> Vec<u64> {
    let (a, b, c) = tokio::join!(
        log.append(b"a".to_vec()),
        log.append(b"b".to_vec()),
        log.append(b"c".to_vec())
    );
    let mut v = vec![a.unwrap(), b.unwrap(), c.unwrap()];
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_commits_everything_queued_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = SegmentLog::open(dir.path(), Options::default()).unwrap();
    let appends: Vec<_> = (0..200u64)
        .map(|i| {
            let log = log.clone();
            tokio::spawn(async move { (i, log.append(fixed_payload(i)).await) })
        })
        .collect();
    log.close().await.unwrap();
    let mut acked = Vec::new();
    for a in appends {
        match a.await.unwrap() {
            (i, Ok(seq)) => acked.push((seq, fixed_payload(i))),
            (_, Err(Error::Closed)) => {}
            (i, Err(e)) => panic!("append {i}: unexpected {e:?}"),
        }
    }
    let (log, report) = SegmentLog::open(dir.path(), Options::default()).unwrap();
    assert_eq!(
        report.records,
        acked.len() as u64,
        "exactly the acknowledged appends"
    );
    for (seq, p) in acked {
        assert_eq!(log.read(seq).unwrap(), p);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_write_poisons_the_writer_but_keeps_durable_records() {
    let dir = tempfile::tempdir().unwrap();
    let opts = small_segments(100);
    let (log, _) = SegmentLog::open(dir.path(), opts.clone()).unwrap();
    assert_eq!(log.append(fixed_payload(0)).await.unwrap(), 0);
    assert_eq!(log.append(fixed_payload(1)).await.unwrap(), 1);
    // The next append must roll to segment 2; a file already there makes creating it fail.
    fs::write(seg_path(dir.path(), 2), b"").unwrap();
    let err = log.append(fixed_payload(2)).await.unwrap_err();
    let Error::WriterFailed(cause) = &err else {
        panic!("expected WriterFailed, got {err:?}");
    };
    assert!(
        matches!(&**cause, Error::Io { op: "create", source, .. } if source.kind() == std::io::ErrorKind::AlreadyExists),
        "{cause:?}"
    );
    assert!(
        format!("{err:?}").contains("Caused by"),
        "Debug walks the source chain"
    );
    assert!(matches!(
        log.append(fixed_payload(3)).await,
        Err(Error::WriterFailed(_))
    ));
    assert_eq!(log.len(), 2);
    assert_eq!(
        log.read_range(0, 2).unwrap(),
        vec![fixed_payload(0), fixed_payload(1)]
    );
    assert!(matches!(log.close().await, Err(Error::WriterFailed(_))));

    // The stray empty file is a valid (empty) last segment starting at the next seq.
    let (log, report) = SegmentLog::open(dir.path(), opts).unwrap();
    assert_eq!(report.records, 2);
    assert_eq!(report.torn_tail, None);
    assert_eq!(log.append(fixed_payload(2)).await.unwrap(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zeroed_space_is_kept_ahead_and_written_over() {
    let dir = tempfile::tempdir().unwrap();
    let seg = seg_path(dir.path(), 0);
    let (log, report) = SegmentLog::open(dir.path(), Options::default()).unwrap();
    assert_eq!(report.torn_tail, None);
    for i in 0..10 {
        assert_eq!(log.append(fixed_payload(i)).await.unwrap(), i);
    }
    let stats = log.stats();
    // The region starts at 64 KiB past the end (rounded to 4 KiB blocks), written after the first
    // append; its syncs are not batch syncs.
    let zeroed = (FRAME_LEN + (64 << 10)).next_multiple_of(4096);
    assert_eq!(stats.preallocations, 1);
    assert_eq!(stats.syncs, stats.batches);
    assert_eq!(fs::metadata(&seg).unwrap().len(), zeroed);
    assert!(fs::read(&seg).unwrap()[(10 * FRAME_LEN) as usize..]
        .iter()
        .all(|&b| b == 0));
    log.close().await.unwrap();

    // The zeros are unused space, not a torn tail: kept, and the next appends go into them.
    let (log, report) = SegmentLog::open(dir.path(), Options::default()).unwrap();
    assert_eq!(report.torn_tail, None);
    assert_eq!(report.records, 10);
    assert_eq!(fs::metadata(&seg).unwrap().len(), zeroed);
    for i in 10..20 {
        assert_eq!(log.append(fixed_payload(i)).await.unwrap(), i);
    }
    assert_eq!(log.stats().preallocations, 0, "half the region is left");
    assert_eq!(fs::metadata(&seg).unwrap().len(), zeroed);
    log.close().await.unwrap();
    let (log, report) = SegmentLog::open(dir.path(), Options::default()).unwrap();
    assert_eq!((report.records, report.torn_tail), (20, None));
    let expected: Vec<Vec<u8>> = (0..20).map(fixed_payload).collect();
    assert_eq!(log.read_range(0, 20).unwrap(), expected);
    log.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zeroed_space_grows_with_the_segment_and_stops_at_the_roll() {
    let dir = tempfile::tempdir().unwrap();
    let opts = Options {
        segment_bytes: 200 << 10,
        ..Options::default()
    };
    let (log, _) = SegmentLog::open(dir.path(), opts.clone()).unwrap();
    // 40-byte frames: 100 KiB of them in one batch, then one more append.
    let n = (100 << 10) / FRAME_LEN;
    log.append_batch((0..n).map(fixed_payload).collect())
        .await
        .unwrap();
    log.append(fixed_payload(n)).await.unwrap();
    let len = fs::metadata(seg_path(dir.path(), 0)).unwrap().len();
    // After the batch the segment held 100 KiB, so the region became 128 KiB past its end, cut
    // at the 200 KiB roll threshold; the append after it found more than half of that left.
    assert_eq!(len, 200 << 10, "zeroed to {len}");
    assert_eq!(
        log.stats().preallocations,
        1,
        "one region, sized after the first batch"
    );
    // Past the roll threshold the sealed segment keeps its frames only.
    let m = (120 << 10) / FRAME_LEN;
    log.append_batch((n + 1..n + 1 + m).map(fixed_payload).collect())
        .await
        .unwrap();
    let sealed = fs::metadata(seg_path(dir.path(), 0)).unwrap().len();
    assert_eq!(sealed % FRAME_LEN, 0, "trimmed to whole frames: {sealed}");
    assert!(sealed <= 200 << 10);
    log.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_tail_is_unused_space_not_a_torn_write() {
    let dir = tempfile::tempdir().unwrap();
    write_fixed(dir.path(), exact_files(), 10).await;
    let seg = seg_path(dir.path(), 0);
    append_bytes(&seg, &[0; 4096]);
    let (log, report) = SegmentLog::open(dir.path(), exact_files()).unwrap();
    assert_eq!((report.records, report.torn_tail), (10, None));
    for i in 10..13 {
        assert_eq!(log.append(fixed_payload(i)).await.unwrap(), i);
    }
    log.close().await.unwrap();
    // The three frames were written over the zeros, not after them.
    assert_eq!(fs::metadata(&seg).unwrap().len(), 10 * FRAME_LEN + 4096);
    let (log, report) = SegmentLog::open(dir.path(), exact_files()).unwrap();
    assert_eq!((report.records, report.torn_tail), (13, None));
    let expected: Vec<Vec<u8>> = (0..13).map(fixed_payload).collect();
    assert_eq!(log.read_range(0, 13).unwrap(), expected);
    log.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealed_segments_are_trimmed_and_zeros_left_by_a_crash_are_accepted() {
    let dir = tempfile::tempdir().unwrap();
    // 100-byte segments hold two 40-byte frames; the zeroed space is capped at the roll size.
    write_fixed(dir.path(), small_segments(100), 6).await;
    for base in [0, 2] {
        assert_eq!(
            fs::metadata(seg_path(dir.path(), base)).unwrap().len(),
            2 * FRAME_LEN,
            "sealed segment {base} trimmed to its frames"
        );
    }
    // A crash between a roll and the trim reaching the disk leaves zeros in a sealed segment.
    append_bytes(&seg_path(dir.path(), 2), &[0; 20]);
    let (log, report) = SegmentLog::open(dir.path(), small_segments(100)).unwrap();
    assert_eq!((report.records, report.torn_tail), (6, None));
    let expected: Vec<Vec<u8>> = (0..6).map(fixed_payload).collect();
    assert_eq!(log.read_range(0, 6).unwrap(), expected);
    log.close().await.unwrap();
    // Garbage there is still damage that no torn write explains.
    append_bytes(&seg_path(dir.path(), 2), &[0xAB; 3]);
    assert!(matches!(
        SegmentLog::open(dir.path(), small_segments(100)),
        Err(Error::Corrupt { offset, .. }) if offset == 2 * FRAME_LEN
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_place_reserved_before_close_fails_its_append_instead_of_hanging() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = SegmentLog::open(dir.path(), Options::default()).unwrap();
    assert_eq!(log.append(fixed_payload(0)).await.unwrap(), 0);
    let slot = log.reserve().await.unwrap();
    log.close().await.unwrap();
    assert!(matches!(log.reserve().await, Err(Error::Closed)));
    let pending = slot.enqueue(vec![fixed_payload(1)]).unwrap();
    let waited = tokio::time::timeout(std::time::Duration::from_secs(5), pending.durable())
        .await
        .expect("the append fails rather than waiting forever");
    assert!(matches!(waited, Err(Error::Closed)), "{waited:?}");
    drop(log);
    let (log, report) = SegmentLog::open(dir.path(), Options::default()).unwrap();
    assert_eq!(report.records, 1, "the failed append was not written");
    log.close().await.unwrap();
}

/// An unsynced batch written into zeroed space can reach the disk sector by sector in any order:
/// a later frame whole, an earlier one with a sector still zero. That is a torn tail, not damage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_with_a_zero_sector_before_a_whole_one_is_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let payload = |i: u64| {
        let mut p = format!("big-{i:04}-").into_bytes();
        p.resize(2000, b'a' + i as u8);
        p
    };
    let (log, _) = SegmentLog::open(dir.path(), exact_files()).unwrap();
    for i in 0..5 {
        log.append(payload(i)).await.unwrap();
    }
    log.close().await.unwrap();
    let frame = (HEADER_LEN + 2000) as u64;
    let seg = seg_path(dir.path(), 0);
    // The aligned sector inside record 3's payload never reached the disk; record 4 did.
    let sector = (3 * frame + HEADER_LEN as u64).next_multiple_of(512);
    assert!(sector + 512 <= 4 * frame);
    let f = OpenOptions::new().write(true).open(&seg).unwrap();
    f.write_all_at(&[0u8; 512], sector).unwrap();
    drop(f);
    let (log, report) = SegmentLog::open(dir.path(), exact_files()).unwrap();
    let torn = report.torn_tail.expect("reported as a torn tail");
    assert_eq!((report.records, torn.offset), (3, 3 * frame));
    assert_eq!(torn.damage, TailDamage::BadChecksum);
    assert_eq!(
        log.read_range(0, 3).unwrap(),
        (0..3).map(payload).collect::<Vec<_>>()
    );
    log.close().await.unwrap();

    // One flipped byte in the same place, with no zero sector, is still damage.
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = SegmentLog::open(dir.path(), exact_files()).unwrap();
    for i in 0..5 {
        log.append(payload(i)).await.unwrap();
    }
    log.close().await.unwrap();
    flip_byte(&seg_path(dir.path(), 0), sector + 7);
    assert!(matches!(
        SegmentLog::open(dir.path(), exact_files()),
        Err(Error::Corrupt { offset, .. }) if offset == 3 * frame
    ));
}
