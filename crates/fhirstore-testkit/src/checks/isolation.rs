//! Permissions, and two tenants holding the same ids that never see each other.

use super::*;

/// A context without a permission cannot use it, and a denied call changes nothing.
pub async fn permissions_are_enforced(store: &dyn ResourceStorage) {
    let full = random_tenant();
    let w = store
        .create(&full, patient(), patient_body(None, "A"))
        .await
        .expect("seed");
    let pid = w.resource.key.id.clone();
    let ro = TenantContext::new(full.tenant().clone(), Permissions::READ_ONLY);
    store
        .read(&ro, patient(), &pid)
        .await
        .expect("read allowed");
    let denied = [
        store
            .create(&ro, patient(), patient_body(None, "B"))
            .await
            .err(),
        store
            .update(
                &ro,
                patient(),
                &pid,
                patient_body(Some(pid.as_str()), "B"),
                None,
            )
            .await
            .err(),
        store.delete(&ro, patient(), &pid).await.err(),
    ];
    for e in denied {
        assert!(matches!(e, Some(Error::TenantDenied(_))), "{e:?}");
    }
    let mut no_delete = Permissions::ALL;
    no_delete.delete = false;
    let nd = TenantContext::new(full.tenant().clone(), no_delete);
    assert!(matches!(
        store.delete(&nd, patient(), &pid).await,
        Err(Error::TenantDenied(_))
    ));
    let batch = store
        .batch(
            &ro,
            vec![WriteOp::Delete {
                resource_type: patient(),
                id: pid.clone(),
            }],
        )
        .await
        .expect("batch runs");
    assert!(matches!(
        batch[0].as_ref().map_err(Error::kind),
        Err(Error::TenantDenied(_))
    ));
    let no_read = TenantContext::new(
        full.tenant().clone(),
        Permissions {
            read: false,
            write: true,
            delete: true,
            admin: false,
        },
    );
    assert!(matches!(
        store.read(&no_read, patient(), &pid).await,
        Err(Error::TenantDenied(_))
    ));
    assert!(matches!(
        store
            .search(&no_read, &SearchQuery::all(Some(patient())))
            .await,
        Err(Error::TenantDenied(_))
    ));
    let r = store.read(&full, patient(), &pid).await.expect("unchanged");
    assert_eq!(r, w.resource);
}

/// Two tenants holding the same ids: every read path of one sees only its own data.
pub async fn tenant_isolation_reads(store: &dyn ResourceStorage) {
    let a = random_tenant();
    let b = random_tenant();
    let shared = id("shared");
    for (ctx, who) in [(&a, "A"), (&b, "B")] {
        store
            .update(
                ctx,
                patient(),
                &shared,
                with_identifier(patient_body(Some("shared"), who), "urn:mrn", "same"),
                None,
            )
            .await
            .expect("seed");
    }
    store
        .update(
            &b,
            patient(),
            &shared,
            with_identifier(patient_body(Some("shared"), "B2"), "urn:mrn", "same"),
            None,
        )
        .await
        .expect("b v2");
    put_patient(store, &b, &id("only-b"), "B").await;

    let ra = store.read(&a, patient(), &shared).await.expect("a read");
    assert_eq!((family(&ra), ra.version.get()), ("A", 1));
    assert_eq!(&ra.tenant, a.tenant());
    assert!(matches!(
        store.read(&a, patient(), &id("only-b")).await,
        Err(Error::NotFound(_))
    ));
    assert!(matches!(
        store
            .vread(&a, patient(), &shared, VersionId::new(2).expect("2"))
            .await,
        Err(Error::NotFound(_))
    ));
    for scope in [
        HistoryScope::System,
        HistoryScope::Type(patient()),
        HistoryScope::Instance(patient(), shared.clone()),
    ] {
        let h = all_history(store, &a, scope.clone(), 1).await;
        assert_eq!(h.len(), 1, "{scope:?}");
        assert!(h
            .iter()
            .all(|r| &r.tenant == a.tenant() && family(r) == "A"));
    }
    // B's history cursor used in A still yields only A's data.
    let mut req = HistoryRequest::new(HistoryScope::System);
    req.count = Some(1);
    let b_page = store.history(&b, &req).await.expect("b page");
    req.cursor = b_page.next_cursor;
    let a_with_b_cursor = store.history(&a, &req).await.expect("a page");
    assert!(a_with_b_cursor.entries.iter().all(|r| family(r) == "A"));

    for qs in [
        "_id=shared",
        "identifier=urn:mrn|same",
        "identifier=same",
        "_id=only-b",
        "",
    ] {
        let hits = all_matches(store, &a, query(Some(patient()), qs)).await;
        assert!(
            hits.iter()
                .all(|r| &r.tenant == a.tenant() && family(r) == "A"),
            "{qs}: {hits:?}"
        );
        // A system-level search knows only the parameters every resource has.
        if !qs.starts_with("identifier") {
            let sys = all_matches(store, &a, query(None, qs)).await;
            assert!(sys.iter().all(|r| family(r) == "A"), "system {qs}");
        }
    }
    let total = store
        .search(&a, &query(Some(patient()), "_total=accurate"))
        .await
        .expect("total");
    assert_eq!(total.total, Some(1));
    assert_eq!(store.count(&a, None).await.expect("count a"), 1);
    assert_eq!(store.count(&b, None).await.expect("count b"), 2);
}

/// Two tenants holding the same ids: no write path of one changes the other's data.
pub async fn tenant_isolation_writes(store: &dyn ResourceStorage) {
    let a = random_tenant();
    let b = random_tenant();
    let shared = id("shared");
    let mut b_state = None;
    for (ctx, who) in [(&a, "A"), (&b, "B")] {
        let w = store
            .update(
                ctx,
                patient(),
                &shared,
                with_identifier(patient_body(Some("shared"), who), "urn:mrn", "same"),
                None,
            )
            .await
            .expect("seed");
        b_state = Some(w.resource);
    }
    let b_state = b_state.expect("b seeded");

    // If-Match is checked against the caller's tenant's version only.
    put_patient(store, &a, &shared, "A2").await;
    store
        .update(
            &a,
            patient(),
            &shared,
            patient_body(Some("shared"), "A3"),
            VersionId::new(2),
        )
        .await
        .expect("a's own version");
    let crit = identifier_query("urn:mrn", "same");
    store
        .conditional_update(
            &b,
            patient(),
            &crit,
            with_identifier(patient_body(None, "B-cond"), "urn:mrn", "same"),
        )
        .await
        .expect("b conditional update finds only b's");
    store
        .delete(&a, patient(), &shared)
        .await
        .expect("a delete");
    let a_created = store
        .conditional_create(
            &a,
            patient(),
            &crit,
            with_identifier(patient_body(None, "A-new"), "urn:mrn", "same"),
        )
        .await
        .expect("a conditional create");
    assert_eq!(
        a_created.kind,
        WriteKind::Created,
        "b's match is invisible to a"
    );
    let d = store
        .conditional_delete(&a, patient(), &crit)
        .await
        .expect("a conditional delete");
    assert_eq!(d.deleted.len(), 1);

    let rb = store.read(&b, patient(), &shared).await.expect("b intact");
    assert_eq!(family(&rb), "B-cond");
    assert_eq!(
        rb.version.get(),
        2,
        "only b's own conditional update touched it"
    );
    let v1 = store
        .vread(&b, patient(), &shared, VersionId::FIRST)
        .await
        .expect("b v1");
    assert_eq!(v1, b_state);
    assert_eq!(store.count(&b, Some(patient())).await.expect("count"), 1);
    assert_eq!(
        all_history(store, &b, HistoryScope::System, 10).await.len(),
        2
    );
}

/// Transactions and batches of one tenant never read or change the other's data.
pub async fn tenant_isolation_transactions(store: &dyn ResourceStorage) {
    let a = random_tenant();
    let b = random_tenant();
    let shared = id("shared");
    store
        .update(
            &b,
            patient(),
            &shared,
            with_identifier(patient_body(Some("shared"), "B"), "urn:mrn", "t"),
            None,
        )
        .await
        .expect("seed b");
    let ops = vec![
        WriteOp::Delete {
            resource_type: patient(),
            id: shared.clone(),
        },
        WriteOp::Create {
            resource_type: patient(),
            resource: with_identifier(patient_body(None, "A"), "urn:mrn", "t"),
            if_none_exist: Some(identifier_query("urn:mrn", "t")),
            full_url: None,
        },
        WriteOp::ConditionalDelete {
            resource_type: patient(),
            criteria: query(Some(patient()), "_id=shared"),
        },
    ];
    let out = store.transaction(&a, ops).await.expect("a transaction");
    assert!(matches!(&out[0], OpOutcome::Deleted(d) if d.deleted.is_empty()));
    assert!(matches!(&out[1], OpOutcome::Written(w) if w.kind == WriteKind::Created));
    let batch = store
        .batch(
            &a,
            vec![WriteOp::Update {
                resource_type: patient(),
                id: shared.clone(),
                resource: patient_body(Some("shared"), "A"),
                if_match: Some(VersionId::FIRST),
            }],
        )
        .await
        .expect("batch");
    assert!(
        matches!(
            batch[0].as_ref().map_err(Error::kind),
            Err(Error::VersionConflict { current: 0, .. })
        ),
        "b's version 1 is not a's: {batch:?}"
    );
    let rb = store.read(&b, patient(), &shared).await.expect("b intact");
    assert_eq!((family(&rb), rb.version.get()), ("B", 1));
    assert_eq!(store.count(&b, None).await.expect("count"), 1);
}
