//! The daemon on ZFS (zfs-fuse, a pool on a sparse file made here): every
//! grain gets its own dataset with a quota, `granary status` says so, and
//! purging a user keeps each grain's final snapshot. On the plain default,
//! snapshots are scheduled too, and link what did not change.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use granary_datasets::testing::ZfsPool;
use granary_testkit::{Daemon, DaemonMode};

fn install_hello(daemon: &Daemon) {
    let app = daemon.dir().join("app");
    std::fs::create_dir_all(app.join("image/bin")).unwrap();
    std::fs::copy(
        granary_testkit::hello_binary(),
        app.join("image/bin/granary-hello"),
    )
    .unwrap();
    std::fs::write(
        app.join("granary-app.toml"),
        "id = \"org.test.hello\"\nversion = \"1\"\nkind = \"hello\"\n\
         exec = [\"/bin/granary-hello\"]\nservices = [\"hello\"]\n",
    )
    .unwrap();
    daemon
        .granary(&["app", "install", app.to_str().unwrap()])
        .success();
}

#[test]
fn plain_datasets_are_snapshotted_on_schedule_and_unchanged_files_are_links() {
    let daemon = Daemon::start_with(
        DaemonMode::Serve,
        "[snapshots]\ninterval = \"1s\"\nkeep = [\"1s:1000\"]\n",
    );
    let status = daemon.granary(&["status", "--json"]).success().json();
    assert_eq!(status["storage_backend"], "plain");
    install_hello(&daemon);
    daemon.granary(&["user", "add", "alice"]).success();
    assert_eq!(daemon.ask("alice/hello", "ping"), "pong");
    let grain = daemon.data_dir().join("grains/alice-hello");
    std::fs::write(grain.join("data/kept"), "the same in every snapshot").unwrap();
    std::fs::write(grain.join("data/note"), "before").unwrap();

    let autos = || -> Vec<std::path::PathBuf> {
        let list = daemon
            .granary(&["snapshot", "list", "alice/hello", "--json"])
            .success()
            .json();
        list.as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap().to_owned())
            .filter(|n| n.starts_with("auto-"))
            .map(|n| grain.join("snapshots").join(n))
            .collect()
    };
    let ino = |p: &Path| std::fs::metadata(p).unwrap().ino();
    // Two automatic snapshots that hold `kept` as one inode: the later
    // one linked it (once the file was older than the walk's second).
    let (older, newer) = granary_testkit::eventually(
        "two automatic snapshots sharing an unchanged file",
        std::time::Duration::from_secs(30),
        || {
            let snaps: Vec<_> = autos()
                .into_iter()
                .filter(|s| s.join("kept").exists() && s.join("note").exists())
                .collect();
            snaps.windows(2).find_map(|w| {
                (ino(&w[0].join("kept")) == ino(&w[1].join("kept")))
                    .then(|| (w[0].clone(), w[1].clone()))
            })
        },
    );
    assert_ne!(
        ino(&newer.join("kept")),
        ino(&grain.join("data/kept")),
        "a snapshot never shares an inode with the live dataset"
    );
    assert_eq!(
        std::fs::read_to_string(newer.join("kept")).unwrap(),
        "the same in every snapshot"
    );
    // Written in place: later snapshots have the new text, earlier ones
    // keep the old.
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(grain.join("data/note"))
            .unwrap();
        f.write_all(b"AFTER!").unwrap();
    }
    granary_testkit::eventually(
        "an automatic snapshot with the new note",
        std::time::Duration::from_secs(30),
        || {
            autos()
                .iter()
                .any(|s| std::fs::read_to_string(s.join("note")).ok().as_deref() == Some("AFTER!"))
                .then_some(())
        },
    );
    assert_eq!(
        std::fs::read_to_string(older.join("note")).unwrap(),
        "before"
    );
    drop(daemon);
}

#[test]
fn grains_live_on_their_own_zfs_datasets_and_purge_keeps_a_final_snapshot() {
    let tmp = tempfile::tempdir().unwrap();
    let pool = ZfsPool::create(tmp.path(), "256M").unwrap();
    let daemon = Daemon::start_with(
        DaemonMode::Serve,
        &format!(
            "[storage]\nbackend = \"zfs\"\nzfs_dataset = \"{}\"\nquota_mib = 16\n\
             [snapshots]\ninterval = \"1s\"\nkeep = [\"1h:1\"]\n",
            pool.name
        ),
    );
    let status = daemon.granary(&["status", "--json"]).success().json();
    assert_eq!(status["storage_backend"], "zfs");

    install_hello(&daemon);
    daemon.granary(&["user", "add", "alice"]).success();
    assert_eq!(daemon.ask("alice/hello", "ping"), "pong");

    let zfs = |args: &[&str]| {
        let out = std::process::Command::new("zfs")
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let dataset = format!("{}/alice-hello", pool.name);
    assert_eq!(
        zfs(&["get", "-H", "-o", "value", "refquota", &dataset]).trim(),
        "16M"
    );
    // A consistent snapshot of the running grain, then a rollback to it.
    let data = daemon.data_dir().join("grains/alice-hello/data");
    std::fs::write(data.join("note"), "before").unwrap();
    let taken = daemon
        .granary(&[
            "snapshot",
            "create",
            "alice/hello",
            "--label",
            "before-change",
        ])
        .success();
    assert!(taken.stdout.contains("frozen for"), "{}", taken.stdout);
    assert!(
        taken.stdout.contains("checkpoint: nothing to flush"),
        "{}",
        taken.stdout
    );
    std::fs::write(data.join("note"), "after").unwrap();
    std::fs::write(data.join("later"), "x").unwrap();
    let list = daemon
        .granary(&["snapshot", "list", "alice/hello", "--json"])
        .success()
        .json();
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .any(|s| s["name"] == "before-change"),
        "{list}"
    );
    let back = daemon
        .granary(&["snapshot", "rollback", "alice/hello", "before-change"])
        .success();
    assert!(back.stdout.contains("running again"), "{}", back.stdout);
    assert_eq!(
        std::fs::read_to_string(data.join("note")).unwrap(),
        "before"
    );
    assert!(!data.join("later").exists());
    // The grain is told its data was set back (an app with sync tokens
    // starts new ones).
    assert!(data.join(".granary-rewound").exists());
    assert_eq!(daemon.ask("alice/hello", "ping"), "pong");

    // The scheduler snapshots every second and keeps one automatic
    // snapshot per hour; the manual one stays.
    granary_testkit::eventually(
        "an automatic snapshot",
        std::time::Duration::from_secs(30),
        || {
            let list = daemon
                .granary(&["snapshot", "list", "alice/hello", "--json"])
                .success()
                .json();
            let names: Vec<String> = list
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["name"].as_str().unwrap().to_owned())
                .collect();
            let autos = names.iter().filter(|n| n.starts_with("auto-")).count();
            assert!(autos <= 2, "pruning keeps one per hour: {names:?}");
            assert!(names.contains(&"before-change".to_owned()));
            (autos >= 1).then_some(())
        },
    );
    let refused = daemon
        .granary(&["snapshot", "create", "alice/hello", "--label", "auto-1"])
        .failure();
    assert!(refused.stderr.contains("scheduler"), "{}", refused.stderr);
    let refused = daemon.granary(&["user", "remove", "alice"]).failure();
    assert!(
        refused.stderr.contains("final state is kept"),
        "{}",
        refused.stderr
    );
    daemon
        .granary(&["user", "remove", "alice", "--purge"])
        .success();
    let snapshots = zfs(&["list", "-H", "-t", "snapshot", "-o", "name"]);
    assert!(
        snapshots.contains(&format!("{}/retired-alice-hello-final-", pool.name)),
        "{snapshots}"
    );
    assert!(!zfs(&["list", "-H", "-o", "name"]).contains(&dataset));
    drop(daemon);
}
