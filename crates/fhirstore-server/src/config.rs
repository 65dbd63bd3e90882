//! Settings from flags, environment variables and an optional TOML file.
//!
//! A flag wins over its environment variable (clap reads both into the same field), and either
//! wins over the file; the file wins over the built-in default. Every subcommand shares
//! [`StorageArgs`], so `import`, `reconcile`, `search` and `status` open the very stores
//! `serve` does.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// How changes reach one secondary, or whether it is used at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ModeArg {
    /// Applied before a write returns.
    Sync,
    /// Applied by the background worker.
    Async,
    /// Not configured.
    Off,
}

/// The storage flags every subcommand takes.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct StorageArgs {
    /// A TOML file with any of the settings below (flags and environment win over it).
    #[arg(long, env = "FHIRSTORE_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// Where the embedded SQLite database and the tantivy index live [default: ./data].
    #[arg(long, env = "FHIRSTORE_DATA_DIR", global = true)]
    pub data_dir: Option<PathBuf>,
    /// Use this PostgreSQL database as the primary instead of the embedded SQLite file.
    #[arg(long, env = "FHIRSTORE_POSTGRES", global = true)]
    pub postgres: Option<String>,
    /// Keep a Redis read cache and lookup index at this `redis://` URL, or on a Redis Cluster
    /// at `redis+cluster://host:port[,host:port…][?replicas=N]` (seed nodes; `replicas`: how
    /// many replicas of a shard must hold each batch before it counts as applied).
    #[arg(long, env = "FHIRSTORE_REDIS", global = true)]
    pub redis: Option<String>,
    /// The first part of every Redis key, so several deployments can share one Redis
    /// [default: fhirstore].
    #[arg(long, env = "FHIRSTORE_REDIS_PREFIX", global = true)]
    pub redis_prefix: Option<String>,
    /// How writes reach Redis [default: sync].
    #[arg(long, env = "FHIRSTORE_REDIS_MODE", global = true)]
    pub redis_mode: Option<ModeArg>,
    /// How writes reach the tantivy index under the data directory, or `off` [default: async].
    #[arg(long, env = "FHIRSTORE_INDEX_MODE", global = true)]
    pub index_mode: Option<ModeArg>,
    /// How long one search may run on the primary before it is cancelled and answered 400
    /// `too-costly` naming `search_timeout` (`30s`, `2m`) [default: 30s].
    #[arg(long, env = "FHIRSTORE_SEARCH_TIMEOUT", global = true, value_parser = parse_duration)]
    pub search_timeout: Option<Duration>,
    /// Primary connections that searches may hold at once, apart from those of reads by id
    /// and writes [default: 6].
    #[arg(long, env = "FHIRSTORE_SEARCH_CONNECTIONS", global = true)]
    pub search_connections: Option<u32>,
    /// The most ids one backend hands another in a search split between them (full text with
    /// a chain, an include or a sort): past it on both sides the search is refused, 400
    /// `too-costly` naming `split_bound` [default: 100000].
    #[arg(long, env = "FHIRSTORE_SEARCH_SPLIT_BOUND", global = true)]
    pub search_split_bound: Option<usize>,
    /// Bytes of current resource versions this process keeps in memory for reads by id, `0`
    /// for none; used on the embedded SQLite primary, whose commits the cache sees from any
    /// process [default: 67108864, 64 MiB].
    #[arg(long, env = "FHIRSTORE_MEMORY_CACHE", global = true)]
    pub memory_cache: Option<usize>,
    /// How hard the primary deflates the resource bodies it stores: 1 (fastest) to 9
    /// (smallest), or 0 to store the JSON text; reads take either [default: 6].
    #[arg(long, env = "FHIRSTORE_BODY_COMPRESSION", global = true)]
    pub body_compression: Option<u32>,
}

/// The `serve` flags.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct ServeArgs {
    /// The address to listen on [default: 127.0.0.1:8080].
    #[arg(long, env = "FHIRSTORE_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// The public base URL, when the server sits behind a proxy (the default is taken from
    /// each request's Host header), such as `https://fhir.example.org`.
    #[arg(long, env = "FHIRSTORE_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// An API token for one tenant, as `TENANT=TOKEN`; repeat for more.
    #[arg(long = "token", value_name = "TENANT=TOKEN")]
    pub tokens: Vec<String>,
    /// The admin token: every tenant, and the admin endpoints.
    #[arg(long, env = "FHIRSTORE_ADMIN_TOKEN")]
    pub admin_token: Option<String>,
    /// Listen on a non-loopback address without any token configured.
    #[arg(long)]
    pub allow_unauthenticated: bool,
    /// The largest request body accepted, in bytes [default: 32 MiB].
    #[arg(long, env = "FHIRSTORE_MAX_BODY")]
    pub max_body: Option<usize>,
    /// Reconcile every secondary this often (`90s`, `15m`, `6h`, `1d`): first the resources
    /// written in the last `--reconcile-window`, then a full comparison [default: off].
    #[arg(long, env = "FHIRSTORE_RECONCILE_EVERY", value_parser = parse_duration)]
    pub reconcile_every: Option<Duration>,
    /// How far back the first pass of a scheduled reconcile looks [default: the interval].
    #[arg(long, env = "FHIRSTORE_RECONCILE_WINDOW", value_parser = parse_duration)]
    pub reconcile_window: Option<Duration>,
    /// Scheduled reconciles report without repairing.
    #[arg(long)]
    pub reconcile_dry_run: bool,
    /// Scheduled full reconciles deep-scrub each secondary first (hash what it holds again, to
    /// find keys lost or damaged out of band).
    #[arg(long)]
    pub reconcile_deep: bool,
    /// The scheduled deep scrub's pace, in documents a second [default: 2000].
    #[arg(long, env = "FHIRSTORE_RECONCILE_DEEP_RATE")]
    pub reconcile_deep_rate: Option<u64>,
    /// What one request may ask for.
    #[command(flatten)]
    pub limits: LimitArgs,
    /// How long bulk export files are kept after the kick-off (`90s`, `15m`, `6h`, `1d`)
    /// [default: 1d].
    #[arg(long, env = "FHIRSTORE_EXPORT_TTL", value_parser = parse_duration)]
    pub export_ttl: Option<Duration>,
    /// Where and how subscription notifications are delivered.
    #[command(flatten)]
    pub subscriptions: SubscriptionArgs,
}

/// Subscription delivery: each a flag, an environment variable, or a key of the TOML file's
/// `[subscriptions]` table (`endpoints = [...]`, `timeout`, `retry_period`, `retry_base`,
/// `concurrency`, `retention`, `ca`).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct SubscriptionArgs {
    /// A URL prefix notifications may be sent to although the default rule refuses it (the
    /// default allows https endpoints on public addresses only), such as
    /// `http://127.0.0.1:9000/`; repeat for more.
    #[arg(long = "subscription-endpoint", value_name = "PREFIX")]
    pub endpoints: Vec<String>,
    /// How long one delivery may take [default: 10s].
    #[arg(long = "subscription-timeout", env = "FHIRSTORE_SUBSCRIPTION_TIMEOUT", value_parser = parse_duration)]
    pub timeout: Option<Duration>,
    /// How long a failing endpoint is retried before its subscription goes to `error`
    /// [default: 1h].
    #[arg(long = "subscription-retry-period", env = "FHIRSTORE_SUBSCRIPTION_RETRY_PERIOD", value_parser = parse_duration)]
    pub retry_period: Option<Duration>,
    /// The first retry's delay; each later one doubles it, up to 5 minutes, with jitter
    /// [default: 1s].
    #[arg(long = "subscription-retry-base", env = "FHIRSTORE_SUBSCRIPTION_RETRY_BASE", value_parser = parse_duration)]
    pub retry_base: Option<Duration>,
    /// Deliveries in flight at once, across all subscriptions [default: 16].
    #[arg(
        long = "subscription-concurrency",
        env = "FHIRSTORE_SUBSCRIPTION_CONCURRENCY"
    )]
    pub concurrency: Option<usize>,
    /// How long delivered events are kept for `$events` [default: 7d].
    #[arg(long = "subscription-retention", env = "FHIRSTORE_SUBSCRIPTION_RETENTION", value_parser = parse_duration)]
    pub retention: Option<Duration>,
    /// A PEM file of certificate authorities to trust for https endpoints beside the public
    /// web's (an endpoint under a private CA).
    #[arg(
        long = "subscription-ca",
        env = "FHIRSTORE_SUBSCRIPTION_CA",
        value_name = "FILE"
    )]
    pub ca: Option<PathBuf>,
}

/// The TOML file's `[subscriptions]` table; see [`SubscriptionArgs`].
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SubscriptionFile {
    #[serde(default)]
    endpoints: Vec<String>,
    timeout: Option<String>,
    retry_period: Option<String>,
    retry_base: Option<String>,
    concurrency: Option<usize>,
    retention: Option<String>,
    ca: Option<PathBuf>,
}

impl SubscriptionArgs {
    /// These settings, each from the flags (`self`), else the file, else the default.
    fn resolve(
        &self,
        file: &SubscriptionFile,
    ) -> Result<crate::subscriptions::Settings, ConfigError> {
        let d = crate::subscriptions::Settings::default();
        let pick = |flag: Option<Duration>, file: &Option<String>, default: Duration| match flag {
            Some(v) => Ok(v),
            None => file
                .as_deref()
                .map(parse_duration)
                .transpose()
                .map(|v| v.unwrap_or(default))
                .map_err(ConfigError),
        };
        let mut endpoints = file.endpoints.clone();
        endpoints.extend(self.endpoints.iter().cloned());
        for e in &endpoints {
            crate::subscriptions::deliver::check_prefix(e)
                .map_err(|why| ConfigError(format!("subscription endpoint {e:?}: {why}")))?;
        }
        let concurrency = self
            .concurrency
            .or(file.concurrency)
            .unwrap_or(d.concurrency);
        if concurrency == 0 {
            return Err(ConfigError(
                "subscription concurrency must be at least 1".to_owned(),
            ));
        }
        let extra_roots = match self.ca.as_ref().or(file.ca.as_ref()) {
            Some(path) => crate::subscriptions::deliver::read_pem_certificates(path)
                .map_err(|why| ConfigError(format!("subscription CA {}: {why}", path.display())))?,
            None => Vec::new(),
        };
        Ok(crate::subscriptions::Settings {
            endpoints,
            extra_roots,
            timeout: pick(self.timeout, &file.timeout, d.timeout)?,
            retry_period: pick(self.retry_period, &file.retry_period, d.retry_period)?,
            retry_base: pick(self.retry_base, &file.retry_base, d.retry_base)?,
            concurrency,
            retention: pick(self.retention, &file.retention, d.retention)?,
            ..d
        })
    }
}

/// Bounds on what one request may ask for; each is a flag, an environment variable, or a key
/// of the TOML file's `[limits]` table. A request beyond one is refused (413 for sizes, 400
/// `too-costly` for searches) with an `OperationOutcome` naming the limit.
#[derive(clap::Args, Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitArgs {
    /// Entries in one batch or transaction Bundle [default: 10000].
    #[arg(long, env = "FHIRSTORE_MAX_BUNDLE_ENTRIES")]
    pub max_bundle_entries: Option<usize>,
    /// Bytes of one batch response, reads included; entries past it answer 413 [default: 64 MiB].
    #[arg(long, env = "FHIRSTORE_MAX_RESPONSE_BYTES")]
    pub max_response_bytes: Option<usize>,
    /// Bytes of a request's URL; beyond it, 414 [default: 32 KiB]. The HTTP parser itself
    /// refuses a request line over 65,534 bytes, with a bare 414.
    #[arg(long, env = "FHIRSTORE_MAX_URI_BYTES")]
    pub max_uri_bytes: Option<usize>,
    /// Bytes of a request's headers together; beyond it, 431 [default: 64 KiB].
    #[arg(long, env = "FHIRSTORE_MAX_HEADER_BYTES")]
    pub max_header_bytes: Option<usize>,
    /// Criteria in one search [default: 100].
    #[arg(long, env = "FHIRSTORE_MAX_SEARCH_CRITERIA")]
    pub max_search_criteria: Option<usize>,
    /// Links in one chained parameter [default: 4].
    #[arg(long, env = "FHIRSTORE_MAX_CHAIN_DEPTH")]
    pub max_chain_depth: Option<usize>,
    /// `_sort` keys in one search [default: 8].
    #[arg(long, env = "FHIRSTORE_MAX_SORT_KEYS")]
    pub max_sort_keys: Option<usize>,
    /// Comma-separated values in one search parameter [default: 1000].
    #[arg(long, env = "FHIRSTORE_MAX_OR_VALUES")]
    pub max_or_values: Option<usize>,
    /// `_include` and `_revinclude` parameters in one search [default: 32].
    #[arg(long, env = "FHIRSTORE_MAX_INCLUDES")]
    pub max_includes: Option<usize>,
}

impl LimitArgs {
    /// These limits, each from the flags (`self`), else the file, else the default.
    fn resolve(&self, file: &LimitArgs) -> Limits {
        let d = Limits::default();
        let pick = |flag: Option<usize>, file: Option<usize>, default: usize| {
            flag.or(file).unwrap_or(default)
        };
        Limits {
            max_bundle_entries: pick(
                self.max_bundle_entries,
                file.max_bundle_entries,
                d.max_bundle_entries,
            ),
            max_response_bytes: pick(
                self.max_response_bytes,
                file.max_response_bytes,
                d.max_response_bytes,
            ),
            max_uri_bytes: pick(self.max_uri_bytes, file.max_uri_bytes, d.max_uri_bytes),
            max_header_bytes: pick(
                self.max_header_bytes,
                file.max_header_bytes,
                d.max_header_bytes,
            ),
            search: fhirstore_core::search::SearchLimits {
                max_criteria: pick(
                    self.max_search_criteria,
                    file.max_search_criteria,
                    d.search.max_criteria,
                ),
                max_chain_depth: pick(
                    self.max_chain_depth,
                    file.max_chain_depth,
                    d.search.max_chain_depth,
                ),
                max_sort_keys: pick(
                    self.max_sort_keys,
                    file.max_sort_keys,
                    d.search.max_sort_keys,
                ),
                max_or_values: pick(
                    self.max_or_values,
                    file.max_or_values,
                    d.search.max_or_values,
                ),
                max_includes: pick(self.max_includes, file.max_includes, d.search.max_includes),
                ..d.search
            },
        }
    }
}

/// The limits in force; see [`LimitArgs`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Entries in one batch or transaction Bundle.
    pub max_bundle_entries: usize,
    /// Bytes of one batch response.
    pub max_response_bytes: usize,
    /// Bytes of a request's URL.
    pub max_uri_bytes: usize,
    /// Bytes of a request's headers together.
    pub max_header_bytes: usize,
    /// What one search may ask for.
    pub search: fhirstore_core::search::SearchLimits,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bundle_entries: 10_000,
            max_response_bytes: 64 << 20,
            max_uri_bytes: 32 << 10,
            max_header_bytes: 64 << 10,
            search: Default::default(),
        }
    }
}

/// `250ms`, `90s`, `15m`, `6h`, `1d`, or plain seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let (num, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{text:?}: expected a number and a unit (s, m, h, d)"))?;
    if unit == "ms" {
        if n == 0 {
            return Err(format!("{text:?}: must be more than zero"));
        }
        return Ok(Duration::from_millis(n));
    }
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3_600,
        "d" => n * 86_400,
        _ => return Err(format!("{text:?}: the unit is one of ms, s, m, h, d")),
    };
    if secs == 0 {
        return Err(format!("{text:?}: must be more than zero"));
    }
    Ok(Duration::from_secs(secs))
}

/// The in-process read cache's default size: 64 MiB.
pub const DEFAULT_MEMORY_CACHE: usize = 64 << 20;

/// The TOML file: the same settings as the flags, with tokens as a table of tenant to tokens.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    data_dir: Option<PathBuf>,
    postgres: Option<String>,
    redis: Option<String>,
    redis_prefix: Option<String>,
    redis_mode: Option<ModeArg>,
    index_mode: Option<ModeArg>,
    search_timeout: Option<String>,
    search_connections: Option<u32>,
    search_split_bound: Option<usize>,
    memory_cache: Option<usize>,
    body_compression: Option<u32>,
    listen: Option<SocketAddr>,
    public_url: Option<String>,
    admin_token: Option<String>,
    allow_unauthenticated: Option<bool>,
    max_body: Option<usize>,
    reconcile_every: Option<String>,
    reconcile_window: Option<String>,
    reconcile_dry_run: Option<bool>,
    reconcile_deep: Option<bool>,
    reconcile_deep_rate: Option<u64>,
    export_ttl: Option<String>,
    #[serde(default)]
    tokens: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    limits: LimitArgs,
    #[serde(default)]
    subscriptions: SubscriptionFile,
}

/// A configuration problem, reported before anything is opened.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// Where data lives and which secondaries are kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreSettings {
    /// The data directory (SQLite file, tantivy index).
    pub data_dir: PathBuf,
    /// The PostgreSQL URL, when it is the primary.
    pub postgres: Option<String>,
    /// The Redis URL, when Redis is kept.
    pub redis: Option<String>,
    /// The Redis key prefix.
    pub redis_prefix: String,
    /// Redis's mode (`Off` when no URL).
    pub redis_mode: ModeArg,
    /// tantivy's mode.
    pub index_mode: ModeArg,
    /// How searches on the primary are bounded.
    pub search: SearchBounds,
    /// Bytes of the in-process read cache (`fhirstore_sync::SyncConfig::memory_cache_bytes`).
    pub memory_cache: usize,
    /// `fhirstore_sql::SqlConfig::body_compression`.
    pub body_compression: u32,
}

impl StoreSettings {
    /// The primary's settings.
    pub fn sql_config(&self) -> fhirstore_sql::SqlConfig {
        fhirstore_sql::SqlConfig {
            body_compression: self.body_compression,
            ..self.search.sql_config()
        }
    }
}

/// How searches on the primary are bounded (see `fhirstore_sql::SqlConfig`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SearchBounds {
    /// How long one search may run.
    pub timeout: Duration,
    /// Connections that searches may hold at once.
    pub connections: u32,
    /// The most ids one side of a split search hands the other
    /// (`fhirstore_sync::SyncConfig::split_bound`).
    pub split_bound: usize,
}

impl Default for SearchBounds {
    fn default() -> Self {
        let sql = fhirstore_sql::SqlConfig::default();
        SearchBounds {
            timeout: sql.search_timeout,
            connections: sql.search_connections,
            split_bound: fhirstore_sync::SyncConfig::default().split_bound,
        }
    }
}

impl SearchBounds {
    /// The primary's settings with these bounds.
    pub fn sql_config(&self) -> fhirstore_sql::SqlConfig {
        fhirstore_sql::SqlConfig {
            search_timeout: self.timeout,
            search_connections: self.connections,
            ..Default::default()
        }
    }
}

/// The HTTP server's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerSettings {
    /// The listening address.
    pub listen: SocketAddr,
    /// The public base URL, without a trailing slash.
    pub public_url: Option<String>,
    /// `(tenant, token)` pairs.
    pub tokens: Vec<(String, String)>,
    /// The admin token.
    pub admin_token: Option<String>,
    /// Listening beyond loopback without tokens was asked for.
    pub allow_unauthenticated: bool,
    /// The largest request body, in bytes.
    pub max_body: usize,
    /// Scheduled reconciliation, when configured.
    pub reconcile: Option<fhirstore_sync::schedule::Schedule>,
    /// What one request may ask for.
    pub limits: Limits,
    /// Where bulk export files are written (`{data_dir}/exports` for `serve`); `None`: no
    /// bulk export.
    pub export_dir: Option<PathBuf>,
    /// How long an export's files are kept after its kick-off.
    pub export_ttl: Duration,
    /// Subscription delivery.
    pub subscriptions: crate::subscriptions::Settings,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            public_url: None,
            tokens: Vec::new(),
            admin_token: None,
            allow_unauthenticated: false,
            max_body: 32 << 20,
            reconcile: None,
            limits: Limits::default(),
            export_dir: None,
            export_ttl: Duration::from_secs(24 * 3_600),
            subscriptions: crate::subscriptions::Settings::default(),
        }
    }
}

impl ServerSettings {
    /// Whether any token is configured, which turns access control on.
    pub fn has_tokens(&self) -> bool {
        self.admin_token.is_some() || !self.tokens.is_empty()
    }

    /// Refuses to serve an open API beyond loopback unless that was asked for explicitly.
    pub fn check_exposure(&self) -> Result<(), ConfigError> {
        if !self.listen.ip().is_loopback() && !self.has_tokens() && !self.allow_unauthenticated {
            return Err(ConfigError(format!(
                "refusing to listen on {} without API tokens: configure --token/--admin-token, \
                 or pass --allow-unauthenticated",
                self.listen
            )));
        }
        Ok(())
    }
}

fn read_file(path: Option<&Path>) -> Result<FileConfig, ConfigError> {
    let Some(path) = path else {
        return Ok(FileConfig::default());
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError(format!("reading {}: {e}", path.display())))?;
    toml::from_str(&text).map_err(|e| ConfigError(format!("{}: {e}", path.display())))
}

/// The scheduled deep scrub's default pace, in documents a second: a full scrub of a million
/// resources then takes about eight minutes, a small share of one Redis core.
const DEFAULT_DEEP_RATE: u64 = 2_000;

/// A URL as it may be shown in a log, a status page or an error: a password in its userinfo
/// or in a `password=` query parameter becomes `***`.
pub fn redact_url(url: &str) -> String {
    let mut out = url.to_owned();
    if let Some(scheme_end) = out.find("://") {
        let rest = scheme_end + 3;
        let authority_end = out[rest..]
            .find(['/', '?', '#'])
            .map_or(out.len(), |i| rest + i);
        if let Some(at) = out[rest..authority_end].rfind('@') {
            let userinfo = &out[rest..rest + at];
            let shown = match userinfo.split_once(':') {
                Some((user, _)) => format!("{user}:***"),
                None => "***".to_owned(),
            };
            out.replace_range(rest..rest + at, &shown);
        }
    }
    if let Some(q) = out.find('?') {
        let redacted: Vec<String> = out[q + 1..]
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                _ => pair.to_owned(),
            })
            .collect();
        out = format!("{}?{}", &out[..q], redacted.join("&"));
    }
    out
}

/// Resolves the storage settings, reading the TOML file if one is named.
pub fn store_settings(args: &StorageArgs) -> Result<StoreSettings, ConfigError> {
    let file = read_file(args.config.as_deref())?;
    resolve_store(args, &file)
}

fn resolve_store(args: &StorageArgs, file: &FileConfig) -> Result<StoreSettings, ConfigError> {
    let defaults = SearchBounds::default();
    let search = SearchBounds {
        timeout: match args.search_timeout {
            Some(d) => d,
            None => file
                .search_timeout
                .as_deref()
                .map(parse_duration)
                .transpose()
                .map_err(|e| ConfigError(format!("search_timeout: {e}")))?
                .unwrap_or(defaults.timeout),
        },
        connections: args
            .search_connections
            .or(file.search_connections)
            .unwrap_or(defaults.connections),
        split_bound: args
            .search_split_bound
            .or(file.search_split_bound)
            .unwrap_or(defaults.split_bound),
    };
    if search.connections == 0 {
        return Err(ConfigError(
            "search_connections must be at least 1".to_owned(),
        ));
    }
    if search.split_bound == 0 {
        return Err(ConfigError(
            "search_split_bound must be at least 1".to_owned(),
        ));
    }
    let body_compression = args
        .body_compression
        .or(file.body_compression)
        .unwrap_or(fhirstore_sql::SqlConfig::default().body_compression);
    if body_compression > 9 {
        return Err(ConfigError(format!(
            "body_compression {body_compression}: expected 0 (none) to 9"
        )));
    }
    let redis = args.redis.clone().or_else(|| file.redis.clone());
    let redis_mode = match redis {
        None => ModeArg::Off,
        Some(_) => args.redis_mode.or(file.redis_mode).unwrap_or(ModeArg::Sync),
    };
    Ok(StoreSettings {
        data_dir: args
            .data_dir
            .clone()
            .or_else(|| file.data_dir.clone())
            .unwrap_or_else(|| PathBuf::from("data")),
        postgres: args.postgres.clone().or_else(|| file.postgres.clone()),
        redis: redis.filter(|_| redis_mode != ModeArg::Off),
        redis_prefix: args
            .redis_prefix
            .clone()
            .or_else(|| file.redis_prefix.clone())
            .unwrap_or_else(|| "fhirstore".to_owned()),
        redis_mode,
        index_mode: args
            .index_mode
            .or(file.index_mode)
            .unwrap_or(ModeArg::Async),
        search,
        memory_cache: args
            .memory_cache
            .or(file.memory_cache)
            .unwrap_or(DEFAULT_MEMORY_CACHE),
        body_compression,
    })
}

/// Resolves the storage and server settings for `serve`.
pub fn serve_settings(
    storage: &StorageArgs,
    serve: &ServeArgs,
) -> Result<(StoreSettings, ServerSettings), ConfigError> {
    let file = read_file(storage.config.as_deref())?;
    let defaults = ServerSettings::default();
    let mut tokens = Vec::new();
    for (tenant, list) in &file.tokens {
        for t in list {
            tokens.push((tenant.clone(), t.clone()));
        }
    }
    for pair in &serve.tokens {
        let (tenant, token) = pair
            .split_once('=')
            .filter(|(a, b)| !a.is_empty() && !b.is_empty())
            .ok_or_else(|| ConfigError(format!("--token {pair:?}: expected TENANT=TOKEN")))?;
        tokens.push((tenant.to_owned(), token.to_owned()));
    }
    for (tenant, _) in &tokens {
        fhirstore_core::TenantId::new(tenant.as_str())
            .map_err(|e| ConfigError(format!("token for {tenant:?}: {e}")))?;
    }
    let server = ServerSettings {
        listen: serve.listen.or(file.listen).unwrap_or(defaults.listen),
        public_url: serve
            .public_url
            .clone()
            .or_else(|| file.public_url.clone())
            .map(|u| u.trim_end_matches('/').to_owned()),
        tokens,
        admin_token: serve
            .admin_token
            .clone()
            .or_else(|| file.admin_token.clone()),
        allow_unauthenticated: serve.allow_unauthenticated
            || file.allow_unauthenticated.unwrap_or(false),
        max_body: serve
            .max_body
            .or(file.max_body)
            .unwrap_or(defaults.max_body),
        reconcile: schedule(serve, &file)?,
        limits: serve.limits.resolve(&file.limits),
        export_dir: None,
        export_ttl: match serve.export_ttl {
            Some(d) => d,
            None => file
                .export_ttl
                .as_deref()
                .map(parse_duration)
                .transpose()
                .map_err(ConfigError)?
                .unwrap_or(defaults.export_ttl),
        },
        subscriptions: serve.subscriptions.resolve(&file.subscriptions)?,
    };
    let stores = resolve_store(storage, &file)?;
    let server = ServerSettings {
        export_dir: Some(stores.data_dir.join("exports")),
        ..server
    };
    Ok((stores, server))
}

fn schedule(
    serve: &ServeArgs,
    file: &FileConfig,
) -> Result<Option<fhirstore_sync::schedule::Schedule>, ConfigError> {
    let from_file = |v: &Option<String>| v.as_deref().map(parse_duration).transpose();
    let every = match serve.reconcile_every {
        Some(d) => Some(d),
        None => from_file(&file.reconcile_every).map_err(ConfigError)?,
    };
    let Some(interval) = every else {
        return Ok(None);
    };
    let window = match serve.reconcile_window {
        Some(d) => d,
        None => from_file(&file.reconcile_window)
            .map_err(ConfigError)?
            .unwrap_or(interval),
    };
    let dry = serve.reconcile_dry_run || file.reconcile_dry_run.unwrap_or(false);
    let deep = (serve.reconcile_deep || file.reconcile_deep.unwrap_or(false)).then(|| {
        serve
            .reconcile_deep_rate
            .or(file.reconcile_deep_rate)
            .unwrap_or(DEFAULT_DEEP_RATE)
    });
    Ok(Some(fhirstore_sync::schedule::Schedule {
        deep,
        interval,
        window,
        mode: if dry {
            fhirstore_sync::reconcile::ReconcileMode::DryRun
        } else {
            fhirstore_sync::reconcile::ReconcileMode::Repair
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_the_file_and_the_file_over_defaults() {
        let file: FileConfig = toml::from_str(
            r#"
            data_dir = "/srv/fhir"
            redis = "redis://cache:6379"
            index_mode = "sync"
            listen = "0.0.0.0:9000"
            [tokens]
            clinic-a = ["t1", "t2"]
            "#,
        )
        .expect("valid file");
        let args = StorageArgs {
            index_mode: Some(ModeArg::Off),
            ..StorageArgs::default()
        };
        let s = resolve_store(&args, &file).expect("settings");
        assert_eq!(s.data_dir, PathBuf::from("/srv/fhir"));
        assert_eq!(s.redis.as_deref(), Some("redis://cache:6379"));
        assert_eq!(s.redis_mode, ModeArg::Sync);
        assert_eq!(s.index_mode, ModeArg::Off);
        let none =
            resolve_store(&StorageArgs::default(), &FileConfig::default()).expect("settings");
        assert_eq!(none.data_dir, PathBuf::from("data"));
        assert_eq!(
            (none.redis_mode, none.index_mode),
            (ModeArg::Off, ModeArg::Async)
        );
        assert!(toml::from_str::<FileConfig>("nonsense = 1").is_err());
    }

    /// The search bounds reach the primary's settings: a flag over the file, the file over
    /// the defaults; a bad duration or zero connections is a configuration error.
    #[test]
    fn search_bounds_reach_the_primary() {
        let file: FileConfig = toml::from_str(
            "search_timeout = \"2m\"\nsearch_connections = 3\nsearch_split_bound = 50",
        )
        .expect("file");
        let s = resolve_store(&StorageArgs::default(), &file).expect("settings");
        let sql = s.search.sql_config();
        assert_eq!(sql.search_timeout, Duration::from_secs(120));
        assert_eq!(sql.search_connections, 3);
        assert_eq!(s.search.split_bound, 50);
        let args = StorageArgs {
            search_timeout: Some(Duration::from_secs(5)),
            ..StorageArgs::default()
        };
        let s = resolve_store(&args, &file).expect("settings");
        assert_eq!(s.search.timeout, Duration::from_secs(5));
        assert_eq!(s.sql_config().search_timeout, Duration::from_secs(5));
        assert_eq!(s.search.connections, 3);
        let defaults = resolve_store(&StorageArgs::default(), &FileConfig::default())
            .expect("settings")
            .search;
        assert_eq!(
            defaults.timeout,
            fhirstore_sql::SqlConfig::default().search_timeout
        );
        assert_eq!(
            defaults.split_bound,
            fhirstore_sync::SyncConfig::default().split_bound
        );
        for bad in [
            "search_timeout = \"soon\"",
            "search_connections = 0",
            "search_split_bound = 0",
        ] {
            let file: FileConfig = toml::from_str(bad).expect("parses");
            let e = resolve_store(&StorageArgs::default(), &file).expect_err(bad);
            assert!(e.0.contains("search_"), "{e}");
        }
    }

    /// The body compression level reaches the primary: a flag over the file over the default;
    /// past 9 is a configuration error naming the setting.
    #[test]
    fn body_compression_reaches_the_primary() {
        let none = resolve_store(&StorageArgs::default(), &FileConfig::default()).expect("ok");
        assert_eq!(
            none.sql_config().body_compression,
            fhirstore_sql::SqlConfig::default().body_compression
        );
        let file: FileConfig = toml::from_str("body_compression = 0").expect("file");
        let s = resolve_store(&StorageArgs::default(), &file).expect("settings");
        assert_eq!(s.sql_config().body_compression, 0);
        let args = StorageArgs {
            body_compression: Some(9),
            ..StorageArgs::default()
        };
        assert_eq!(
            resolve_store(&args, &file)
                .expect("settings")
                .sql_config()
                .body_compression,
            9
        );
        let file: FileConfig = toml::from_str("body_compression = 12").expect("parses");
        let e = resolve_store(&StorageArgs::default(), &file).expect_err("12");
        assert!(e.0.contains("body_compression"), "{e}");
    }

    #[test]
    fn durations_and_the_reconcile_schedule() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7_200)));
        assert_eq!(parse_duration("45"), Ok(Duration::from_secs(45)));
        for bad in ["", "0s", "1w", "m5", "-3s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        let file: FileConfig = toml::from_str("reconcile_every = \"1h\"").expect("file");
        let s = schedule(&ServeArgs::default(), &file)
            .expect("ok")
            .expect("scheduled");
        assert_eq!(s.interval, Duration::from_secs(3_600));
        assert_eq!(s.window, s.interval);
        let off = schedule(&ServeArgs::default(), &FileConfig::default()).expect("ok");
        assert!(off.is_none(), "off by default");
    }

    #[test]
    fn an_open_server_stays_on_loopback_unless_told() {
        let mut s = ServerSettings::default();
        assert!(s.check_exposure().is_ok());
        s.listen = "0.0.0.0:8080".parse().expect("addr");
        assert!(s.check_exposure().is_err());
        s.tokens.push(("a".into(), "secret".into()));
        assert!(s.check_exposure().is_ok());
        s.tokens.clear();
        s.allow_unauthenticated = true;
        assert!(s.check_exposure().is_ok());
    }

    #[test]
    fn passwords_never_show() {
        for (url, shown) in [
            ("redis://:s3cret@host:6379/0", "redis://:***@host:6379/0"),
            ("redis://user:s3cret@host/0", "redis://user:***@host/0"),
            (
                "redis+cluster://:s3cret@a:7000,b:7001?replicas=1",
                "redis+cluster://:***@a:7000,b:7001?replicas=1",
            ),
            ("postgres://token@db/x", "postgres://***@db/x"),
            (
                "postgres://u@db/x?sslmode=require&password=s3cret",
                "postgres://***@db/x?sslmode=require&password=***",
            ),
            ("redis://127.0.0.1:6379", "redis://127.0.0.1:6379"),
            ("redis://h/0?x=a@b", "redis://h/0?x=a@b"),
        ] {
            assert_eq!(redact_url(url), shown);
            assert!(!redact_url(url).contains("s3cret"));
        }
    }

    #[test]
    fn limits_come_from_flags_then_file_then_defaults() {
        let file: FileConfig = toml::from_str(
            "[limits]\nmax_bundle_entries = 50\nmax_search_criteria = 7\nmax_sort_keys = 3\n",
        )
        .expect("toml");
        let flags = LimitArgs {
            max_search_criteria: Some(9),
            ..LimitArgs::default()
        };
        let l = flags.resolve(&file.limits);
        assert_eq!(l.max_bundle_entries, 50);
        assert_eq!(l.search.max_criteria, 9);
        assert_eq!(l.search.max_sort_keys, 3);
        assert_eq!(l.max_response_bytes, Limits::default().max_response_bytes);
        assert!(toml::from_str::<FileConfig>("[limits]\nmax_nope = 1\n").is_err());
    }
}
