//! Crash test: a child process appends under load and is SIGKILLed; every append it saw
//! acknowledged must be in the log after reopening. Three rounds run on the same directory, so
//! later children also start from a log left behind by a kill.
//!
//! The child is this same test binary, re-executed with `CHILD_DIR_ENV` set and arguments that
//! select only this test, so the test needs no helper binary and can be copied as one file.

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use agentgate::audit::segment_log::{Options, SegmentLog};

/// Set in the child's environment to the log directory; its presence makes the test act as the child.
const CHILD_DIR_ENV: &str = "WAL_CRASH_CHILD_DIR";
/// Round number given to the child, so payload ids stay unique across kills of the same log.
const CHILD_ROUND_ENV: &str = "WAL_CRASH_CHILD_ROUND";
/// Kill-and-recover rounds on the same directory; later rounds start from a killed log.
const ROUNDS: u64 = 3;
/// Name of this test, passed to the child with `--exact` so it runs nothing else.
const TEST_NAME: &str = "acknowledged_appends_survive_sigkill";
/// Acknowledgements to see in each round before killing the child.
const ACKS_BEFORE_KILL: usize = 3000;
/// Concurrent appending tasks in the child.
const CHILD_TASKS: u64 = 16;
/// Small segments so the kill can also land around a segment roll.
const SEGMENT_BYTES: u64 = 64 << 10;

/// Identifies one append: (round, task, i).
type Id = (u64, u64, u64);

fn format_id((round, task, i): Id) -> String {
    format!("r{round}-t{task}-{i}")
}

fn parse_id(id: &str) -> Option<Id> {
    let mut parts = id.split('-');
    let round = parts.next()?.strip_prefix('r')?.parse().ok()?;
    let task = parts.next()?.strip_prefix('t')?.parse().ok()?;
    let i = parts.next()?.parse().ok()?;
    parts.next().is_none().then_some((round, task, i))
}

/// The payload for an id: recomputable by the parent, distinct per id, of varying length.
fn payload(id: Id) -> Vec<u8> {
    format!("{}|", format_id(id))
        .repeat(1 + (id.2 % 7) as usize)
        .into_bytes()
}

fn options() -> Options {
    Options {
        segment_bytes: SEGMENT_BYTES,
        ..Options::default()
    }
}

#[test]
fn acknowledged_appends_survive_sigkill() {
    if let Ok(dir) = std::env::var(CHILD_DIR_ENV) {
        let round = std::env::var(CHILD_ROUND_ENV).unwrap().parse().unwrap();
        run_child(&dir, round);
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut acks = BTreeMap::new();
    for round in 0..ROUNDS {
        kill_child_under_load(dir.path(), round, &mut acks);
        check_log(dir.path(), &acks, round);
    }
}

/// Runs one child on `dir` until it has acknowledged `ACKS_BEFORE_KILL` appends, SIGKILLs it and
/// adds everything it acknowledged to `acks`.
fn kill_child_under_load(dir: &Path, round: u64, acks: &mut BTreeMap<u64, Id>) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([TEST_NAME, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_DIR_ENV, dir)
        .env(CHILD_ROUND_ENV, round.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();

    // Read lines on a thread so the parent can give up on a deadline.
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });

    let mut new_acks = 0;
    let deadline = Instant::now() + Duration::from_secs(4);
    while new_acks < ACKS_BEFORE_KILL {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => new_acks += record_ack(acks, &line),
            Err(RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                panic!("round {round}: only {new_acks} acks before the deadline");
            }
            Err(RecvTimeoutError::Disconnected) => {
                panic!(
                    "round {round}: child exited after {new_acks} acks: {:?}",
                    child.wait()
                );
            }
        }
    }
    // Child::kill sends SIGKILL on Unix: no destructors, no flushing, mid-append.
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(
        !status.success(),
        "child must have been killed, got {status:?}"
    );
    // Lines still in the pipe were printed after their appends returned, so they count too.
    for line in rx.iter() {
        record_ack(acks, &line);
    }
    reader.join().unwrap();
}

/// Reopens the log and checks every acknowledged record and that nothing foreign or duplicated
/// is present (records appended but not yet acknowledged at the kill may be present too).
fn check_log(dir: &Path, acks: &BTreeMap<u64, Id>, round: u64) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let (log, report) = SegmentLog::open(dir, options()).unwrap();
    eprintln!(
        "round {round}: {} acks so far, {} records in {} segments, torn tail {:?}",
        acks.len(),
        report.records,
        report.segments,
        report.torn_tail
    );
    let max_acked = *acks.keys().next_back().unwrap();
    assert!(
        report.records > max_acked,
        "acked seq {max_acked} missing; log has {} records",
        report.records
    );
    for (&seq, &id) in acks {
        assert_eq!(log.read(seq).unwrap(), payload(id), "acked seq {seq}");
    }
    let mut seen = HashSet::new();
    for item in log.iter_from(0).unwrap() {
        let (seq, p) = item.unwrap();
        let text = String::from_utf8(p.clone()).unwrap();
        let id = parse_id(text.split('|').next().unwrap())
            .unwrap_or_else(|| panic!("seq {seq}: unexpected payload {text:?}"));
        assert_eq!(p, payload(id), "seq {seq}");
        assert!(seen.insert(id), "seq {seq}: duplicate id {id:?}");
    }
    if round + 1 == ROUNDS {
        assert!(
            report.segments > 1,
            "the children should have rolled segments"
        );
    }
}

/// Parses one line of child output; returns 1 for an acknowledgement, 0 for harness output.
fn record_ack(acks: &mut BTreeMap<u64, Id>, line: &str) -> usize {
    // The test harness prints its own lines to the same stdout; only ours start with ACK.
    let Some(rest) = line.strip_prefix("ACK ") else {
        return 0;
    };
    let (seq, id) = rest.split_once(' ').unwrap();
    let seq: u64 = seq.parse().unwrap();
    let id = parse_id(id).unwrap();
    assert!(
        acks.insert(seq, id).is_none(),
        "seq {seq} acknowledged twice"
    );
    1
}

/// Appends from several tasks forever, printing each acknowledged seq after `append` returns.
/// Exits on its own after a while in case the parent died without killing it.
fn run_child(dir: &str, round: u64) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    rt.block_on(async {
        let (log, _) = SegmentLog::open(dir, options()).unwrap();
        let stop_at = Instant::now() + Duration::from_secs(30);
        let tasks: Vec<_> = (0..CHILD_TASKS)
            .map(|task| {
                let log = log.clone();
                tokio::spawn(async move {
                    let mut i = 0u64;
                    while Instant::now() < stop_at {
                        let id = (round, task, i);
                        let seq = log.append(payload(id)).await.unwrap();
                        let mut out = std::io::stdout().lock();
                        writeln!(out, "ACK {seq} {}", format_id(id)).unwrap();
                        out.flush().unwrap();
                        i += 1;
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    });
}
