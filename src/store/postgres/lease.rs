//! Leases and fencing: several masters on one database.
//!
//! Each master process takes a lease when it starts ([`PgState::take_lease`]):
//! a row in `masters` with a new id (its epoch: ids are never reused) and an
//! expiry on the database's own clock, so the masters' clocks do not
//! matter. It renews the lease every few seconds ([`PgState::renew_lease`]).
//! A build is owned by the lease that claimed it. When a lease expires (its
//! master's machine died, or it lost the database), another master adopts
//! the builds it owned ([`PgState::adopt_orphans`]).
//!
//! Fencing: every write to a build made through a leased state checks, in
//! its own transaction and holding the build's row, that the build is
//! still owned by this lease and that the lease has not expired. A master
//! that comes back after losing its lease (it was stopped, or cut off) so
//! writes nothing to the builds it no longer owns: its write fails with
//! [`StateError::Fenced`], and its renewal with [`StateError::LeaseLost`].
//! Adoption takes the same rows, so it waits for a write in flight, and a
//! write after it sees the new owner.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use super::PgState;
use crate::store::StateError;

/// 4: the masters' leases, and which lease owns each build.
pub(super) const MIGRATION_4: &str = "
CREATE TABLE masters (
    id BIGSERIAL PRIMARY KEY,
    name TEXT NOT NULL,
    started_at TIMESTAMPTZ NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL
);
ALTER TABLE builds ADD COLUMN owner BIGINT REFERENCES masters(id);
CREATE INDEX builds_owned_unfinished ON builds (owner) WHERE result IS NULL;
";

/// A master's lease: its epoch (the `masters` row's id, never reused).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Lease(pub i64);

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl PgState {
    /// Takes a new lease for master `name`, valid for `ttl`; the returned
    /// state claims builds for it and fences every write to a build on it.
    pub async fn take_lease(&self, name: &str, ttl: Duration) -> Result<PgState, StateError> {
        let id = self.new_lease(name, ttl).await?;
        Ok(PgState {
            lease: Arc::new(AtomicI64::new(id)),
            lease_name: Arc::from(name),
            origin: rand::random::<i64>() | 1,
            ..self.clone()
        })
    }

    /// Takes a new lease, under the same name, in place of one that was
    /// lost (it expired before it was renewed): this state and its clones
    /// claim and write under the new one from now on, and nothing more
    /// under the old, which stays fenced. Adopting the old lease's builds
    /// is the caller's next step ([`PgState::adopt_own_and_orphans`]).
    pub async fn retake_lease(&self, ttl: Duration) -> Result<Lease, StateError> {
        if self.lease().is_none() {
            return Err(StateError::Postgres(
                "no lease was taken, so none can be taken again".into(),
            ));
        }
        let id = self.new_lease(&self.lease_name, ttl).await?;
        self.lease.store(id, Ordering::SeqCst);
        Ok(Lease(id))
    }

    /// A new `masters` row: a lease's epoch.
    async fn new_lease(&self, name: &str, ttl: Duration) -> Result<i64, StateError> {
        let client = self.client().await?;
        Ok(client
            .query_one(
                "INSERT INTO masters (name, started_at, expires_at)
                 VALUES ($1, clock_timestamp(), clock_timestamp() + $2 * INTERVAL '1 millisecond')
                 RETURNING id",
                &[&name, &millis(ttl)],
            )
            .await?
            .get(0))
    }

    /// This state's lease, if it has one.
    pub fn lease(&self) -> Option<Lease> {
        match self.lease.load(Ordering::SeqCst) {
            0 => None,
            id => Some(Lease(id)),
        }
    }

    /// Extends the lease to `ttl` from now. A lease that has expired is
    /// never renewed ([`StateError::LeaseLost`]): another master may have
    /// adopted its builds; the master must stop serving them.
    pub async fn renew_lease(&self, ttl: Duration) -> Result<(), StateError> {
        let Some(Lease(id)) = self.lease() else {
            return Ok(());
        };
        let client = self.client().await?;
        let renewed = client
            .execute(
                "UPDATE masters SET expires_at = clock_timestamp() + $2 * INTERVAL '1 millisecond'
                 WHERE id = $1 AND expires_at > clock_timestamp()",
                &[&id, &millis(ttl)],
            )
            .await?;
        if renewed == 0 {
            return Err(StateError::LeaseLost { epoch: id });
        }
        Ok(())
    }

    /// Ends this state's lease now (a master stepping down): the others may
    /// adopt its builds at once, and nothing more is written under it.
    pub async fn end_lease(&self) -> Result<(), StateError> {
        let Some(Lease(id)) = self.lease() else {
            return Ok(());
        };
        let client = self.client().await?;
        client
            .execute(
                "UPDATE masters SET expires_at = LEAST(expires_at, clock_timestamp()) WHERE id = $1",
                &[&id],
            )
            .await?;
        Ok(())
    }

    /// Takes over the unfinished builds of every master whose lease has
    /// expired; returns their ids. Only a state with a live lease adopts.
    pub async fn adopt_orphans(&self) -> Result<Vec<i64>, StateError> {
        let Some(Lease(id)) = self.lease() else {
            return Ok(Vec::new());
        };
        let client = self.client().await?;
        let rows = client
            .query(
                "UPDATE builds SET owner = $1
                 WHERE result IS NULL AND owner IN (SELECT id FROM masters WHERE expires_at <= clock_timestamp())
                   AND EXISTS (SELECT 1 FROM masters WHERE id = $1 AND expires_at > clock_timestamp())
                 RETURNING id",
                &[&id],
            )
            .await?;
        let mut ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
        ids.sort_unstable();
        Ok(ids)
    }

    /// As [`PgState::adopt_orphans`], and first the unfinished builds of
    /// this master's own earlier leases (same name: it was restarted), whose
    /// leases are ended at once so that nothing of them writes again.
    pub async fn adopt_own_and_orphans(&self) -> Result<Vec<i64>, StateError> {
        let Some(Lease(id)) = self.lease() else {
            return Ok(Vec::new());
        };
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        tx.execute(
            "UPDATE masters SET expires_at = LEAST(expires_at, clock_timestamp())
             WHERE name = (SELECT name FROM masters WHERE id = $1) AND id < $1",
            &[&id],
        )
        .await?;
        tx.commit().await?;
        drop(client);
        self.adopt_orphans().await
    }

    /// Inside a claim's transaction: this state's lease (if any) is live,
    /// so the build it makes is owned by a master that can run it.
    pub(super) async fn check_live(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
    ) -> Result<(), StateError> {
        let Some(Lease(id)) = self.lease() else {
            return Ok(());
        };
        let live = tx
            .query_opt(
                "SELECT 1 FROM masters WHERE id = $1 AND expires_at > clock_timestamp() FOR SHARE",
                &[&id],
            )
            .await?;
        match live {
            Some(_) => Ok(()),
            None => Err(StateError::LeaseLost { epoch: id }),
        }
    }

    /// Inside a write's transaction: holds `build`'s row and checks that
    /// this state's lease owns it and is live. Without a lease (one master,
    /// or a tool) there is nothing to check.
    pub(super) async fn fence(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        build: i64,
    ) -> Result<(), StateError> {
        let Some(Lease(id)) = self.lease() else {
            return Ok(());
        };
        let owned = tx
            .query_opt(
                "SELECT 1 FROM builds b JOIN masters m ON m.id = b.owner
                 WHERE b.id = $1 AND b.owner = $2 AND m.expires_at > clock_timestamp()
                 FOR SHARE OF b",
                &[&build, &id],
            )
            .await?;
        match owned {
            Some(_) => Ok(()),
            None => Err(StateError::Fenced { build, epoch: id }),
        }
    }
}

/// 5: which master leads each job that runs once across masters (pollers,
/// the reporters' sender, pruning), and the timers' marks.
pub(super) const MIGRATION_5: &str = "
CREATE TABLE leaders (job TEXT PRIMARY KEY, owner BIGINT NOT NULL REFERENCES masters(id));
CREATE TABLE marks (key TEXT PRIMARY KEY, value BIGINT NOT NULL);
";

impl PgState {
    /// Whether this master leads `job`: one master with a live lease at a
    /// time does, and keeps it while its lease lives; when the lease
    /// expires, the next master to ask takes the job over. A state without
    /// a lease (one master) leads everything.
    pub async fn leads(&self, job: &str) -> Result<bool, StateError> {
        let Some(Lease(id)) = self.lease() else {
            return Ok(true);
        };
        let client = self.client().await?;
        let led = client
            .query_opt(
                "INSERT INTO leaders (job, owner)
                 SELECT $1, $2 WHERE EXISTS (SELECT 1 FROM masters WHERE id = $2 AND expires_at > clock_timestamp())
                 ON CONFLICT (job) DO UPDATE SET owner = EXCLUDED.owner
                 WHERE leaders.owner = EXCLUDED.owner
                    OR NOT EXISTS (SELECT 1 FROM masters m WHERE m.id = leaders.owner AND m.expires_at > clock_timestamp())
                 RETURNING owner",
                &[&job, &id],
            )
            .await?;
        Ok(led.is_some())
    }
}
