//! What a scheduled snapshot costs on the plain backend (the embedded
//! default): a dataset of many files, 1% of it rewritten in place, and the
//! snapshot taken after, against the two ways an admin would do it by
//! hand, in one run on the same data:
//!
//! - `cp -a --reflink=auto` (a whole copy: what plain snapshots were);
//! - `rsync -a --link-dest` (links to the previous copy, as ours).
//!
//! A second shape is one big file with 1% of it rewritten: plain snapshots
//! work file by file, so that costs a whole copy of the file (a reflink
//! where the filesystem has them). Use ZFS or btrfs for one big database.
//!
//! cargo bench -p granary-datasets --bench snapshots              # 1 GiB
//! cargo bench -p granary-datasets --bench snapshots -- --smoke   # 64 MiB

use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use granary_datasets::{Datasets, Plain};

const FILE: usize = 1 << 20;

/// Fills `dir` with `files` files of 1 MiB each that do not compress.
fn fill(dir: &Path, files: usize) {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut buf = vec![0u8; FILE];
    for i in 0..files {
        for chunk in buf.chunks_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            chunk.copy_from_slice(&state.to_le_bytes());
        }
        let sub = dir.join(format!("d{:02}", i % 32));
        std::fs::create_dir_all(&sub).unwrap();
        std::fs::write(sub.join(format!("f{i:05}")), &buf).unwrap();
    }
}

/// Rewrites one 4 KiB page in place in each file given.
fn touch_files(dir: &Path, files: &[usize]) {
    for &i in files {
        let path = dir.join(format!("d{:02}", i % 32)).join(format!("f{i:05}"));
        let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        f.seek(SeekFrom::Start(4096)).unwrap();
        f.write_all(&[i as u8; 4096]).unwrap();
    }
}

/// Kilobytes that `second` adds on disk to `first` (du counts a hard-linked
/// inode once, for the first tree it meets).
fn added_kib(first: &Path, second: &Path) -> u64 {
    let out = Command::new("du")
        .arg("-sk")
        .arg(first)
        .arg(second)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .nth(1)
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Every measurement starts with nothing dirty: ours ends with a syncfs,
/// which must not pay for what the peers left in the page cache.
fn settle() {
    let _ = Command::new("sync").status();
}

fn run(what: &str, cmd: &mut Command) -> Duration {
    settle();
    let started = Instant::now();
    let status = cmd.status().unwrap();
    assert!(status.success(), "{what} failed");
    started.elapsed()
}

/// A plain snapshot indexes only files older than the second its walk
/// started in (a write in that same second could go unseen). Scheduled
/// snapshots are minutes apart; here the clock is let run past it once.
fn let_the_second_pass() {
    std::thread::sleep(Duration::from_millis(1100));
}

fn main() {
    let smoke = std::env::args().any(|a| a == "--smoke");
    let files = if smoke { 64 } else { 1024 };
    let changed: Vec<usize> = (0..files).step_by(100).collect();
    let tmp = tempfile::Builder::new()
        .prefix("granary-snap-bench")
        .tempdir_in("/var/tmp")
        .unwrap();
    let plain = Plain::new(&tmp.path().join("grains")).unwrap();
    let data = plain.create("bench-data", 0).unwrap();
    fill(&data, files);
    let_the_second_pass();
    println!(
        "plain snapshots: {files} MiB in {files} files, {} of them rewritten in place (4 KiB each)",
        changed.len()
    );

    // The first snapshot is a whole copy, as every way of doing it is.
    settle();
    let t = Instant::now();
    plain.snapshot("bench-data", "auto-1").unwrap();
    let first = t.elapsed();
    let cp_base = tmp.path().join("cp-1");
    let cp_first = run(
        "cp",
        Command::new("cp")
            .args(["-a", "--reflink=auto"])
            .arg(&data)
            .arg(&cp_base),
    );
    let rsync_base = tmp.path().join("rsync-1");
    run(
        "rsync",
        Command::new("rsync")
            .arg("-a")
            .arg(format!("{}/", data.display()))
            .arg(&rsync_base),
    );

    touch_files(&data, &changed);
    settle();
    let t = Instant::now();
    plain.snapshot("bench-data", "auto-2").unwrap();
    let ours = t.elapsed();
    let snaps = plain.grain_dir("bench-data").join("snapshots");
    let ours_kib = added_kib(&snaps.join("auto-1"), &snaps.join("auto-2"));

    let cp_second = tmp.path().join("cp-2");
    let cp = run(
        "cp",
        Command::new("cp")
            .args(["-a", "--reflink=auto"])
            .arg(&data)
            .arg(&cp_second),
    );
    let cp_kib = added_kib(&cp_base, &cp_second);
    let rsync_second = tmp.path().join("rsync-2");
    let rsync = run(
        "rsync",
        Command::new("rsync")
            .arg("-a")
            .arg(format!("--link-dest={}", rsync_base.display()))
            .arg(format!("{}/", data.display()))
            .arg(&rsync_second),
    );
    let rsync_kib = added_kib(&rsync_base, &rsync_second);

    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "  first snapshot (a whole copy): granary {:.0} ms, cp -a {:.0} ms",
        ms(first),
        ms(cp_first)
    );
    println!(
        "  1% changed: granary {:.1} ms, {ours_kib} KiB new | cp -a {:.0} ms, {cp_kib} KiB | rsync --link-dest {:.0} ms, {rsync_kib} KiB",
        ms(ours),
        ms(cp),
        ms(rsync),
    );
    println!(
        "  ratio granary/cp: time {:.3}x, space {:.3}x; granary/rsync: time {:.2}x, space {:.2}x",
        ms(ours) / ms(cp),
        ours_kib as f64 / cp_kib.max(1) as f64,
        ms(ours) / ms(rsync),
        ours_kib as f64 / rsync_kib.max(1) as f64,
    );

    // One big file, 1% of its pages rewritten: copied whole.
    let big = plain.create("bench-big", 0).unwrap();
    {
        let mut out = std::fs::File::create(big.join("db")).unwrap();
        let chunk = vec![7u8; FILE];
        for _ in 0..files {
            out.write_all(&chunk).unwrap();
        }
        out.sync_all().unwrap();
    }
    let_the_second_pass();
    plain.snapshot("bench-big", "auto-1").unwrap();
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(big.join("db"))
            .unwrap();
        for page in (0..files as u64 * 256).step_by(100) {
            f.seek(SeekFrom::Start(page * 4096)).unwrap();
            f.write_all(&[1u8; 4096]).unwrap();
        }
    }
    settle();
    let t = Instant::now();
    plain.snapshot("bench-big", "auto-2").unwrap();
    let big_time = t.elapsed();
    let snaps = plain.grain_dir("bench-big").join("snapshots");
    let big_kib = added_kib(&snaps.join("auto-1"), &snaps.join("auto-2"));
    println!(
        "  one {files} MiB file, 1% of its pages rewritten: granary {:.0} ms, {big_kib} KiB new (file by file: a whole copy, or a reflink where the filesystem has them)",
        ms(big_time),
    );
}
