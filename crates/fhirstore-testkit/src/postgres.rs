//! A PostgreSQL database of a test's own.
//!
//! Most tests share the one test database and keep apart by tenant. A test that reads the whole
//! database (a new secondary catching up with every tenant's change log, a subscription engine
//! matching every change) would otherwise do work that grows with whatever the other tests
//! wrote before it, and slow down or time out depending on test order.

use sqlx::Connection as _;

/// The PostgreSQL server the tests use: `FHIRSTORE_TEST_POSTGRES_URL`, or the local default.
pub fn postgres_url() -> String {
    std::env::var("FHIRSTORE_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A database created for one test on the server at [`postgres_url`], dropped (with any
/// connection still open to it) when this value is dropped, whether the test passed or not.
pub struct OwnDatabase {
    admin: String,
    name: String,
    url: String,
}

impl OwnDatabase {
    /// Creates a database with a fresh name. `None` (skip) when the server cannot be reached
    /// and services are not required; see [`crate::service_unavailable`].
    pub async fn create() -> Option<OwnDatabase> {
        let admin = postgres_url();
        let name = format!("fhirstore_test_{}", uuid::Uuid::now_v7().simple());
        let created = async {
            let mut c = sqlx::PgConnection::connect(&admin).await?;
            sqlx::query(&format!("CREATE DATABASE {name}"))
                .execute(&mut c)
                .await?;
            Ok::<_, sqlx::Error>(())
        }
        .await;
        if let Err(e) = created {
            return crate::service_unavailable("PostgreSQL", e);
        }
        let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
        let url = format!("{base}/{name}");
        Some(OwnDatabase { admin, name, url })
    }

    /// The URL that connects to this database.
    pub fn url(&self) -> &str {
        &self.url
    }
}

impl Drop for OwnDatabase {
    fn drop(&mut self) {
        let (admin, name) = (self.admin.clone(), self.name.clone());
        // Dropped from async code, whose runtime may be shutting down: the drop runs on a
        // thread and runtime of its own.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                if let Ok(mut c) = sqlx::PgConnection::connect(&admin).await {
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .execute(&mut c)
                        .await;
                }
            });
        })
        .join();
    }
}
