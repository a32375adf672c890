//! Audit log benchmarks: durable append throughput with group commit, append cost as one tenant's
//! log grows, proof latency and bundle verification (results and commands: docs/PERFORMANCE.md).
//!
//! A plain `fn main()` (`harness = false`) with its own timing: every figure is measured with
//! `Instant` after a warm-up, repeated, and reported as a median with its spread (min–max of the
//! repetitions) and, for latencies, the 99th percentile of all samples.
//!
//! ```text
//! cargo bench --bench audit                      # every group, full size (about 6 minutes on 2 cores)
//! cargo bench --bench audit -- appends           # only groups whose name contains "appends"
//! cargo bench --bench audit -- --quick           # a smoke run at reduced sizes (well under a minute)
//! cargo bench --bench audit -- append-scaling --huge   # also take the product path to 10^7 events
//! ```
//!
//! Groups: `appends`, `append-scaling`, `proofs`, `verify`. Temporary data directories go to
//! `$AGENTGATE_BENCH_DIR` when set (to measure another disk), else to the system temp directory.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentgate::app::Services;
use agentgate::audit::bundle;
use agentgate::audit::event::{encode, encode_unplaced, is_canonical, Envelope};
use agentgate::audit::log::LogSink;
use agentgate::audit::merkle::{
    leaf_hash, root_from_range, verify_consistency, verify_inclusion, Hash, LeafIndex,
    MemNodeStore, Tree, TreeSize,
};
use agentgate::audit::nodes::NodeFiles;
use agentgate::audit::segment_log::{Options as SegmentOptions, SegmentLog};
use agentgate::audit::{AuditSink, EventBody};
use agentgate::config::AuditOptions;
use agentgate::installation::{InstallSource, NewInstallation, Workspace};
use agentgate::store::TenantStore;
use agentgate::tenant::{PrincipalId, TenantContext};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use secrecy::SecretString;
use sha2::{Digest, Sha256};

const GROUPS: &[&str] = &["appends", "append-scaling", "proofs", "verify"];

/// Bytes of the synthetic leaves of the in-memory tree: about the size of a real encoded event.
const LEAF_BYTES: usize = 320;

struct Cfg {
    quick: bool,
    huge: bool,
    filter: Option<String>,
    /// `--writers=N`: only this concurrency level in `appends`.
    writers: Option<usize>,
    /// `--kind=role|command|segment`: only this target in `appends`.
    kind: Option<String>,
}

impl Cfg {
    fn from_args() -> Cfg {
        let mut cfg = Cfg {
            quick: false,
            huge: false,
            filter: None,
            writers: None,
            kind: None,
        };
        for arg in std::env::args().skip(1) {
            if let Some(n) = arg.strip_prefix("--writers=") {
                cfg.writers = Some(n.parse().expect("--writers takes a number"));
                continue;
            }
            if let Some(k) = arg.strip_prefix("--kind=") {
                cfg.kind = Some(k.to_owned());
                continue;
            }
            match arg.as_str() {
                "--quick" => cfg.quick = true,
                "--huge" => cfg.huge = true,
                "--help" | "-h" => {
                    println!(
                        "usage: cargo bench --bench audit -- [FILTER] [--quick] [--huge] [--writers=N] [--kind=role|command|segment]\ngroups: {}\n--writers and --kind narrow the appends group (for profiling one case)",
                        GROUPS.join(", ")
                    );
                    std::process::exit(0);
                }
                // cargo passes `--bench`; other harness flags mean nothing here.
                a if a.starts_with('-') => {}
                a => cfg.filter = Some(a.to_owned()),
            }
        }
        cfg
    }

    fn wants_level(&self, writers: usize) -> bool {
        self.writers.is_none_or(|w| w == writers)
    }

    fn wants_kind(&self, kind: &str) -> bool {
        self.kind.as_deref().is_none_or(|k| k == kind)
    }

    fn wants(&self, group: &str) -> bool {
        self.filter
            .as_deref()
            .is_none_or(|f| f == "all" || group.contains(f))
    }
}

// ---------------------------------------------------------------------------------------------
// Statistics and formatting
// ---------------------------------------------------------------------------------------------

/// Order statistics of a sample.
#[derive(Clone, Copy, Debug)]
struct Summary {
    n: usize,
    min: f64,
    median: f64,
    p99: f64,
    max: f64,
}

fn summarize(values: &[f64]) -> Summary {
    assert!(!values.is_empty(), "nothing to summarise");
    let mut s = values.to_vec();
    s.sort_by(f64::total_cmp);
    let at = |p: f64| s[((p / 100.0) * (s.len() - 1) as f64).round() as usize];
    Summary {
        n: s.len(),
        min: s[0],
        median: at(50.0),
        p99: at(99.0),
        max: s[s.len() - 1],
    }
}

fn fmt_ns(ns: f64) -> String {
    if ns < 1e3 {
        format!("{ns:.0} ns")
    } else if ns < 1e6 {
        format!("{:.2} µs", ns / 1e3)
    } else if ns < 1e9 {
        format!("{:.2} ms", ns / 1e6)
    } else {
        format!("{:.3} s", ns / 1e9)
    }
}

fn fmt_count(n: f64) -> String {
    let digits = format!("{:.0}", n.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn ns(d: Duration) -> f64 {
    d.as_nanos() as f64
}

fn heading(title: &str) {
    println!("\n== {title} ==  (load average {})", loadavg());
}

/// The 1, 5 and 15 minute load averages, to show whether other work shared the machine.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn bench_dir() -> tempfile::TempDir {
    match std::env::var_os("AGENTGATE_BENCH_DIR") {
        Some(d) => {
            std::fs::create_dir_all(&d).expect("the bench directory can be created");
            tempfile::tempdir_in(d).expect("a temporary directory")
        }
        None => tempfile::tempdir().expect("a temporary directory"),
    }
}

// ---------------------------------------------------------------------------------------------
// The product: Services over a temporary data directory with one tenant
// ---------------------------------------------------------------------------------------------

struct Product {
    services: Services,
    ctx: TenantContext,
    repo: TenantStore,
    _dir: tempfile::TempDir,
}

impl Product {
    async fn open() -> Product {
        let dir = bench_dir();
        let master = SecretString::from("42".repeat(32));
        let services = Services::open(dir.path(), Some(&master), &AuditOptions::default())
            .expect("the services open");
        let new = NewInstallation {
            workspace: Workspace::slack_team(None, "TBENCH").expect("a workspace"),
            app_id: "A0BENCH".into(),
            bot_user_id: Some("U0BOT".into()),
            bot_token: Some("xoxb-bench".to_owned().into()),
            refresh_token: None,
            token_expires_at: None,
            scopes: vec!["commands".into()],
            installer: PrincipalId::qualified("slack", "U0OWNER").expect("a principal"),
            source: InstallSource::OAuth,
        };
        let tenant = services
            .tenants
            .install(new, "bench", None)
            .await
            .expect("the tenant installs")
            .tenant;
        let ctx = services
            .tenants
            .operator_context(&tenant)
            .expect("an operator context");
        let repo = services.store.for_tenant(&ctx).expect("the tenant's store");
        Product {
            services,
            ctx,
            repo,
            _dir: dir,
        }
    }

    /// The tenant log's Merkle node files.
    fn node_dir(&self) -> std::path::PathBuf {
        self._dir
            .path()
            .join("audit")
            .join(self.ctx.tenant_id().as_str())
            .join("nodes")
    }

    async fn size(&self) -> u64 {
        self.services
            .audit
            .head(&self.ctx, self.repo.clone())
            .await
            .expect("the head")
            .size
    }

    async fn close(self) {
        self.services.close().await.expect("the services close");
    }
}

/// Which event the writers append.
#[derive(Clone, Copy, Debug)]
enum Kind {
    /// `role.granted`: folded into the membership projection after it is durable.
    Role,
    /// `command.received`: only logged.
    Command,
}

fn body(kind: Kind, writer: usize) -> EventBody {
    match kind {
        Kind::Role => EventBody::RoleGranted {
            principal: format!("slack:UBENCH{writer:04}"),
            role: "member".into(),
        },
        Kind::Command => EventBody::CommandReceived {
            platform: "slack".into(),
            kind: "slash_command".into(),
            text_sha256: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08".into(),
        },
    }
}

/// One kind of append, cloned into every writer task.
#[derive(Clone)]
enum Target {
    /// `AuditLog::append_with` through an already-scoped repository.
    Audit {
        services: Services,
        ctx: TenantContext,
        repo: TenantStore,
        kind: Kind,
    },
    /// The `AuditSink` trait, as the rest of the product calls it.
    Sink {
        sink: Arc<LogSink>,
        ctx: TenantContext,
        kind: Kind,
    },
    /// `SegmentLog::append` of one record.
    Segment { log: SegmentLog, payload: Arc<[u8]> },
    /// `SegmentLog::append_batch` of `batch` records.
    SegmentBatch {
        log: SegmentLog,
        payload: Arc<[u8]>,
        batch: usize,
    },
}

impl Target {
    /// Appends once and returns how many events became durable.
    async fn once(&self, writer: usize) -> u64 {
        match self {
            Target::Audit {
                services,
                ctx,
                repo,
                kind,
            } => {
                services
                    .audit
                    .append_with(ctx, repo.clone(), body(*kind, writer))
                    .await
                    .expect("the append succeeds");
                1
            }
            Target::Sink { sink, ctx, kind } => {
                sink.append(ctx, body(*kind, writer))
                    .await
                    .expect("the append succeeds");
                1
            }
            Target::Segment { log, payload } => {
                log.append(payload.to_vec())
                    .await
                    .expect("the append succeeds");
                1
            }
            Target::SegmentBatch {
                log,
                payload,
                batch,
            } => {
                log.append_batch(vec![payload.to_vec(); *batch])
                    .await
                    .expect("the batch succeeds");
                *batch as u64
            }
        }
    }
}

/// CPU time (user + system, all threads) this process used so far, from /proc/self/stat.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th of them.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // USER_HZ is 100 on Linux.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

/// What `writers` concurrent tasks achieved in one timed window.
struct Window {
    events: u64,
    elapsed: Duration,
    /// Process CPU time over the window.
    cpu: Duration,
    /// Latency of every call, in nanoseconds.
    latencies: Vec<f64>,
}

async fn window(target: &Target, writers: usize, length: Duration) -> Window {
    let cpu0 = cpu_time();
    let start = Instant::now();
    let deadline = start + length;
    let mut tasks = Vec::with_capacity(writers);
    for w in 0..writers {
        let t = target.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(4096);
            let mut events = 0;
            while Instant::now() < deadline {
                let t0 = Instant::now();
                events += t.once(w).await;
                latencies.push(ns(t0.elapsed()));
            }
            (events, latencies)
        }));
    }
    let mut out = Window {
        events: 0,
        elapsed: Duration::ZERO,
        cpu: Duration::ZERO,
        latencies: Vec::new(),
    };
    for task in tasks {
        let (events, lat) = task.await.expect("a writer finishes");
        out.events += events;
        out.latencies.extend(lat);
    }
    out.elapsed = start.elapsed();
    out.cpu = cpu_time().saturating_sub(cpu0);
    out
}

/// Durable events per second (median and spread over the repetitions) and call latency.
struct Throughput {
    rate: Summary,
    latency: Summary,
    events: u64,
    /// CPU time per event (both cores), over all repetitions.
    cpu_per_event: Duration,
    /// Cores busy on average over the repetitions.
    cores: f64,
}

async fn throughput(
    target: &Target,
    writers: usize,
    warm: Duration,
    length: Duration,
    reps: usize,
) -> Throughput {
    window(target, writers, warm).await;
    let mut rates = Vec::with_capacity(reps);
    let mut latencies = Vec::new();
    let mut events = 0;
    let (mut cpu, mut wall) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..reps {
        let w = window(target, writers, length).await;
        rates.push(w.events as f64 / w.elapsed.as_secs_f64());
        latencies.extend(w.latencies);
        events += w.events;
        cpu += w.cpu;
        wall += w.elapsed;
    }
    Throughput {
        rate: summarize(&rates),
        latency: summarize(&latencies),
        events,
        cpu_per_event: cpu / events.max(1) as u32,
        cores: cpu.as_secs_f64() / wall.as_secs_f64(),
    }
}

fn print_throughput(label: &str, writers: usize, t: &Throughput, extra: &str) {
    println!(
        "{label:<34} {writers:>4} writers  {:>9} ev/s  [{} – {}]  p50 {:>9}  p99 {:>9}  cpu {:>8}/ev ({:.2} cores){extra}",
        fmt_count(t.rate.median),
        fmt_count(t.rate.min),
        fmt_count(t.rate.max),
        fmt_ns(t.latency.median),
        fmt_ns(t.latency.p99),
        fmt_ns(ns(t.cpu_per_event)),
        t.cores,
    );
}

// ---------------------------------------------------------------------------------------------
// Group: appends
// ---------------------------------------------------------------------------------------------

/// Latency of a small `pwrite` + `fdatasync` on the bench filesystem: the floor of one durable
/// append, and the cost group commit amortises.
fn fdatasync_floor(samples: usize) -> Summary {
    use std::os::unix::fs::FileExt;
    let dir = bench_dir();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(dir.path().join("probe"))
        .expect("a probe file");
    let record = [0x5au8; LEAF_BYTES];
    let mut latencies = Vec::with_capacity(samples);
    for i in 0..samples + 10 {
        let t0 = Instant::now();
        file.write_all_at(&record, (i * LEAF_BYTES) as u64)
            .expect("the write");
        file.sync_data().expect("the sync");
        if i >= 10 {
            latencies.push(ns(t0.elapsed()));
        }
    }
    summarize(&latencies)
}

async fn bench_appends(cfg: &Cfg) {
    heading("appends: durable appends per second with group commit");
    let (warm, length, reps) = if cfg.quick {
        (Duration::from_millis(100), Duration::from_millis(300), 2)
    } else {
        (Duration::from_millis(500), Duration::from_secs(1), 5)
    };
    let levels: &[usize] = &[1, 8, 64, 256];
    println!(
        "(windows of {} ms after a {} ms warm-up, {reps} repetitions; ev/s median [min – max]; latency of one call over all repetitions)",
        length.as_millis(),
        warm.as_millis()
    );

    let floor = fdatasync_floor(if cfg.quick { 50 } else { 300 });
    println!(
        "{:<34} pwrite {LEAF_BYTES} B + fdatasync: p50 {}  p99 {}  min {}  ({} samples) => at most {} syncs/s",
        "fdatasync floor",
        fmt_ns(floor.median),
        fmt_ns(floor.p99),
        fmt_ns(floor.min),
        floor.n,
        fmt_count(1e9 / floor.median)
    );

    let product = Product::open().await;
    // A real encoded event, as the raw segment log payload.
    product
        .services
        .audit
        .append_with(&product.ctx, product.repo.clone(), body(Kind::Role, 0))
        .await
        .expect("an append");
    let size = product.size().await;
    let payload: Arc<[u8]> = product
        .services
        .audit
        .read_range(&product.ctx, product.repo.clone(), size - 1, size)
        .await
        .expect("the event reads back")
        .remove(0)
        .into();
    println!(
        "(an encoded role.granted event is {} bytes; the product checkpoints every {} events)",
        payload.len(),
        AuditOptions::default().checkpoint_every
    );

    // The CPU work done under the tenant's lock besides the tree: building the envelope and
    // encoding the event.
    let (all, med) = time_calls(reps, 20_000, || {
        let env = Envelope::from_ctx(&product.ctx);
        std::hint::black_box(encode(
            &env,
            123_456,
            chrono::Utc::now(),
            &body(Kind::Role, 7),
        ));
    });
    print_latency("Envelope::from_ctx + event::encode", &all, &med, None);
    // What the lock's section does of it now: the event is encoded before the lock, which fills
    // in the sequence number and the time.
    let env = Envelope::from_ctx(&product.ctx);
    let unplaced = encode_unplaced(&env, &body(Kind::Role, 7));
    let (all, med) = time_calls(reps, 20_000, || {
        std::hint::black_box(unplaced.place(123_456, chrono::Utc::now()));
    });
    print_latency("Unplaced::place (under the lock)", &all, &med, None);

    for (kind, name, label) in [
        (Kind::Role, "role", "AuditLog::append_with role.granted"),
        (
            Kind::Command,
            "command",
            "AuditLog::append_with command.recv",
        ),
    ] {
        if !cfg.wants_kind(name) {
            continue;
        }
        for &writers in levels.iter().filter(|&&w| cfg.wants_level(w)) {
            let target = Target::Audit {
                services: product.services.clone(),
                ctx: product.ctx.clone(),
                repo: product.repo.clone(),
                kind,
            };
            let t = throughput(&target, writers, warm, length, reps).await;
            print_throughput(label, writers, &t, "");
            if matches!(kind, Kind::Role) && writers == 64 {
                // The same appends through the trait the rest of the product uses, measured right
                // after so that the log has about the same size.
                let sink = Target::Sink {
                    sink: Arc::new(LogSink::new(
                        product.services.audit.clone(),
                        product.services.store.clone(),
                    )),
                    ctx: product.ctx.clone(),
                    kind,
                };
                let t = throughput(&sink, writers, warm, length, reps).await;
                print_throughput("AuditSink::append role.granted", writers, &t, "");
            }
        }
    }
    // What `LogSink::append` does before `append_with`: scope the store to the tenant.
    let (all, med) = time_calls(reps, 20_000, || {
        std::hint::black_box(
            product
                .services
                .store
                .for_tenant(&product.ctx)
                .expect("the tenant's store"),
        );
    });
    print_latency("Store::for_tenant (per AuditSink append)", &all, &med, None);
    println!(
        "(the tenant log now holds {} events)",
        fmt_count(product.size().await as f64)
    );
    product.close().await;

    if !cfg.wants_kind("segment") {
        return;
    }
    let dir = bench_dir();
    let (log, _) = SegmentLog::open(dir.path().join("events"), SegmentOptions::default())
        .expect("the segment log opens");
    for &writers in levels.iter().filter(|&&w| cfg.wants_level(w)) {
        let target = Target::Segment {
            log: log.clone(),
            payload: Arc::clone(&payload),
        };
        let before = log.stats();
        let t = throughput(&target, writers, warm, length, reps).await;
        let after = log.stats();
        let per_sync =
            (after.records - before.records) as f64 / (after.syncs - before.syncs) as f64;
        print_throughput(
            "SegmentLog::append",
            writers,
            &t,
            &format!("  {per_sync:.1} records/fdatasync"),
        );
    }
    for (writers, batch) in [(1, 64), (8, 64)]
        .into_iter()
        .filter(|&(w, _)| cfg.wants_level(w))
    {
        let target = Target::SegmentBatch {
            log: log.clone(),
            payload: Arc::clone(&payload),
            batch,
        };
        let before = log.stats();
        let t = throughput(&target, writers, warm, length, reps).await;
        let after = log.stats();
        let per_sync =
            (after.records - before.records) as f64 / (after.syncs - before.syncs) as f64;
        print_throughput(
            &format!("SegmentLog::append_batch({batch})"),
            writers,
            &t,
            &format!("  {per_sync:.1} records/fdatasync ({} events)", t.events),
        );
    }
    log.close().await.expect("the segment log closes");
}

// ---------------------------------------------------------------------------------------------
// Group: append-scaling
// ---------------------------------------------------------------------------------------------

/// The decade sizes at which the append cost is sampled.
fn decades(max_exp: u32) -> Vec<u64> {
    (3..=max_exp).map(|e| 10u64.pow(e)).collect()
}

/// The appends `[n - w, n)` form the window at size `n`: a tenth of it, at least 1000.
fn window_len(n: u64) -> u64 {
    (n / 10).max(1000).min(n)
}

const SLICES: u64 = 10;

fn bench_tree_scaling(cfg: &Cfg) {
    let max_exp = if cfg.quick { 6 } else { 7 };
    let reps = if cfg.quick { 1 } else { 3 };
    let sizes = decades(max_exp);
    println!(
        "Tree<MemNodeStore>::append of {LEAF_BYTES}-byte leaves, up to 10^{max_exp}, {reps} independent trees; window at n = appends [n - max(n/10, 1000), n) in {SLICES} slices"
    );
    let mut per_size: Vec<Vec<f64>> = vec![Vec::new(); sizes.len()];
    let mut build = Vec::new();
    for rep in 0..reps {
        let start = Instant::now();
        let mut tree = Tree::new(MemNodeStore::new());
        let mut data = [0u8; LEAF_BYTES];
        data[8..].fill(rep as u8 ^ 0xa5);
        let mut n = 0u64;
        let mut append = |tree: &mut Tree<MemNodeStore>, n: &mut u64| {
            data[..8].copy_from_slice(&n.to_le_bytes());
            tree.append(&data).expect("an in-memory append");
            *n += 1;
        };
        for (i, &size) in sizes.iter().enumerate() {
            let w = window_len(size);
            while n < size - w {
                append(&mut tree, &mut n);
            }
            let slice = w / SLICES;
            for _ in 0..SLICES {
                let t0 = Instant::now();
                for _ in 0..slice {
                    append(&mut tree, &mut n);
                }
                per_size[i].push(ns(t0.elapsed()) / slice as f64);
            }
        }
        build.push(start.elapsed());
        std::hint::black_box(tree.root());
    }
    print_scaling(&sizes, &per_size, None);
    let total: Vec<f64> = build.iter().map(|d| d.as_secs_f64()).collect();
    let s = summarize(&total);
    println!(
        "(building the 10^{max_exp}-leaf tree took {:.2} s median [{:.2} – {:.2}], {} per append overall)",
        s.median,
        s.min,
        s.max,
        fmt_ns(s.median * 1e9 / *sizes.last().expect("a size") as f64)
    );
}

/// `Tree::append` over the product's node files, single-threaded and without the segment log:
/// the index's share of an append, on a scratch tenant.
async fn bench_sled_tree_scaling(cfg: &Cfg) {
    let max_exp = if cfg.quick { 5 } else { 6 };
    let sizes = decades(max_exp);
    println!(
        "Tree<node files>::append (the product's index, no segment log, no fsync), one writer, up to 10^{max_exp}, same windows"
    );
    let scratch = bench_dir();
    let mut tree = Tree::new(NodeFiles::open(scratch.path()).expect("the node files open"));
    let mut data = [0x77u8; LEAF_BYTES];
    let mut per_size: Vec<Vec<f64>> = vec![Vec::new(); sizes.len()];
    let started = Instant::now();
    let mut n = 0u64;
    let mut append = |tree: &mut Tree<NodeFiles>, n: &mut u64| {
        data[..8].copy_from_slice(&n.to_le_bytes());
        tree.append(&data).expect("an indexed append");
        *n += 1;
    };
    for (i, &size) in sizes.iter().enumerate() {
        let w = window_len(size);
        while n < size - w {
            append(&mut tree, &mut n);
        }
        let slice = w / SLICES;
        for _ in 0..SLICES {
            let t0 = Instant::now();
            for _ in 0..slice {
                append(&mut tree, &mut n);
            }
            per_size[i].push(ns(t0.elapsed()) / slice as f64);
        }
    }
    let elapsed = started.elapsed();
    print_scaling(&sizes, &per_size, None);
    println!(
        "(appended {} leaves in {:.1} s: {} per append overall)",
        fmt_count(n as f64),
        elapsed.as_secs_f64(),
        fmt_ns(ns(elapsed) / n as f64)
    );
    drop(tree);
}

fn print_scaling(sizes: &[u64], per_size: &[Vec<f64>], latency: Option<&[Summary]>) {
    let base = summarize(&per_size[0]).median;
    for (i, &size) in sizes.iter().enumerate() {
        let s = summarize(&per_size[i]);
        let lat = latency.map_or(String::new(), |l| {
            format!(
                "  latency p50 {:>9} p99 {:>9}",
                fmt_ns(l[i].median),
                fmt_ns(l[i].p99)
            )
        });
        println!(
            "  n = 10^{:<2} {:>12}  per event {:>9} [{} – {}]  = {:>9} ev/s  ({:.2}x the 10^3 cost){lat}",
            size.ilog10(),
            fmt_count(size as f64),
            fmt_ns(s.median),
            fmt_ns(s.min),
            fmt_ns(s.max),
            fmt_count(1e9 / s.median),
            s.median / base,
        );
    }
}

/// One completed append of the product path.
struct Done {
    seq: u64,
    start: Instant,
    end: Instant,
}

/// Appends `total` events with `writers` concurrent tasks; returns when it started and every append.
async fn fill(product: &Product, writers: usize, total: u64, kind: Kind) -> (Instant, Vec<Done>) {
    let issued = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(writers);
    for w in 0..writers {
        let issued = Arc::clone(&issued);
        let services = product.services.clone();
        let ctx = product.ctx.clone();
        let repo = product.repo.clone();
        tasks.push(tokio::spawn(async move {
            let mut done = Vec::with_capacity((total / writers as u64 + 1) as usize);
            while issued.fetch_add(1, Ordering::Relaxed) < total {
                let t0 = Instant::now();
                let seq = services
                    .audit
                    .append_with(&ctx, repo.clone(), body(kind, w))
                    .await
                    .expect("the append succeeds");
                done.push(Done {
                    seq,
                    start: t0,
                    end: Instant::now(),
                });
            }
            done
        }));
    }
    let mut all = Vec::with_capacity(total as usize);
    for t in tasks {
        all.extend(t.await.expect("a writer finishes"));
    }
    (start, all)
}

/// Per-event cost of the product path in the window at each size, from the completion times.
fn product_windows(sizes: &[u64], start: Instant, done: &[Done]) -> (Vec<Vec<f64>>, Vec<Summary>) {
    let max = done.iter().map(|d| d.seq).max().unwrap_or(0) as usize;
    let mut end_of: Vec<Option<Instant>> = vec![None; max + 1];
    for d in done {
        end_of[d.seq as usize] = Some(d.end);
    }
    // by[i]: the time by which every recorded append below seq i + 1 had returned.
    let mut by = Vec::with_capacity(max + 1);
    let mut latest = start;
    for e in &end_of {
        if let Some(t) = e {
            latest = latest.max(*t);
        }
        by.push(latest);
    }
    let at = |seq: u64| -> Instant {
        if seq == 0 {
            start
        } else {
            by[(seq - 1) as usize]
        }
    };
    let mut per_size = Vec::new();
    let mut latency = Vec::new();
    for &size in sizes {
        let w = window_len(size);
        let slice = w / SLICES;
        let mut costs = Vec::new();
        for k in 0..SLICES {
            let a = size - w + k * slice;
            let b = a + slice;
            costs.push(ns(at(b).saturating_duration_since(at(a))) / slice as f64);
        }
        per_size.push(costs);
        let lat: Vec<f64> = done
            .iter()
            .filter(|d| d.seq >= size - w && d.seq < size)
            .map(|d| ns(d.end - d.start))
            .collect();
        latency.push(summarize(&lat));
    }
    (per_size, latency)
}

/// Fills a fresh product tenant to `total` appends with 64 writers; prints the curve if asked.
async fn scaled_product(total: u64, print: bool) -> Product {
    let product = Product::open().await;
    let writers = 64;
    let t0 = Instant::now();
    let (start, done) = fill(&product, writers, total, Kind::Role).await;
    let elapsed = t0.elapsed();
    let size = product.size().await;
    if print {
        let max_exp = total.ilog10();
        let sizes = decades(max_exp);
        println!(
            "AuditLog::append_with role.granted, {writers} writers, one tenant, up to {} events (same windows; per event = wall time / events, so 1/throughput)",
            fmt_count(total as f64)
        );
        let (per_size, latency) = product_windows(&sizes, start, &done);
        print_scaling(&sizes, &per_size, Some(&latency));
    }
    println!(
        "(filled {} events in {:.1} s: {} ev/s overall; the log holds {} events with checkpoints)",
        fmt_count(total as f64),
        elapsed.as_secs_f64(),
        fmt_count(total as f64 / elapsed.as_secs_f64()),
        fmt_count(size as f64)
    );
    product
}

fn big_n(cfg: &Cfg) -> u64 {
    if cfg.quick {
        100_000
    } else {
        1_000_000
    }
}

// ---------------------------------------------------------------------------------------------
// Group: proofs
// ---------------------------------------------------------------------------------------------

/// Times `calls` invocations of `f` individually, `reps` times after a warm-up.
fn time_calls(reps: usize, calls: usize, mut f: impl FnMut()) -> (Summary, Summary) {
    for _ in 0..calls / 10 {
        f();
    }
    let mut all = Vec::with_capacity(reps * calls);
    let mut medians = Vec::with_capacity(reps);
    for _ in 0..reps {
        let mut rep = Vec::with_capacity(calls);
        for _ in 0..calls {
            let t0 = Instant::now();
            f();
            rep.push(ns(t0.elapsed()));
        }
        medians.push(summarize(&rep).median);
        all.extend(rep);
    }
    (summarize(&all), summarize(&medians))
}

fn print_latency(label: &str, all: &Summary, medians: &Summary, target_ns: Option<f64>) {
    let verdict = target_ns.map_or(String::new(), |t| {
        format!(
            "  target < {}: {}",
            fmt_ns(t),
            if all.p99 < t {
                "met (p99)"
            } else if all.median < t {
                "met (median)"
            } else {
                "MISSED"
            }
        )
    });
    println!(
        "{label:<46} p50 {:>9} [{} – {}]  p99 {:>9}  max {:>9}  ({} calls){verdict}",
        fmt_ns(all.median),
        fmt_ns(medians.min),
        fmt_ns(medians.max),
        fmt_ns(all.p99),
        fmt_ns(all.max),
        all.n
    );
}

const PROOF_TARGET_NS: f64 = 50_000.0;

async fn bench_proofs(cfg: &Cfg, product: &Product) {
    let n = big_n(cfg);
    heading(&format!(
        "proofs: latency at {} events",
        fmt_count(n as f64)
    ));
    let (reps, calls) = if cfg.quick { (3, 1000) } else { (5, 5000) };
    println!("({reps} repetitions of {calls} calls at random leaves / old sizes, after {} warm-up calls; p50 [min – max of per-repetition medians])", calls / 10);
    let mut rng = StdRng::seed_from_u64(9162);

    // In memory.
    let mut tree = Tree::new(MemNodeStore::new());
    let mut data = [0x3cu8; LEAF_BYTES];
    for i in 0..n {
        data[..8].copy_from_slice(&i.to_le_bytes());
        tree.append(&data).expect("an in-memory append");
    }
    let size = TreeSize::new(n).expect("a size");
    let root = tree.root();
    let (all, med) = time_calls(reps, calls, || {
        let leaf = LeafIndex::new(rng.gen_range(0..n)).expect("a leaf");
        std::hint::black_box(tree.inclusion_proof(leaf, size).expect("a proof"));
    });
    print_latency(
        "Tree<MemNodeStore>::inclusion_proof",
        &all,
        &med,
        Some(PROOF_TARGET_NS),
    );
    let (all, med) = time_calls(reps, calls, || {
        let old = TreeSize::new(rng.gen_range(1..n)).expect("a size");
        std::hint::black_box(tree.consistency_proof(old, size).expect("a proof"));
    });
    print_latency(
        "Tree<MemNodeStore>::consistency_proof",
        &all,
        &med,
        Some(PROOF_TARGET_NS),
    );
    // What a client pays to check one.
    let queries: Vec<(u64, Hash, Vec<Hash>)> = (0..calls)
        .map(|_| {
            let i = rng.gen_range(0..n);
            let leaf = tree
                .leaf_hash_at(LeafIndex::new(i).expect("a leaf"))
                .expect("a leaf hash");
            let proof = tree
                .inclusion_proof(LeafIndex::new(i).expect("a leaf"), size)
                .expect("a proof");
            (i, leaf, proof)
        })
        .collect();
    let mut q = queries.iter().cycle();
    let (all, med) = time_calls(reps, calls, || {
        let (i, leaf, proof) = q.next().expect("a query");
        verify_inclusion(leaf, *i, n, proof, &root).expect("the proof verifies");
    });
    print_latency("verify_inclusion (client side)", &all, &med, None);
    let olds: Vec<(u64, Hash, Vec<Hash>)> = (0..calls)
        .map(|_| {
            let s = rng.gen_range(1..n);
            let ts = TreeSize::new(s).expect("a size");
            (
                s,
                tree.root_at(ts).expect("an old root"),
                tree.consistency_proof(ts, size).expect("a proof"),
            )
        })
        .collect();
    let mut o = olds.iter().cycle();
    let (all, med) = time_calls(reps, calls, || {
        let (s, old_root, proof) = o.next().expect("a query");
        verify_consistency(*s, n, proof, old_root, &root).expect("the proof verifies");
    });
    print_latency("verify_consistency (client side)", &all, &med, None);
    drop(tree);

    // Through the product, from the sled-backed node index.
    let audit = &product.services.audit;
    let size = product.size().await;
    let async_calls = |label: &'static str, consistency: bool| {
        let mut rng = StdRng::seed_from_u64(if consistency { 2 } else { 1 });
        async move {
            for _ in 0..calls / 10 {
                let x = rng.gen_range(1..size);
                if consistency {
                    audit
                        .consistency_proof(&product.ctx, product.repo.clone(), x, size)
                        .await
                        .expect("a proof");
                } else {
                    audit
                        .inclusion_proof(&product.ctx, product.repo.clone(), x, size)
                        .await
                        .expect("a proof");
                }
            }
            let mut all = Vec::with_capacity(reps * calls);
            let mut medians = Vec::new();
            for _ in 0..reps {
                let mut rep = Vec::with_capacity(calls);
                for _ in 0..calls {
                    let x = rng.gen_range(1..size);
                    let t0 = Instant::now();
                    let proof = if consistency {
                        audit
                            .consistency_proof(&product.ctx, product.repo.clone(), x, size)
                            .await
                    } else {
                        audit
                            .inclusion_proof(&product.ctx, product.repo.clone(), x, size)
                            .await
                    };
                    rep.push(ns(t0.elapsed()));
                    std::hint::black_box(proof.expect("a proof"));
                }
                medians.push(summarize(&rep).median);
                all.extend(rep);
            }
            print_latency(
                label,
                &summarize(&all),
                &summarize(&medians),
                Some(PROOF_TARGET_NS),
            );
        }
    };
    // The same node files read by a bare `Tree`, without the log's registry and lock. The log
    // buffers appended nodes; a checkpoint writes them out.
    product
        .services
        .audit
        .checkpoint_now(&product.ctx, product.repo.clone())
        .await
        .expect("a checkpoint");
    let sled_tree = Tree::open(
        NodeFiles::open(&product.node_dir()).expect("the node files open"),
        TreeSize::new(size).expect("a size"),
    )
    .expect("the index opens");
    let size_ts = TreeSize::new(size).expect("a size");
    let (all, med) = time_calls(reps, calls, || {
        let leaf = LeafIndex::new(rng.gen_range(0..size)).expect("a leaf");
        std::hint::black_box(sled_tree.inclusion_proof(leaf, size_ts).expect("a proof"));
    });
    print_latency(
        "Tree<node files>::inclusion_proof",
        &all,
        &med,
        Some(PROOF_TARGET_NS),
    );
    let (all, med) = time_calls(reps, calls, || {
        let old = TreeSize::new(rng.gen_range(1..size)).expect("a size");
        std::hint::black_box(sled_tree.consistency_proof(old, size_ts).expect("a proof"));
    });
    print_latency(
        "Tree<node files>::consistency_proof",
        &all,
        &med,
        Some(PROOF_TARGET_NS),
    );
    drop(sled_tree);
    async_calls("AuditLog::inclusion_proof (node files)", false).await;
    async_calls("AuditLog::consistency_proof (node files)", true).await;
    let mut all = Vec::new();
    let mut medians = Vec::new();
    for _ in 0..reps {
        let mut rep = Vec::with_capacity(calls);
        for _ in 0..calls {
            let t0 = Instant::now();
            let head = audit.head(&product.ctx, product.repo.clone()).await;
            rep.push(ns(t0.elapsed()));
            std::hint::black_box(head.expect("a head"));
        }
        medians.push(summarize(&rep).median);
        all.extend(rep);
    }
    print_latency(
        "AuditLog::head",
        &summarize(&all),
        &summarize(&medians),
        None,
    );
}

// ---------------------------------------------------------------------------------------------
// Group: verify
// ---------------------------------------------------------------------------------------------

const VERIFY_TARGET_S: f64 = 3.0;

async fn bench_verify(cfg: &Cfg, product: &Product) {
    let n = big_n(cfg);
    heading(&format!(
        "verify: bundle::verify of a {}-event export",
        fmt_count(n as f64)
    ));
    let reps = if cfg.quick { 1 } else { 3 };
    let out = bench_dir();
    let dir = out.path().join("bundle");
    let before = PeakRss::start();
    let t0 = Instant::now();
    let manifest = product
        .services
        .audit
        .export(&product.ctx, product.repo.clone(), 0, None, None, &dir)
        .await
        .expect("the export");
    let export = t0.elapsed();
    let export_peak = before.growth();
    let events_bytes = std::fs::metadata(dir.join(bundle::files::EVENTS))
        .expect("events.jsonl")
        .len();
    let csv_bytes = std::fs::metadata(dir.join(bundle::files::CSV))
        .expect("events.csv")
        .len();
    println!(
        "AuditLog::export of events [{}, {}) (tree size {}): {:.2} s; events.jsonl {:.1} MB, events.csv {:.1} MB",
        manifest.from,
        manifest.to,
        manifest.tree_size,
        export.as_secs_f64(),
        events_bytes as f64 / 1e6,
        csv_bytes as f64 / 1e6
    );

    // One untimed run first: it checks the bundle and leaves the files in the page cache.
    let verified = bundle::verify(&dir, None, None).expect("the bundle verifies");
    assert_eq!(verified.events, manifest.to - manifest.from);
    let verify_peak = verify_peak_in_child(&dir);
    println!(
        "peak memory: export {} above the process's resident size before it; verify {} peak resident size of a process doing only that (bundle files {:.1} MB)",
        fmt_mb(export_peak),
        fmt_mb(verify_peak),
        (events_bytes + csv_bytes) as f64 / 1e6
    );
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t0 = Instant::now();
        std::hint::black_box(bundle::verify(&dir, None, None).expect("the bundle verifies"));
        times.push(t0.elapsed().as_secs_f64());
    }
    let s = summarize(&times);
    println!(
        "bundle::verify ({} events, warm page cache)   median {:.3} s [{:.3} – {:.3}] over {reps} runs = {} ev/s  target < {VERIFY_TARGET_S} s at 10^6: {}",
        fmt_count(verified.events as f64),
        s.median,
        s.min,
        s.max,
        fmt_count(verified.events as f64 / s.median),
        if s.median < VERIFY_TARGET_S * verified.events as f64 / 1e6 {
            "met"
        } else {
            "MISSED"
        }
    );
    verify_breakdown(&dir, &manifest);
}

/// The growth of this process's peak resident size over one step: the peak is reset first
/// (`/proc/self/clear_refs`, Linux), so what is left is what the step itself held at its peak.
struct PeakRss {
    rss_before: Option<u64>,
}

impl PeakRss {
    fn start() -> Self {
        let reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
        PeakRss {
            rss_before: reset.then(|| proc_status_kb("VmRSS")).flatten(),
        }
    }

    /// Bytes by which the peak rose above the resident size at `start`, if Linux tells.
    fn growth(&self) -> Option<u64> {
        let peak = proc_status_kb("VmHWM")?;
        Some(peak.saturating_sub(self.rss_before?) * 1024)
    }
}

/// The peak resident size of a fresh process of this benchmark that verifies `dir` and nothing
/// else (see `main`): the verifier's own memory, which a compliance officer's machine must have.
fn verify_peak_in_child(dir: &Path) -> Option<u64> {
    let exe = std::env::current_exe().ok()?;
    let out = std::process::Command::new(exe)
        .arg(VERIFY_PEAK_ARG)
        .arg(dir)
        .output()
        .ok()?;
    assert!(
        out.status.success(),
        "the verifying child failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).ok()?.trim().parse().ok()
}

/// Run as `audit --verify-peak DIR`, the benchmark verifies DIR and prints its peak resident size
/// in bytes (`VmHWM`).
const VERIFY_PEAK_ARG: &str = "--verify-peak";

fn proc_status_kb(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn fmt_mb(bytes: Option<u64>) -> String {
    bytes.map_or("unknown (no /proc)".to_owned(), |b| {
        format!("{:.1} MB", b as f64 / 1e6)
    })
}

/// Times the steps `bundle::verify` performs, separately, to show where its time goes.
fn verify_breakdown(dir: &Path, manifest: &bundle::Manifest) {
    let step = |label: &str, t0: Instant| {
        println!("  step {label:<52} {:>9}", fmt_ns(ns(t0.elapsed())));
    };
    let t0 = Instant::now();
    let mut files = Vec::new();
    for name in manifest.files.keys() {
        files.push((
            name.clone(),
            std::fs::read(dir.join(name)).expect("a bundle file"),
        ));
    }
    step("read every listed file", t0);
    let t0 = Instant::now();
    for (_, bytes) in &files {
        std::hint::black_box(hex::encode(Sha256::digest(bytes)));
    }
    step("SHA-256 of every listed file (manifest check)", t0);
    let events = &files
        .iter()
        .find(|(n, _)| n == bundle::files::EVENTS)
        .expect("events.jsonl")
        .1;
    let lines: Vec<&[u8]> = events
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .collect();
    let t0 = Instant::now();
    for l in &lines {
        assert!(is_canonical(l));
    }
    step("is_canonical per event (parse + re-serialise)", t0);
    let t0 = Instant::now();
    for l in &lines {
        std::hint::black_box(serde_json::from_slice::<serde_json::Value>(l).expect("JSON"));
    }
    step("serde_json::from_slice per event (second parse)", t0);
    let t0 = Instant::now();
    let owned: Vec<Vec<u8>> = lines.iter().map(|l| l.to_vec()).collect();
    let csv_file = &files
        .iter()
        .find(|(n, _)| n == bundle::files::CSV)
        .expect("events.csv")
        .1;
    assert!(bundle::csv(&owned).as_bytes() == csv_file.as_slice());
    step(
        "CSV check: copy lines, bundle::csv (third parse), compare",
        t0,
    );
    let t0 = Instant::now();
    let leaves: Vec<Hash> = lines.iter().map(|l| leaf_hash(l)).collect();
    step("leaf_hash per event", t0);
    let proofs: bundle::Proofs = serde_json::from_slice(
        &std::fs::read(dir.join(bundle::files::PROOFS)).expect("proofs.json"),
    )
    .expect("proofs parse");
    let range: Vec<Hash> = proofs
        .range_proof
        .iter()
        .map(|h| hex::decode(h).expect("hex").try_into().expect("32 bytes"))
        .collect();
    let t0 = Instant::now();
    std::hint::black_box(
        root_from_range(manifest.from, &leaves, manifest.tree_size, &range).expect("a root"),
    );
    step("root_from_range over the leaves", t0);
}

// ---------------------------------------------------------------------------------------------

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(VERIFY_PEAK_ARG) {
        let dir = Path::new(args.get(2).expect("--verify-peak DIR"));
        bundle::verify(dir, None, None).expect("the bundle verifies");
        let peak = proc_status_kb("VmHWM").expect("VmHWM in /proc/self/status");
        println!("{}", peak * 1024);
        return;
    }
    let cfg = Cfg::from_args();
    if let Some(f) = &cfg.filter {
        if f != "all" && !GROUPS.iter().any(|g| g.contains(f.as_str())) {
            eprintln!("no group matches {f:?}; groups: {}", GROUPS.join(", "));
            std::process::exit(2);
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    println!(
        "agentgate audit benchmarks{} on {} CPUs; load average {}",
        if cfg.quick { " (--quick)" } else { "" },
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        loadavg()
    );
    let started = Instant::now();
    rt.block_on(async {
        if cfg.wants("appends") {
            bench_appends(&cfg).await;
        }
        let mut fixture: Option<Product> = None;
        if cfg.wants("append-scaling") {
            heading("append-scaling: append cost as one tenant's log grows");
            bench_tree_scaling(&cfg);
            bench_sled_tree_scaling(&cfg).await;
            let total = if cfg.huge { 10_000_000 } else { big_n(&cfg) };
            let product = scaled_product(total, true).await;
            if total == big_n(&cfg) {
                fixture = Some(product);
            } else {
                product.close().await;
            }
        }
        if cfg.wants("proofs") || cfg.wants("verify") {
            let product = match fixture.take() {
                Some(p) => p,
                None => {
                    println!(
                        "\n(building the {}-event tenant for proofs and verify)",
                        fmt_count(big_n(&cfg) as f64)
                    );
                    scaled_product(big_n(&cfg), false).await
                }
            };
            if cfg.wants("proofs") {
                bench_proofs(&cfg, &product).await;
            }
            if cfg.wants("verify") {
                bench_verify(&cfg, &product).await;
            }
            product.close().await;
        }
    });
    println!(
        "\n(total {:.1} s; load average {})",
        started.elapsed().as_secs_f64(),
        loadavg()
    );
}
