//! History at every scope, and paging that holds still under writes.

use super::*;

/// History at instance, type and system scope: newest first, tombstones included, `_since`
/// honoured, and paging returns every version exactly once.
pub async fn history_all_scopes(store: &dyn ResourceStorage) {
    let ctx = random_tenant();
    let a = id("a");
    put_patient(store, &ctx, &a, "A1").await;
    let obs = store
        .create(
            &ctx,
            rt("Observation"),
            json!({"resourceType": "Observation", "status": "final",
                   "code": {"text": "x"}}),
        )
        .await
        .expect("obs");
    let a2 = put_patient(store, &ctx, &a, "A2").await;
    store.delete(&ctx, patient(), &a).await.expect("delete a");
    put_patient(store, &ctx, &id("b"), "B1").await;

    let inst = all_history(store, &ctx, HistoryScope::Instance(patient(), a.clone()), 2).await;
    let versions: Vec<u64> = inst.iter().map(|r| r.version.get()).collect();
    assert_eq!(versions, vec![3, 2, 1]);
    assert!(inst[0].deleted && !inst[1].deleted);
    assert_eq!(family(&inst[1]), "A2");

    let ty = all_history(store, &ctx, HistoryScope::Type(patient()), 2).await;
    let keys: Vec<(String, u64)> = ty
        .iter()
        .map(|r| (r.key.id.to_string(), r.version.get()))
        .collect();
    let want: Vec<(String, u64)> = [("b", 1), ("a", 3), ("a", 2), ("a", 1)]
        .iter()
        .map(|(i, v)| (i.to_string(), *v))
        .collect();
    assert_eq!(keys, want);

    let sys = all_history(store, &ctx, HistoryScope::System, 3).await;
    assert_eq!(sys.len(), 5);
    assert_eq!(
        sys[3].key, obs.resource.key,
        "system history interleaves types by time"
    );

    let mut since = HistoryRequest::new(HistoryScope::System);
    since.since = Some(a2.resource.last_updated);
    let recent = store.history(&ctx, &since).await.expect("since");
    assert!(
        recent.entries.len() >= 3,
        "a2, the delete and b1 are at or after a2"
    );
    assert!(recent
        .entries
        .iter()
        .all(|r| r.last_updated >= a2.resource.last_updated));
    assert!(!recent
        .entries
        .iter()
        .any(|r| r.key == obs.resource.key && r.last_updated < a2.resource.last_updated));
}

/// Writes made while paging through history never shift later pages: every version that existed
/// when paging began is returned exactly once.
pub async fn history_paging_is_stable_under_writes(store: &dyn ResourceStorage) {
    let ctx = random_tenant();
    for i in 0..12 {
        store
            .create(&ctx, patient(), patient_body(None, &format!("P{i}")))
            .await
            .expect("seed");
    }
    let before: HashSet<(String, u64)> =
        all_history(store, &ctx, HistoryScope::Type(patient()), 100)
            .await
            .into_iter()
            .map(|r| (r.key.id.to_string(), r.version.get()))
            .collect();
    let mut req = HistoryRequest::new(HistoryScope::Type(patient()));
    req.count = Some(5);
    let mut seen = Vec::new();
    let mut page_no = 0;
    loop {
        let p = store.history(&ctx, &req).await.expect("page");
        seen.extend(
            p.entries
                .iter()
                .map(|r| (r.key.id.to_string(), r.version.get())),
        );
        // Interleave writes with paging.
        store
            .create(
                &ctx,
                patient(),
                patient_body(None, &format!("new{page_no}")),
            )
            .await
            .expect("concurrent write");
        page_no += 1;
        match p.next_cursor {
            Some(c) => req.cursor = Some(c),
            None => break,
        }
    }
    let unique: HashSet<_> = seen.iter().cloned().collect();
    assert_eq!(unique.len(), seen.len(), "no version returned twice");
    assert_eq!(
        unique, before,
        "exactly the versions that existed when paging began"
    );
}
