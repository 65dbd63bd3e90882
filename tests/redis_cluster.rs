//! The Redis secondary on a Redis Cluster this binary starts on loopback ports of its own
//! (three masters with two replicas each, `redis-server --cluster-enabled yes` joined by
//! `redis-cli --cluster create`) and stops by process id:
//!
//! - the secondary suite, and every script the secondary runs, with every key it writes in its
//!   tenant's slot;
//! - a shard that loses its data is noticed by its slots' `built` markers, and only the
//!   tenants on that shard are refused;
//! - a master killed mid-load: the primary's writes go on, a replica takes over, the secondary
//!   catches up, and nothing is lost.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use fhirstore_core::secondary::{Change, DigestView, Health, Secondary};
use fhirstore_core::{LogicalId, ResourceStorage, ResourceType, TenantContext, TenantId};
use fhirstore_redis::{RedisConfig, RedisSecondary};
use fhirstore_testkit::secondary::assert_mirrors;
use fhirstore_testkit::OwnRedisCluster;
use serde_json::json;

/// A write that returned: (tenant's index, id) and the version.
type Acked = ((usize, String), u64);

fn pt() -> ResourceType {
    ResourceType::new("Patient").expect("type")
}

/// A secondary on `cluster` under a fresh prefix, with `query` on its URL.
async fn connect(cluster: &OwnRedisCluster, query: &str, timeout: Duration) -> RedisSecondary {
    let mut config = RedisConfig::new(cluster.url(query));
    config.prefix = format!("fhirstore-{}", fhirstore_testkit::random_tenant().tenant());
    config.timeout = timeout;
    let s = RedisSecondary::connect(&config).await.expect("connect");
    assert!(s.is_cluster());
    s
}

fn patient(tenant: &TenantId, id: &str, v: u64) -> Change {
    fhirstore_integration::indexed_patient_change(tenant, id, v)
}

async fn node(port: u16) -> redis::aio::MultiplexedConnection {
    redis::Client::open(format!("redis://127.0.0.1:{port}"))
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect to a node")
}

/// Every key under `prefix` on every master.
async fn all_keys(cluster: &OwnRedisCluster, prefix: &str) -> Vec<String> {
    let mut out = Vec::new();
    for port in cluster.masters() {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{prefix}:*"))
            .query_async(&mut node(port).await)
            .await
            .expect("KEYS");
        out.extend(keys);
    }
    out
}

/// The slot ranges the master at `port` serves, from `CLUSTER SLOTS`.
async fn ranges_of(port: u16) -> Vec<(i64, i64)> {
    let reply: Vec<redis::Value> = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query_async(&mut node(port).await)
        .await
        .expect("CLUSTER SLOTS");
    reply
        .iter()
        .filter_map(|r| {
            let redis::Value::Array(parts) = r else {
                return None;
            };
            let [redis::Value::Int(first), redis::Value::Int(last), redis::Value::Array(master), ..] =
                parts.as_slice()
            else {
                return None;
            };
            (master.get(1) == Some(&redis::Value::Int(i64::from(port)))).then_some((*first, *last))
        })
        .collect()
}

async fn keyslot(port: u16, key: &str) -> i64 {
    redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(key)
        .query_async(&mut node(port).await)
        .await
        .expect("CLUSTER KEYSLOT")
}

/// The secondary suite on a cluster, then every script once more by hand (apply, search,
/// regroup, scrub read and fix); a script touching a key outside its slot fails there. Every
/// key written is a slot marker or carries its tenant's tag, and the server puts it in that
/// tenant's slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_secondary_suite_runs_on_a_cluster() {
    let Some(cluster) = OwnRedisCluster::start(3, 2) else {
        return;
    };
    let timeout = Duration::from_secs(2);
    let s = connect(&cluster, "", timeout).await;
    fhirstore_testkit::secondary::secondary_version_guard(&s).await;
    s.purge().await.expect("purge");
    let s = connect(&cluster, "", timeout).await;
    fhirstore_testkit::secondary::secondary_rebuild_and_isolation(&s).await;
    s.purge().await.expect("purge");
    let s = connect(&cluster, "?replicas=1", timeout).await;
    let Some(primary) = fhirstore_integration::sqlite_store(env!("CARGO_TARGET_TMPDIR")).await
    else {
        return;
    };
    fhirstore_testkit::secondary::secondary_search_agrees(&primary, &s).await;
    s.purge().await.expect("purge");

    let s = connect(&cluster, "?replicas=2", timeout).await;
    let tenants: Vec<TenantContext> = (0..12)
        .map(|_| fhirstore_testkit::random_tenant())
        .collect();
    let changes: Vec<Change> = tenants
        .iter()
        .flat_map(|t| (1..=2).map(|v| patient(t.tenant(), "x", v)))
        .collect();
    // One batch across tenants on every shard.
    let applied = s.apply(&changes).await.expect("apply");
    assert_eq!(applied.applied, changes.len() as u64);
    s.mark_built().await.expect("built");
    assert_eq!(s.health().await, Health::Healthy);
    for t in &tenants {
        let r = s.read(t, pt(), &LogicalId::new("x").expect("id")).await;
        assert_eq!(r.expect("read").expect("found").version.get(), 2);
        let q = fhirstore_core::SearchQuery::parse(
            Some(pt()),
            "identifier=urn:mrn|x-2",
            fhirstore_core::Handling::Strict,
        )
        .expect("query");
        assert_eq!(s.search(t, &q).await.expect("search").matches.len(), 1);
        assert!(!s
            .group_digests(t.tenant(), pt())
            .await
            .expect("groups")
            .is_empty());
        let segment = patient(t.tenant(), "x", 2).segment();
        let scrub = s
            .scrub(t.tenant(), pt(), &[segment, segment ^ 1], true)
            .await
            .expect("scrub");
        assert_eq!(
            scrub,
            fhirstore_core::secondary::Scrub {
                keys_read: 1,
                ..Default::default()
            },
            "a clean copy needs no fix"
        );
    }
    let prefix = format!("{}:", s.prefix());
    let keys = all_keys(&cluster, s.prefix()).await;
    assert!(
        keys.len() > 16_384,
        "a marker per slot and the tenants' keys"
    );
    let port = cluster.masters()[0];
    for t in &tenants {
        let tag = format!("{prefix}{{{}}}:", t.tenant());
        let mine: Vec<&String> = keys.iter().filter(|k| k.starts_with(&tag)).collect();
        assert!(mine.len() > 5, "{} has its keys", t.tenant());
        let slot = keyslot(port, t.tenant().as_str()).await;
        for k in mine.iter().take(3) {
            assert_eq!(keyslot(port, k).await, slot, "{k}");
        }
    }
    for k in &keys {
        let ok = k.ends_with(":built") && k.starts_with(&format!("{prefix}{{~"))
            || tenants
                .iter()
                .any(|t| k.starts_with(&format!("{prefix}{{{}}}:", t.tenant())));
        assert!(ok, "a key neither a slot marker nor tenant-tagged: {k}");
    }
    s.clear(tenants[0].tenant()).await.expect("clear");
    assert!(all_keys(&cluster, s.prefix())
        .await
        .iter()
        .all(|k| !k.starts_with(&format!("{prefix}{{{}}}:", tenants[0].tenant()))));
    s.purge().await.expect("purge");
    assert!(
        all_keys(&cluster, s.prefix()).await.is_empty(),
        "purge left keys"
    );
}

/// A shard that loses its data (flushed, as a master restarted without persistence and
/// without a replica comes back) takes its slots' markers with it: health names the shard,
/// the tenants in its slots are refused (never served from the partial copy), every other
/// tenant is still served, and a rebuild brings it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_that_loses_its_data_is_noticed() {
    let Some(cluster) = OwnRedisCluster::start(3, 1) else {
        return;
    };
    let s = connect(&cluster, "", Duration::from_secs(2)).await;
    let tenants: Vec<TenantContext> = (0..24)
        .map(|_| fhirstore_testkit::random_tenant())
        .collect();
    let changes: Vec<Change> = tenants
        .iter()
        .map(|t| patient(t.tenant(), "x", 1))
        .collect();
    s.apply(&changes).await.expect("apply");
    s.mark_built().await.expect("built");
    assert_eq!(s.health().await, Health::Healthy);

    let lost = cluster.masters()[1];
    let ranges = ranges_of(lost).await;
    let mut on_lost = Vec::new();
    for t in &tenants {
        let slot = keyslot(lost, t.tenant().as_str()).await;
        on_lost.push(ranges.iter().any(|(a, b)| (*a..=*b).contains(&slot)));
    }
    assert!(
        on_lost.iter().any(|x| *x) && on_lost.iter().any(|x| !*x),
        "tenants on both sides"
    );
    redis::cmd("FLUSHALL")
        .query_async::<()>(&mut node(lost).await)
        .await
        .expect("flush one shard");

    match s.health().await {
        Health::NeedsRebuild(why) => assert!(why.contains(&lost.to_string()), "{why}"),
        other => panic!("a shard lost its data, yet {other:?}"),
    }
    let x = LogicalId::new("x").expect("id");
    for (t, lost) in tenants.iter().zip(&on_lost) {
        match s.read(t, pt(), &x).await {
            Err(e) if *lost && e.to_string().contains("rebuilt") => {}
            Ok(Some(r)) if !*lost => assert_eq!(r.version.get(), 1),
            other => panic!("{} (on the lost shard: {lost}): {other:?}", t.tenant()),
        }
    }
    s.apply(&changes).await.expect("apply again");
    s.mark_built().await.expect("built again");
    assert_eq!(s.health().await, Health::Healthy);
    for t in &tenants {
        assert!(s.read(t, pt(), &x).await.expect("read").is_some());
    }
    s.purge().await.expect("purge");
}

/// One master killed (SIGKILL) while a SQLite primary takes writes with the cluster as its
/// synchronous cache: every write either returns or fails temporarily, a replica takes over,
/// the secondary catches up and mirrors the primary exactly, and every write that returned
/// reads back at its version or later. `replicas=1`: a batch counts as applied only once a
/// replica holds it, so the failover loses none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_killed_mid_load_loses_nothing() {
    let Some(mut cluster) = OwnRedisCluster::start(3, 2) else {
        return;
    };
    let Some(primary) = fhirstore_integration::sqlite_store(env!("CARGO_TARGET_TMPDIR")).await
    else {
        return;
    };
    let primary = Arc::new(primary);
    let redis = connect(&cluster, "?replicas=1", Duration::from_millis(500)).await;
    let composite = fhirstore_integration::redis_cache_composite(
        primary.clone(),
        &redis,
        Duration::from_millis(500),
    )
    .await;
    // Tenants on every shard, so the killed master holds some of them.
    let tenants: Vec<TenantContext> = (0..9).map(|_| fhirstore_testkit::random_tenant()).collect();
    let mut acked: BTreeMap<(usize, String), u64> = BTreeMap::new();
    let mut failed = 0;
    let write = |round: usize| {
        let (composite, tenants) = (&composite, &tenants);
        async move {
            let mut out = Vec::new();
            for (n, t) in tenants.iter().enumerate() {
                let id = format!("p{}", round % 4);
                let body = json!({"resourceType": "Patient", "id": id,
                                  "name": [{"family": format!("Round{round}")}]});
                let lid = LogicalId::new(&id).expect("id");
                match composite.update(t, pt(), &lid, body, None).await {
                    Ok(w) => out.push(Some(((n, id), w.resource.version.get()))),
                    Err(e) if e.is_temporary() => out.push(None),
                    Err(e) => panic!("write {round} failed with {e:?}"),
                }
            }
            out
        }
    };
    let mut record = |results: Vec<Option<Acked>>| {
        for r in results {
            match r {
                Some((k, v)) => {
                    let e = acked.entry(k).or_default();
                    *e = (*e).max(v);
                }
                None => failed += 1,
            }
        }
    };
    for round in 0..8 {
        record(write(round).await);
    }
    // The master of the first tenant's slot.
    let slot = keyslot(cluster.ports()[0], tenants[0].tenant().as_str()).await;
    let mut victim = None;
    for port in cluster.masters() {
        if ranges_of(port)
            .await
            .iter()
            .any(|(a, b)| (*a..=*b).contains(&slot))
        {
            victim = Some(port);
        }
    }
    let victim = victim.expect("a master serves every slot");
    cluster.kill(victim);
    for round in 8..24 {
        record(write(round).await);
    }
    cluster.wait_until_ok();
    for round in 24..32 {
        record(write(round).await);
    }
    fhirstore_integration::caught_up(&composite).await;
    assert_eq!(
        cluster.masters().len(),
        3,
        "a replica took the killed master's place"
    );
    assert_eq!(redis.health().await, Health::Healthy);
    assert_mirrors(&*primary, &redis, &tenants).await;
    for ((n, id), v) in &acked {
        let r = composite
            .read(&tenants[*n], pt(), &LogicalId::new(id).expect("id"))
            .await
            .expect("read");
        assert!(
            r.version.get() >= *v,
            "{id}: v{} after v{v} returned",
            r.version
        );
    }
    assert!(acked.len() > 9, "writes went on: {failed} failed");
    composite.shutdown().await;
    redis.purge().await.expect("purge");
}
