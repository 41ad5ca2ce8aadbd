//! Export, verify, resume, tamper and restore against the plain backend
//! and a directory target (the ZFS and daemon paths are in tests/backup.rs).

use std::path::Path;

use granary_backup::catalogue::GrainEntry;
use granary_backup::crypt::{Identity, Recipients, generate};
use granary_backup::export::Exporter;
use granary_backup::restore::{RestoreJob, open_trusted, verify};
use granary_backup::target::{DirTarget, Target};
use granary_backup::{BackupError, tree};
use granary_datasets::{Datasets, Plain};
use granary_package::SigningKey;
use granary_testkit::noise;

fn meta() -> GrainEntry {
    GrainEntry {
        user: "alice".into(),
        kind: "hello".into(),
        app_id: "k1".into(),
        app_version: "1.0".into(),
        data_version: Some("1.0".into()),
        host_uid: 4242,
        grants: vec![],
        streams: vec![],
    }
}

/// A target that fails every write after `allowed` of them: media pulled.
struct Pulled<'a> {
    inner: &'a mut DirTarget,
    allowed: usize,
}

impl Target for Pulled<'_> {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn read(&mut self, name: &str, max: u64) -> Result<Option<Vec<u8>>, BackupError> {
        self.inner.read(name, max)
    }
    fn write(&mut self, name: &str, bytes: &[u8]) -> Result<(), BackupError> {
        if self.allowed == 0 {
            return Err(BackupError::Io("media removed".into()));
        }
        self.allowed -= 1;
        self.inner.write(name, bytes)
    }
    fn list(&mut self, prefix: &str) -> Result<Vec<(String, u64)>, BackupError> {
        self.inner.list(prefix)
    }
    fn remove(&mut self, name: &str) -> Result<(), BackupError> {
        self.inner.remove(name)
    }
}

fn chunk_files(dir: &Path) -> Vec<(std::path::PathBuf, std::time::SystemTime)> {
    let mut out = Vec::new();
    for e in walk(dir) {
        if e.extension().is_some_and(|x| x == "age") {
            let m = std::fs::metadata(&e).unwrap().modified().unwrap();
            out.push((e, m));
        }
    }
    out.sort();
    out
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn export_resume_verify_tamper_restore() {
    let tmp = tempfile::tempdir().unwrap();
    let plain = Plain::new(&tmp.path().join("grains")).unwrap();
    let data = plain.create("alice-hello", 4242).unwrap();
    std::fs::write(data.join("big"), noise(1, 300_000)).unwrap();
    std::fs::create_dir(data.join("notes")).unwrap();
    std::fs::write(data.join("notes/a"), "first").unwrap();
    plain.snapshot("alice-hello", "backup-100").unwrap();

    let key = SigningKey::generate().unwrap();
    let (secret, public) = generate();
    let recipients = Recipients::parse(&[public]).unwrap();
    let media = tmp.path().join("media");
    let mut dir = DirTarget::new(&media).unwrap();
    let chunk = 64 * 1024;

    // Cut off after three chunk writes (each chunk also writes its journal).
    {
        let mut pulled = Pulled {
            inner: &mut dir,
            allowed: 6,
        };
        let mut ex = Exporter::open(&mut pulled, &key, &recipients, chunk).unwrap();
        let err = ex
            .export(
                "alice-hello",
                meta(),
                "backup-100",
                None,
                &plain,
                &mut |_| {},
            )
            .unwrap_err();
        assert!(err.to_string().contains("media removed"), "{err}");
    }
    let before = chunk_files(&media);
    assert_eq!(before.len(), 3, "three whole chunks made it");
    // A journal changed on the media (say, chunk hashes swapped to match
    // garbage) is not this node's any more: not resumed from.
    let journal = walk(&media)
        .into_iter()
        .find(|p| p.ends_with("journal.json"))
        .unwrap();
    let original = std::fs::read(&journal).unwrap();
    let mut forged = original.clone();
    let at = forged.len() - 10;
    forged[at] ^= 1;
    std::fs::write(&journal, &forged).unwrap();
    {
        let mut ex = Exporter::open(&mut dir, &key, &recipients, chunk).unwrap();
        assert_eq!(ex.pending("alice-hello").unwrap(), None);
    }
    std::fs::write(&journal, &original).unwrap();
    // Resume: the same snapshot, the first three chunks left as they are.
    let mut ex = Exporter::open(&mut dir, &key, &recipients, chunk).unwrap();
    let pending = ex.pending("alice-hello").unwrap().unwrap();
    assert_eq!(
        (pending.snapshot.as_str(), pending.chunks),
        ("backup-100", 3)
    );
    let report = ex
        .export(
            "alice-hello",
            meta(),
            "backup-100",
            None,
            &plain,
            &mut |_| {},
        )
        .unwrap();
    assert_eq!(report.resumed_chunks, 3);
    assert!(report.chunks >= 5, "{report:?}");
    let after = chunk_files(&media);
    for (path, modified) in &before {
        let now = after.iter().find(|(p, _)| p == path).expect("kept").1;
        assert_eq!(&now, modified, "{} was not rewritten", path.display());
    }
    assert!(!walk(&media).iter().any(|p| p.ends_with("journal.json")));

    // An incremental: only the change travels.
    std::fs::write(data.join("notes/a"), "second").unwrap();
    std::fs::write(data.join("notes/b"), "new").unwrap();
    plain.snapshot("alice-hello", "backup-200").unwrap();
    let incr = ex
        .export(
            "alice-hello",
            meta(),
            "backup-200",
            Some("backup-100"),
            &plain,
            &mut |_| {},
        )
        .unwrap();
    assert!(incr.plain_bytes < 10_000, "{incr:?}");
    assert_eq!(incr.chunks, 1);
    drop(ex);

    verify(&mut dir, &mut |_| {}).unwrap();
    let identity = Identity::parse(secret.as_bytes()).unwrap();
    let (cat, _) = open_trusted(&mut dir, &[key.public()]).unwrap();
    let grain = &cat.grains["alice-hello"];

    // Restore each point in time on a "second node" with another uid.
    let node2 = Plain::new(&tmp.path().join("node2")).unwrap();
    for (snap, expect) in [("backup-100", "first"), ("backup-200", "second")] {
        let staging = granary_backup::staging_id("restore");
        let done = RestoreJob {
            grain_id: "alice-hello",
            grain,
            snapshot: Some(snap),
            identity: &identity,
            datasets: &node2,
            staging: &staging,
            uid: 5151,
        }
        .run(&mut dir, &mut |_| {})
        .unwrap();
        assert_eq!(done.snapshot, snap);
        let path = node2.path(&staging);
        assert_eq!(
            std::fs::read_to_string(path.join("notes/a")).unwrap(),
            expect
        );
        assert_eq!(std::fs::read(path.join("big")).unwrap(), noise(1, 300_000));
        use std::os::unix::fs::MetadataExt;
        assert_eq!(std::fs::metadata(path.join("big")).unwrap().uid(), 5151);
        node2.destroy(&staging).unwrap();
    }
    // The restored files equal the snapshot's.
    assert_eq!(
        grain.streams[1].tree_sha256.as_deref(),
        Some(tree::digest(&plain.grain_dir("alice-hello").join("snapshots/backup-200")).unwrap())
            .as_deref()
    );

    // Not trusted: another node's key.
    let stranger = SigningKey::generate().unwrap();
    let e = open_trusted(&mut dir, &[stranger.public()]).unwrap_err();
    assert!(e.to_string().contains("--trust"), "{e}");

    // One byte of one chunk changed: verify names it, restore leaves nothing.
    let victim = &chunk_files(&media)[2].0;
    let original = std::fs::read(victim).unwrap();
    let mut payload = original.clone();
    payload[200] ^= 0x40;
    std::fs::write(victim, &payload).unwrap();
    let e = verify(&mut dir, &mut |_| {}).unwrap_err();
    assert!(matches!(e, BackupError::Integrity(_)));
    assert!(e.to_string().contains("00000002.age"), "{e}");
    // A changed key stanza in the header still parses, but no key opens
    // it: that is damage to this chunk too, not a wrong key file.
    let mut header = original.clone();
    let stanza = header
        .windows(10)
        .position(|w| w == b"-> X25519 ")
        .expect("an X25519 stanza");
    let body = stanza + header[stanza..].iter().position(|b| *b == b'\n').unwrap() + 1;
    header[body] = if header[body] == b'A' { b'B' } else { b'A' };
    let staging = granary_backup::staging_id("restore");
    for (what, bytes) in [("a payload byte", payload), ("the key stanza", header)] {
        std::fs::write(victim, &bytes).unwrap();
        let e = RestoreJob {
            grain_id: "alice-hello",
            grain,
            snapshot: None,
            identity: &identity,
            datasets: &node2,
            staging: &staging,
            uid: 5151,
        }
        .run(&mut dir, &mut |_| {})
        .unwrap_err();
        assert!(matches!(e, BackupError::Integrity(_)), "{what}: {e}");
        assert!(e.to_string().contains("00000002.age"), "{what}: {e}");
        assert!(!node2.grain_dir(&staging).exists(), "nothing half-restored");
    }
    std::fs::write(victim, &original).unwrap();

    // A wrong identity is a clear error too.
    let (other, _) = generate();
    let other = Identity::parse(other.as_bytes()).unwrap();
    let e = RestoreJob {
        grain_id: "alice-hello",
        grain,
        snapshot: Some("backup-100"),
        identity: &other,
        datasets: &node2,
        staging: &staging,
        uid: 5151,
    }
    .run(&mut dir, &mut |_| {})
    .unwrap_err();
    assert!(e.to_string().contains("identity"), "{e}");
    assert!(!node2.grain_dir(&staging).exists());
}

/// btrfs: snapshots are read-only subvolumes, holds keep a base from
/// deletion, and a restore lands in a staging subvolume renamed into place
/// with the grain's qgroup limit.
#[test]
fn btrfs_export_hold_and_restore() {
    use granary_datasets::Btrfs;
    use granary_datasets::testing::BtrfsLoop;
    let tmp = tempfile::tempdir().unwrap();
    let fs = BtrfsLoop::create(tmp.path(), "512M").unwrap();
    let btrfs = Btrfs::new(&fs.mount.join("grains"), 64 << 20).unwrap();
    let data = btrfs.create("alice-hello", 4242).unwrap();
    std::fs::write(data.join("big"), noise(5, 2 << 20)).unwrap();
    btrfs.snapshot("alice-hello", "backup-1").unwrap();
    btrfs
        .hold("alice-hello", "backup-1", "granary-backup-t1")
        .unwrap();
    let e = btrfs
        .delete_snapshot("alice-hello", "backup-1")
        .unwrap_err();
    assert_eq!(e.source.kind(), std::io::ErrorKind::ResourceBusy);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(data.join("big"))
            .unwrap();
        f.write_all_at(&[1; 1000], 4096).unwrap();
    }
    btrfs.snapshot("alice-hello", "backup-2").unwrap();

    let key = SigningKey::generate().unwrap();
    let (secret, public) = generate();
    let recipients = Recipients::parse(&[public]).unwrap();
    let mut dir = DirTarget::new(&tmp.path().join("media")).unwrap();
    let mut ex = Exporter::open(&mut dir, &key, &recipients, 1 << 20).unwrap();
    ex.export("alice-hello", meta(), "backup-1", None, &btrfs, &mut |_| {})
        .unwrap();
    let incr = ex
        .export(
            "alice-hello",
            meta(),
            "backup-2",
            Some("backup-1"),
            &btrfs,
            &mut |_| {},
        )
        .unwrap();
    assert!(
        incr.plain_bytes < 200_000,
        "only the changed block: {incr:?}"
    );
    drop(ex);
    btrfs
        .release("alice-hello", "backup-1", "granary-backup-t1")
        .unwrap();
    btrfs.delete_snapshot("alice-hello", "backup-1").unwrap();

    let identity = Identity::parse(secret.as_bytes()).unwrap();
    let (cat, _) = open_trusted(&mut dir, &[key.public()]).unwrap();
    let staging = granary_backup::staging_id("restore");
    RestoreJob {
        grain_id: "alice-hello",
        grain: &cat.grains["alice-hello"],
        snapshot: None,
        identity: &identity,
        datasets: &btrfs,
        staging: &staging,
        uid: 5151,
    }
    .run(&mut dir, &mut |_| {})
    .unwrap();
    let path = btrfs.rename(&staging, "bob-hello", 5151).unwrap();
    let mut expect = noise(5, 2 << 20);
    expect[4096..5096].fill(1);
    assert_eq!(std::fs::read(path.join("big")).unwrap(), expect);
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(path.join("big")).unwrap().uid(), 5151);
    assert!(!btrfs.grain_dir(&staging).exists());
    btrfs.destroy("bob-hello").unwrap();
    btrfs.destroy("alice-hello").unwrap();
}
