//! The store suite: what every state backend must do, run against each
//! (SQLite in `store::tests`, PostgreSQL in `store::postgres::tests`).
//! Test-only.

use std::sync::Arc;

use super::{
    BuildFilter, BuildStore, ChangeReader, ChangeStore, LogSize, LogStorage, NewChange, NewRequest,
    PropertyRow, QueuedReport, ReportOutbox, ReportProgress, ReportedBuild, RequestQueue,
    StepEndRecord, TimerMarks,
};
use crate::builds::Outcome;
use crate::wire::StepId;

pub use super::postgres::testing::TempPg;

fn change(n: usize) -> NewChange {
    NewChange {
        repository: "https://example.org/repo.git".into(),
        branch: if n.is_multiple_of(2) { "main" } else { "dev" }.into(),
        revision: format!("{n:040x}"),
        author: "A U Thor <a@example.org>".into(),
        comments: format!("change {n}\n\nwith a body, 'quotes' and ünïcode"),
        category: "push".into(),
        project: "owner/repo".into(),
        files: (0..n % 4).map(|i| format!("src/f{i}.rs")).collect(),
        when: (!n.is_multiple_of(3)).then_some((1_700_000_000 + n as i64, n as i32)),
        properties: (0..n % 3)
            .map(|i| (format!("p{i}"), format!("v{n}")))
            .collect(),
    }
}

/// The change log: pushes stored whole and read back equal, in order;
/// keyed pushes stored once, also when the same key comes concurrently.
pub async fn changes<S: ChangeStore + ChangeReader>(store: &Arc<S>) {
    let before = store.change_count().await.unwrap();
    let batch: Vec<NewChange> = (0..7).map(change).collect();
    let ids = store.add_changes(batch.clone()).await.unwrap();
    assert_eq!(ids.len(), 7);
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    assert_eq!(store.change_count().await.unwrap(), before + 7);
    for (id, c) in ids.iter().zip(&batch) {
        let got = store.change(*id).await.unwrap().expect("stored");
        assert_eq!(got.id, *id);
        assert_eq!(&got.change, c);
        assert!(got.received_ms > 0);
    }
    assert!(store.change(ids[6] + 1000).await.unwrap().is_none());
    let after = store.changes_after(ids[1], 3).await.unwrap();
    assert_eq!(
        after.iter().map(|c| c.id).collect::<Vec<_>>(),
        ids[2..5].to_vec()
    );
    assert_eq!(after[0].change, batch[2]);

    // A key: stored once; the same key again answers the first ids.
    let key = ("user:ci".to_string(), "k-1".to_string());
    let (first, again) = store
        .add_changes_keyed(key.clone(), vec![change(10), change(11)])
        .await
        .unwrap();
    assert!(!again);
    let (second, again) = store
        .add_changes_keyed(key.clone(), vec![change(12)])
        .await
        .unwrap();
    assert!(again);
    assert_eq!(second, first);
    assert_eq!(store.change_count().await.unwrap(), before + 9);
    // The same key in another namespace (another user) is another push.
    let (other, again) = store
        .add_changes_keyed(("user:other".into(), "k-1".into()), vec![change(13)])
        .await
        .unwrap();
    assert!(!again);
    assert_eq!(other.len(), 1);
    assert_ne!(other[0], first[0]);

    // Eight pushes with one key at once: one stores, all answer its ids.
    let racing: Vec<_> = (0..8)
        .map(|i| {
            let s = store.clone();
            tokio::spawn(async move {
                s.add_changes_keyed(("user:ci".into(), "raced".into()), vec![change(20 + i)])
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut answers = Vec::new();
    for r in racing {
        answers.push(r.await.unwrap());
    }
    assert_eq!(answers.iter().filter(|(_, again)| !again).count(), 1);
    assert!(answers.iter().all(|(ids, _)| ids == &answers[0].0));
    assert_eq!(store.change_count().await.unwrap(), before + 11);
}

fn request(builder: &str, n: usize) -> NewRequest {
    NewRequest {
        builder: builder.into(),
        change_id: None,
        reason: format!("request {n}"),
        repository: "https://example.org/repo.git".into(),
        branch: "main".into(),
        revision: format!("{n:040x}"),
        properties: vec![("n".into(), n.to_string(), "test".into())],
        not_before_ms: 0,
        collapse_key: String::new(),
    }
}

/// The request queue, shared by `masters` (handles on one state): stored
/// and read back in order; 300 requests over three builders claimed by six
/// claimers spread over the masters, each exactly once, numbered 1..=100
/// in each builder; a request not yet due is left waiting.
pub async fn requests<S: RequestQueue>(masters: &[Arc<S>]) {
    let first = &masters[0];
    let later = NewRequest {
        not_before_ms: crate::store::now_ms() + 3_600_000,
        ..request("later", 0)
    };
    let later_id = first.add_requests(vec![later.clone()]).await.unwrap()[0];
    let builders = ["widgets", "gadgets", "gizmos"];
    let batch: Vec<NewRequest> = (0..300).map(|n| request(builders[n % 3], n)).collect();
    let ids = first.add_requests(batch.clone()).await.unwrap();
    assert_eq!(ids.len(), 300);
    assert!(ids.windows(2).all(|w| w[0] < w[1]));
    let waiting = masters[masters.len() - 1].waiting_requests().await.unwrap();
    assert_eq!(waiting.len(), 301);
    assert_eq!(waiting[1].id, ids[0]);
    assert_eq!(waiting[1].request, batch[0]);

    let all: Vec<String> = ["widgets", "gadgets", "gizmos", "later"]
        .iter()
        .map(|b| b.to_string())
        .collect();
    let claimers: Vec<_> = (0..6)
        .map(|i| {
            let store = masters[i % masters.len()].clone();
            let all = all.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                while let Some(c) = store.claim_next(&all, &format!("w{i}")).await.unwrap() {
                    got.push(c);
                }
                got
            })
        })
        .collect();
    let mut claimed = Vec::new();
    for c in claimers {
        claimed.extend(c.await.unwrap());
    }
    let mut got: Vec<i64> = claimed.iter().map(|c| c.request.id).collect();
    got.sort();
    assert_eq!(got, ids, "each request claimed exactly once");
    for b in builders {
        let mut numbers: Vec<i64> = claimed
            .iter()
            .filter(|c| c.request.request.builder == b)
            .map(|c| c.number)
            .collect();
        numbers.sort();
        assert_eq!(numbers, (1..=100).collect::<Vec<i64>>(), "{b}");
    }
    let mut builds: Vec<i64> = claimed.iter().map(|c| c.build).collect();
    builds.sort();
    builds.dedup();
    assert_eq!(builds.len(), 300);
    let left = first.waiting_requests().await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].id, later_id);
    assert_eq!(left[0].request, later);
}

/// A request for `builder` on `branch` (of change `change`).
fn request_on(builder: &str, branch: &str, change: Option<i64>) -> NewRequest {
    NewRequest {
        builder: builder.into(),
        change_id: change,
        reason: "suite".into(),
        repository: "https://git.example/widgets".into(),
        branch: branch.into(),
        revision: "abc123".into(),
        ..Default::default()
    }
}

fn prop(name: &str, value: &str, source: &str) -> PropertyRow {
    (name.into(), value.into(), source.into())
}

/// Builds, their steps, where their logs are and the reporters' outbox:
/// what the master records as a build runs, read back the same on every
/// backend. Uses builders and branches of its own (`bs-*`), so it can run
/// beside the other parts on one store.
pub async fn builds<S>(s: &S)
where
    S: ChangeStore + RequestQueue + BuildStore + ReportOutbox,
{
    let change = s
        .add_changes(vec![NewChange {
            repository: "https://git.example/widgets".into(),
            branch: "bs-main".into(),
            revision: "abc123".into(),
            ..Default::default()
        }])
        .await
        .unwrap()[0];
    let reqs = s
        .add_requests(vec![
            request_on("bs-a", "bs-main", Some(change)),
            request_on("bs-a", "bs-feature", None),
            request_on("bs-b", "bs-main", None),
        ])
        .await
        .unwrap();
    let claim = |builder: &'static str, worker: &'static str| async move {
        s.claim_next(&[builder.to_string()], worker)
            .await
            .unwrap()
            .expect("a request to claim")
    };
    let c1 = claim("bs-a", "w1").await;
    assert_eq!(c1.request.id, reqs[0]);
    assert_eq!(s.request_build(reqs[0]).await.unwrap(), Some(c1.build));
    assert_eq!(s.request_build(reqs[1]).await.unwrap(), None);
    assert_eq!(s.build_change_ids(c1.build).await.unwrap(), vec![change]);

    // A build runs: a step that succeeds and sets a property, then one
    // that fails and ends the build.
    let (id0, id1) = (StepId::random(), StepId::random());
    let row0 = s
        .start_step(
            c1.build,
            0,
            "checkout",
            1,
            id0,
            "retry",
            vec![prop("branch", "bs-main", "request")],
        )
        .await
        .unwrap();
    let running = s.unfinished_builds().await.unwrap();
    let b = running
        .iter()
        .find(|b| b.id == c1.build)
        .expect("a running build");
    assert_eq!((b.result, b.finished_ms), (None, None));
    assert_eq!(b.steps.len(), 1);
    assert_eq!((b.steps[0].step_id, b.steps[0].result), (id0, None));
    assert_eq!(b.steps[0].log_stored, LogStorage::File);
    s.record_step_end(
        StepEndRecord {
            exit_code: Some(0),
            then: Some((c1.build, vec![prop("got_revision", "abc123", "step")], None)),
            ..StepEndRecord::new(row0, Outcome::Success, "")
        },
        LogSize {
            bytes: 12,
            lines: 2,
        },
    )
    .await
    .unwrap();
    let row1 = s
        .start_step(c1.build, 1, "test", 1, id1, "fail", Vec::new())
        .await
        .unwrap();
    s.record_step_end(
        StepEndRecord {
            exit_code: Some(2),
            then: Some((c1.build, Vec::new(), Some(Outcome::Failure))),
            ..StepEndRecord::new(row1, Outcome::Failure, "exited with code 2")
        },
        LogSize::default(),
    )
    .await
    .unwrap();
    let b = s.build(c1.build).await.unwrap().expect("the build");
    assert_eq!(
        (
            b.builder.as_str(),
            b.worker.as_str(),
            b.number,
            b.request_id
        ),
        ("bs-a", "w1", c1.number, reqs[0])
    );
    assert_eq!(
        (b.branch.as_str(), b.revision.as_str()),
        ("bs-main", "abc123")
    );
    assert_eq!(b.result, Some(Outcome::Failure));
    assert!(b.finished_ms.is_some_and(|f| f >= b.started_ms));
    assert_eq!(
        b.properties,
        vec![
            prop("branch", "bs-main", "request"),
            prop("got_revision", "abc123", "step")
        ]
    );
    let steps: Vec<_> = b
        .steps
        .iter()
        .map(|st| {
            (
                st.row,
                st.position,
                st.name.as_str(),
                st.attempt,
                st.step_id,
                st.on_lost.as_str(),
            )
        })
        .collect();
    assert_eq!(
        steps,
        vec![
            (row0, 0, "checkout", 1, id0, "retry"),
            (row1, 1, "test", 1, id1, "fail")
        ]
    );
    let ends: Vec<_> = b
        .steps
        .iter()
        .map(|st| {
            (
                st.result,
                st.exit_code,
                st.detail.as_str(),
                st.log_bytes,
                st.log_lines,
            )
        })
        .collect();
    assert_eq!(
        ends,
        vec![
            (Some(Outcome::Success), Some(0), "", Some(12), Some(2)),
            (
                Some(Outcome::Failure),
                Some(2),
                "exited with code 2",
                Some(0),
                Some(0)
            ),
        ]
    );
    assert!(b.steps.iter().all(|st| st.finished_ms.is_some()));
    // A property set again is replaced, not doubled.
    s.set_build_properties(c1.build, vec![prop("branch", "bs-other", "force")])
        .await
        .unwrap();
    let b = s.build(c1.build).await.unwrap().unwrap();
    assert_eq!(b.properties[0], prop("branch", "bs-other", "force"));
    assert_eq!(b.properties.len(), 2);

    // Two more builds, ended without steps.
    let c2 = claim("bs-a", "w2").await;
    assert_eq!(c2.request.id, reqs[1]);
    s.finish_build(c2.build, Outcome::Success).await.unwrap();
    let c3 = claim("bs-b", "w1").await;
    s.finish_build(c3.build, Outcome::Interrupted)
        .await
        .unwrap();
    assert!(
        s.build(c2.build + c3.build + 1_000_000)
            .await
            .unwrap()
            .is_none()
    );

    // Finding builds: newest first, every filter applied.
    let found = |f: BuildFilter| async move {
        s.find_builds(f)
            .await
            .unwrap()
            .iter()
            .map(|b| b.id)
            .collect::<Vec<_>>()
    };
    let of = |builder: &str| BuildFilter {
        builder: Some(builder.into()),
        limit: 100,
        ..Default::default()
    };
    assert_eq!(found(of("bs-a")).await, vec![c2.build, c1.build]);
    assert_eq!(
        found(BuildFilter {
            result: Some(Outcome::Failure),
            ..of("bs-a")
        })
        .await,
        vec![c1.build]
    );
    assert_eq!(
        found(BuildFilter {
            branch: Some("bs-feature".into()),
            ..of("bs-a")
        })
        .await,
        vec![c2.build]
    );
    assert_eq!(
        found(BuildFilter {
            before: Some(c2.build),
            ..of("bs-a")
        })
        .await,
        vec![c1.build]
    );
    assert_eq!(
        found(BuildFilter {
            limit: 1,
            ..of("bs-a")
        })
        .await,
        vec![c2.build]
    );
    assert_eq!(found(of("bs-b")).await, vec![c3.build]);
    let listed = s.builds(Some("bs-a".into()), 10).await.unwrap();
    assert_eq!(listed[1], s.build(c1.build).await.unwrap().unwrap());
    assert_eq!(
        s.build_by_number("bs-a", c1.number).await.unwrap(),
        Some(c1.build)
    );
    assert_eq!(
        s.build_by_number("bs-a", c1.number + 1000).await.unwrap(),
        None
    );
    let unfinished = s.unfinished_builds().await.unwrap();
    assert!(
        unfinished
            .iter()
            .all(|b| ![c1.build, c2.build, c3.build].contains(&b.id))
    );

    // Where the logs are.
    let plain = s.ended_logs_stored_as(LogStorage::File).await.unwrap();
    assert!(plain.contains(&row0) && plain.contains(&row1), "{plain:?}");
    s.set_log_storage(vec![row0], LogStorage::Compressed)
        .await
        .unwrap();
    let b = s.build(c1.build).await.unwrap().unwrap();
    assert_eq!(
        (b.steps[0].log_stored, b.steps[1].log_stored),
        (LogStorage::Compressed, LogStorage::File)
    );
    let plain = s.ended_logs_stored_as(LogStorage::File).await.unwrap();
    assert!(!plain.contains(&row0) && plain.contains(&row1));
    let later = crate::store::now_ms() + 60_000;
    let prunable = s.logs_to_prune(later, 10_000).await.unwrap();
    assert!(
        prunable.contains(&(row0, LogStorage::Compressed)),
        "{prunable:?}"
    );
    assert!(prunable.contains(&(row1, LogStorage::File)), "{prunable:?}");
    assert!(s.logs_to_prune(0, 10_000).await.unwrap().is_empty());
    s.set_log_storage(vec![row0, row1], LogStorage::Pruned)
        .await
        .unwrap();
    let prunable = s.logs_to_prune(later, 10_000).await.unwrap();
    assert!(prunable.iter().all(|(r, _)| *r != row0 && *r != row1));

    // The reporters' outbox: each build's start and end, in order, with
    // what a report says of the build.
    let ours = [c1.build, c2.build, c3.build];
    let queue = |reporter: &'static str| async move {
        let (rows, progress) = s.report_queue(reporter.into(), 100_000).await.unwrap();
        let rows: Vec<QueuedReport> = rows
            .into_iter()
            .filter(|r| ours.contains(&r.build_id))
            .collect();
        (rows, progress)
    };
    let (rows, progress) = queue("r1").await;
    let seen: Vec<_> = rows.iter().map(|r| (r.build_id, r.finished)).collect();
    assert_eq!(
        seen,
        vec![
            (c1.build, false),
            (c1.build, true),
            (c2.build, false),
            (c2.build, true),
            (c3.build, false),
            (c3.build, true),
        ]
    );
    assert!(progress.is_empty());
    assert!(rows.windows(2).all(|w| w[0].outbox_id < w[1].outbox_id));
    assert_eq!(
        rows[1].build,
        Some(ReportedBuild {
            builder: "bs-a".into(),
            number: c1.number,
            result: Some(Outcome::Failure),
            repository: "https://git.example/widgets".into(),
            branch: "bs-main".into(),
            revision: "abc123".into(),
        })
    );
    // A failed delivery is remembered, per reporter.
    let failed = ReportProgress {
        done: false,
        attempts: 1,
        next_ms: 5,
        last_error: "HTTP 503".into(),
    };
    s.set_report_progress(rows[0].outbox_id, "r1".into(), failed.clone())
        .await
        .unwrap();
    let (_, progress) = queue("r1").await;
    assert_eq!(progress.get(&rows[0].outbox_id), Some(&failed));
    assert!(queue("r2").await.1.is_empty());
    let undelivered = s.undelivered_reports(100).await.unwrap();
    assert_eq!(undelivered.len(), 1);
    assert_eq!(
        (
            undelivered[0].reporter.as_str(),
            undelivered[0].build_id,
            undelivered[0].attempts
        ),
        ("r1", c1.build, 1)
    );
    assert_eq!(
        (undelivered[0].builder.as_str(), undelivered[0].number),
        ("bs-a", c1.number)
    );
    assert_eq!(s.undelivered_report_count().await.unwrap(), 1);
    // Done for r1: delivered, or skipped.
    s.set_report_progress(
        rows[0].outbox_id,
        "r1".into(),
        ReportProgress {
            done: true,
            ..failed
        },
    )
    .await
    .unwrap();
    let ids: Vec<i64> = rows.iter().map(|r| r.outbox_id).collect();
    s.skip_reports("r1".into(), ids[1..].to_vec())
        .await
        .unwrap();
    assert!(queue("r1").await.0.is_empty());
    assert_eq!(s.undelivered_report_count().await.unwrap(), 0);
    // Only rows every reporter is done with are forgotten.
    s.skip_reports("r2".into(), ids[..2].to_vec())
        .await
        .unwrap();
    let forgotten = s
        .forget_delivered_reports(vec!["r1".into(), "r2".into()], 100_000)
        .await
        .unwrap();
    assert_eq!(forgotten, 2);
    let left: Vec<_> = queue("r2").await.0.iter().map(|r| r.outbox_id).collect();
    assert_eq!(left, ids[2..].to_vec());
}

/// A timer two masters saw due at once fires once: one stores its firing
/// and its requests, the other finds the mark moved and stores nothing.
pub async fn timers<S: TimerMarks + RequestQueue>(masters: &[Arc<S>]) {
    let key = "nightly:suite:fired".to_string();
    assert_eq!(masters[0].mark(&key).await.unwrap(), None);
    // First sight: one master starts the schedule.
    let first = masters[0].fire((key.clone(), None, 100), Vec::new(), Vec::new());
    assert!(first.await.unwrap().is_some());
    let late = masters[1].fire((key.clone(), None, 101), Vec::new(), Vec::new());
    assert!(late.await.unwrap().is_none());
    assert_eq!(masters[1].mark(&key).await.unwrap(), Some(100));
    // Both read 100 and fire together.
    let fire = |m: Arc<S>, at: i64| {
        let key = key.clone();
        tokio::spawn(async move {
            let request = request_on("tm-nightly", "main", None);
            let marks = vec![("nightly:suite:change".to_string(), 7)];
            m.fire((key, Some(100), at), vec![request], marks)
                .await
                .unwrap()
                .map(|_| at)
        })
    };
    let (x, y) = (
        fire(masters[0].clone(), 200),
        fire(masters[1 % masters.len()].clone(), 201),
    );
    let fired: Vec<i64> = [x.await.unwrap(), y.await.unwrap()]
        .into_iter()
        .flatten()
        .collect();
    assert_eq!(fired.len(), 1, "fired by both");
    assert_eq!(masters[0].mark(&key).await.unwrap(), Some(fired[0]));
    let change = masters[1].mark("nightly:suite:change").await.unwrap();
    assert_eq!(change, Some(7));
    let waiting = masters[0].waiting_requests().await.unwrap();
    let ours = waiting.iter().filter(|r| r.request.builder == "tm-nightly");
    assert_eq!(ours.count(), 1);
}
