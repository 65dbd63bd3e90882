//! The tantivy secondary's settings.

use super::*;

/// Commit batching and memory.
#[derive(Clone, Debug)]
pub struct TantivyConfig {
    /// Commit once this many changes are waiting.
    pub commit_every: usize,
    /// And at least this often while any are waiting.
    pub commit_interval: Duration,
    /// The index writer's memory budget.
    pub writer_memory: usize,
}

impl Default for TantivyConfig {
    fn default() -> Self {
        TantivyConfig {
            commit_every: 10_000,
            commit_interval: Duration::from_secs(1),
            writer_memory: 64 << 20,
        }
    }
}
