//! The store suite: what every state backend must do, run against each
//! (SQLite in `store::tests`, PostgreSQL in `store::postgres::tests`).
//! Test-only.

use std::sync::Arc;

use super::{ChangeReader, ChangeStore, NewChange, NewRequest, RequestQueue};

/// The machine's PostgreSQL server, as every test machine has it.
pub const PG_ADMIN: &str = "postgres://postgres@127.0.0.1:5432/test";

/// A database of its own for one test, made on the machine's server and
/// dropped after (by [`TempPg::drop_database`], or when dropped, also when
/// the test failed).
pub struct TempPg {
    pub url: String,
    name: String,
    dropped: bool,
}

impl TempPg {
    pub async fn new() -> TempPg {
        let name = format!(
            "switchyard_test_{}",
            crate::wire::hex(&rand::random::<[u8; 8]>())
        );
        let (client, conn) = tokio_postgres::connect(PG_ADMIN, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("the test machine's PostgreSQL at {PG_ADMIN}: {e}"));
        tokio::spawn(conn);
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        TempPg {
            url: format!("postgres://postgres@127.0.0.1:5432/{name}"),
            name,
            dropped: false,
        }
    }

    pub async fn drop_database(mut self) {
        drop_database(&self.name).await;
        self.dropped = true;
    }
}

async fn drop_database(name: &str) {
    if let Ok((client, conn)) = tokio_postgres::connect(PG_ADMIN, tokio_postgres::NoTls).await {
        tokio::spawn(conn);
        let _ = client
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await;
    }
}

impl Drop for TempPg {
    fn drop(&mut self) {
        if self.dropped {
            return;
        }
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(drop_database(&name));
            }
        })
        .join();
    }
}

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
