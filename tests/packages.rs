//! Signed packages end to end: `granary pack` builds and signs the example
//! app, the daemon verifies and installs it into its content-addressed
//! image store, and a grain runs from that image in a real jail. Tampered
//! packages, other signers and failed upgrades are refused or rolled back.

use std::path::{Path, PathBuf};

use granary_testkit::{Daemon, DaemonMode, eventually, run_granary};

fn hello_binary() -> PathBuf {
    let triple = format!("{}-unknown-linux-gnu", std::env::consts::ARCH);
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(format!("../target/{triple}/debug/granary-hello"));
    assert!(
        path.exists(),
        "{} is missing; run ./run-tests",
        path.display()
    );
    path
}

/// A package definition for the example app at `version`, with extra
/// arguments to its exec.
fn definition(dir: &Path, version: &str, args: &[&str]) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(hello_binary(), dir.join("granary-hello")).unwrap();
    let mut exec = vec!["\"/bin/granary-hello\"".to_owned()];
    exec.extend(args.iter().map(|a| format!("{a:?}")));
    let def = dir.join(format!("hello-{version}.toml"));
    std::fs::write(
        &def,
        format!(
            "format = 1\n[app]\nkind = \"hello\"\nversion = \"{version}\"\nexec = [{}]\n\
             services = [\"hello\"]\noffers = [\"ping\"]\n[files]\n\
             copy = [{{ from = \"granary-hello\", to = \"/bin/granary-hello\" }}]\n",
            exec.join(", ")
        ),
    )
    .unwrap();
    def
}

fn pack(key: &Path, args: &[&str]) -> granary_testkit::Run {
    let mut full = vec!["pack"];
    full.extend_from_slice(args);
    full.extend_from_slice(&["--key", key.to_str().unwrap()]);
    run_granary(&full, None)
}

fn build(key: &Path, def: &Path, out: &Path) {
    pack(
        key,
        &["build", def.to_str().unwrap(), "-o", out.to_str().unwrap()],
    )
    .success();
}

fn ask(daemon: &Daemon, grain: &str, line: &str) -> String {
    daemon
        .granary_with_stdin(
            &["grain", "connect", grain, "hello"],
            Some(&format!("{line}\n")),
        )
        .success()
        .stdout
        .trim_end()
        .to_owned()
}

#[test]
fn a_signed_package_installs_and_its_grain_sees_only_the_package() {
    let daemon = Daemon::start_with(DaemonMode::Serve, "");
    let work = daemon.dir().join("work");
    let key = work.join("pack.key");
    let keygen = pack(&key, &["keygen"]).success();
    assert!(keygen.stdout.contains("app id"), "{}", keygen.stdout);
    let def = definition(&work, "1.0", &[]);
    let pkg = work.join("hello-1.0.gpkg");
    build(&key, &def, &pkg);
    let verify = run_granary(&["pack", "verify", pkg.to_str().unwrap()], None).success();
    assert!(
        verify.stdout.contains("signature and contents ok"),
        "{}",
        verify.stdout
    );
    let inspect = run_granary(&["pack", "inspect", pkg.to_str().unwrap(), "--json"], None)
        .success()
        .json();
    assert_eq!(inspect["manifest"]["kind"], "hello");
    let paths: Vec<&str> = inspect["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, ["/bin", "/bin/granary-hello"]);

    daemon.granary(&["user", "add", "alice"]).success();
    let installed = daemon
        .granary(&["app", "install", pkg.to_str().unwrap(), "--json"])
        .success()
        .json();
    assert_eq!(installed["dev_mode"], false);
    assert_eq!(installed["app_id"], inspect["app_id"]);
    let image = daemon
        .data_dir()
        .join("apps/hello")
        .join(inspect["sha256"].as_str().unwrap());
    assert!(image.join("image/bin/granary-hello").exists());
    // The grain runs from the image and sees only it (and its mounts).
    assert_eq!(ask(&daemon, "alice/hello", "ping"), "pong");
    assert_eq!(ask(&daemon, "alice/hello", "ls /"), "bin dev proc tmp var");
    assert_eq!(ask(&daemon, "alice/hello", "ls /bin"), "granary-hello");
    // The same package again: the same image.
    daemon
        .granary(&["app", "install", pkg.to_str().unwrap()])
        .success();
    assert_eq!(
        std::fs::read_dir(daemon.data_dir().join("apps/hello"))
            .unwrap()
            .count(),
        1
    );

    // One flipped byte: refused, nothing installed.
    let mut bytes = std::fs::read(&pkg).unwrap();
    let at = bytes.len() - 100;
    bytes[at] ^= 0x20;
    let tampered = work.join("tampered.gpkg");
    std::fs::write(&tampered, &bytes).unwrap();
    let refused = run_granary(&["pack", "verify", tampered.to_str().unwrap()], None).failure();
    assert!(
        refused.stderr.contains("signature does not verify"),
        "{}",
        refused.stderr
    );
    let refused = daemon
        .granary(&["app", "install", tampered.to_str().unwrap()])
        .failure();
    assert!(
        refused.stderr.contains("signature does not verify"),
        "{}",
        refused.stderr
    );
    assert_eq!(
        std::fs::read_dir(daemon.data_dir().join("apps/hello"))
            .unwrap()
            .count(),
        1
    );

    // Another signer cannot take the kind without --replace.
    let other_key = work.join("other.key");
    pack(&other_key, &["keygen"]).success();
    let other_pkg = work.join("other.gpkg");
    build(&other_key, &def, &other_pkg);
    let refused = daemon
        .granary(&["app", "install", other_pkg.to_str().unwrap()])
        .failure();
    assert!(refused.stderr.contains("--replace"), "{}", refused.stderr);
    assert_eq!(ask(&daemon, "alice/hello", "ping"), "pong");
}

#[test]
fn an_upgrade_that_fails_to_start_rolls_back() {
    let daemon = Daemon::start_with(DaemonMode::Serve, "[grains]\nrestart_backoff = \"50ms\"\n");
    let work = daemon.dir().join("work");
    let key = work.join("pack.key");
    pack(&key, &["keygen"]).success();
    let v1 = work.join("v1.gpkg");
    build(&key, &definition(&work, "1.0", &[]), &v1);
    daemon.granary(&["user", "add", "alice"]).success();
    daemon
        .granary(&["app", "install", v1.to_str().unwrap()])
        .success();
    assert_eq!(ask(&daemon, "alice/hello", "ping"), "pong");

    // 1.1 crashes at start: the upgrade is rolled back and the grain runs 1.0.
    let bad = work.join("v1.1.gpkg");
    build(
        &key,
        &definition(&work.join("bad"), "1.1", &["--crash-at-start"]),
        &bad,
    );
    let out = daemon
        .granary(&["app", "upgrade", bad.to_str().unwrap()])
        .failure();
    assert!(
        out.stderr.contains("rolled back to hello 1.0"),
        "{}",
        out.stderr
    );
    let apps = daemon.granary(&["app", "list", "--json"]).success().json();
    assert_eq!(apps[0]["version"], "1.0");
    eventually(
        "alice/hello back on 1.0",
        std::time::Duration::from_secs(30),
        || {
            let s = daemon
                .granary(&["grain", "status", "alice/hello", "--json"])
                .success()
                .json();
            (s["state"] == "running").then_some(())
        },
    );
    assert_eq!(ask(&daemon, "alice/hello", "ping"), "pong");

    // An older or equal version is not an upgrade.
    let refused = daemon
        .granary(&["app", "upgrade", v1.to_str().unwrap()])
        .failure();
    assert!(refused.stderr.contains("not newer"), "{}", refused.stderr);

    // 2.0 works: upgraded, the grain restarted on it, data untouched.
    let v2 = work.join("v2.gpkg");
    build(&key, &definition(&work.join("good"), "2.0", &[]), &v2);
    let out = daemon
        .granary(&["app", "upgrade", v2.to_str().unwrap()])
        .success();
    assert!(out.stdout.contains("from 1.0 to 2.0"), "{}", out.stdout);
    let s = daemon
        .granary(&["grain", "status", "alice/hello", "--json"])
        .success()
        .json();
    assert_eq!(s["state"], "running");
    assert_eq!(ask(&daemon, "alice/hello", "ping"), "pong");
}
