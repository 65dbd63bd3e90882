//! Opening the configured stores as one [`Deployment`]: the primary (SQLite or PostgreSQL)
//! behind a [`CompositeStorage`] with its secondaries.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use fhirstore_core::changelog::{ChangeLog, JobLog};
use fhirstore_core::secondary::{DigestSource, Secondary};
use fhirstore_core::{Error, ResourceStorage, Result, SearchQuery, TenantContext, TenantId};
use fhirstore_sql::{SqlConfig, SqliteStore};
use fhirstore_sync::reconcile::{JobReport, JobRequest, ReconcileProgress};
use fhirstore_sync::{
    CompositeStorage, Routed, SecondaryConfig, SecondaryStatus, SyncConfig, SyncMode,
};

use crate::config::{ModeArg, StoreSettings};

/// Everything the server and the commands need from the stores, whatever the primary's type.
#[async_trait]
pub trait Deployment: Send + Sync {
    /// The stores as one [`ResourceStorage`]: writes go to the primary and on to the
    /// secondaries, reads and searches to whichever may answer.
    fn storage(&self) -> &dyn ResourceStorage;
    /// A search, with the backend that answered.
    async fn search_routed(&self, ctx: &TenantContext, query: &SearchQuery) -> Result<Routed>;
    /// Each secondary's sync status.
    async fn sync_status(&self) -> Result<Vec<SecondaryStatus>>;
    /// Runs a reconcile job over every configured secondary.
    async fn reconcile(
        &self,
        request: &JobRequest,
        progress: &(dyn for<'r> Fn(&'r ReconcileProgress) + Send + Sync),
        cancel: &AtomicBool,
    ) -> Result<(String, JobReport)>;
    /// Runs reconcile jobs on `schedule` until `stop` is set.
    async fn run_scheduled(
        &self,
        schedule: &fhirstore_sync::schedule::Schedule,
        on_run: &(dyn for<'r> Fn(&'r fhirstore_sync::schedule::ScheduledRun) + Send + Sync),
        stop: &AtomicBool,
    );
    /// Every tenant the primary holds data for.
    async fn tenants(&self) -> Result<Vec<TenantId>>;
    /// Waits for every secondary to apply what is committed; `true` when they did in time.
    async fn wait_for_sync(&self, timeout: Duration) -> Result<bool>;
    /// Stops the sync workers cleanly.
    async fn shutdown(&self);
    /// What was opened, for the start-up log and the admin status: paths, and URLs with any
    /// password redacted.
    fn describe(&self) -> &str;
    /// What kinds of store serve, for anyone to see (the CapabilityStatement): no paths, no
    /// hosts, no URLs.
    fn summary(&self) -> &str;
}

struct Opened<P> {
    composite: CompositeStorage<P>,
    description: String,
    summary: String,
}

#[async_trait]
impl<P> Deployment for Opened<P>
where
    P: ResourceStorage + ChangeLog + DigestSource + JobLog + 'static,
{
    fn storage(&self) -> &dyn ResourceStorage {
        &self.composite
    }
    async fn search_routed(&self, ctx: &TenantContext, query: &SearchQuery) -> Result<Routed> {
        self.composite.search_routed(ctx, query, None).await
    }
    async fn sync_status(&self) -> Result<Vec<SecondaryStatus>> {
        self.composite.status().await
    }
    async fn reconcile(
        &self,
        request: &JobRequest,
        progress: &(dyn for<'r> Fn(&'r ReconcileProgress) + Send + Sync),
        cancel: &AtomicBool,
    ) -> Result<(String, JobReport)> {
        self.composite
            .reconciler()
            .run(request, progress, cancel)
            .await
    }
    async fn run_scheduled(
        &self,
        schedule: &fhirstore_sync::schedule::Schedule,
        on_run: &(dyn for<'r> Fn(&'r fhirstore_sync::schedule::ScheduledRun) + Send + Sync),
        stop: &AtomicBool,
    ) {
        self.composite
            .reconciler()
            .run_scheduled(schedule, on_run, stop)
            .await;
    }
    async fn tenants(&self) -> Result<Vec<TenantId>> {
        self.composite.primary().tenants().await
    }
    async fn wait_for_sync(&self, timeout: Duration) -> Result<bool> {
        self.composite.wait_for_sync(timeout).await
    }
    async fn shutdown(&self) {
        self.composite.shutdown().await;
    }
    fn describe(&self) -> &str {
        &self.description
    }
    fn summary(&self) -> &str {
        &self.summary
    }
}

/// The sync consumer name of the tantivy index. With SQLite the index sits beside the one
/// database file, so `tantivy`. With PostgreSQL every process keeps its own index under its
/// own data directory while they share the change log, so each index needs its own cursor: the
/// name carries an id kept in the data directory, made on first use.
fn index_consumer(settings: &StoreSettings) -> Result<String> {
    if settings.postgres.is_none() {
        return Ok("tantivy".to_owned());
    }
    let path = settings.data_dir.join("tantivy-consumer-id");
    let io = |e: std::io::Error| Error::backend(format!("{}", path.display()), false, e);
    let id = match std::fs::read_to_string(&path) {
        Ok(id) => id.trim().to_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = uuid::Uuid::now_v7().simple().to_string();
            std::fs::write(&path, &id).map_err(io)?;
            id
        }
        Err(e) => return Err(io(e)),
    };
    Ok(format!("tantivy-{id}"))
}

/// The sync consumer name of a Redis secondary: one per key prefix.
fn redis_consumer(prefix: &str) -> String {
    if prefix == "fhirstore" {
        "redis".to_owned()
    } else {
        format!("redis-{prefix}")
    }
}

fn mode(m: ModeArg) -> SyncMode {
    match m {
        ModeArg::Sync => SyncMode::Synchronous,
        ModeArg::Async | ModeArg::Off => SyncMode::Asynchronous,
    }
}

fn opened<P>(
    primary: Arc<P>,
    secondaries: Vec<(String, Arc<dyn Secondary>, SecondaryConfig)>,
    config: SyncConfig,
    parts: &[(String, String)],
) -> Result<Arc<dyn Deployment>>
where
    P: ResourceStorage + ChangeLog + DigestSource + JobLog + 'static,
{
    let join =
        |f: fn(&(String, String)) -> &str| parts.iter().map(f).collect::<Vec<_>>().join(" + ");
    Ok(Arc::new(Opened {
        composite: CompositeStorage::new(primary, secondaries, config)?,
        description: join(|p| &p.0),
        summary: join(|p| &p.1),
    }))
}

/// Opens the primary and the secondaries the settings name, and starts the sync workers.
pub async fn open(settings: &StoreSettings) -> Result<Arc<dyn Deployment>> {
    std::fs::create_dir_all(&settings.data_dir).map_err(|e| {
        Error::backend(
            format!("creating {}", settings.data_dir.display()),
            false,
            e,
        )
    })?;
    let mut secondaries: Vec<(String, Arc<dyn Secondary>, SecondaryConfig)> = Vec::new();
    // (for the operator, for everyone)
    let mut parts: Vec<(String, String)> = Vec::new();
    if settings.index_mode != ModeArg::Off {
        let dir = settings.data_dir.join("tantivy");
        let index = fhirstore_tantivy::TantivySecondary::open(&dir, Default::default()).await?;
        secondaries.push((
            index_consumer(settings)?,
            Arc::new(index),
            SecondaryConfig {
                mode: mode(settings.index_mode),
                ..SecondaryConfig::index()
            },
        ));
        parts.push((
            format!("tantivy {} ({:?})", dir.display(), settings.index_mode),
            format!("tantivy ({:?})", settings.index_mode),
        ));
    }
    if let Some(url) = &settings.redis {
        secondaries.push(redis_secondary(url, &settings.redis_prefix, settings.redis_mode).await?);
        parts.push((
            format!(
                "redis {} ({:?})",
                crate::config::redact_url(url),
                settings.redis_mode
            ),
            format!("redis ({:?})", settings.redis_mode),
        ));
    }
    let config = SyncConfig::default();
    let deployment: Arc<dyn Deployment> = match &settings.postgres {
        Some(url) => postgres(url, secondaries, config, parts).await?,
        None => {
            let path = settings.data_dir.join("fhirstore.sqlite");
            let store = SqliteStore::open(&path, SqlConfig::default()).await?;
            parts.insert(0, (format!("sqlite {}", path.display()), "sqlite".into()));
            opened(Arc::new(store), secondaries, config, &parts)?
        }
    };
    Ok(deployment)
}

#[cfg(feature = "postgres")]
async fn postgres(
    url: &str,
    secondaries: Vec<(String, Arc<dyn Secondary>, SecondaryConfig)>,
    config: SyncConfig,
    mut parts: Vec<(String, String)>,
) -> Result<Arc<dyn Deployment>> {
    let store = fhirstore_sql::PostgresStore::connect(url, SqlConfig::default()).await?;
    parts.insert(
        0,
        (
            format!("postgres {}", crate::config::redact_url(url)),
            "postgres".into(),
        ),
    );
    opened(Arc::new(store), secondaries, config, &parts)
}

#[cfg(not(feature = "postgres"))]
async fn postgres(
    _url: &str,
    _secondaries: Vec<(String, Arc<dyn Secondary>, SecondaryConfig)>,
    _config: SyncConfig,
    _parts: Vec<(String, String)>,
) -> Result<Arc<dyn Deployment>> {
    Err(Error::Configuration(
        "this build has no PostgreSQL support (feature `postgres`)".into(),
    ))
}

#[cfg(feature = "redis")]
async fn redis_secondary(
    url: &str,
    prefix: &str,
    m: ModeArg,
) -> Result<(String, Arc<dyn Secondary>, SecondaryConfig)> {
    let mut config = fhirstore_redis::RedisConfig::new(url);
    config.prefix = prefix.to_owned();
    let redis = fhirstore_redis::RedisSecondary::connect(&config).await?;
    Ok((
        redis_consumer(prefix),
        Arc::new(redis),
        SecondaryConfig {
            mode: mode(m),
            ..SecondaryConfig::cache()
        },
    ))
}

#[cfg(not(feature = "redis"))]
async fn redis_secondary(
    _url: &str,
    _prefix: &str,
    _m: ModeArg,
) -> Result<(String, Arc<dyn Secondary>, SecondaryConfig)> {
    Err(Error::Configuration(
        "this build has no Redis support (feature `redis`)".into(),
    ))
}
