//! An XMPP client's stream before login: any bytes are read unit by unit
//! or refused without panicking, and a unit is only ever read whole.

#![no_main]

use granary_wire::xmpp::parse;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Some((_, n))) = parse(rest) {
        assert!(n > 0 && n <= rest.len());
        rest = &rest[n..];
    }
    // A unit is only ever read whole: any prefix of its bytes waits for
    // more or reads the same first units.
    if let Ok(Some((_, n))) = parse(data) {
        assert!(n <= data.len());
        if let Ok(Some((_, m))) = parse(&data[..n - 1]) {
            assert!(m < n);
        }
    }
});
