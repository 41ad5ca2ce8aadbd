//! The ZFS and btrfs backends against the real tools: quotas enforced,
//! snapshots taken, everything destroyed. Root only (CI runs as root).

use std::io::Write;
use std::os::unix::fs::MetadataExt;

use granary_datasets::testing::{BtrfsLoop, ZfsPool};
use granary_datasets::{Btrfs, Datasets, Quota, Zfs};

const QUOTA: u64 = 16 << 20;

/// Writes until the filesystem refuses; returns the bytes written and the
/// error.
fn fill(path: &std::path::Path) -> (u64, std::io::Error) {
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0x5au8; 1 << 20];
    let mut written = 0u64;
    loop {
        if let Err(e) = f.write_all(&chunk).and_then(|()| f.sync_all()) {
            return (written, e);
        }
        written += chunk.len() as u64;
        assert!(written < 10 * QUOTA, "no quota: wrote {written} bytes");
    }
}

/// Runs every operation; returns where the retired grain's snapshot is.
fn exercise(backend: &dyn Datasets) -> String {
    let uid = 1_500_000_321;
    let data = backend.create("g-one", uid).unwrap();
    assert_eq!(backend.create("g-one", uid).unwrap(), data, "idempotent");
    let meta = std::fs::metadata(&data).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o777), (uid, 0o700));
    assert!(!backend.has_data("g-one").unwrap());
    // The fencing epoch: none yet, then the last one written, durably,
    // where the grain cannot see or change it.
    assert_eq!(backend.epoch("g-one").unwrap(), None);
    backend.set_epoch("g-one", 41).unwrap();
    backend.set_epoch("g-one", 57).unwrap();
    assert_eq!(backend.epoch("g-one").unwrap(), Some(57));
    assert!(
        !backend.has_data("g-one").unwrap(),
        "the epoch is not in the grain's data"
    );
    std::fs::write(data.join("note"), "kept").unwrap();
    assert!(backend.has_data("g-one").unwrap());
    // A fenced node's dataset: read-only, then writable again.
    backend.set_read_only("g-one", true).unwrap();
    let refused = std::fs::write(data.join("late"), "x").unwrap_err();
    assert_eq!(refused.raw_os_error(), Some(libc::EROFS), "{refused}");
    // A start checks the dataset (create) before the gate makes it
    // writable again: that works on a read-only one.
    assert_eq!(backend.create("g-one", uid).unwrap(), data);
    assert_eq!(std::fs::read_to_string(data.join("note")).unwrap(), "kept");
    backend.set_read_only("g-one", false).unwrap();
    std::fs::write(data.join("late"), "x").unwrap();
    std::fs::remove_file(data.join("late")).unwrap();
    let snap = backend.snapshot("g-one", "first").unwrap();
    assert!(snap.is_some());
    let (written, e) = fill(&data.join("big"));
    assert_eq!(e.raw_os_error(), Some(libc_edquot_or_enospc(&e)), "{e}");
    assert!(
        written <= QUOTA + (4 << 20),
        "wrote {written} past a {QUOTA} quota"
    );
    // The snapshot is listed, and rolling back to it restores the note and
    // drops what came after (the space too).
    let names: Vec<String> = backend
        .list_snapshots("g-one")
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, ["first"]);
    std::fs::remove_file(data.join("big")).ok();
    // btrfs credits freed space to a qgroup only when the transaction
    // commits; until then a full grain stays full. Commit it now.
    let synced = std::process::Command::new("sync")
        .arg("-f")
        .arg(&data)
        .status()
        .unwrap();
    assert!(synced.success());
    std::fs::write(data.join("note"), "changed").unwrap();
    backend.rollback("g-one", "first", uid).unwrap();
    assert_eq!(std::fs::read_to_string(data.join("note")).unwrap(), "kept");
    assert!(!data.join("big").exists());
    assert_eq!(std::fs::metadata(&data).unwrap().uid(), uid);
    std::fs::write(data.join("after-rollback"), vec![0u8; 1 << 20]).unwrap();
    backend.delete_snapshot("g-one", "first").unwrap();
    assert!(backend.list_snapshots("g-one").unwrap().is_empty());
    // A quota set for the grain holds at once, and through what makes or
    // replaces its dataset: a start (create again) and a rollback.
    backend.set_quota("g-one", Quota::Bytes(2 * QUOTA)).unwrap();
    backend.snapshot("g-one", "second").unwrap();
    backend.rollback("g-one", "second", uid).unwrap();
    backend.create("g-one", uid).unwrap();
    let (written, e) = fill(&data.join("bigger"));
    assert_eq!(e.raw_os_error(), Some(libc_edquot_or_enospc(&e)), "{e}");
    assert!(
        written > QUOTA + (4 << 20) && written <= 2 * QUOTA + (4 << 20),
        "wrote {written} under a {} quota",
        2 * QUOTA
    );
    // The backend's own account, as /metrics and the pages show it.
    let space = backend.spaces().unwrap()["g-one"];
    assert_eq!(space.quota, Some(2 * QUOTA), "{space:?}");
    assert!(space.used > QUOTA, "{space:?}");
    std::fs::remove_file(data.join("bigger")).unwrap();
    // Another grain has its own quota.
    let other = backend.create("g-two", uid + 1).unwrap();
    std::fs::write(other.join("x"), vec![1u8; 1 << 20]).unwrap();
    backend.destroy("g-one").unwrap();
    assert!(!backend.grain_dir("g-one").exists());
    // Retiring keeps a final read-only snapshot; the name is free again.
    let kept = backend.retire("g-two", "final-1").unwrap().unwrap();
    assert!(!backend.grain_dir("g-two").exists());
    let _again = backend.create("g-two", uid + 1).unwrap();
    assert!(
        !backend.has_data("g-two").unwrap(),
        "a new grain starts empty"
    );
    backend.destroy("g-two").unwrap();
    kept
}

/// EDQUOT (122) normally; zfs-fuse reports a full quota as ENOSPC (28).
fn libc_edquot_or_enospc(e: &std::io::Error) -> i32 {
    match e.raw_os_error() {
        Some(28) => 28,
        _ => 122,
    }
}

#[test]
fn zfs_datasets_have_quotas_and_snapshots() {
    let tmp = tempfile::tempdir().unwrap();
    let pool = ZfsPool::create(tmp.path(), "256M").unwrap();
    let zfs = Zfs::new(&tmp.path().join("grains"), &pool.name, QUOTA).unwrap();
    let kept = exercise(&zfs);
    assert_eq!(kept, format!("{}/retired-g-two-final-1@final-1", pool.name));
    let snaps = std::process::Command::new("zfs")
        .args(["list", "-H", "-t", "snapshot", "-o", "name"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&snaps.stdout).contains(&kept));
    assert!(Zfs::new(tmp.path(), "no-such-pool", QUOTA).is_err());
}

#[test]
fn btrfs_subvolumes_have_quotas_and_snapshots() {
    let tmp = tempfile::tempdir().unwrap();
    let fs = BtrfsLoop::create(tmp.path(), "512M").unwrap();
    let btrfs = Btrfs::new(&fs.mount.join("grains"), QUOTA).unwrap();
    let kept = exercise(&btrfs);
    assert_eq!(
        std::fs::read(std::path::Path::new(&kept).join("x"))
            .unwrap()
            .len(),
        1 << 20,
        "the retired grain's data is in its final snapshot"
    );
    let not_btrfs = Btrfs::new(tmp.path(), QUOTA).unwrap_err().to_string();
    assert!(not_btrfs.contains("not btrfs"), "{not_btrfs}");
}
