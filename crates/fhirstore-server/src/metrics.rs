//! `/metrics` in the Prometheus text format: requests by interaction and status, latency
//! histograms by interaction, and the sync and reconcile figures read when scraped.
//!
//! Recorded through the `metrics` facade into a Prometheus recorder that belongs to this
//! server, not the process-wide one: several servers (and tests) in one process each count
//! their own requests.

use std::time::Duration;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

/// Upper bounds of the latency histogram buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

const REQUESTS: &str = "fhirstore_http_requests_total";
const LATENCY: &str = "fhirstore_http_request_duration_seconds";
const RECONCILE: &str = "fhirstore_reconcile_total";

type Gauge = fn(&fhirstore_sync::SecondaryStatus) -> f64;

/// The sync gauges, set from the secondaries' status on each scrape.
const SYNC_GAUGES: [(&str, &str, Gauge); 4] = [
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

type SubscriptionGauge = fn(&fhirstore_core::subscription::State) -> f64;

/// The per-subscription gauges, set from their delivery state on each scrape.
const SUBSCRIPTION_GAUGES: [(&str, &str, SubscriptionGauge); 4] = [
    (
        "fhirstore_subscription_lag_events",
        "Events a subscription recorded but has not delivered yet.",
        |s| (s.events - s.delivered) as f64,
    ),
    (
        "fhirstore_subscription_events",
        "Events a subscription recorded since it started.",
        |s| s.events as f64,
    ),
    (
        "fhirstore_subscription_failures",
        "Failed delivery attempts since the last success.",
        |s| s.failures as f64,
    ),
    (
        "fhirstore_subscription_last_delivery_seconds",
        "When a subscription last delivered, seconds since the Unix epoch; 0 when never.",
        |s| s.last_sent as f64 / 1e6,
    ),
];

/// Request counters and latency histograms, with the recorder that renders them.
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
}

impl Default for Metrics {
    fn default() -> Self {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(LATENCY.to_owned()), &BUCKETS)
            .map(PrometheusBuilder::build_recorder)
            // The buckets are a non-empty constant, the one thing the builder checks.
            .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            describe_counter!(REQUESTS, "HTTP requests by interaction and status.");
            describe_histogram!(LATENCY, metrics::Unit::Seconds, "HTTP request latency.");
            describe_counter!(
                RECONCILE,
                "Reconcile jobs finished, and the drift they found and repaired."
            );
            for (name, help, _) in SYNC_GAUGES {
                describe_gauge!(name, help);
            }
            for (name, help, _) in SUBSCRIPTION_GAUGES {
                describe_gauge!(name, help);
            }
        });
        Metrics { recorder, handle }
    }
}

impl Metrics {
    /// Records one request.
    pub fn observe(&self, interaction: &'static str, status: u16, took: Duration) {
        metrics::with_local_recorder(&self.recorder, || {
            counter!(REQUESTS, "interaction" => interaction, "status" => status.to_string())
                .increment(1);
            histogram!(LATENCY, "interaction" => interaction).record(took.as_secs_f64());
        });
    }

    /// Adds a finished reconcile job's counts (`missing`, `extra`, `stale`, `ahead`,
    /// `repaired`).
    pub fn reconciled(&self, counts: &[(&'static str, u64)]) {
        metrics::with_local_recorder(&self.recorder, || {
            for (name, n) in counts {
                counter!(RECONCILE, "count" => *name).increment(*n);
            }
            counter!(RECONCILE, "count" => "jobs").increment(1);
        });
    }

    /// The text exposition, with the sync gauges set from `sync` and the subscription gauges
    /// from `subscriptions` first.
    pub fn render(
        &self,
        sync: &[fhirstore_sync::SecondaryStatus],
        subscriptions: &[fhirstore_core::subscription::State],
    ) -> String {
        metrics::with_local_recorder(&self.recorder, || {
            for (name, _, value) in SYNC_GAUGES {
                for s in sync {
                    gauge!(name, "secondary" => s.name.clone()).set(value(s));
                }
            }
            for (name, _, value) in SUBSCRIPTION_GAUGES {
                for s in subscriptions {
                    gauge!(name, "tenant" => s.tenant.as_str().to_owned(),
                        "subscription" => s.id.as_str().to_owned())
                    .set(value(s));
                }
            }
        });
        self.handle.render()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of the sample line that starts with `series`.
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series))
            .and_then(|v| v.trim().parse().ok())
    }

    #[test]
    fn requests_count_and_histograms_are_cumulative() {
        let m = Metrics::default();
        m.observe("read", 200, Duration::from_micros(700));
        m.observe("read", 404, Duration::from_millis(30));
        m.observe("read", 200, Duration::from_millis(2));
        let text = m.render(&[], &[]);
        let req = |status: &str| {
            sample(
                &text,
                &format!("{REQUESTS}{{interaction=\"read\",status=\"{status}\"}}"),
            )
        };
        assert_eq!(req("200"), Some(2.0));
        assert_eq!(req("404"), Some(1.0));
        let bucket = |le: &str| {
            sample(
                &text,
                &format!("{LATENCY}_bucket{{interaction=\"read\",le=\"{le}\"}}"),
            )
        };
        assert_eq!(bucket("0.0005"), Some(0.0));
        assert_eq!(bucket("0.001"), Some(1.0));
        assert_eq!(bucket("0.0025"), Some(2.0));
        assert_eq!(bucket("0.05"), Some(3.0));
        assert_eq!(bucket("+Inf"), Some(3.0));
        assert_eq!(
            sample(&text, &format!("{LATENCY}_count{{interaction=\"read\"}}")),
            Some(3.0)
        );
        assert!(
            text.contains(&format!("# TYPE {LATENCY} histogram")),
            "{text}"
        );
    }

    #[test]
    fn each_server_counts_its_own_requests() {
        let (a, b) = (Metrics::default(), Metrics::default());
        a.observe("search-type", 200, Duration::from_millis(1));
        let series = format!("{REQUESTS}{{interaction=\"search-type\",status=\"200\"}}");
        assert_eq!(sample(&a.render(&[], &[]), &series), Some(1.0));
        assert_eq!(sample(&b.render(&[], &[]), &series), None);
    }

    #[test]
    fn reconcile_counts_add_up() {
        let m = Metrics::default();
        m.reconciled(&[("missing", 3), ("repaired", 3)]);
        m.reconciled(&[("missing", 1)]);
        let text = m.render(&[], &[]);
        assert_eq!(
            sample(&text, &format!("{RECONCILE}{{count=\"missing\"}}")),
            Some(4.0)
        );
        assert_eq!(
            sample(&text, &format!("{RECONCILE}{{count=\"jobs\"}}")),
            Some(2.0)
        );
    }
}
