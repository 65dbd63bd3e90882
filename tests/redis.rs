//! The secondary checks against the Redis secondary on the test Redis server, each test under
//! its own key prefix; plus what only Redis has: every key carries its tenant's hash tag, and a
//! server that loses everything is noticed and refused until rebuilt.

use fhirstore_core::secondary::{Change, DigestView, Health, Secondary};
use fhirstore_core::{LogicalId, ResourceType};
use fhirstore_redis::RedisSecondary;
use serde_json::json;

async fn redis_secondary() -> Option<RedisSecondary> {
    fhirstore_integration::redis_secondary().await
}

async fn sqlite_store() -> Option<fhirstore_sql::SqliteStore> {
    fhirstore_integration::sqlite_store(env!("CARGO_TARGET_TMPDIR")).await
}

/// Removes everything a test wrote under its prefix.
async fn purge(s: &RedisSecondary) {
    s.purge().await.expect("purge the test's keys");
}

fhirstore_testkit::secondary_tests!(redis_secondary(), sqlite_store(), purge);

async fn raw() -> redis::aio::MultiplexedConnection {
    redis::Client::open(fhirstore_integration::redis_url())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect")
}

async fn keys(conn: &mut redis::aio::MultiplexedConnection, pattern: &str) -> Vec<String> {
    redis::cmd("KEYS")
        .arg(pattern)
        .query_async(conn)
        .await
        .expect("KEYS")
}

fn patient(tenant: &fhirstore_core::TenantId, id: &str, v: u64) -> Change {
    fhirstore_integration::indexed_patient_change(tenant, id, v)
}

/// Every key but the global `built` marker starts with `prefix:{tenant}:`, the tenant in a
/// Cluster hash tag, so one tenant's data is one slot and one SCAN pattern.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_key_is_tenant_tagged() {
    let Some(s) = redis_secondary().await else {
        return;
    };
    let (a, b) = (
        fhirstore_testkit::random_tenant(),
        fhirstore_testkit::random_tenant(),
    );
    let changes: Vec<Change> = (1..=3)
        .flat_map(|v| [patient(a.tenant(), "x", v), patient(b.tenant(), "x", v)])
        .collect();
    s.apply(&changes).await.expect("apply");
    s.mark_built().await.expect("built");
    let prefix = s.prefix().to_owned();
    let mut conn = raw().await;
    let all = keys(&mut conn, &format!("{prefix}:*")).await;
    assert!(all.len() > 10, "indexes were written: {all:?}");
    for k in &all {
        let ok = *k == format!("{prefix}:built")
            || k.starts_with(&format!("{prefix}:{{{}}}:", a.tenant()))
            || k.starts_with(&format!("{prefix}:{{{}}}:", b.tenant()));
        assert!(ok, "key without its tenant's tag: {k}");
    }
    // Token, reference, string and lastUpdated entries exist, and the old version's token is gone.
    let a_keys = keys(&mut conn, &format!("{prefix}:{{{}}}:*", a.tenant())).await;
    assert!(a_keys.iter().any(|k| k.ends_with("identifier:c:x-3")));
    assert!(!a_keys.iter().any(|k| k.ends_with("identifier:c:x-2")));
    assert!(a_keys
        .iter()
        .any(|k| k.contains(":r:Patient:organization:ti:Organization/o1")));
    assert!(a_keys.iter().any(|k| k.ends_with(":s:Patient:family")));
    assert!(a_keys.iter().any(|k| k.ends_with(":lu:Patient")));
    s.clear(a.tenant()).await.expect("clear a");
    assert!(keys(&mut conn, &format!("{prefix}:{{{}}}:*", a.tenant()))
        .await
        .is_empty());
    assert!(!keys(&mut conn, &format!("{prefix}:{{{}}}:*", b.tenant()))
        .await
        .is_empty());
    s.purge().await.expect("purge");
    assert!(
        keys(&mut conn, &format!("{prefix}:*")).await.is_empty(),
        "purge left keys"
    );
}

/// A Redis that loses everything (here: its keys and its script cache are flushed, as a
/// restart without persistence does) is reported as needing a rebuild and refuses reads, so
/// it can never serve a version older than one it served before; changes still apply; once
/// rebuilt it answers again with the newest versions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_everything_is_noticed() {
    let Some(s) = redis_secondary().await else {
        return;
    };
    let ctx = fhirstore_testkit::random_tenant();
    let pt = ResourceType::new("Patient").expect("type");
    let id = LogicalId::new("y").expect("id");
    s.apply(&[patient(ctx.tenant(), "y", 1), patient(ctx.tenant(), "y", 2)])
        .await
        .expect("apply");
    s.mark_built().await.expect("built");
    let served = s.read(&ctx, pt, &id).await.expect("read").expect("held");
    assert_eq!(served.version.get(), 2);

    // Lose the data of this prefix only (other tests share the server), and every script.
    let mut conn = raw().await;
    let prefix = s.prefix().to_owned();
    let mine = keys(&mut conn, &format!("{prefix}:*")).await;
    let _: () = redis::cmd("DEL")
        .arg(&mine)
        .query_async(&mut conn)
        .await
        .expect("DEL");
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .expect("SCRIPT FLUSH");

    assert!(matches!(s.health().await, Health::NeedsRebuild(_)));
    let err = s.read(&ctx, pt, &id).await.expect_err("refused");
    assert!(err.to_string().contains("rebuilt"), "{err}");
    // A late, older change lands in the empty store, but is never served: still unbuilt.
    s.apply(&[patient(ctx.tenant(), "y", 1)])
        .await
        .expect("apply after loss");
    assert!(s.read(&ctx, pt, &id).await.is_err());

    // The rebuild: clear, reload from the primary's current state, mark built.
    s.clear(ctx.tenant()).await.expect("clear");
    s.apply(&[patient(ctx.tenant(), "y", 3)])
        .await
        .expect("rebuild");
    s.mark_built().await.expect("built");
    let after = s.read(&ctx, pt, &id).await.expect("read").expect("held");
    assert_eq!(after.version.get(), 3);
    s.purge().await.expect("purge");
}

/// Large match sets are paged by walking the type's ids in order (small ones are sorted in
/// the script): both paths give every match once, in id order, with the right total.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_results_page_in_id_order() {
    use fhirstore_core::search::Handling;
    use fhirstore_core::SearchQuery;
    let Some(s) = redis_secondary().await else {
        return;
    };
    let ctx = fhirstore_testkit::random_tenant();
    let changes: Vec<Change> = (0..700)
        .map(|i| {
            let mut c = patient(ctx.tenant(), &format!("p{i}"), 1);
            if let Some(body) = c.content.as_mut() {
                body["gender"] = json!(if i % 7 == 0 { "other" } else { "female" });
            }
            c
        })
        .collect();
    s.apply(&changes).await.expect("apply");
    s.mark_built().await.expect("built");
    let pt = ResourceType::new("Patient").expect("type");
    for (qs, every) in [("gender=female", 0..700), ("gender=other", 0..700)] {
        let want: Vec<String> = {
            let mut v: Vec<String> = every
                .filter(|i| (i % 7 == 0) == (qs == "gender=other"))
                .map(|i| format!("p{i}"))
                .collect();
            v.sort();
            v
        };
        let mut q = SearchQuery::parse(
            Some(pt),
            &format!("{qs}&_count=45&_total=accurate"),
            Handling::Strict,
        )
        .expect("query");
        let mut got = Vec::new();
        loop {
            let page = s.search(&ctx, &q).await.expect("page");
            assert_eq!(page.total, Some(want.len() as u64), "{qs}");
            got.extend(page.matches.into_iter().map(|r| r.key.id.to_string()));
            match page.next_cursor {
                Some(c) => q.cursor = Some(c),
                None => break,
            }
        }
        assert_eq!(got, want, "{qs}: every match once, in id order");
        let count = SearchQuery::parse(Some(pt), &format!("{qs}&_summary=count"), Handling::Strict)
            .expect("count");
        assert_eq!(
            s.search(&ctx, &count).await.expect("count").total,
            Some(want.len() as u64)
        );
    }
    s.purge().await.expect("purge");
}

/// Group digests written before groups existed (or damaged) disagree with the root; the first
/// read of them rebuilds them from the segments, for that tenant and type only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_digests_that_disagree_with_the_root_are_rebuilt() {
    use fhirstore_core::secondary::fold_groups;
    let Some(s) = redis_secondary().await else {
        return;
    };
    let (a, b) = (
        fhirstore_testkit::random_tenant(),
        fhirstore_testkit::random_tenant(),
    );
    let pt = ResourceType::new("Patient").expect("type");
    let changes: Vec<Change> = [&a, &b]
        .iter()
        .flat_map(|ctx| (0..300).map(|i| patient(ctx.tenant(), &format!("g{i}"), 1)))
        .collect();
    s.apply(&changes).await.expect("apply");
    let want_a = fold_groups(&s.segment_digests(a.tenant(), pt).await.expect("segments"));
    let want_b = fold_groups(&s.segment_digests(b.tenant(), pt).await.expect("segments"));
    assert_eq!(
        s.group_digests(a.tenant(), pt).await.expect("groups"),
        want_a
    );

    let mut conn = raw().await;
    let groups_key = |t: &fhirstore_core::TenantId| format!("{}:{{{}}}:gg:Patient", s.prefix(), t);
    // As a Redis filled before groups existed: no group hash at all.
    let _: () = redis::cmd("DEL")
        .arg(groups_key(a.tenant()))
        .query_async(&mut conn)
        .await
        .expect("DEL");
    // Damaged: one group's digest overwritten.
    let first = want_b.first().expect("a group").group;
    let _: () = redis::cmd("HSET")
        .arg(groups_key(b.tenant()))
        .arg(first.to_string())
        .arg("1:2:3:4:1")
        .query_async(&mut conn)
        .await
        .expect("HSET");

    assert_eq!(
        s.group_digests(a.tenant(), pt).await.expect("groups"),
        want_a
    );
    assert_eq!(
        s.group_digests(b.tenant(), pt).await.expect("groups"),
        want_b
    );
    // Rebuilt, and kept up by later applies.
    s.apply(&[patient(a.tenant(), "g0", 2)])
        .await
        .expect("apply");
    assert_eq!(
        s.group_digests(a.tenant(), pt).await.expect("groups"),
        fold_groups(&s.segment_digests(a.tenant(), pt).await.expect("segments"))
    );
    purge(&s).await;
}
