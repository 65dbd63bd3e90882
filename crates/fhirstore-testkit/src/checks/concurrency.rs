//! Concurrent writers, racing `If-Match`, and write futures dropped mid-flight.

use super::*;

/// 32 concurrent writers × 50 updates to one resource, no If-Match: every update lands, as
/// versions 2..=1601 with no gaps and no duplicates.
pub async fn concurrent_updates_have_no_gaps(store: &dyn ResourceStorage) {
    let ctx = random_tenant();
    let pid = id("hot");
    put_patient(store, &ctx, &pid, "w0").await;
    let writers = (0..32).map(|w| {
        let ctx = &ctx;
        let pid = &pid;
        async move {
            for i in 0..50 {
                store
                    .update(
                        ctx,
                        patient(),
                        pid,
                        patient_body(Some("hot"), &format!("w{w}-{i}")),
                        None,
                    )
                    .await
                    .expect("concurrent update");
            }
        }
    });
    futures::future::join_all(writers).await;
    let r = store.read(&ctx, patient(), &pid).await.expect("read");
    assert_eq!(r.version.get(), 1601);
    let h = all_history(
        store,
        &ctx,
        HistoryScope::Instance(patient(), pid.clone()),
        1000,
    )
    .await;
    let versions: Vec<u64> = h.iter().map(|r| r.version.get()).collect();
    let want: Vec<u64> = (1..=1601).rev().collect();
    assert_eq!(
        versions, want,
        "history is every version, newest first, no gaps"
    );
}

/// Write futures dropped at every stage (before, during and after their transaction) leave the
/// store whole and usable, as a client disconnecting mid-request does: each transaction lands
/// completely or not at all, later writes succeed, and version histories have no gaps.
pub async fn cancelled_writes_leave_store_usable(store: &dyn ResourceStorage) {
    use futures::FutureExt as _;
    let ctx = random_tenant();
    let hot: Vec<LogicalId> = (0..4).map(|i| id(&format!("hot{i}"))).collect();
    for p in &hot {
        put_patient(store, &ctx, p, "start").await;
    }
    for k in 0..80usize {
        let update = store.update(
            &ctx,
            patient(),
            &hot[k % hot.len()],
            patient_body(Some(hot[k % hot.len()].as_str()), &format!("c{k}")),
            None,
        );
        let pair = store.transaction(
            &ctx,
            ["a", "b"]
                .iter()
                .map(|side| WriteOp::Update {
                    resource_type: patient(),
                    id: id(&format!("{side}{k}")),
                    resource: patient_body(Some(&format!("{side}{k}")), "pair"),
                    if_match: None,
                })
                .collect(),
        );
        let mut both = Box::pin(futures::future::join(update, pair));
        // Polled a different number of times each round, so the drop lands at every stage.
        for _ in 0..k % 9 {
            if futures::poll!(both.as_mut()).is_ready() {
                break;
            }
            tokio::task::yield_now().await;
        }
        drop(both);
        // Some rounds also drop a future that was never polled, or polled only once.
        if k % 5 == 0 {
            let _ = store
                .delete(&ctx, patient(), &hot[(k + 1) % hot.len()])
                .now_or_never();
        }
    }
    for (i, p) in hot.iter().enumerate() {
        store
            .update(
                &ctx,
                patient(),
                p,
                patient_body(Some(p.as_str()), &format!("after{i}")),
                None,
            )
            .await
            .unwrap_or_else(|e| panic!("a write after cancelled writes failed: {e}"));
    }
    let mut q = query(Some(patient()), "family=pair");
    q.count = Some(1000);
    // One page is one statement, so one snapshot: a pair is seen whole or not at all.
    let page = store.search(&ctx, &q).await.expect("search pairs");
    assert!(page.next_cursor.is_none());
    let mut seen: HashMap<String, u32> = HashMap::new();
    for r in &page.matches {
        *seen.entry(r.key.id.as_str()[1..].to_owned()).or_default() += 1;
    }
    for (k, n) in &seen {
        assert_eq!(*n, 2, "transaction {k} landed in part");
    }
    for p in &hot {
        let h = all_history(
            store,
            &ctx,
            HistoryScope::Instance(patient(), p.clone()),
            1000,
        )
        .await;
        let versions: Vec<u64> = h.iter().map(|r| r.version.get()).collect();
        let want: Vec<u64> = (1..=versions.len() as u64).rev().collect();
        assert_eq!(versions, want, "history of {p} has gaps");
    }
}

/// 32 concurrent writers with the same If-Match: exactly one wins, the rest conflict.
pub async fn concurrent_if_match_has_one_winner(store: &dyn ResourceStorage) {
    let ctx = random_tenant();
    let pid = id("contested");
    put_patient(store, &ctx, &pid, "start").await;
    let racers = (0..32).map(|w| {
        let ctx = &ctx;
        let pid = &pid;
        async move {
            store
                .update(
                    ctx,
                    patient(),
                    pid,
                    patient_body(Some("contested"), &format!("racer{w}")),
                    Some(VersionId::FIRST),
                )
                .await
        }
    });
    let results = futures::future::join_all(racers).await;
    let wins = results.iter().filter(|r| r.is_ok()).count();
    let conflicts = results
        .iter()
        .filter(|r| matches!(r, Err(Error::VersionConflict { .. })))
        .count();
    assert_eq!((wins, conflicts), (1, 31), "{results:?}");
    let r = store.read(&ctx, patient(), &pid).await.expect("read");
    assert_eq!(r.version.get(), 2);
}
