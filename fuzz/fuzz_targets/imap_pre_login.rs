//! IMAP before login, as the gateway reads it: nothing may panic, every
//! step consumes what it says (and makes progress), and a login names
//! what was sent.

#![no_main]

use granary_wire::imap::{Parsed, greeting_capabilities, parse, sasl_plain, sasl_response};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    let mut acked = Vec::new();
    for _ in 0..64 {
        match parse(rest) {
            Parsed::Command { consumed, tag, .. } | Parsed::Bad { consumed, tag, .. } => {
                assert!(consumed > 0 && consumed <= rest.len());
                assert!(!tag.is_empty());
                rest = &rest[consumed..];
                acked.clear();
            }
            Parsed::Continue { at } => {
                assert!(at <= rest.len());
                // The same literal is acknowledged once.
                assert!(!acked.contains(&at));
                acked.push(at);
                break;
            }
            Parsed::Incomplete => break,
        }
    }
    if let Ok(Some(r)) = sasl_response(data) {
        let _ = sasl_plain(&r);
    }
    let _ = sasl_plain(data);
    let _ = greeting_capabilities(data);
});
