//! The search query parser: any query string, against the R4 parameters, is a typed query
//! within the limits or a typed request error; never a panic.
#![no_main]

use fhirstore_core::registry::Registry;
use fhirstore_core::search::{Handling, SearchLimits, SearchQuery};
use fhirstore_core::{Error, ResourceType};
use libfuzzer_sys::fuzz_target;

const TYPES: [Option<&str>; 4] = [
    None,
    Some("Patient"),
    Some("Observation"),
    Some("Encounter"),
];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let rt = TYPES[usize::from(pick) % TYPES.len()].and_then(|t| ResourceType::new(t).ok());
    let handling = if pick & 0x80 == 0 {
        Handling::Lenient
    } else {
        Handling::Strict
    };
    let query = String::from_utf8_lossy(rest);
    let limits = SearchLimits::default();
    match SearchQuery::parse_limited(Registry::r4(), rt, &query, handling, &limits) {
        Ok(q) => {
            assert!(q.check_limits(&limits).is_ok(), "accepted beyond a limit");
            let _ = q.fingerprint();
            assert!(q.page_size() <= fhirstore_core::search::MAX_PAGE_SIZE);
        }
        Err(Error::InvalidSearch(_) | Error::Unsupported(_) | Error::TooCostly(_)) => {}
        Err(e) => panic!("a query string made a {e:?}"),
    }
});
