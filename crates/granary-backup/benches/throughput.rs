//! Backup throughput and incremental size, against the tools an admin
//! would otherwise use, in one run on the same data:
//!
//! - ZFS: our export (`zfs send`, chunked, age-encrypted, hashed, written
//!   durably) and restore (verify, decrypt, `zfs receive`, re-own, digest
//!   check) against raw `zfs send | zfs receive`;
//! - file trees (plain and btrfs): our tree-stream export and restore
//!   against `tar -c | age -r` and `age -d | tar -x`;
//! - incremental exports: bytes carried against bytes changed.
//!
//! Root, zfs-fuse and the `age` tool (apt install age) are needed; a pool
//! on a sparse file is made and destroyed here.
//!
//! cargo bench -p granary-backup --bench throughput              # 256 MiB, 3 rounds
//! cargo bench -p granary-backup --bench throughput -- --smoke   # 24 MiB, 1 round

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use granary_backup::catalogue::GrainEntry;
use granary_backup::crypt::{Identity, Recipients, generate};
use granary_backup::export::Exporter;
use granary_backup::restore::RestoreJob;
use granary_backup::target::DirTarget;
use granary_datasets::testing::ZfsPool;
use granary_datasets::{Datasets, Plain, Zfs};
use granary_package::SigningKey;
use granary_testkit::noise;

fn meta() -> GrainEntry {
    GrainEntry {
        user: "bench".into(),
        kind: "data".into(),
        app_id: "k0".into(),
        app_version: "1".into(),
        data_version: None,
        host_uid: 0,
        grants: vec![],
        streams: vec![],
    }
}

/// A mix: a few big files (photos, mailboxes) and many small ones.
fn fill(dir: &Path, mib: usize) {
    let big = mib * 3 / 4;
    for i in 0..4 {
        std::fs::write(
            dir.join(format!("big-{i}")),
            noise(i as u64, (big << 20) / 4),
        )
        .unwrap();
    }
    let small_dir = dir.join("mail/cur");
    std::fs::create_dir_all(&small_dir).unwrap();
    let small = ((mib - big) << 20) / (16 << 10);
    for i in 0..small {
        std::fs::write(
            small_dir.join(format!("{i:06}.eml")),
            noise(1000 + i as u64, 16 << 10),
        )
        .unwrap();
    }
}

fn sh(script: &str) {
    let ok = Command::new("sh")
        .arg("-c")
        .arg(script)
        .stdout(Stdio::null())
        .status()
        .unwrap()
        .success();
    assert!(ok, "{script}");
}

/// Each measurement starts with nothing dirty in the page cache: an fsync
/// of ours on ext4 (ordered mode) otherwise also writes out what the
/// measurement before it left, such as a raw `zfs receive`'s pool writes.
fn timed(f: impl FnOnce()) -> f64 {
    sh("sync");
    let start = Instant::now();
    f();
    start.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn rate(bytes: u64, secs: f64) -> String {
    format!("{:7.1} MiB/s", bytes as f64 / (1 << 20) as f64 / secs)
}

/// What our export and restore need.
struct Keys {
    node: SigningKey,
    recipients: Recipients,
    identity: Identity,
}

/// Our export of snapshot s1 to `media`, then our restore of it into a
/// staging dataset: the seconds each took.
fn ours(ds: &dyn Datasets, media: &Path, keys: &Keys, chunk: usize) -> (f64, f64) {
    let mut target = DirTarget::new(media).unwrap();
    let export = timed(|| {
        let mut ex = Exporter::open(&mut target, &keys.node, &keys.recipients, chunk).unwrap();
        ex.export("bench-data", meta(), "s1", None, ds, &mut |_| {})
            .unwrap();
    });
    let (cat, _) = granary_backup::export::read_catalogue(&mut target)
        .unwrap()
        .unwrap();
    let staging = granary_backup::staging_id("bench");
    let restore = timed(|| {
        RestoreJob {
            grain_id: "bench-data",
            grain: &cat.grains["bench-data"],
            snapshot: None,
            identity: &keys.identity,
            datasets: ds,
            staging: &staging,
            uid: 4242,
        }
        .run(&mut target, &mut |_| {})
        .unwrap();
    });
    ds.destroy(&staging).unwrap();
    std::fs::remove_dir_all(media).unwrap();
    (export, restore)
}

fn main() {
    let smoke = std::env::args().any(|a| a == "--smoke");
    let mib = if smoke { 24 } else { 256 };
    let rounds = if smoke { 1 } else { 3 };
    if Command::new("age").arg("--version").output().is_err() {
        eprintln!("the age tool is missing (apt install age); skipping");
        return;
    }
    let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
    let pool = ZfsPool::create(tmp.path(), &format!("{}M", mib * 6 + 256)).unwrap();
    let zfs = Zfs::new(&tmp.path().join("grains"), &pool.name, 1 << 40).unwrap();
    let plain = Plain::new(&tmp.path().join("plain")).unwrap();
    let (secret, public) = generate();
    let keys = Keys {
        node: SigningKey::generate().unwrap(),
        recipients: Recipients::parse(std::slice::from_ref(&public)).unwrap(),
        identity: Identity::parse(secret.as_bytes()).unwrap(),
    };
    let id_file = tmp.path().join("id.txt");
    std::fs::write(&id_file, &secret).unwrap();
    // The default chunk size on full runs; small chunks in smoke mode so
    // that several are still in flight.
    let chunk = if smoke { 4 << 20 } else { 32 << 20 };

    let zdata = zfs.create("bench-data", 0).unwrap();
    fill(&zdata, mib);
    zfs.snapshot("bench-data", "s1").unwrap();
    let pdata = plain.create("bench-data", 0).unwrap();
    fill(&pdata, mib);
    plain.snapshot("bench-data", "s1").unwrap();
    let bytes = (mib as u64) << 20;
    println!(
        "backup throughput, {mib} MiB in {} MiB chunks ({rounds} rounds, median)",
        chunk >> 20
    );

    let (mut raw_send, mut our_zexp, mut our_zres) = (vec![], vec![], vec![]);
    let (mut tar_exp, mut tar_res, mut our_texp, mut our_tres) = (vec![], vec![], vec![], vec![]);
    for round in 0..rounds {
        // Raw zfs send | zfs receive.
        let copy = format!("{}/raw{round}", pool.name);
        raw_send.push(timed(|| {
            sh(&format!(
                "zfs send {}/bench-data@s1 | zfs receive -u {copy}",
                pool.name
            ))
        }));
        sh(&format!("zfs destroy -r {copy}"));

        // Ours on ZFS: export, then restore onto a staging dataset.
        let (e, r) = ours(
            &zfs,
            &tmp.path().join(format!("media-z{round}")),
            &keys,
            chunk,
        );
        our_zexp.push(e);
        our_zres.push(r);

        // tar | age and back, on the plain snapshot.
        let snap = plain.grain_dir("bench-data").join("snapshots/s1");
        let file = tmp.path().join("tar.age");
        tar_exp.push(timed(|| {
            sh(&format!(
                "tar -C {} -cf - . | age -r {public} > {} && sync -f {}",
                snap.display(),
                file.display(),
                file.display()
            ))
        }));
        let out = tmp.path().join("untar");
        std::fs::create_dir_all(&out).unwrap();
        tar_res.push(timed(|| {
            sh(&format!(
                "age -d -i {} {} | tar -C {} -xf -",
                id_file.display(),
                file.display(),
                out.display()
            ))
        }));
        std::fs::remove_dir_all(&out).unwrap();
        std::fs::remove_file(&file).unwrap();

        // Ours on a file tree.
        let (e, r) = ours(
            &plain,
            &tmp.path().join(format!("media-t{round}")),
            &keys,
            chunk,
        );
        our_texp.push(e);
        our_tres.push(r);
    }
    let (raw, zexp, zres) = (median(raw_send), median(our_zexp), median(our_zres));
    let (texp, tres, oexp, ores) = (
        median(tar_exp),
        median(tar_res),
        median(our_texp),
        median(our_tres),
    );
    println!(
        "  zfs send | zfs receive (no encryption)  {}",
        rate(bytes, raw)
    );
    println!(
        "  granary export, zfs stream              {}   {:.2}x the raw send|receive time",
        rate(bytes, zexp),
        zexp / raw
    );
    println!(
        "  granary restore, zfs stream             {}   {:.2}x",
        rate(bytes, zres),
        zres / raw
    );
    println!(
        "  tar | age                                {}",
        rate(bytes, texp)
    );
    println!(
        "  granary export, tree stream             {}   {:.2}x the tar|age time",
        rate(bytes, oexp),
        oexp / texp
    );
    println!(
        "  age -d | tar -x                          {}",
        rate(bytes, tres)
    );
    println!(
        "  granary restore, tree stream            {}   {:.2}x the age|tar time",
        rate(bytes, ores),
        ores / tres
    );
    println!(
        "  (granary also hashes every chunk, fsyncs each file, signs the catalogue, and a restore of a tree stream checks every file against the export's digest)"
    );

    // Incremental exports: change a little, export, compare.
    println!("incremental exports: bytes carried for bytes changed");
    for (name, ds) in [
        ("zfs", &zfs as &dyn Datasets),
        ("tree", &plain as &dyn Datasets),
    ] {
        let media = tmp.path().join(format!("incr-{name}"));
        let mut target = DirTarget::new(&media).unwrap();
        let mut ex = Exporter::open(&mut target, &keys.node, &keys.recipients, chunk).unwrap();
        ex.export("bench-data", meta(), "s1", None, ds, &mut |_| {})
            .unwrap();
        let data = ds.path("bench-data");
        let mut base = "s1".to_owned();
        for (i, change) in [64usize << 10, 1 << 20, (mib << 20) / 10]
            .into_iter()
            .enumerate()
        {
            // Rewrite part of one big file in place (a database page, a
            // mailbox append would look the same).
            let f = data.join("big-0");
            let n = change.min(std::fs::metadata(&f).unwrap().len() as usize);
            {
                use std::os::unix::fs::FileExt;
                let file = std::fs::OpenOptions::new().write(true).open(&f).unwrap();
                file.write_all_at(&noise(77 + i as u64, n), 4096).unwrap();
                file.sync_all().unwrap();
            }
            let label = format!("s{}", i + 2);
            ds.snapshot("bench-data", &label).unwrap();
            let r = ex
                .export("bench-data", meta(), &label, Some(&base), ds, &mut |_| {})
                .unwrap();
            println!(
                "  {name:4}: {:8.1} KiB rewritten in a {:.1} MiB file  ->  stream {:8.1} KiB, stored {:8.1} KiB",
                n as f64 / 1024.0,
                std::fs::metadata(&f).unwrap().len() as f64 / (1 << 20) as f64,
                r.plain_bytes as f64 / 1024.0,
                r.stored_bytes as f64 / 1024.0
            );
            base = label;
        }
    }
    zfs.destroy("bench-data").unwrap();
}
