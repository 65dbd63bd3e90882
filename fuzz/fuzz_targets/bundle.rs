//! Bundle processing: any JSON becomes the writes of a batch or transaction, or a request
//! error naming the entry; reference rewriting never panics.
#![no_main]

use std::collections::HashMap;

use fhirstore_core::bundle::{rewrite_references, write_ops_in};
use fhirstore_core::registry::Registry;
use fhirstore_core::Error;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(mut bundle) = fhirstore_core::json::from_slice_strict(data) else {
        return;
    };
    match write_ops_in(Registry::r4(), &bundle) {
        Ok(ops) => {
            let n = bundle
                .get("entry")
                .and_then(|e| e.as_array())
                .map_or(0, Vec::len);
            assert_eq!(ops.len(), n, "one write per entry");
        }
        // An entry's error carries its index; its kind is what must be a request error.
        Err(e) => match e.kind() {
            Error::InvalidResource(_)
            | Error::InvalidSearch(_)
            | Error::Unsupported(_)
            | Error::TooCostly(_) => {}
            _ => panic!("a Bundle made a {e:?}"),
        },
    }
    let map = HashMap::from([
        ("urn:uuid:1".to_owned(), "Patient/p1".to_owned()),
        ("Patient/0".to_owned(), "Patient/p2".to_owned()),
    ]);
    let _ = rewrite_references(&mut bundle, &map);
});
