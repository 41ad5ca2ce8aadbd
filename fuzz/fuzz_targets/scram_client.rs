//! A SCRAM client's first and final messages (XMPP SASL): any bytes parse
//! or are refused without panicking, and no proof but the right one is
//! accepted.

#![no_main]

use granary_wire::scram::{Hash, Verifier, parse_client_first, server_first, verify_client_final};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (first, last) = data.split_at(data.len() / 2);
    let Ok(cf) = parse_client_first(first) else {
        return;
    };
    let v = Verifier::new(Hash::Sha256, "pencil", b"salt-salt-salt", 64).expect("a verifier");
    let sf = server_first(&cf, "servernonce", &v);
    // Random bytes never carry a valid proof for this verifier.
    assert!(verify_client_final(&cf, &sf, last, &v).is_err());
});
