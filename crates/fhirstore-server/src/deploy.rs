//! Opening the configured stores as one [`Deployment`]: the primary (SQLite or PostgreSQL)
//! behind a [`CompositeStorage`] with its secondaries.

use std::sync::Arc;

use fhirstore_core::changelog::Primary;
use fhirstore_core::secondary::Secondary;
use fhirstore_core::{Error, ResourceStorage, Result};
use fhirstore_sql::{SqlConfig, SqliteStore};
use fhirstore_sync::{CompositeStorage, SecondaryConfig, SyncConfig, SyncMode};

use crate::config::{ModeArg, StoreSettings};

/// The opened stores: the primary behind a [`CompositeStorage`] with its secondaries, and how
/// to describe them.
pub struct Deployment {
    composite: CompositeStorage,
    description: String,
    summary: String,
}

impl Deployment {
    /// The stores as one [`ResourceStorage`]: writes go to the primary and on to the
    /// secondaries, reads and searches to whichever may answer.
    pub fn storage(&self) -> &dyn ResourceStorage {
        &self.composite
    }

    /// The same stores as the composite they are: routed searches, sync status, the
    /// reconciler, the primary itself.
    pub fn composite(&self) -> &CompositeStorage {
        &self.composite
    }

    /// What was opened, for the start-up log and the admin status: paths, and URLs with any
    /// password redacted.
    pub fn describe(&self) -> &str {
        &self.description
    }

    /// What kinds of store serve, for anyone to see (the CapabilityStatement): no paths, no
    /// hosts, no URLs.
    pub fn summary(&self) -> &str {
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

fn opened(
    primary: Arc<dyn Primary>,
    secondaries: Vec<(String, Arc<dyn Secondary>, SecondaryConfig)>,
    config: SyncConfig,
    parts: &[(String, String)],
) -> Result<Arc<Deployment>> {
    let join =
        |f: fn(&(String, String)) -> &str| parts.iter().map(f).collect::<Vec<_>>().join(" + ");
    Ok(Arc::new(Deployment {
        composite: CompositeStorage::new(primary, secondaries, config)?,
        description: join(|p| &p.0),
        summary: join(|p| &p.1),
    }))
}

/// Opens the primary and the secondaries the settings name, and starts the sync workers.
pub async fn open(settings: &StoreSettings) -> Result<Arc<Deployment>> {
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
    let config = SyncConfig {
        split_bound: settings.search.split_bound,
        memory_cache_bytes: settings.memory_cache,
        ..SyncConfig::default()
    };
    let deployment: Arc<Deployment> = match &settings.postgres {
        Some(url) => postgres(url, settings.sql_config(), secondaries, config, parts).await?,
        None => {
            let path = settings.data_dir.join("fhirstore.sqlite");
            let store = SqliteStore::open(&path, settings.sql_config()).await?;
            parts.insert(0, (format!("sqlite {}", path.display()), "sqlite".into()));
            opened(Arc::new(store), secondaries, config, &parts)?
        }
    };
    Ok(deployment)
}

#[cfg(feature = "postgres")]
async fn postgres(
    url: &str,
    sql: SqlConfig,
    secondaries: Vec<(String, Arc<dyn Secondary>, SecondaryConfig)>,
    config: SyncConfig,
    mut parts: Vec<(String, String)>,
) -> Result<Arc<Deployment>> {
    let store = fhirstore_sql::PostgresStore::connect(url, sql).await?;
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
    _sql: SqlConfig,
    _secondaries: Vec<(String, Arc<dyn Secondary>, SecondaryConfig)>,
    _config: SyncConfig,
    _parts: Vec<(String, String)>,
) -> Result<Arc<Deployment>> {
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
