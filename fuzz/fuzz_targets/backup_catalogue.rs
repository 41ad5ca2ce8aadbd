//! The catalogue reader on arbitrary JSON: the input is signed here (a real
//! attacker signs with their own key; trust is checked after parsing), so
//! every input reaches the parser and the name checks. Nothing may panic,
//! and whatever is accepted must name only safe relative files.

#![no_main]

use std::sync::OnceLock;

use granary_backup::catalogue::{Catalogue, SIGNING_CONTEXT};
use granary_backup::target::valid_name;
use granary_package::SigningKey;
use libfuzzer_sys::fuzz_target;

fn key() -> &'static SigningKey {
    static KEY: OnceLock<SigningKey> = OnceLock::new();
    KEY.get_or_init(|| SigningKey::generate().unwrap())
}

fuzz_target!(|json: &[u8]| {
    let sig = key().sign(&[SIGNING_CONTEXT, json].concat());
    let hex: String = sig.iter().map(|b| format!("{b:02x}")).collect();
    let file = [hex.as_bytes(), b"\n", json].concat();
    if let Ok((cat, _)) = Catalogue::open(&file) {
        for g in cat.grains.values() {
            for s in &g.streams {
                assert!(valid_name(&s.dir));
                for c in &s.chunks {
                    assert!(valid_name(&format!("{}/{}", s.dir, c.file)));
                }
            }
        }
    }
    // Unsigned bytes straight in: never a panic either.
    let _ = Catalogue::open(json);
});
