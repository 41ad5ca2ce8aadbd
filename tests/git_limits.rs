//! Git at its limits, end to end: a file bigger than the git grain's
//! memory limit pushes and clones over HTTPS and over SSH, and a push over
//! the grain's storage quota tells the user so.
//!
//! `GRANARY_BIG_FILE_MIB` sets the big file's size (default 300, above the
//! git grain's 256 MiB memory limit; the closing note of the seams issue
//! gives a 1 GiB run).

use std::path::Path;

use granary_testkit::{Daemon, DaemonMode, GitClient};

const DOMAIN: &str = "example.test";

fn big_file_mib() -> u64 {
    std::env::var("GRANARY_BIG_FILE_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300)
}

/// `mib` MiB at `path`: incompressible noise at the start and end, zeros
/// between (written sparse), so git must hold a big blob but the test does
/// not spend minutes compressing noise. `GRANARY_BIG_FILE_NOISE=1` makes it
/// noise throughout (a video, say).
fn big_file(path: &Path, mib: u64, seed: u64) {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::File::create(path).unwrap();
    if std::env::var_os("GRANARY_BIG_FILE_NOISE").is_some() {
        for i in 0..mib / 16 {
            f.write_all(&granary_testkit::noise(seed + i, 16 << 20))
                .unwrap();
        }
        return;
    }
    f.write_all(&granary_testkit::noise(seed, 4 << 20)).unwrap();
    f.seek(SeekFrom::Start((mib << 20) - (4 << 20))).unwrap();
    f.write_all(&granary_testkit::noise(seed + 1, 4 << 20))
        .unwrap();
}

#[test]
fn a_file_bigger_than_the_memory_limit_pushes_clones_and_fetches() {
    let daemon = Daemon::start_with(DaemonMode::Serve, &format!("domain = \"{DOMAIN}\"\n"));
    let tmp = tempfile::tempdir().unwrap();
    let pkg = granary_testkit::git_package(tmp.path());
    daemon
        .granary(&["app", "install", pkg.to_str().unwrap()])
        .success();
    daemon.granary(&["user", "add", "alice"]).success();
    let password = granary_testkit::app_password(&daemon, "alice", "git");
    let key = granary_testkit::ssh_key(&daemon, tmp.path(), "alice");
    let home = tmp.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let client = GitClient {
        daemon: &daemon,
        home,
        domain: DOMAIN,
    };
    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let mib = big_file_mib();
    big_file(&work.join("big.bin"), mib, 7);
    client.ok(&work, &["init", "-q"]);
    client.ok(&work, &["add", "."]);
    client.ok(&work, &["commit", "-q", "-m", "big"]);
    let url = client.url(Some(("alice", &password)), "alice/big.git");
    client.ok(&work, &["push", "-q", &url, "main"]);
    let status = || {
        daemon
            .granary(&["grain", "status", "alice/git"])
            .success()
            .stdout
    };
    // Cloned over HTTPS and over SSH, the whole file each time.
    let dest = tmp.path().join("clone");
    let (ok, out) = client.git(tmp.path(), &["clone", "-q", &url, dest.to_str().unwrap()]);
    assert!(
        ok,
        "clone of a {mib} MiB file failed:\n{out}\n--- grain status\n{}",
        status()
    );
    assert_eq!(
        std::fs::metadata(dest.join("big.bin")).unwrap().len(),
        mib << 20
    );
    let over_ssh = tmp.path().join("clone-ssh");
    let ssh_url = client.ssh_url("alice", "alice/big.git");
    let (ok, out) = client.git_ssh(
        tmp.path(),
        &key,
        &["clone", "-q", &ssh_url, over_ssh.to_str().unwrap()],
    );
    assert!(
        ok,
        "clone over SSH failed:\n{out}\n--- grain status\n{}",
        status()
    );
    assert_eq!(
        std::fs::metadata(over_ssh.join("big.bin")).unwrap().len(),
        mib << 20
    );

    // A second big file, pushed; both clones fetch it.
    big_file(&work.join("big2.bin"), mib, 11);
    client.ok(&work, &["add", "."]);
    client.ok(&work, &["commit", "-q", "-m", "bigger"]);
    client.ok(&work, &["push", "-q", &url, "main"]);
    client.ok(&dest, &["pull", "-q", &url, "main"]);
    assert_eq!(
        std::fs::metadata(dest.join("big2.bin")).unwrap().len(),
        mib << 20
    );
    let (ok, out) = client.git_ssh(&over_ssh, &key, &["pull", "-q", &ssh_url, "main"]);
    assert!(ok, "fetch over SSH failed:\n{out}");
    let status = status();
    assert!(
        !status.contains("HIT"),
        "the grain ran out of memory:\n{status}"
    );
    assert!(status.contains("memory       limit 256 MiB"), "{status}");
}

#[test]
fn a_push_over_the_quota_says_the_storage_is_full() {
    let tmp = tempfile::tempdir().unwrap();
    let pool = granary_datasets::testing::ZfsPool::create(tmp.path(), "512M").unwrap();
    let daemon = Daemon::start_with(
        DaemonMode::Serve,
        &format!(
            "domain = \"{DOMAIN}\"\n[storage]\nbackend = \"zfs\"\nzfs_dataset = \"{}\"\nquota_mib = 48\n",
            pool.name
        ),
    );
    let pkg = granary_testkit::git_package(tmp.path());
    daemon
        .granary(&["app", "install", pkg.to_str().unwrap()])
        .success();
    daemon.granary(&["user", "add", "alice"]).success();
    // The doctor reads the pool's own health (zpool status -x).
    let checks = daemon.granary(&["doctor", "--json"]).json();
    let pool = checks
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "zfs pool health")
        .expect("the pool is checked")
        .clone();
    assert_eq!(pool["level"], "ok", "{pool:#}");
    let password = granary_testkit::app_password(&daemon, "alice", "git");
    let key = granary_testkit::ssh_key(&daemon, tmp.path(), "alice");
    let home = tmp.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let client = GitClient {
        daemon: &daemon,
        home,
        domain: DOMAIN,
    };
    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::write(work.join("big.bin"), granary_testkit::noise(3, 64 << 20)).unwrap();
    client.ok(&work, &["init", "-q"]);
    client.ok(&work, &["add", "."]);
    client.ok(&work, &["commit", "-q", "-m", "too big"]);
    let url = client.url(Some(("alice", &password)), "alice/big.git");
    // Over HTTPS and over SSH the client hears, in words, that the push
    // did not fit and how big the storage is; nothing about framing layers.
    let (ok, out) = client.git(&work, &["push", &url, "main"]);
    assert!(!ok, "a push over the quota succeeded:\n{out}");
    assert!(
        out.contains("remote: granary: this push did not fit") && out.contains("free of 48 MiB"),
        "{out}"
    );
    assert!(!out.contains("curl 92") && !out.contains("HTTP/2"), "{out}");
    assert!(out.contains("[remote rejected] main -> main"), "{out}");
    let ssh_url = client.ssh_url("alice", "alice/big.git");
    let (ok, out) = client.git_ssh(&work, &key, &["push", &ssh_url, "main"]);
    assert!(!ok, "a push over the quota succeeded:\n{out}");
    assert!(
        out.contains("granary: this push did not fit") && out.contains("free of 48 MiB"),
        "{out}\n--- daemon log\n{}",
        daemon.log()
    );
    // A push that fits still goes through afterwards.
    let small = tmp.path().join("small");
    std::fs::create_dir_all(&small).unwrap();
    std::fs::write(small.join("README"), "fits\n").unwrap();
    client.ok(&small, &["init", "-q"]);
    client.ok(&small, &["add", "."]);
    client.ok(&small, &["commit", "-q", "-m", "small"]);
    client.ok(
        &small,
        &[
            "push",
            "-q",
            &client.url(Some(("alice", &password)), "alice/small.git"),
            "main",
        ],
    );
    // /metrics shows the dataset's use against its quota, from ZFS itself
    // (a grain's dataset exists once it has run).
    let metrics = std::process::Command::new("curl")
        .args(["--silent", "--fail"])
        .arg(format!("http://{}/metrics", daemon.listener("metrics")))
        .output()
        .unwrap();
    let metrics = String::from_utf8_lossy(&metrics.stdout);
    assert!(
        metrics.contains(&format!(
            "granary_grain_dataset_quota_bytes{{grain=\"alice-git\"}} {}",
            48u64 << 20
        )),
        "{metrics}"
    );
    // What the quota limits (snapshots not counted): the small repository,
    // under the quota.
    let used: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("granary_grain_dataset_bytes{grain=\"alice-git\"} "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no dataset bytes:\n{metrics}"));
    assert!(used > 0 && used <= 48 << 20, "{used}");

    // Raised by the admin, the quota takes the push that did not fit, and
    // it is kept with the grain (the state, the audit log, /metrics).
    let raised = daemon
        .granary(&["grain", "quota", "alice/git", "160M"])
        .success();
    assert!(raised.stdout.contains("quota 160 MiB"), "{raised}");
    client.ok(&work, &["push", "-q", &url, "main"]);
    let events = daemon
        .granary(&["audit", "--action", "grain.quota", "--json"])
        .success()
        .json();
    assert_eq!(events[0]["subject"], "alice-git", "{events:#}");
    assert_eq!(events[0]["detail"], format!("{} bytes", 160u64 << 20));
    let quota_metric = |daemon: &granary_testkit::Daemon| {
        let out = std::process::Command::new("curl")
            .args(["--silent", "--fail"])
            .arg(format!("http://{}/metrics", daemon.listener("metrics")))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| {
                l.strip_prefix("granary_grain_dataset_quota_bytes{grain=\"alice-git\"} ")
                    .map(str::to_owned)
            })
            .unwrap_or_default()
    };
    assert_eq!(quota_metric(&daemon), (160u64 << 20).to_string());
    // Below what the data now takes: ZFS refuses, and nothing changes.
    let low = daemon
        .granary(&["grain", "quota", "alice/git", "8M"])
        .failure();
    assert!(low.stderr.contains("set the quota"), "{low}");
    assert_eq!(quota_metric(&daemon), (160u64 << 20).to_string());
    let bad = daemon
        .granary(&["grain", "quota", "alice/git", "lots"])
        .failure();
    assert!(bad.stderr.contains("512M, 2G, none or default"), "{bad}");
}
