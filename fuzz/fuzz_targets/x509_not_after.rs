//! The certificate expiry reader on arbitrary bytes: nothing may panic.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = granary_wire::x509::not_after(data);
});
