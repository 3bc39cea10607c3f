//! Logs on disk (issue 14):
//!
//! 1. the last 1,000 lines of a 1 GiB log, through the store's reader (the
//!    line index, then the bytes: what the web UI's build page and the API
//!    read), while the step runs (a plain file) and once it is compressed,
//!    against reading the same bytes from a plain file with `pread`;
//! 2. the state database's size after N builds of 1 MiB logs each, stored
//!    through the store as the master stores them (chunks, then the step's
//!    end), and the log files' size once compressed;
//! 3. push to first output stored, p50 and p99, on a master whose history
//!    holds those N builds, all past `build_retention` so that they are
//!    pruned meanwhile, against the same master and history with no
//!    retention, alternating rounds in one run.
//!
//! Run: `cargo bench --bench logs` (N = 10,000; `-- quick` for a 64 MiB
//! log and N = 1,000; `-- only 1,3` for some parts). Every loop is bounded
//! in count and time.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use switchyard::builds::Outcome;

use switchyard::builds::Event;
use switchyard::store::logs::LogFiles;
use switchyard::store::{LogChunk, StateDb, StepEndRecord};

mod support;
use support::{median, percentile, spawn_worker, verifier};

/// A line of compiler-ish output, numbered.
fn line(n: u64) -> String {
    format!(
        "   Compiling crate-{:05} v0.{}.{} (/src/crates/crate-{n})\n",
        n % 99_991,
        n % 17,
        n % 101
    )
}

/// `bytes` of output in 64 KiB chunks of whole lines, numbered from `seq`.
fn chunks_of(step: i64, bytes: u64, mut each: impl FnMut(Vec<LogChunk>)) {
    let (mut made, mut n, mut seq) = (0u64, 0u64, 1u64);
    let mut batch = Vec::new();
    let mut batch_bytes = 0;
    while made < bytes {
        let mut chunk = String::with_capacity(64 * 1024);
        while chunk.len() < 64 * 1024 - 100 && made + (chunk.len() as u64) < bytes {
            chunk.push_str(&line(n));
            n += 1;
        }
        made += chunk.len() as u64;
        batch_bytes += chunk.len();
        batch.push(LogChunk {
            step,
            seq,
            stream: 1,
            data: chunk.into_bytes().into(),
        });
        seq += 1;
        // As the master does: one sync per 2 MiB batch.
        if batch_bytes >= 2 << 20 {
            each(std::mem::take(&mut batch));
            batch_bytes = 0;
        }
    }
    if !batch.is_empty() {
        each(batch);
    }
}

fn tail(dir: &Path, bytes: u64, rounds: usize) {
    let logs = LogFiles::new(dir.join("logs"));
    let started = Instant::now();
    chunks_of(1, bytes, |batch| {
        logs.append(&batch).unwrap();
    });
    let wrote = started.elapsed().as_secs_f64();
    // The plain file, under another name too: compression removes `1.log`.
    let plain = dir.join("plain.log");
    std::fs::hard_link(dir.join("logs/0/1.log"), &plain).unwrap();
    let file = std::fs::File::open(&plain).unwrap();
    let reader = logs.reader(1).unwrap().unwrap();
    let start = reader.start_of_last_lines(1000).unwrap();
    let end = reader.stats().bytes;
    let expected = reader.read(start, end).unwrap();
    assert_eq!(expected.iter().filter(|&&b| b == b'\n').count(), 1000);
    let baseline = || {
        use std::os::unix::fs::FileExt;
        let t = Instant::now();
        let f = std::fs::File::open(&plain).unwrap();
        let mut buf = vec![0u8; (end - start) as usize];
        f.read_exact_at(&mut buf, start).unwrap();
        let secs = t.elapsed().as_secs_f64();
        assert_eq!(buf, expected);
        secs
    };
    let store = || {
        let t = Instant::now();
        let r = logs.reader(1).unwrap().unwrap();
        let (_, got) = r.last_lines(1000).unwrap();
        let secs = t.elapsed().as_secs_f64();
        assert_eq!(got, expected);
        secs
    };
    let measure = |label: &str| {
        let (mut ours, mut plain_reads) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            ours.push(store());
            plain_reads.push(baseline());
        }
        // The first read opens the log's files; later ones find them open
        // (a running step's writer's, or a compressed log's kept reader).
        let first = ours[0] * 1e6;
        let (o, p) = (median(ours) * 1e6, median(plain_reads) * 1e6);
        println!(
            "1. last 1,000 lines ({} bytes) of a {} MiB log, {label}: store {o:.1} µs (first read {first:.1} µs), plain file pread {p:.1} µs (medians of {rounds}, alternating); ratio {:.2}",
            end - start,
            bytes >> 20,
            o / p
        );
    };
    measure("while it runs (plain)");
    let t = Instant::now();
    logs.compress(1).unwrap();
    let packed: u64 = ["logs/0/1.zst", "logs/0/1.frames", "logs/0/1.idx"]
        .iter()
        .map(|f| std::fs::metadata(dir.join(f)).unwrap().len())
        .sum();
    println!(
        "1. stored at {:.0} MiB/s (synced per 2 MiB); compressed in {:.1} s to {} bytes ({:.1}% of {})",
        bytes as f64 / (1 << 20) as f64 / wrote,
        t.elapsed().as_secs_f64(),
        packed,
        packed as f64 * 100.0 / bytes as f64,
        bytes
    );
    measure("once compressed");
    drop(file);
}

/// Fills a master's state with `n` ended builds of builder `old` whose
/// steps wrote `log` bytes each, all through the store; the builds ended
/// 100 days ago.
async fn history(dir: &Path, n: usize, log: u64) -> (u64, u64, f64) {
    let db = Arc::new(StateDb::open(&dir.join("state.sqlite")).unwrap());
    let started = Instant::now();
    let rows: Vec<(i64, i64)> = db
        .write(move |c| {
            let mut out = Vec::new();
            for i in 0..n {
                c.execute(
                    "INSERT INTO build_requests (builder, reason, repository, branch, revision, created_ms)
                     VALUES ('old', 'bench', 'repo', 'main', ?1, 0)",
                    [format!("{i:040x}")],
                )?;
                let request = c.last_insert_rowid();
                c.execute(
                    "INSERT INTO builds (request_id, builder, worker, started_ms, number) VALUES (?1, 'old', 'w1', 0, ?2)",
                    [request, i as i64 + 1],
                )?;
                let build = c.last_insert_rowid();
                c.execute("UPDATE build_requests SET build_id = ?1 WHERE id = ?2", [build, request])?;
                c.execute(
                    "INSERT INTO steps (build_id, position, name, attempt, step_id, on_lost, started_ms, log_stored)
                     VALUES (?1, 0, 'compile', 1, ?2, 'fail', 0, 'file')",
                    rusqlite::params![build, (i as u128).to_le_bytes().to_vec()],
                )?;
                out.push((build, c.last_insert_rowid()));
            }
            c.execute("INSERT INTO builder_numbers (builder, last) VALUES ('old', ?1)", [n as i64])?;
            Ok(out)
        })
        .await
        .unwrap();
    // The same 1 MiB for every build (compressed alike), written and
    // ended as the master does.
    let mut one = Vec::new();
    chunks_of(0, log, |b| one.extend(b));
    for (build, row) in &rows {
        let chunks: Vec<LogChunk> = one
            .iter()
            .map(|c| LogChunk {
                step: *row,
                ..c.clone()
            })
            .collect();
        db.append_logs(chunks).await.unwrap();
        db.finish_step(
            StepEndRecord {
                exit_code: Some(0),
                then: Some((*build, Vec::new(), Some(Outcome::Success))),
                ..StepEndRecord::new(*row, Outcome::Success, "")
            },
            Vec::new(),
        )
        .await
        .unwrap();
    }
    // Wait for the background compression to finish.
    let deadline = Instant::now() + Duration::from_secs(1200);
    loop {
        let left: i64 = db
            .read(|c| {
                c.query_row(
                    "SELECT COUNT(*) FROM steps WHERE log_stored = 'file'",
                    [],
                    |r| r.get(0),
                )
            })
            .await
            .unwrap();
        if left == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "compression did not finish");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    db.write(|c| {
        c.execute(
            "UPDATE builds SET finished_ms = finished_ms - 100 * 86400000",
            [],
        )
    })
    .await
    .unwrap();
    drop(db);
    // Wait for the writer thread to let go, then fold the WAL in.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let c = rusqlite::Connection::open(dir.join("state.sqlite")).unwrap();
    c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .unwrap();
    drop(c);
    let size = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
    let db_bytes = size(&dir.join("state.sqlite")) + size(&dir.join("state.sqlite-wal"));
    (db_bytes, dir_size(&dir.join("logs")), secs)
}

fn dir_size(dir: &Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        total += if p.is_dir() {
            dir_size(&p)
        } else {
            std::fs::metadata(&p).map_or(0, |m| m.len())
        };
    }
    total
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let (src, dst) = (e.path(), to.join(e.file_name()));
        if src.is_dir() {
            copy_dir(&src, &dst);
        } else {
            std::fs::copy(&src, &dst).unwrap();
        }
    }
}

/// A master on `dir` (its state already there), with `retention`.
async fn master_on(
    dir: &Path,
    retention: &str,
) -> (
    Arc<switchyard::master::Master>,
    String,
    tokio_util::sync::CancellationToken,
) {
    std::fs::write(
        dir.join("master.toml"),
        format!(
            "[master]\nlisten = \"127.0.0.1:0\"\nsecrets = \"secrets.toml\"\n{retention}\n\
             \n[[user]]\nname = \"admin\"\nservices = [\"change-source\"]\n\
             \n[[worker]]\nname = \"w1\"\n\
             \n[[builder]]\nname = \"old\"\nworkers = [\"w1\"]\n[[builder.step]]\nname = \"compile\"\nshell = \"true\"\n\
             \n[[builder]]\nname = \"quick\"\nworkers = [\"w1\"]\n[[builder.step]]\nname = \"say\"\nshell = \"echo first\"\n\
             \n[[scheduler]]\nname = \"all\"\nbuilders = [\"quick\"]\n"
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("secrets.toml"),
        format!(
            "[verifiers]\nadmin = {:?}\nw1 = {:?}\n",
            verifier("admin-pw"),
            verifier("worker-pw")
        ),
    )
    .unwrap();
    let master = Arc::new(
        switchyard::master::Master::load(&dir.join("master.toml"))
            .await
            .unwrap(),
    );
    let listener = master.bind().await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let (m, s) = (master.clone(), shutdown.clone());
    tokio::spawn(async move { m.serve(listener, s).await });
    (master, addr, shutdown)
}

/// Push to first output stored, in ms: `samples` times, or, with
/// `until_pruned`, until no old build is left (at most 2,000 samples or
/// 300 s); and how many old builds are left at the end.
async fn first_output(
    dir: &Path,
    retention: &str,
    samples: usize,
    until_pruned: bool,
) -> (Vec<f64>, usize) {
    let (master, addr, shutdown) = master_on(dir, retention).await;
    let _worker = spawn_worker(&addr, "w1", &dir.join("basedir-w1"));
    let deadline = Instant::now() + Duration::from_secs(60);
    while master.builds().connected().is_empty() {
        assert!(Instant::now() < deadline, "the worker did not connect");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut events = master.builds().subscribe();
    let mut push =
        switchyard::grpc::client::ChangeSourceConnection::connect(&addr, "admin", "admin-pw")
            .await
            .unwrap();
    let old_left = || async {
        master
            .state()
            .read(|c| {
                c.query_row(
                    "SELECT COUNT(*) FROM builds WHERE builder = 'old'",
                    [],
                    |r| r.get::<_, i64>(0),
                )
            })
            .await
            .unwrap() as usize
    };
    let cap = Instant::now() + Duration::from_secs(300);
    let mut out = Vec::new();
    for i in 0..2_000 {
        if until_pruned {
            if i % 10 == 0 && (old_left().await == 0 || Instant::now() > cap) {
                break;
            }
        } else if i == samples {
            break;
        }
        let t = Instant::now();
        push.push(switchyard::proto::Change {
            repository: "r".into(),
            branch: "main".into(),
            revision: format!("{i}"),
            ..Default::default()
        })
        .await
        .unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let e = tokio::time::timeout_at(deadline, events.recv())
                .await
                .expect("first output in time")
                .unwrap();
            if let Event::OutputStored { .. } = e.event {
                break;
            }
        }
        out.push(t.elapsed().as_secs_f64() * 1000.0);
        // Let the build end before the next push.
        loop {
            let e = tokio::time::timeout_at(deadline, events.recv())
                .await
                .expect("the build to end")
                .unwrap();
            if let Event::BuildEnded { .. } = e.event {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let left = old_left().await;
    shutdown.cancel();
    tokio::time::sleep(Duration::from_millis(200)).await;
    (out, left)
}

fn main() {
    let quick = std::env::args().any(|a| a == "quick");
    let (log, builds, samples) = if quick {
        (64u64 << 20, 1_000, 100)
    } else {
        (1u64 << 30, 10_000, 300)
    };
    let args: Vec<String> = std::env::args().collect();
    let only: Option<Vec<u32>> = args
        .iter()
        .position(|a| a == "only")
        .and_then(|i| args.get(i + 1))
        .map(|l| l.split(',').filter_map(|n| n.parse().ok()).collect());
    let part = |n: u32| only.as_ref().is_none_or(|o| o.contains(&n));
    let base: PathBuf =
        std::env::temp_dir().join(format!("switchyard-logs-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();
    if part(1) {
        let dir = base.join("tail");
        std::fs::create_dir_all(&dir).unwrap();
        tail(&dir, log, 200);
        let _ = std::fs::remove_dir_all(&dir);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        if part(2) || part(3) {
            let seeded = base.join("seeded");
            std::fs::create_dir_all(&seeded).unwrap();
            let (db, files, secs) = history(&seeded, builds, 1 << 20).await;
            println!(
                "2. {builds} builds of 1 MiB logs each, stored and compressed in {secs:.0} s: state database {:.1} MiB ({} bytes per build); log files {:.1} MiB ({:.1}% of {} MiB)",
                db as f64 / (1 << 20) as f64,
                db / builds as u64,
                files as f64 / (1 << 20) as f64,
                files as f64 * 100.0 / (builds as f64 * (1 << 20) as f64),
                builds
            );
            if part(3) {
                // Alternating rounds, each on a fresh copy of the history:
                // sampled until the pruning round has pruned everything,
                // then as many samples with no pruning.
                let (mut pruning, mut quiet) = (Vec::new(), Vec::new());
                let mut left_after = Vec::new();
                for round in 0..2 {
                    let dir = base.join(format!("round-{round}-prune"));
                    copy_dir(&seeded, &dir);
                    let (ms, left) = first_output(&dir, "build_retention = \"90d\"", 0, true).await;
                    let n = ms.len();
                    left_after.push(left);
                    pruning.extend(ms);
                    let _ = std::fs::remove_dir_all(&dir);
                    let dir = base.join(format!("round-{round}-quiet"));
                    copy_dir(&seeded, &dir);
                    let (ms, _) = first_output(&dir, "", n.max(samples / 2), false).await;
                    quiet.extend(ms);
                    let _ = std::fs::remove_dir_all(&dir);
                }
                let (p50, p99) = (percentile(&mut pruning, 0.5), percentile(&mut pruning, 0.99));
                let (q50, q99) = (percentile(&mut quiet, 0.5), percentile(&mut quiet, 0.99));
                println!(
                    "3. push -> first output stored while {builds} old builds are pruned: p50 {p50:.2} ms, p99 {p99:.2} ms; with no pruning: p50 {q50:.2} ms, p99 {q99:.2} ms; p99 ratio {:.2} ({} and {} samples, 2 alternating rounds, each pruning round sampled until its pruning was done; old builds left at each pruning round's end: {left_after:?})",
                    p99 / q99,
                    pruning.len(),
                    quiet.len()
                );
            }
        }
    });
    let _ = std::fs::remove_dir_all(&base);
}
