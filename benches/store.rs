//! The shared request queue: build requests claimed per second with 1, 2
//! and 3 masters on one PostgreSQL database (each master a `PgState` of its
//! own, with its own pool of connections, as separate master processes
//! would have), six claimers in all spread over them, against SQLite (one
//! master, the same six claimers) in the same run.
//!
//! Each round stores 3,000 requests over three builders, then the claimers
//! claim until none is left; every request must be claimed exactly once.
//! Rounds alternate between the setups; medians are reported.
//!
//! Run: `cargo bench --bench store` (`-- quick` for a short run; `-- vacuum`
//! to `VACUUM` the queue's tables before each PostgreSQL round, as
//! autovacuum does on a running site, which tells the cost of dead index
//! entries from that of the tables' size). Uses the
//! machine's PostgreSQL at 127.0.0.1:5432 (a database made for the run and
//! dropped after). Loopback only; every loop is bounded.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard::store::postgres::PgState;
use switchyard::store::{NewRequest, RequestQueue, StateDb};

const CLAIMERS: usize = 6;
const BUILDERS: [&str; 3] = ["widgets", "gadgets", "gizmos"];

fn request(n: usize) -> NewRequest {
    NewRequest {
        builder: BUILDERS[n % 3].into(),
        reason: format!("request {n}"),
        repository: "https://example.org/repo.git".into(),
        branch: "main".into(),
        revision: format!("{n:040x}"),
        ..Default::default()
    }
}

/// Stores `count` requests, then claims them all with [`CLAIMERS`] claimers
/// spread over `masters`; returns claims per second.
async fn claim_all<S: RequestQueue>(masters: &[Arc<S>], count: usize) -> f64 {
    masters[0]
        .add_requests((0..count).map(request).collect())
        .await
        .unwrap();
    let builders: Vec<String> = BUILDERS.iter().map(|b| b.to_string()).collect();
    let start = Instant::now();
    let cap = Duration::from_secs(60);
    let tasks: Vec<_> = (0..CLAIMERS)
        .map(|i| {
            let store = masters[i % masters.len()].clone();
            let builders = builders.clone();
            tokio::spawn(async move {
                let mut n = 0usize;
                while start.elapsed() < cap
                    && store
                        .claim_next(&builders, &format!("w{i}"))
                        .await
                        .unwrap()
                        .is_some()
                {
                    n += 1;
                }
                n
            })
        })
        .collect();
    let mut claimed = 0;
    for t in tasks {
        claimed += t.await.unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(claimed, count, "every request claimed exactly once");
    count as f64 / secs
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let quick = std::env::args().any(|a| a == "quick");
    let vacuum = std::env::args().any(|a| a == "vacuum");
    let (rounds, count) = if quick { (1, 300) } else { (5, 3_000) };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let db = format!("switchyard_store_bench_{}", std::process::id());
        support::pg_admin(&format!("CREATE DATABASE {db}")).await;
        let url = format!("postgres://postgres@127.0.0.1:5432/{db}");
        let mut pg = Vec::new();
        for _ in 0..3 {
            pg.push(Arc::new(PgState::connect(&url).await.unwrap()));
        }
        let dir = tempfile::tempdir().unwrap();
        let sqlite = Arc::new(StateDb::open(&dir.path().join("state.sqlite")).unwrap());
        let mut rates: [Vec<f64>; 4] = Default::default();
        for _ in 0..rounds {
            rates[0].push(claim_all(std::slice::from_ref(&sqlite), count).await);
            for m in 1..=3 {
                if vacuum {
                    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
                    tokio::spawn(conn);
                    client
                        .batch_execute("VACUUM build_requests, builds, builder_numbers, report_outbox")
                        .await
                        .unwrap();
                }
                rates[m].push(claim_all(&pg[..m], count).await);
            }
        }
        let show = |v: &[f64]| v.iter().map(|x| format!("{x:.0}")).collect::<Vec<_>>().join(" ");
        let sqlite_rate = median(rates[0].clone());
        println!(
            "requests claimed/s, {CLAIMERS} claimers, {count} requests a round, medians of {rounds} alternating rounds{}:",
            if vacuum { ", VACUUM before each PostgreSQL round" } else { "" }
        );
        println!("  SQLite, 1 master: {sqlite_rate:.0} [{}]", show(&rates[0]));
        for (m, rates) in rates.iter().enumerate().skip(1) {
            let r = median(rates.clone());
            println!(
                "  PostgreSQL, {m} master{}: {r:.0} [{}], ratio to SQLite {:.3}",
                if m == 1 { "" } else { "s" },
                show(rates),
                r / sqlite_rate
            );
        }
        drop(pg);
        support::pg_admin(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)")).await;
    });
}
