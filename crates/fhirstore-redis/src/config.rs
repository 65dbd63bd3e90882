//! The Redis secondary's settings.

/// How the Redis secondary connects and names its keys.
#[derive(Clone, Debug)]
pub struct RedisConfig {
    /// A `redis://` URL.
    pub url: String,
    /// The first part of every key, so several deployments (or test runs) can share a server.
    pub prefix: String,
    /// How long a command, or a connection attempt, may take before it fails (temporarily).
    /// Writes in synchronous mode wait at most this long for a Redis that went away.
    pub timeout: std::time::Duration,
}

impl RedisConfig {
    /// A configuration with the default prefix, `fhirstore`.
    pub fn new(url: impl Into<String>) -> Self {
        RedisConfig {
            url: url.into(),
            prefix: "fhirstore".to_owned(),
            timeout: std::time::Duration::from_secs(2),
        }
    }
}
