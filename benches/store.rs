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
//! Two ways of claiming are measured. `claim_next` (the store's
//! `RequestQueue`): each claim takes the oldest due request with
//! `FOR UPDATE SKIP LOCKED`. And the master's own: each claimer reads the
//! waiting list and claims requests by id, in order, as a master's dispatch
//! does for its free workers, each claim recording the build's first step
//! in the same write, under a live lease (PostgreSQL: each master a
//! `StateDb` with a lease of its own, renewed meanwhile), so claimers on
//! several masters race for the same requests as real masters do.
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
use switchyard::wire::StepId;

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

/// Stores `count` requests through the first of `masters`, then runs
/// [`CLAIMERS`] claimers spread over them (`claimer(store, i, start)`
/// claims until none is left or a minute has passed, and returns how many
/// it claimed); checks that every request was claimed exactly once and
/// returns claims per second.
async fn claims_per_second<S, F, Fut>(masters: &[Arc<S>], count: usize, claimer: F) -> f64
where
    S: RequestQueue,
    F: Fn(Arc<S>, usize, Instant) -> Fut,
    Fut: std::future::Future<Output = usize> + Send + 'static,
{
    masters[0]
        .add_requests((0..count).map(request).collect())
        .await
        .unwrap();
    let start = Instant::now();
    let tasks: Vec<_> = (0..CLAIMERS)
        .map(|i| tokio::spawn(claimer(masters[i % masters.len()].clone(), i, start)))
        .collect();
    let mut claimed = 0;
    for t in tasks {
        claimed += t.await.unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(claimed, count, "every request claimed exactly once");
    count as f64 / secs
}

/// No claimer goes on longer than this.
const CAP: Duration = Duration::from_secs(60);

/// Claims with `claim_next` (the oldest due request, `SKIP LOCKED`).
async fn claim_all<S: RequestQueue>(masters: &[Arc<S>], count: usize) -> f64 {
    claims_per_second(masters, count, |store, i, start| async move {
        let builders: Vec<String> = BUILDERS.iter().map(|b| b.to_string()).collect();
        let mut n = 0usize;
        while start.elapsed() < CAP
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
    .await
}

/// Claims the master's way: each claimer reads the waiting list and claims
/// by id, in order (a request another claimer took is passed over), each
/// claim recording the build's first step, until none is left.
async fn claim_all_as_masters(masters: &[Arc<StateDb>], count: usize) -> f64 {
    claims_per_second(masters, count, |store, i, start| async move {
        let worker = format!("w{i}");
        let mut n = 0usize;
        while start.elapsed() < CAP {
            let waiting = store.waiting_requests().await.unwrap();
            if waiting.is_empty() {
                break;
            }
            for r in waiting {
                let first = Some(("compile".to_string(), "retry".to_string(), StepId::random()));
                let claimed = store
                    .claim(r.id, Vec::new(), &worker, first, |_| ((), Vec::new()))
                    .await
                    .unwrap();
                n += claimed.is_some() as usize;
            }
        }
        n
    })
    .await
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
        // The master's way: SQLite in a file of its own, and three leased
        // masters on a database of their own.
        let own = format!("{db}_masters");
        support::pg_admin(&format!("CREATE DATABASE {own}")).await;
        let own_url = format!("postgres://postgres@127.0.0.1:5432/{own}");
        let sqlite_m = Arc::new(StateDb::open(&dir.path().join("masters.sqlite")).unwrap());
        let lease = Duration::from_secs(10);
        let mut masters = Vec::new();
        for i in 0..3 {
            let data = dir.path().join(format!("data-{i}"));
            let state = StateDb::open_postgres(&own_url, &data, &format!("bench master {i}"), lease)
                .await
                .unwrap();
            masters.push(Arc::new(state));
        }
        let renewing: Vec<_> = masters
            .iter()
            .map(|m| {
                let m = m.clone();
                tokio::spawn(async move {
                    loop {
                        tokio::time::sleep(lease / 3).await;
                        m.renew_lease(lease).await.unwrap();
                    }
                })
            })
            .collect();
        let vacuum_now = |url: String| async move {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
            tokio::spawn(conn);
            client
                .batch_execute("VACUUM build_requests, builds, builder_numbers, report_outbox, steps")
                .await
                .unwrap();
        };
        let mut rates: [Vec<f64>; 4] = Default::default();
        let mut master_rates: [Vec<f64>; 4] = Default::default();
        for _ in 0..rounds {
            rates[0].push(claim_all(std::slice::from_ref(&sqlite), count).await);
            master_rates[0].push(claim_all_as_masters(std::slice::from_ref(&sqlite_m), count).await);
            for m in 1..=3 {
                if vacuum {
                    vacuum_now(url.clone()).await;
                    vacuum_now(own_url.clone()).await;
                }
                rates[m].push(claim_all(&pg[..m], count).await);
                master_rates[m].push(claim_all_as_masters(&masters[..m], count).await);
            }
        }
        for r in renewing {
            r.abort();
        }
        let show = |v: &[f64]| v.iter().map(|x| format!("{x:.0}")).collect::<Vec<_>>().join(" ");
        println!(
            "requests claimed/s, {CLAIMERS} claimers, {count} requests a round, medians of {rounds} alternating rounds{}:",
            if vacuum { ", VACUUM before each PostgreSQL round" } else { "" }
        );
        for (how, rates) in [
            ("claim_next (oldest due, SKIP LOCKED)", &rates),
            ("the master's claim (waiting list, then by id, first step, lease)", &master_rates),
        ] {
            let sqlite_rate = median(rates[0].clone());
            println!("  {how}:");
            println!("    SQLite, 1 master: {sqlite_rate:.0} [{}]", show(&rates[0]));
            for (m, rates) in rates.iter().enumerate().skip(1) {
                let r = median(rates.clone());
                println!(
                    "    PostgreSQL, {m} master{}: {r:.0} [{}], ratio to SQLite {:.3}",
                    if m == 1 { "" } else { "s" },
                    show(rates),
                    r / sqlite_rate
                );
            }
        }
        drop((pg, masters));
        support::pg_admin(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)")).await;
        support::pg_admin(&format!("DROP DATABASE IF EXISTS {own} WITH (FORCE)")).await;
    });
}
