//! The package reader on arbitrary archives: the input is the tar inside a
//! package, which is compressed and signed here so that every input reaches
//! the archive walk (a real attacker can sign anything with their own key).
//! Nothing may panic, and unpacking may create nothing outside its
//! destination.

#![no_main]

use std::io::Write;
use std::sync::OnceLock;

use granary_package::{Limits, SigningKey, open, seal};
use libfuzzer_sys::fuzz_target;

fn key() -> &'static SigningKey {
    static KEY: OnceLock<SigningKey> = OnceLock::new();
    KEY.get_or_init(|| SigningKey::generate().unwrap())
}

fuzz_target!(|tar: &[u8]| {
    let key = key();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(tar).unwrap();
    let file = seal(key, &gz.finish().unwrap());

    let limits = Limits {
        max_package_bytes: 64 << 20,
        max_unpacked_bytes: 16 << 20,
        max_entries: 10_000,
    };
    let dir = tempfile::tempdir().unwrap();
    if let Ok(pkg) = open(&file, &limits) {
        let _ = pkg.inspect(&limits);
        let _ = pkg.unpack(&dir.path().join("out"), &limits, &["aarch64", "x86_64"]);
    }
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        assert_eq!(entry.unwrap().file_name(), "out", "something escaped");
    }
    // Raw bytes as a whole package file, too (magic and signature checks).
    let _ = open(tar, &limits);
});
