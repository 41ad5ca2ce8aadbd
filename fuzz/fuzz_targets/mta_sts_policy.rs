//! MTA-STS policies fetched from other domains: any bytes parse or are
//! refused without panicking, and a parsed policy keeps its bounds.

#![no_main]

use granary_wire::mta_sts::{MAX_AGE, Mode, parse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = parse(data) {
        assert!(p.max_age <= MAX_AGE);
        assert!(p.mode == Mode::None || !p.mx.is_empty());
        assert!(p.mx.len() <= 100);
        for host in ["mx.example.org", "", "a.b.c", "*"] {
            let _ = p.allows(host);
        }
    }
});
