//! Databases of their own for tests and benchmarks, on the PostgreSQL
//! server every test machine runs (127.0.0.1:5432, trust authentication):
//! made when a test starts, dropped when it ends, also when it fails.

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
