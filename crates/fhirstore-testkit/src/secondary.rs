//! Checks every [`Secondary`] runs: the version guard as a property over random change
//! sequences, agreement with the primary on every search the secondary claims (chosen from its
//! declared capabilities, never from a skip list), rebuild state and tenant isolation.

use std::collections::{BTreeMap, BTreeSet};

use fhirstore_core::digest::Digest;
use fhirstore_core::index;
use fhirstore_core::search::Handling;
use fhirstore_core::secondary::{Change, DigestView, Health, KeyState, Secondary, SegmentDigest};
use fhirstore_core::{
    format_instant, from_micros, Error, HistoryRequest, HistoryScope, LogicalId, ResourceKey,
    ResourceStorage, ResourceType, SearchQuery, StoredResource, TenantContext, TenantId, VersionId,
};
use serde_json::{json, Value};

use crate::random_tenant;

/// A small deterministic generator (splitmix64), so a failing seed can be replayed.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// Shuffles in place (Fisher-Yates).
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.below(i + 1));
        }
    }
}

fn rt(name: &str) -> ResourceType {
    ResourceType::new(name).expect("known resource type")
}

/// What a secondary must hold after a sequence of changes: the newest change per key.
#[derive(Default)]
struct Model {
    newest: BTreeMap<(TenantId, ResourceType, String), Change>,
}

impl Model {
    fn apply(&mut self, c: &Change) {
        let k = (c.tenant.clone(), c.key.resource_type, c.key.id.to_string());
        match self.newest.get(&k) {
            Some(held) if held.version >= c.version => {}
            _ => {
                self.newest.insert(k, c.clone());
            }
        }
    }

    fn of(&self, tenant: &TenantId, t: ResourceType) -> impl Iterator<Item = &Change> {
        let (tenant, t) = (tenant.clone(), t);
        self.newest
            .values()
            .filter(move |c| c.tenant == tenant && c.key.resource_type == t)
    }

    fn digest(&self, tenant: &TenantId, t: ResourceType) -> Digest {
        let mut d = Digest::default();
        self.of(tenant, t).for_each(|c| d.add(c.element_hash()));
        d
    }

    fn segments(&self, tenant: &TenantId, t: ResourceType) -> Vec<SegmentDigest> {
        let mut by: BTreeMap<u16, Digest> = BTreeMap::new();
        for c in self.of(tenant, t) {
            by.entry(c.segment()).or_default().add(c.element_hash());
        }
        by.into_iter()
            .map(|(segment, digest)| SegmentDigest { segment, digest })
            .collect()
    }

    fn keys(&self, tenant: &TenantId, t: ResourceType) -> Vec<KeyState> {
        let mut out: Vec<KeyState> = self
            .of(tenant, t)
            .map(|c| KeyState {
                id: c.key.id.clone(),
                version: c.version,
                e: c.element_hash(),
            })
            .collect();
        out.sort();
        out
    }
}

/// Asserts that the secondary holds exactly the model for these tenants and types: every key
/// reads back as its newest change, and root, segment digests and segment keys equal the model's.
async fn assert_holds(
    secondary: &dyn Secondary,
    model: &Model,
    tenants: &[TenantContext],
    types: &[ResourceType],
    what: &str,
) {
    for (tenant, t, id) in model.newest.keys() {
        let Some(ctx) = tenants.iter().find(|c| c.tenant() == tenant) else {
            continue;
        };
        let want = &model.newest[&(tenant.clone(), *t, id.clone())];
        let got = secondary
            .read(ctx, *t, &want.key.id)
            .await
            .expect("read")
            .unwrap_or_else(|| panic!("{what}: {t}/{id} missing"));
        assert_eq!(got.version, want.version, "{what}: {t}/{id} version");
        assert_eq!(
            got.deleted,
            want.content.is_none(),
            "{what}: {t}/{id} deleted"
        );
        assert_eq!(
            got.content,
            want.content.clone().unwrap_or(Value::Null),
            "{what}: {t}/{id} body"
        );
        assert_eq!(
            got.last_updated, want.last_updated,
            "{what}: {t}/{id} lastUpdated"
        );
    }
    for ctx in tenants {
        for t in types {
            let tenant = ctx.tenant();
            assert_eq!(
                secondary.root_digest(tenant, *t).await.expect("digest"),
                model.digest(tenant, *t),
                "{what}: root digest of {tenant}/{t}"
            );
            let segs = secondary
                .segment_digests(tenant, *t)
                .await
                .expect("segment digests");
            assert_eq!(segs, model.segments(tenant, *t), "{what}: segments of {t}");
            let groups = secondary
                .group_digests(tenant, *t)
                .await
                .expect("group digests");
            assert_eq!(
                groups,
                fhirstore_core::secondary::fold_groups(&segs),
                "{what}: groups of {t}"
            );
            let some: Vec<u16> = groups.iter().step_by(2).map(|g| g.group).collect();
            assert_eq!(
                secondary
                    .segment_digests_in(tenant, *t, &some)
                    .await
                    .expect("segments by group"),
                fhirstore_core::secondary::in_groups(segs.clone(), &some),
                "{what}: segments by group of {t}"
            );
            let numbers: Vec<u16> = segs.iter().map(|s| s.segment).collect();
            assert_eq!(
                secondary
                    .segment_keys(tenant, *t, &numbers)
                    .await
                    .expect("segment keys"),
                model.keys(tenant, *t),
                "{what}: segment keys of {t}"
            );
        }
    }
}

/// Random versions of a few keys in two tenants (the same ids in both, so a leak shows): each
/// version a body or a tombstone, with `lastUpdated` rising with the version.
fn random_history(rng: &mut Rng, tenants: &[TenantContext], types: &[ResourceType]) -> Vec<Change> {
    let mut out = Vec::new();
    for ctx in tenants {
        for t in types {
            for k in 0..6 {
                let id = LogicalId::new(format!("k{k}")).expect("id");
                let versions = 1 + rng.below(5) as u64;
                for v in 1..=versions {
                    let body = (rng.below(4) != 0).then(|| {
                        json!({
                            "resourceType": t.as_str(), "id": id.as_str(),
                            "meta": {"versionId": v.to_string()},
                            "identifier": [{"system": "urn:s", "value": format!("{}-{v}", rng.below(3))}],
                        })
                    });
                    out.push(Change {
                        tenant: ctx.tenant().clone(),
                        key: ResourceKey {
                            resource_type: *t,
                            id: id.clone(),
                        },
                        version: VersionId::new(v).expect("version"),
                        last_updated: from_micros(1_700_000_000_000_000 + (v as i64) * 1_000),
                        content: body,
                    });
                }
            }
        }
    }
    out
}

/// The version guard as a property: random sequences of changes, with duplicates, any order,
/// tombstones and random batch sizes, leave exactly the newest version per key, with digests
/// equal to the model's; replaying everything changes nothing.
pub async fn secondary_version_guard(secondary: &dyn Secondary) {
    let tenants = [random_tenant(), random_tenant()];
    let types = [rt("Patient"), rt("Observation")];
    secondary.mark_built().await.expect("mark built");
    for seed in 0..12u64 {
        let mut rng = Rng::new(seed);
        // Fresh ids per round: each round starts from nothing.
        for ctx in &tenants {
            secondary.clear(ctx.tenant()).await.expect("clear");
        }
        let history = random_history(&mut rng, &tenants, &types);
        let mut sequence: Vec<Change> = history
            .iter()
            .filter(|_| rng.below(5) != 0)
            .cloned()
            .collect();
        let dups: Vec<Change> = sequence
            .iter()
            .filter(|_| rng.below(3) == 0)
            .cloned()
            .collect();
        sequence.extend(dups);
        rng.shuffle(&mut sequence);
        let mut model = Model::default();
        sequence.iter().for_each(|c| model.apply(c));
        let mut applied = 0;
        let mut rest = sequence.as_slice();
        while !rest.is_empty() {
            let n = (1 + rng.below(20)).min(rest.len());
            let (batch, tail) = rest.split_at(n);
            let r = secondary.apply(batch).await.expect("apply");
            assert_eq!(
                r.applied + r.skipped,
                n as u64,
                "seed {seed}: every change counted"
            );
            applied += r.applied;
            rest = tail;
        }
        assert!(applied >= model.newest.len() as u64, "seed {seed}");
        assert_holds(secondary, &model, &tenants, &types, &format!("seed {seed}")).await;

        // Replaying the whole sequence, reversed, is a no-op.
        let mut replay = sequence.clone();
        replay.reverse();
        let r = secondary.apply(&replay).await.expect("replay");
        assert_eq!(r.applied, 0, "seed {seed}: a replay moved something");
        assert_holds(
            secondary,
            &model,
            &tenants,
            &types,
            &format!("seed {seed} replay"),
        )
        .await;
    }
}

/// A secondary that has not been built reports it and refuses to answer; once built it
/// answers; `clear` removes one tenant only, and nothing of one tenant is visible to another.
pub async fn secondary_rebuild_and_isolation(secondary: &dyn Secondary) {
    let (a, b) = (random_tenant(), random_tenant());
    let p = rt("Patient");
    let id = LogicalId::new("same").expect("id");
    assert!(
        matches!(secondary.health().await, Health::NeedsRebuild(_)),
        "a new secondary must ask to be rebuilt"
    );
    assert!(
        secondary.read(&a, p, &id).await.is_err(),
        "an unbuilt secondary answered a read"
    );
    let change = |ctx: &TenantContext, family: &str| Change {
        tenant: ctx.tenant().clone(),
        key: ResourceKey {
            resource_type: p,
            id: id.clone(),
        },
        version: VersionId::FIRST,
        last_updated: from_micros(1_700_000_000_000_000),
        content: Some(
            json!({"resourceType": "Patient", "id": "same", "name": [{"family": family}]}),
        ),
    };
    secondary
        .apply(&[change(&a, "Alpha")])
        .await
        .expect("apply while unbuilt");
    secondary.mark_built().await.expect("mark built");
    assert_eq!(secondary.health().await, Health::Healthy);

    // B has nothing until it is given something, then only its own.
    assert_eq!(secondary.read(&b, p, &id).await.expect("read b"), None);
    let q = |qs: &str| SearchQuery::parse(Some(p), qs, Handling::Strict).expect("query");
    let page = secondary
        .search(&b, &q("_id=same"))
        .await
        .expect("search b");
    assert!(page.matches.is_empty(), "B sees A's resource");
    secondary
        .apply(&[change(&b, "Beta")])
        .await
        .expect("apply b");
    let got = secondary
        .read(&b, p, &id)
        .await
        .expect("read")
        .expect("b's");
    assert_eq!(got.content["name"][0]["family"], "Beta");
    assert_eq!(got.tenant, *b.tenant());
    let page = secondary
        .search(&a, &q("_id=same"))
        .await
        .expect("search a");
    assert_eq!(page.matches.len(), 1);
    assert_eq!(page.matches[0].content["name"][0]["family"], "Alpha");

    secondary.clear(a.tenant()).await.expect("clear a");
    assert_eq!(secondary.read(&a, p, &id).await.expect("read a"), None);
    assert_eq!(
        secondary.root_digest(a.tenant(), p).await.expect("digest"),
        Digest::default()
    );
    let kept = secondary
        .read(&b, p, &id)
        .await
        .expect("read b")
        .expect("b kept");
    assert_eq!(kept.content["name"][0]["family"], "Beta");
    assert_eq!(
        secondary
            .root_digest(b.tenant(), p)
            .await
            .expect("digest")
            .count,
        1
    );
}

/// Percent-encodes a query value, keeping the characters FHIR search syntax needs readable.
fn enc(v: &str) -> String {
    let mut out = String::new();
    for b in v.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'|' | b'/' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Queries made from the data itself: for each sampled resource, each kind of index entry it
/// has becomes a few queries (plain and with modifiers), plus `_id`, `_lastUpdated`, pairs of
/// criteria and the search features a secondary may or may not answer.
fn queries_from(resources: &[StoredResource]) -> Vec<(ResourceType, String)> {
    let mut out = BTreeSet::new();
    let mut per_type: BTreeMap<ResourceType, usize> = BTreeMap::new();
    for r in resources.iter().filter(|r| !r.deleted) {
        let t = r.key.resource_type;
        let n = per_type.entry(t).or_default();
        *n += 1;
        if *n > 4 {
            continue;
        }
        let mut q = |s: String| {
            out.insert((t, s));
        };
        let e = index::extract(&r.content);
        let mut firsts = Vec::new();
        for tok in e.tokens.iter().take(6) {
            let p = tok.param;
            if !tok.code.is_empty() {
                q(format!("{p}={}", enc(&tok.code)));
                q(format!("{p}:not={}", enc(&tok.code)));
                if tok.system.is_empty() {
                    q(format!("{p}=|{}", enc(&tok.code)));
                } else {
                    q(format!("{p}={}|{}", enc(&tok.system), enc(&tok.code)));
                    firsts.push(format!("{p}={}|{}", enc(&tok.system), enc(&tok.code)));
                }
            }
            if !tok.system.is_empty() {
                q(format!("{p}={}|", enc(&tok.system)));
            }
        }
        for s in e.strings.iter().take(4) {
            let p = s.param;
            let prefix: String = s.exact.chars().take(3).collect();
            q(format!("{p}={}", enc(&prefix)));
            q(format!("{p}={}", enc(&s.exact.to_uppercase())));
            q(format!("{p}:exact={}", enc(&s.exact)));
            let middle: String = s.folded.chars().skip(1).take(3).collect();
            q(format!("{p}:contains={}", enc(&middle)));
        }
        for rf in e.references.iter().take(4) {
            let p = rf.param;
            if !rf.target_id.is_empty() && !rf.target_type.is_empty() {
                q(format!("{p}={}/{}", rf.target_type, enc(&rf.target_id)));
                q(format!("{p}={}", enc(&rf.target_id)));
                q(format!("{p}:{}={}", rf.target_type, enc(&rf.target_id)));
                firsts.push(format!("{p}={}/{}", rf.target_type, enc(&rf.target_id)));
            } else {
                q(format!("{p}={}", enc(&rf.url)));
            }
        }
        for u in e.uris.iter().take(2) {
            q(format!("{}={}", u.param, enc(&u.uri)));
            q(format!("{}:below={}", u.param, enc(&u.uri)));
        }
        for d in e.dates.iter().take(2) {
            let at = enc(&format_instant(from_micros(d.low)));
            q(format!("{}=ge{at}", d.param));
            q(format!("{}=lt{at}", d.param));
        }
        for n in e.numbers.iter().chain(&e.quantities).take(2) {
            q(format!("{}=gt{}", n.param, n.value));
        }
        if let [a, b, ..] = firsts.as_slice() {
            q(format!("{a}&{b}"));
        }
        let lu = enc(&format_instant(r.last_updated));
        q(format!("_id={}", r.key.id));
        q(format!("_id={},nope", r.key.id));
        q(format!("_lastUpdated=ge{lu}"));
        q(format!("_lastUpdated=lt{lu}"));
        q(format!("_lastUpdated=ne{lu}"));
        q(format!("_lastUpdated={lu}"));
        q(format!("_id={}&_sort=-_lastUpdated", r.key.id));
        q(format!("_id:missing=false&_id={}", r.key.id));
        q(String::new());
        q("_summary=count".to_owned());
    }
    out.into_iter().collect()
}

/// Every page of a search, with the ids in order; a failure is returned, not raised.
async fn all_pages<F, Fut>(
    mut query: SearchQuery,
    mut run: F,
) -> fhirstore_core::Result<(Vec<StoredResource>, Option<u64>)>
where
    F: FnMut(SearchQuery) -> Fut,
    Fut: std::future::Future<Output = fhirstore_core::Result<fhirstore_core::SearchPage>>,
{
    let mut out = Vec::new();
    let mut total = None;
    for _ in 0..1000 {
        let page = run(query.clone()).await?;
        total = total.or(page.total);
        out.extend(page.matches);
        match page.next_cursor {
            Some(c) => query.cursor = Some(c),
            None => return Ok((out, total)),
        }
    }
    panic!("more than 1000 pages");
}

fn by_id(rs: &[StoredResource]) -> Vec<(String, u64, &Value)> {
    let mut v: Vec<_> = rs
        .iter()
        .map(|r| (r.key.id.to_string(), r.version.get(), &r.content))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Loads clinical data into the primary (the Synthea bundles, then updates and deletes),
/// feeds every version to the secondary in a shuffled order, and compares every query made
/// from the data: each one the secondary's capabilities claim must return what the primary
/// returns (ids, versions, bodies, totals), page by page; each one they do not claim must be
/// refused as unsupported. Then checks the secondary's digests equal the primary's.
pub async fn secondary_search_agrees(primary: &dyn ResourceStorage, secondary: &dyn Secondary) {
    let (ctx, other) = (random_tenant(), random_tenant());
    for (file, bundle) in crate::fixtures::synthea_bundles().into_iter().take(2) {
        let ops = fhirstore_core::bundle::write_ops(&bundle).expect("writes");
        for c in [&ctx, &other] {
            primary
                .transaction(c, ops.clone())
                .await
                .unwrap_or_else(|e| panic!("{file}: {e}"));
        }
    }
    // Some history: every fifth Observation updated, every seventh Condition deleted.
    for (i, r) in live(primary, &ctx, "Observation").await.iter().enumerate() {
        if i % 5 == 0 {
            let mut body = r.content.clone();
            body["status"] = json!("amended");
            primary
                .update(&ctx, r.key.resource_type, &r.key.id, body, None)
                .await
                .expect("update");
        }
    }
    for (i, r) in live(primary, &ctx, "Condition").await.iter().enumerate() {
        if i % 7 == 0 {
            primary
                .delete(&ctx, r.key.resource_type, &r.key.id)
                .await
                .expect("delete");
        }
    }

    let mut changes = Vec::new();
    for c in [&ctx, &other] {
        let mut req = HistoryRequest::new(HistoryScope::System);
        req.count = Some(1000);
        loop {
            let page = primary.history(c, &req).await.expect("history");
            changes.extend(page.entries.iter().map(Change::of));
            match page.next_cursor {
                Some(cur) => req.cursor = Some(cur),
                None => break,
            }
        }
    }
    let mut rng = Rng::new(7);
    rng.shuffle(&mut changes);
    for batch in changes.chunks(250) {
        secondary.apply(batch).await.expect("apply");
    }
    secondary.flush().await.expect("flush");
    secondary.mark_built().await.expect("mark built");

    let caps = secondary.capabilities();
    let mut samples = Vec::new();
    for t in [
        "Patient",
        "Observation",
        "Condition",
        "Encounter",
        "Procedure",
        "Immunization",
        "MedicationRequest",
        "Organization",
        "Practitioner",
        "Claim",
    ] {
        samples.extend(live(primary, &ctx, t).await.into_iter().step_by(7).take(4));
    }
    let queries = queries_from(&samples);
    let (mut claimed, mut refused, mut nonempty) = (0, 0, 0);
    let mut failures = Vec::new();
    for (t, qs) in &queries {
        let with_paging = if qs.is_empty() {
            "_count=7&_total=accurate".to_owned()
        } else {
            format!("{qs}&_count=7&_total=accurate")
        };
        let Ok(query) = SearchQuery::parse(Some(*t), &with_paging, Handling::Strict) else {
            continue;
        };
        if !caps.can_search(&query) {
            refused += 1;
            match secondary.search(&ctx, &query).await {
                Err(Error::Unsupported(_)) => {}
                other => failures.push(format!(
                    "{t}?{qs}: not claimed, yet answered {:?}",
                    other.map(|p| p.matches.len())
                )),
            }
            continue;
        }
        claimed += 1;
        for c in [&ctx, &other] {
            let want = all_pages(
                query.clone(),
                |q| async move { primary.search(c, &q).await },
            )
            .await;
            let got = all_pages(
                query.clone(),
                |q| async move { secondary.search(c, &q).await },
            )
            .await;
            match (want, got) {
                (Ok((w, wt)), Ok((g, gt))) => {
                    if c == &ctx && !w.is_empty() {
                        nonempty += 1;
                    }
                    if by_id(&w) != by_id(&g) || wt != gt {
                        failures.push(format!(
                            "{t}?{qs}: primary {:?} (total {wt:?}), {} {:?} (total {gt:?})",
                            by_id(&w).iter().map(|x| x.0.clone()).collect::<Vec<_>>(),
                            secondary.name(),
                            by_id(&g).iter().map(|x| x.0.clone()).collect::<Vec<_>>(),
                        ));
                    }
                    if g.iter().any(|r| r.tenant != *c.tenant()) {
                        failures.push(format!("{t}?{qs}: another tenant's resource"));
                    }
                }
                (w, g) => failures.push(format!(
                    "{t}?{qs}: primary {:?}, secondary {:?}",
                    w.err(),
                    g.err()
                )),
            }
        }
    }
    eprintln!(
        "{}: {claimed} queries claimed ({nonempty} with matches), {refused} refused, {} failures",
        secondary.name(),
        failures.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(
        claimed >= 40 && nonempty * 2 >= claimed,
        "too few claimed queries to mean anything: {claimed}, {nonempty} with matches"
    );

    // Same state, same digests, type by type.
    let mut types: BTreeSet<ResourceType> = BTreeSet::new();
    types.extend(changes.iter().map(|c| c.key.resource_type));
    for c in [&ctx, &other] {
        let mut model = Model::default();
        changes
            .iter()
            .filter(|ch| ch.tenant == *c.tenant())
            .for_each(|ch| model.apply(ch));
        for t in &types {
            assert_eq!(
                secondary.root_digest(c.tenant(), *t).await.expect("digest"),
                model.digest(c.tenant(), *t),
                "digest of {t}"
            );
        }
    }
}

async fn live(store: &dyn ResourceStorage, ctx: &TenantContext, t: &str) -> Vec<StoredResource> {
    let q = SearchQuery::parse(Some(rt(t)), "_count=1000", Handling::Strict).expect("query");
    store.search(ctx, &q).await.expect("search").matches
}

/// Stamps one `#[tokio::test]` per secondary check. `$secondary` makes a new, unbuilt secondary
/// (or `None` when its service is unavailable); `$primary` makes the primary the search check
/// compares against; the optional `$cleanup` (an async fn taking `&S`) runs after each check
/// passes, for backends whose data outlives the test.
#[macro_export]
macro_rules! secondary_tests {
    ($secondary:expr, $primary:expr) => {
        $crate::secondary_tests!($secondary, $primary, |_| async {});
    };
    ($secondary:expr, $primary:expr, $cleanup:expr) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn secondary_version_guard() {
            let Some(s) = $secondary.await else { return };
            $crate::secondary::secondary_version_guard(&s).await;
            ($cleanup)(&s).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn secondary_rebuild_and_isolation() {
            let Some(s) = $secondary.await else { return };
            $crate::secondary::secondary_rebuild_and_isolation(&s).await;
            ($cleanup)(&s).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn secondary_search_agrees() {
            let Some(s) = $secondary.await else { return };
            let Some(p) = $primary.await else { return };
            $crate::secondary::secondary_search_agrees(&p, &s).await;
            ($cleanup)(&s).await;
        }
    };
}

/// A secondary wrapper that fails on demand, for sync tests: while `down`, every call fails
/// as an unreachable server would (a temporary error; health `Unavailable`); a change of the
/// resource id in `reject` fails for good. It also records how many `apply` calls overlap.
pub struct Flaky {
    inner: std::sync::Arc<dyn Secondary>,
    /// Fail everything, temporarily.
    pub down: std::sync::atomic::AtomicBool,
    /// Reject changes of this id for good.
    pub reject: parking_lot::Mutex<Option<String>>,
    in_flight: std::sync::atomic::AtomicUsize,
    /// The most `apply` calls seen running at once.
    pub max_in_flight: std::sync::atomic::AtomicUsize,
}

impl Flaky {
    /// Wraps a secondary, up.
    pub fn new(inner: std::sync::Arc<dyn Secondary>) -> Self {
        Flaky {
            inner,
            down: Default::default(),
            reject: Default::default(),
            in_flight: Default::default(),
            max_in_flight: Default::default(),
        }
    }

    /// Takes it down or brings it back.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, std::sync::atomic::Ordering::SeqCst);
    }

    fn check(&self) -> fhirstore_core::Result<()> {
        if self.down.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(Error::backend_msg("injected outage", true));
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl Secondary for Flaky {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn capabilities(&self) -> fhirstore_core::Capabilities {
        self.inner.capabilities()
    }

    async fn apply(
        &self,
        changes: &[Change],
    ) -> fhirstore_core::Result<fhirstore_core::secondary::Applied> {
        use std::sync::atomic::Ordering::SeqCst;
        self.check()?;
        if let Some(id) = self.reject.lock().clone() {
            if changes.iter().any(|c| c.key.id.as_str() == id) {
                return Err(Error::InvalidResource(format!(
                    "injected rejection of {id}"
                )));
            }
        }
        let now = self.in_flight.fetch_add(1, SeqCst) + 1;
        self.max_in_flight.fetch_max(now, SeqCst);
        let r = self.inner.apply(changes).await;
        self.in_flight.fetch_sub(1, SeqCst);
        r
    }

    async fn repair(
        &self,
        changes: &[Change],
    ) -> fhirstore_core::Result<fhirstore_core::secondary::Applied> {
        self.check()?;
        self.inner.repair(changes).await
    }

    async fn read(
        &self,
        ctx: &TenantContext,
        resource_type: ResourceType,
        id: &LogicalId,
    ) -> fhirstore_core::Result<Option<StoredResource>> {
        self.check()?;
        self.inner.read(ctx, resource_type, id).await
    }

    async fn search(
        &self,
        ctx: &TenantContext,
        query: &SearchQuery,
    ) -> fhirstore_core::Result<fhirstore_core::SearchPage> {
        self.check()?;
        self.inner.search(ctx, query).await
    }

    async fn clear(&self, tenant: &TenantId) -> fhirstore_core::Result<()> {
        self.check()?;
        self.inner.clear(tenant).await
    }

    async fn mark_built(&self) -> fhirstore_core::Result<()> {
        self.check()?;
        self.inner.mark_built().await
    }

    async fn health(&self) -> Health {
        if self.down.load(std::sync::atomic::Ordering::SeqCst) {
            return Health::Unavailable("injected outage".to_owned());
        }
        self.inner.health().await
    }

    async fn flush(&self) -> fhirstore_core::Result<()> {
        self.check()?;
        self.inner.flush().await
    }
}

#[async_trait::async_trait]
impl DigestView for Flaky {
    async fn root_digest(
        &self,
        tenant: &TenantId,
        resource_type: ResourceType,
    ) -> fhirstore_core::Result<Digest> {
        self.check()?;
        self.inner.root_digest(tenant, resource_type).await
    }

    async fn segment_digests(
        &self,
        tenant: &TenantId,
        resource_type: ResourceType,
    ) -> fhirstore_core::Result<Vec<SegmentDigest>> {
        self.check()?;
        self.inner.segment_digests(tenant, resource_type).await
    }

    async fn group_digests(
        &self,
        tenant: &TenantId,
        resource_type: ResourceType,
    ) -> fhirstore_core::Result<Vec<fhirstore_core::secondary::GroupDigest>> {
        self.check()?;
        self.inner.group_digests(tenant, resource_type).await
    }

    async fn segment_digests_in(
        &self,
        tenant: &TenantId,
        resource_type: ResourceType,
        groups: &[u16],
    ) -> fhirstore_core::Result<Vec<SegmentDigest>> {
        self.check()?;
        self.inner
            .segment_digests_in(tenant, resource_type, groups)
            .await
    }

    async fn segment_keys(
        &self,
        tenant: &TenantId,
        resource_type: ResourceType,
        segments: &[u16],
    ) -> fhirstore_core::Result<Vec<KeyState>> {
        self.check()?;
        self.inner
            .segment_keys(tenant, resource_type, segments)
            .await
    }
}

/// Asserts that a secondary holds exactly the primary's current state for these tenants:
/// every key (tombstones included) at the primary's version and body, and equal digests for
/// every type the tenants have.
pub async fn assert_mirrors<P>(primary: &P, secondary: &dyn Secondary, tenants: &[TenantContext])
where
    P: fhirstore_core::changelog::ChangeLog + ?Sized,
{
    let mut model = Model::default();
    for r in primary_state(primary).await {
        if tenants.iter().any(|t| t.tenant() == &r.tenant) {
            model.apply(&Change::of(&r));
        }
    }
    let types: BTreeSet<ResourceType> = model.newest.keys().map(|(_, t, _)| *t).collect();
    let types: Vec<ResourceType> = types.into_iter().collect();
    assert!(!model.newest.is_empty(), "nothing to compare");
    assert_holds(secondary, &model, tenants, &types, secondary.name()).await;
}

/// The primary's current version (or tombstone) of every resource of every tenant, from its
/// change log's snapshot.
pub async fn primary_state<P>(primary: &P) -> Vec<StoredResource>
where
    P: fhirstore_core::changelog::ChangeLog + ?Sized,
{
    let mut out: Vec<StoredResource> = Vec::new();
    loop {
        let after = out
            .last()
            .map(|r| (r.tenant.clone(), r.key.resource_type, r.key.id.clone()));
        let rows = primary
            .snapshot(after.as_ref(), 1000)
            .await
            .expect("snapshot");
        if rows.is_empty() {
            return out;
        }
        out.extend(rows);
    }
}
