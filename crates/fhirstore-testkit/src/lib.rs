//! fhirstore-testkit: the conformance suite every `ResourceStorage` backend runs.
//!
//! Each check in [`checks`] is a `pub async fn` taking `&dyn ResourceStorage`; it makes its own
//! random tenant, so checks run in parallel against one shared database without seeing each
//! other. [`conformance_tests!`] stamps one `#[tokio::test]` per check into a backend's test
//! crate. Run it again with the store behind `Arc<dyn ResourceStorage>` to test the forwarding
//! impls as well.

pub mod checks;
pub mod fixtures;
#[cfg(feature = "postgres")]
pub mod postgres;
mod reindex;
pub mod secondary;
mod services;

pub use services::{
    loopback_port, require_services, service_unavailable, OwnRedis, OwnRedisCluster,
};

use fhirstore_core::{TenantContext, TenantId};

/// A context with every permission for a fresh random tenant.
pub fn random_tenant() -> TenantContext {
    let id = format!("t-{}", uuid::Uuid::new_v4().simple());
    TenantContext::full(TenantId::new(&id[..34]).expect("generated tenant ids are valid"))
}

/// Stamps one `#[tokio::test]` per conformance check.
///
/// `$factory` is an expression evaluating to a future of `Option<S>` where `S: ResourceStorage`;
/// `None` means the backend's service is unavailable and the test is skipped (the factory
/// decides, via [`service_unavailable`], whether that is allowed).
///
/// With `teardown = f`, the factory yields `Option<(S, T)>` instead, and `f(store, t)` (a
/// future) runs after each check passes: to stop workers and remove what the test left in a
/// shared service.
///
/// With `sequential`, one test runs every check in turn on one store: the factory yields
/// `Option<(S, T)>`, and `T` (a database of the test's own, say) is kept until the end.
#[macro_export]
macro_rules! conformance_tests {
    ($factory:expr) => {
        $crate::conformance_tests!(@list plain, $factory);
    };
    ($factory:expr, teardown = $teardown:path) => {
        $crate::conformance_tests!(@list with $teardown, $factory);
    };
    (sequential $factory:expr) => {
        $crate::conformance_tests!(@list sequential, $factory);
    };
    // The one list of checks; `checks_are_all_stamped` compares it with `checks`.
    (@list $($how:tt)*) => {
        $crate::conformance_tests!(@each $($how)*;
            create_assigns_id_and_meta,
            read_absent_is_not_found,
            update_writes_new_version,
            update_as_create,
            if_match_guards_updates,
            delete_writes_tombstone,
            update_after_delete_recreates,
            bad_input_changes_nothing,
            decimals_keep_their_precision,
            compartments_equal_the_equivalent_searches,
            history_all_scopes,
            history_paging_is_stable_under_writes,
            count_counts_live_resources,
            search_by_id_and_last_updated,
            counts_agree_with_the_matches,
            search_by_identifier,
            search_paging_covers_every_match_once,
            search_parameter_types,
            search_includes,
            search_sorting,
            search_modifiers_and_meta,
            search_composites,
            custom_search_parameters,
            custom_search_parameters_rejected,
            custom_date_parameter_over_several_values,
            synthea_transactions,
            r4_examples_round_trip,
            conditional_create,
            conditional_update,
            conditional_delete,
            transaction_is_atomic,
            transaction_resolves_urn_uuid_references,
            transaction_resolves_conditional_references,
            batch_entries_stand_alone,
            permissions_are_enforced,
            tenant_isolation_reads,
            tenant_isolation_writes,
            tenant_isolation_transactions,
            concurrent_updates_have_no_gaps,
            concurrent_if_match_has_one_winner,
            cancelled_writes_leave_store_usable,
        );
    };
    (@each plain, $factory:expr; $($check:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                let Some(store) = $factory.await else { return };
                $crate::checks::$check(&store).await;
            }
        )*
    };
    (@each sequential, $factory:expr; $($check:ident),* $(,)?) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn conformance_suite_in_sequence() {
            let Some((store, _keep)) = $factory.await else { return };
            $(
                $crate::checks::$check(&store).await;
            )*
        }
    };
    (@each with $teardown:path, $factory:expr; $($check:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                let Some((store, rest)) = $factory.await else { return };
                $crate::checks::$check(&store).await;
                $teardown(store, rest).await;
            }
        )*
    };
}

#[cfg(test)]
mod tests {
    /// A check written but missing from the macro's list would never run: the checks and the
    /// list must be the same.
    #[test]
    fn checks_are_all_stamped() {
        // A check is a `pub async fn` over one store, in one of the area files of `checks/`
        // (read from disk, so a new area file is never left out); the reindexing checks live
        // apart.
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = vec![src.join("reindex.rs")];
        for entry in std::fs::read_dir(src.join("checks")).expect("checks/") {
            files.push(entry.expect("an entry of checks/").path());
        }
        let sources: Vec<String> = files
            .iter()
            .map(|f| std::fs::read_to_string(f).expect("a check file"))
            .collect();
        let mut written: Vec<&str> = sources
            .iter()
            .flat_map(|s| s.lines())
            .filter_map(|l| l.strip_prefix("pub async fn "))
            .filter_map(|l| l.strip_suffix("(store: &dyn ResourceStorage) {"))
            .collect();
        let lib = include_str!("lib.rs");
        let start = lib
            .find(concat!("(@each $(", "$how)*;"))
            .expect("the macro's list");
        let list = &lib[start..];
        let list = &list[list.find(';').expect("list start") + 1..];
        let list = &list[..list.find(");").expect("list end")];
        let mut stamped: Vec<&str> = list
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        assert!(written.len() > 30, "checks found: {written:?}");
        written.sort_unstable();
        stamped.sort_unstable();
        assert_eq!(
            written, stamped,
            "checks written vs stamped into conformance_tests!"
        );
    }
}
