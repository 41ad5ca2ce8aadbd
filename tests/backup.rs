//! Backups end to end with the real daemon and CLI: an export to media
//! that fills up mid-write and resumes, a signed catalogue verified
//! without keys, a tampered chunk refused, restores onto a second node
//! with another uid range (the grain comes up with its data and a
//! consistent ledger written while it was snapshotted), drills, and on
//! ZFS: incremental zfs-send streams pushed on a schedule to another
//! node's `granary backup receive` over mutually authenticated TLS.

use std::io::BufRead;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use granary_datasets::testing::ZfsPool;
use granary_testkit::{Daemon, DaemonMode, eventually, hello_app, noise};

const WAIT: Duration = Duration::from_secs(60);

/// A tmpfs of a given size at `path`, unmounted on drop: media that fills.
struct SmallMedia {
    path: PathBuf,
}

impl SmallMedia {
    fn mount(path: &Path, size: &str) -> SmallMedia {
        std::fs::create_dir_all(path).unwrap();
        let ok = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "granary-test-media",
            ])
            .arg(path)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount a tmpfs (the tests run as root)");
        SmallMedia {
            path: path.to_path_buf(),
        }
    }

    fn grow(&self, size: &str) {
        let ok = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.path)
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }
}

impl Drop for SmallMedia {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(&self.path)
            .status();
    }
}

/// An age identity made by `granary backup keygen`: (file, public key).
fn keygen(dir: &Path) -> (PathBuf, String) {
    let file = dir.join("backup-identity.txt");
    let out = granary_testkit::run_granary(
        &[
            "--home",
            dir.to_str().unwrap(),
            "backup",
            "keygen",
            "--out",
            file.to_str().unwrap(),
        ],
        None,
    )
    .success();
    let public = out.stdout.trim().to_owned();
    assert!(public.starts_with("age1"), "{public}");
    assert_eq!(std::fs::metadata(&file).unwrap().mode() & 0o777, 0o600);
    (file, public)
}

fn backup_config(recipient: &str, extra: &str) -> String {
    format!("[backup]\nrecipients = [\"{recipient}\"]\nchunk_mib = 1\n{extra}\n")
}

fn install_hello(daemon: &Daemon) {
    let app = hello_app(daemon.dir(), "hello", &[]);
    daemon
        .granary(&["app", "install", app.to_str().unwrap()])
        .success();
}

fn chunks_under(dir: &Path) -> Vec<(PathBuf, std::time::SystemTime)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "age") {
                out.push((
                    p.clone(),
                    std::fs::metadata(&p).unwrap().modified().unwrap(),
                ));
            }
        }
    }
    out.sort();
    out
}

/// `granary restore` of alice/hello on `node` from `from`.
fn restore(node: &Daemon, from: &str, identity: &Path, extra: &[&str]) -> granary_testkit::Run {
    let mut args = vec![
        "restore",
        "--from",
        from,
        "--grain",
        "alice/hello",
        "--identity",
        identity.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    node.granary(&args)
}

fn grain_uid(daemon: &Daemon, grain: &str) -> u32 {
    let list = daemon
        .granary(&["grain", "list", "--json"])
        .success()
        .json();
    list.as_array()
        .unwrap()
        .iter()
        .find(|g| g["id"] == grain)
        .unwrap_or_else(|| panic!("{grain} in {list}"))["host_uid"]
        .as_u64()
        .unwrap() as u32
}

#[test]
fn export_resumes_after_full_media_and_restores_on_a_second_node() {
    let tmp = tempfile::tempdir().unwrap();
    let (identity, recipient) = keygen(tmp.path());
    let node1 = Daemon::start_with(DaemonMode::Serve, &backup_config(&recipient, ""));
    install_hello(&node1);
    node1.granary(&["user", "add", "alice"]).success();
    assert_eq!(node1.ask("alice/hello", "ping"), "pong");
    // 3 MiB of data, then a grain that keeps writing its ledger.
    let data = node1.data_dir().join("grains/alice-hello/data");
    std::fs::write(data.join("photo.raw"), noise(7, 3 << 20)).unwrap();
    assert_eq!(node1.ask("alice/hello", "writer"), "ok");

    // Media with room for about two chunks: the export stops there.
    let media = SmallMedia::mount(&tmp.path().join("media"), "2300k");
    let media_dir = media.path.to_str().unwrap().to_owned();
    let cut = node1
        .granary(&["backup", "export", "--to", &media_dir])
        .failure();
    assert!(
        cut.stdout.contains("FAILED"),
        "{}\n{}",
        cut.stdout,
        cut.stderr
    );
    let before = chunks_under(&media.path);
    assert!(
        !before.is_empty(),
        "whole chunks were written before it filled"
    );

    // More room (another stick, in real life): the export resumes.
    media.grow("64m");
    let done = node1
        .granary(&["backup", "export", "--to", &media_dir, "--json"])
        .success()
        .json();
    let stream = &done[0]["stream"];
    assert_eq!(done[0]["grain"], "alice-hello");
    assert_eq!(
        stream["resumed_chunks"].as_u64().unwrap() as usize,
        before.len(),
        "{done}"
    );
    assert!(stream["chunks"].as_u64().unwrap() >= 3, "{done}");
    assert!(stream["base"].is_null());
    for (path, modified) in &before {
        assert_eq!(
            &std::fs::metadata(path).unwrap().modified().unwrap(),
            modified,
            "{} was written once",
            path.display()
        );
    }

    // An incremental: the next export carries only what changed.
    std::fs::write(data.join("note.txt"), "written after the first export").unwrap();
    let incr = node1
        .granary(&["backup", "export", "--to", &media_dir, "--json"])
        .success()
        .json();
    let s = &incr[0]["stream"];
    assert_eq!(s["base"], stream["snapshot"], "{incr}");
    let changed = s["plain_bytes"].as_u64().unwrap();
    assert!(
        changed < 1 << 20,
        "an incremental of a little ledger and one note: {changed} bytes"
    );

    // Anyone can check it; no key needed.
    let verified = granary_testkit::run_granary(&["backup", "verify", &media_dir, "--json"], None)
        .success()
        .json();
    assert_eq!(verified["streams"], 2);
    let node1_key = node1
        .granary(&["backup", "key"])
        .success()
        .stdout
        .trim()
        .to_owned();
    assert_eq!(verified["signer"], node1_key.as_str());

    // A second node, another uid range (the test kit gives each daemon its
    // own), the same app. It trusts node 1's key.
    let node2 = Daemon::start_with(
        DaemonMode::Serve,
        &backup_config(&recipient, &format!("trust = [\"{node1_key}\"]")),
    );
    install_hello(&node2);
    node2.granary(&["user", "add", "alice"]).success();
    let restored = restore(&node2, &media_dir, &identity, &["--json"])
        .success()
        .json();
    assert_eq!(restored["started"], true, "{restored}");
    assert_eq!(restored["streams"], 2);
    let uid2 = grain_uid(&node2, "alice-hello");
    assert_ne!(uid2, grain_uid(&node1, "alice-hello"));
    assert_eq!(restored["host_uid"].as_u64().unwrap() as u32, uid2);
    let data2 = node2.data_dir().join("grains/alice-hello/data");
    assert_eq!(
        std::fs::read(data2.join("photo.raw")).unwrap(),
        noise(7, 3 << 20)
    );
    assert_eq!(
        std::fs::metadata(data2.join("photo.raw")).unwrap().uid(),
        uid2
    );
    // The grain sees its data, and the ledger it was writing while it was
    // snapshotted is consistent.
    assert!(node2.ask("alice/hello", "ls /var").contains("note.txt"));
    let ledger = node2.ask("alice/hello", "ledger");
    assert!(ledger.starts_with("ok lines="), "{ledger}");

    // The first point in time, as another user (created on the way).
    let older = restore(
        &node2,
        &media_dir,
        &identity,
        &[
            "--as",
            "bob",
            "--snapshot",
            stream["snapshot"].as_str().unwrap(),
            "--json",
        ],
    )
    .success()
    .json();
    assert_eq!(older["user_created"], true);
    assert!(
        !node2
            .data_dir()
            .join("grains/bob-hello/data/note.txt")
            .exists()
    );
    assert!(node2.ask("bob/hello", "ledger").starts_with("ok"));

    // Restoring over a grain that holds data is refused.
    let refused = restore(&node2, &media_dir, &identity, &[]).failure();
    assert!(
        refused.stderr.contains("already holds data"),
        "{}",
        refused.stderr
    );

    // The drill restores everything into scratch space and compares.
    let drill = node2
        .granary(&[
            "backup",
            "drill",
            "--from",
            &media_dir,
            "--identity",
            identity.to_str().unwrap(),
            "--json",
        ])
        .success()
        .json();
    assert_eq!(drill[0]["ok"], true, "{drill}");
    assert!(
        !std::fs::read_dir(node2.data_dir().join("grains"))
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with('0')),
        "the drill left nothing behind"
    );

    // One byte of one chunk changed: verify names it; restore refuses and
    // leaves nothing half-restored.
    let (victim, _) = chunks_under(&media.path).into_iter().nth(1).unwrap();
    let mut bytes = std::fs::read(&victim).unwrap();
    bytes[4000] ^= 0x01;
    std::fs::write(&victim, bytes).unwrap();
    let bad = granary_testkit::run_granary(&["backup", "verify", &media_dir], None).failure();
    let name = victim.file_name().unwrap().to_str().unwrap();
    assert!(
        bad.stderr.contains(name) && bad.stderr.contains("SHA-256"),
        "{}",
        bad.stderr
    );
    let bad = restore(&node2, &media_dir, &identity, &["--as", "carol"]).failure();
    assert!(bad.stderr.contains("changed or damaged"), "{}", bad.stderr);
    let carol = node2.data_dir().join("grains/carol-hello/data");
    assert!(
        !carol.exists() || std::fs::read_dir(&carol).unwrap().next().is_none(),
        "nothing half-restored"
    );

    // Another node's backup is not restored unless trusted.
    let node3 = Daemon::start_with(DaemonMode::Serve, &backup_config(&recipient, ""));
    // Trusted, but the app is missing: a clear error, nothing made.
    let no_app = restore(&node3, &media_dir, &identity, &["--trust", &node1_key]).failure();
    assert!(
        no_app.stderr.contains("hello app") && no_app.stderr.contains("not installed"),
        "{}",
        no_app.stderr
    );
    install_hello(&node3);
    let untrusted = restore(&node3, &media_dir, &identity, &[]).failure();
    assert!(untrusted.stderr.contains("--trust"), "{}", untrusted.stderr);
    drop(media);
}

/// `granary backup receive` as a child process; killed by pid on drop.
struct Receiver {
    child: std::process::Child,
    address: String,
    key: String,
}

impl Receiver {
    fn start(home: &Path, dir: &Path, allow: &str) -> Receiver {
        let mut child = std::process::Command::new(granary_testkit::granary_bin())
            .args([
                "--home",
                home.to_str().unwrap(),
                "backup",
                "receive",
                "--listen",
                "127.0.0.1:0",
                "--dir",
            ])
            .arg(dir)
            .args(["--allow", allow])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .unwrap();
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let address = lines.next().unwrap().unwrap();
        let key = lines.next().unwrap().unwrap();
        Receiver {
            child,
            address: address.strip_prefix("listening on ").unwrap().to_owned(),
            key: key.strip_prefix("node key ").unwrap().to_owned(),
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn zfs_streams_go_to_another_node_on_a_schedule_and_restore_there() {
    let tmp = tempfile::tempdir().unwrap();
    let pool = ZfsPool::create(tmp.path(), "512M").unwrap();
    for parent in ["node1", "node2"] {
        let ok = std::process::Command::new("zfs")
            .args(["create", &format!("{}/{parent}", pool.name)])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }
    let (identity, recipient) = keygen(tmp.path());
    let zfs = |parent: &str| {
        format!(
            "[storage]\nbackend = \"zfs\"\nzfs_dataset = \"{}/{parent}\"\nquota_mib = 64\n[snapshots]\ninterval = \"off\"\n",
            pool.name
        )
    };
    let mut node1 = Daemon::start_with(
        DaemonMode::Serve,
        &format!("{}{}", zfs("node1"), backup_config(&recipient, "")),
    );
    install_hello(&node1);
    node1.granary(&["user", "add", "alice"]).success();
    assert_eq!(node1.ask("alice/hello", "writer"), "ok");
    let data = node1.data_dir().join("grains/alice-hello/data");
    std::fs::write(data.join("big"), noise(3, 2 << 20)).unwrap();

    // The receiving node allows node 1; node 1 pins the receiver's key and
    // pushes every second.
    let node1_key = node1
        .granary(&["backup", "key"])
        .success()
        .stdout
        .trim()
        .to_owned();
    let received = tmp.path().join("received");
    let receiver = Receiver::start(&tmp.path().join("receiver-home"), &received, &node1_key);
    let mut config = std::fs::read_to_string(node1.config_path()).unwrap();
    config.push_str(&format!(
        "\n[[backup.targets]]\nname = \"offsite\"\nremote = \"{}\"\nremote_key = \"{}\"\ninterval = \"1s\"\n",
        receiver.address, receiver.key
    ));
    std::fs::write(node1.config_path(), config).unwrap();
    node1.restart();
    assert_eq!(node1.ask("alice/hello", "writer"), "ok");
    let stored = received.join(&node1_key[..16]);
    let catalogue = stored.join("granary-backup.catalogue");
    // Two scheduled rounds: a full stream, then incrementals.
    eventually("two scheduled pushes", WAIT, || {
        let text = std::fs::read_to_string(&catalogue).ok()?;
        (text.matches("\"snapshot\"").count() >= 2).then_some(())
    });
    let text = std::fs::read_to_string(&catalogue).unwrap();
    assert!(text.contains("\"format\": \"zfs\""), "{text}");
    // The receiver holds only ciphertext.
    for (chunk, _) in chunks_under(&stored) {
        let bytes = std::fs::read(&chunk).unwrap();
        assert!(
            bytes.starts_with(b"age-encryption.org/v1"),
            "{}",
            chunk.display()
        );
    }
    granary_testkit::run_granary(&["backup", "verify", stored.to_str().unwrap()], None).success();
    // `backup verify` of the configured remote target goes over the wire.
    node1.granary(&["backup", "verify", "offsite"]).success();
    drop(receiver);

    // The receiving side restores what it got, on ZFS, as node 2.
    let node2 = Daemon::start_with(
        DaemonMode::Serve,
        &format!(
            "{}{}",
            zfs("node2"),
            backup_config(&recipient, &format!("trust = [\"{node1_key}\"]"))
        ),
    );
    install_hello(&node2);
    let restored = restore(&node2, stored.to_str().unwrap(), &identity, &["--json"])
        .success()
        .json();
    assert_eq!(restored["started"], true, "{restored}");
    assert!(
        restored["streams"].as_u64().unwrap() >= 2,
        "full then incrementals: {restored}"
    );
    let uid2 = grain_uid(&node2, "alice-hello");
    let data2 = node2.data_dir().join("grains/alice-hello/data");
    assert_eq!(std::fs::read(data2.join("big")).unwrap(), noise(3, 2 << 20));
    assert_eq!(std::fs::metadata(data2.join("big")).unwrap().uid(), uid2);
    let ledger = node2.ask("alice/hello", "ledger");
    assert!(ledger.starts_with("ok lines="), "{ledger}");
    let drill = node2
        .granary(&[
            "backup",
            "drill",
            "--from",
            stored.to_str().unwrap(),
            "--identity",
            identity.to_str().unwrap(),
        ])
        .success();
    assert!(drill.stdout.contains("ok"), "{}", drill.stdout);
    // Node 1 keeps only the newest exported snapshot as the next base.
    let snaps = node1
        .granary(&["snapshot", "list", "alice/hello", "--json"])
        .success()
        .json();
    let backups = snaps
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["name"].as_str().unwrap().starts_with("backup-"))
        .count();
    assert!(
        (1..=2).contains(&backups),
        "old bases are released: {snaps}"
    );
    drop(node1);
    drop(node2);
}
