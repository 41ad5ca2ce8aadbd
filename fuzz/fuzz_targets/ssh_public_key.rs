//! OpenSSH public key lines (what `granary ssh-key add` reads and the SSH
//! listener compares): nothing may panic, and what comes out parses again
//! to itself.

#![no_main]

use granary_wire::ssh::public_key;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(line) = std::str::from_utf8(data)
        && let Ok(key) = public_key(line)
    {
        let again = public_key(&key.normal).expect("a normal key parses");
        assert_eq!(again.normal, key.normal);
        assert_eq!(again.fingerprint, key.fingerprint);
    }
});
