//! Applying a file-tree stream (what a restore decrypts) from arbitrary
//! bytes, into a directory that holds a symlink pointing out of it. Nothing
//! may panic, and nothing may appear outside the destination.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|stream: &[u8]| {
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("dest");
    let outside = tmp.path().join("outside");
    std::fs::create_dir(&dest).unwrap();
    std::fs::create_dir(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, dest.join("link")).unwrap();
    let _ = granary_backup::tree::apply_stream(stream, &dest, None);
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        0,
        "a stream wrote outside its destination"
    );
});
