//! The SQLite backend's change log: the store's change traits on
//! [`SqliteDb`], and the newest changes with their builds (the web UI).

use async_trait::async_trait;
use rusqlite::params;

use super::SqliteDb;
use super::rows::load_change;
use crate::store::{ChangeReader, ChangeStore, NewChange, StateError, StoredChange};

#[async_trait]
impl ChangeStore for SqliteDb {
    async fn add_changes(&self, batch: Vec<NewChange>) -> Result<Vec<i64>, StateError> {
        self.write(move |conn| super::rows::insert_changes(conn, &batch))
            .await
    }

    async fn add_changes_keyed(
        &self,
        key: (String, String),
        batch: Vec<NewChange>,
    ) -> Result<(Vec<i64>, bool), StateError> {
        let (ids, _, again) = self.add_changes_once(key, batch, |_, _| Vec::new()).await?;
        Ok((ids, again))
    }
}

#[async_trait]
impl ChangeReader for SqliteDb {
    async fn change(&self, id: i64) -> Result<Option<StoredChange>, StateError> {
        self.read(move |conn| load_change(conn, id)).await
    }

    async fn changes_after(
        &self,
        after: i64,
        limit: usize,
    ) -> Result<Vec<StoredChange>, StateError> {
        self.read(move |conn| {
            let ids: Vec<i64> = conn
                .prepare_cached("SELECT id FROM changes WHERE id > ?1 ORDER BY id LIMIT ?2")?
                .query_map(params![after, limit as i64], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            let mut out = Vec::with_capacity(ids.len());
            for id in ids {
                if let Some(c) = load_change(conn, id)? {
                    out.push(c);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn change_count(&self) -> Result<i64, StateError> {
        self.read(|conn| conn.query_row("SELECT COUNT(*) FROM changes", [], |r| r.get(0)))
            .await
    }
}

impl SqliteDb {
    /// See [`crate::store::StateDb::recent_changes`].
    pub(in crate::store) async fn recent_changes(
        &self,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<(StoredChange, Vec<i64>)>, StateError> {
        self.read(move |conn| {
            let ids: Vec<i64> = conn
                .prepare_cached(
                    "SELECT id FROM changes WHERE (?1 IS NULL OR id < ?1) ORDER BY id DESC LIMIT ?2",
                )?
                .query_map(params![before, limit as i64], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            let mut out = Vec::with_capacity(ids.len());
            for id in ids {
                if let Some(c) = load_change(conn, id)? {
                    let builds = conn
                        .prepare_cached(
                            "SELECT build_id FROM build_requests WHERE change_id = ?1 AND build_id IS NOT NULL ORDER BY build_id",
                        )?
                        .query_map([id], |r| r.get(0))?
                        .collect::<rusqlite::Result<Vec<i64>>>()?;
                    out.push((c, builds));
                }
            }
            Ok(out)
        })
        .await
    }
}
