//! `/metrics` in the Prometheus text format: requests by interaction and status, latency
//! histograms by interaction, and the sync and reconcile figures read when scraped.

use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

/// Upper bounds of the latency histogram buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

/// Request counters and latency histograms.
#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    latency: Mutex<BTreeMap<&'static str, Histogram>>,
    reconcile: Mutex<BTreeMap<&'static str, u64>>,
}

impl Metrics {
    /// Records one request.
    pub fn observe(&self, interaction: &'static str, status: u16, took: Duration) {
        *self
            .requests
            .lock()
            .entry((interaction, status))
            .or_default() += 1;
        let secs = took.as_secs_f64();
        let mut latency = self.latency.lock();
        let h = latency.entry(interaction).or_default();
        for (i, bound) in BUCKETS.iter().enumerate() {
            if secs <= *bound {
                h.counts[i] += 1;
            }
        }
        h.count += 1;
        h.sum += secs;
    }

    /// Adds a finished reconcile job's counts (`missing`, `extra`, `stale`, `ahead`,
    /// `repaired`).
    pub fn reconciled(&self, counts: &[(&'static str, u64)]) {
        let mut r = self.reconcile.lock();
        for (name, n) in counts {
            *r.entry(name).or_default() += n;
        }
        *r.entry("jobs").or_default() += 1;
    }

    /// The text exposition, with `sync` lines appended by the caller's figures.
    pub fn render(&self, sync: &[fhirstore_sync::SecondaryStatus]) -> String {
        let mut out = String::new();
        out.push_str(
            "# HELP fhirstore_http_requests_total HTTP requests by interaction and status.\n",
        );
        out.push_str("# TYPE fhirstore_http_requests_total counter\n");
        for ((interaction, status), n) in self.requests.lock().iter() {
            let _ = writeln!(
                out,
                "fhirstore_http_requests_total{{interaction=\"{interaction}\",status=\"{status}\"}} {n}"
            );
        }
        out.push_str("# HELP fhirstore_http_request_duration_seconds HTTP request latency.\n");
        out.push_str("# TYPE fhirstore_http_request_duration_seconds histogram\n");
        for (interaction, h) in self.latency.lock().iter() {
            for (bound, n) in BUCKETS.iter().zip(h.counts) {
                let _ = writeln!(
                    out,
                    "fhirstore_http_request_duration_seconds_bucket{{interaction=\"{interaction}\",le=\"{bound}\"}} {n}"
                );
            }
            let _ = writeln!(
                out,
                "fhirstore_http_request_duration_seconds_bucket{{interaction=\"{interaction}\",le=\"+Inf\"}} {}\n\
                 fhirstore_http_request_duration_seconds_sum{{interaction=\"{interaction}\"}} {}\n\
                 fhirstore_http_request_duration_seconds_count{{interaction=\"{interaction}\"}} {}",
                h.count, h.sum, h.count
            );
        }
        type Gauge = fn(&fhirstore_sync::SecondaryStatus) -> f64;
        let gauges: [(&str, &str, Gauge); 4] = [
            (
                "fhirstore_sync_lag_changes",
                "Outbox changes a secondary has not applied (the outbox depth it sees).",
                |s| s.lag_changes as f64,
            ),
            (
                "fhirstore_sync_lag_seconds",
                "Age of the oldest change a secondary has not applied.",
                |s| s.lag_ms as f64 / 1000.0,
            ),
            (
                "fhirstore_sync_healthy",
                "Whether a secondary may answer searches.",
                |s| f64::from(u8::from(s.healthy)),
            ),
            (
                "fhirstore_sync_dead_letters",
                "Changes a secondary rejected for good and set aside.",
                |s| s.dead_letters as f64,
            ),
        ];
        for (name, help, value) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            for s in sync {
                let _ = writeln!(out, "{name}{{secondary=\"{}\"}} {}", s.name, value(s));
            }
        }
        out.push_str("# HELP fhirstore_reconcile_total Reconcile jobs finished, and the drift they found and repaired.\n");
        out.push_str("# TYPE fhirstore_reconcile_total counter\n");
        for (name, n) in self.reconcile.lock().iter() {
            let _ = writeln!(out, "fhirstore_reconcile_total{{count=\"{name}\"}} {n}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative() {
        let m = Metrics::default();
        m.observe("read", 200, Duration::from_micros(700));
        m.observe("read", 404, Duration::from_millis(30));
        let text = m.render(&[]);
        assert!(
            text.contains("fhirstore_http_requests_total{interaction=\"read\",status=\"200\"} 1")
        );
        assert!(text.contains("le=\"0.0005\"} 0"));
        assert!(text.contains("le=\"0.001\"} 1"));
        assert!(text.contains("le=\"0.05\"} 2"));
        assert!(
            text.contains("fhirstore_http_request_duration_seconds_count{interaction=\"read\"} 2")
        );
    }
}
