//! The mail grain's view of a message: ENVELOPE, BODYSTRUCTURE, sections
//! and BINARY from any bytes, without panicking, in bounded output.

#![no_main]

use granary_mail::mime::section::{self, Spec};
use granary_mail::mime::{analyse, parse, search_text};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let a = analyse(data);
    assert!(a.bodystructure.starts_with('('));
    assert!(a.envelope.starts_with('('));
    let tree = parse(data);
    for path in [&[][..], &[1], &[1, 1], &[2], &[2, 1, 1], &[3, 2]] {
        for spec in [None, Some(Spec::Header), Some(Spec::Text), Some(Spec::Mime)] {
            if let Some(b) = section::body(data, &tree, path, spec.as_ref()) {
                assert!(b.len() <= data.len() + 2);
            }
        }
        let _ = section::binary(data, &tree, path);
    }
    let _ = search_text(data, true);
});
