//! Whether a missing service skips a test or fails it.

/// True when `FHIRSTORE_REQUIRE_SERVICES=1`: CI sets it, so a missing database fails the run
/// instead of silently skipping half the suite.
pub fn require_services() -> bool {
    std::env::var("FHIRSTORE_REQUIRE_SERVICES").is_ok_and(|v| v == "1")
}

/// Reports that `service` could not be reached: panics when services are required, otherwise
/// prints a skip notice and returns `None`.
pub fn service_unavailable<T>(service: &str, err: impl std::fmt::Display) -> Option<T> {
    if require_services() {
        panic!("{service} is required (FHIRSTORE_REQUIRE_SERVICES=1) but unavailable: {err}");
    }
    eprintln!(
        "SKIP: {service} unavailable ({err}); set FHIRSTORE_REQUIRE_SERVICES=1 to fail instead"
    );
    None
}
