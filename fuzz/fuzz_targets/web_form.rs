//! What the web home reads from a browser first, on arbitrary bytes: form
//! bodies and `Cookie` headers. Nothing may panic, a form never has more
//! than `MAX_FIELDS` fields, and a cookie's value never holds a `;`.

#![no_main]

use granary_wire::form::{MAX_FIELDS, cookie, fields};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    assert!(fields(data).len() <= MAX_FIELDS);
    for name in ["__Host-granary", "__Host-granary-pre", ""] {
        if let Some(v) = cookie([data], name) {
            assert!(!v.contains(';'));
        }
    }
});
