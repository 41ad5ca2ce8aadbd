//! Signed packages end to end: `granary pack` builds and signs the example
//! app, the daemon verifies and installs it into its content-addressed
//! image store, and a grain runs from that image in a real jail. Tampered
//! packages, other signers and failed upgrades are refused or rolled back.

use std::path::{Path, PathBuf};

use granary_testkit::{Daemon, DaemonMode, eventually, run_granary};

/// A package definition for the example app at `version`, with extra
/// arguments to its exec.
fn definition(dir: &Path, version: &str, args: &[&str]) -> PathBuf {
    definition_with(dir, version, args, "")
}

fn definition_with(dir: &Path, version: &str, args: &[&str], extra: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(granary_testkit::hello_binary(), dir.join("granary-hello")).unwrap();
    let mut exec = vec!["\"/bin/granary-hello\"".to_owned()];
    exec.extend(args.iter().map(|a| format!("{a:?}")));
    let def = dir.join(format!("hello-{version}.toml"));
    std::fs::write(
        &def,
        format!(
            "format = 1\n[app]\nkind = \"hello\"\nversion = \"{version}\"\nexec = [{}]\n\
             services = [\"hello\"]\noffers = [\"ping\"]\n{extra}\n[files]\n\
             copy = [{{ from = \"granary-hello\", to = \"/bin/granary-hello\" }}]\n",
            exec.join(", "),
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

/// What `apps/hello` holds, sorted.
fn kept(daemon: &Daemon) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(daemon.data_dir().join("apps/hello"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn build(key: &Path, def: &Path, out: &Path) {
    pack(
        key,
        &["build", def.to_str().unwrap(), "-o", out.to_str().unwrap()],
    )
    .success();
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
    let sha256 = inspect["sha256"].as_str().unwrap();
    let image = daemon.data_dir().join("apps/hello").join(sha256);
    assert!(image.join("image/bin/granary-hello").exists());
    // The grain runs from the image and sees only it (and its mounts).
    assert_eq!(daemon.ask("alice/hello", "ping"), "pong");
    assert_eq!(daemon.ask("alice/hello", "ls /"), "bin dev tmp var");
    assert_eq!(daemon.ask("alice/hello", "ls /bin"), "granary-hello");
    // The same package again: the same image.
    daemon
        .granary(&["app", "install", pkg.to_str().unwrap()])
        .success();
    assert_eq!(
        kept(&daemon),
        [sha256.to_owned(), format!("{sha256}.gpkg")],
        "one image, and its package kept beside it"
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
        kept(&daemon),
        [sha256.to_owned(), format!("{sha256}.gpkg")],
        "one image, and its package kept beside it"
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
    assert_eq!(daemon.ask("alice/hello", "ping"), "pong");
}

#[test]
fn a_package_with_an_image_per_architecture_runs_this_hosts_image() {
    let daemon = Daemon::start_with(DaemonMode::Serve, "");
    let work = daemon.dir().join("work");
    let key = work.join("pack.key");
    pack(&key, &["keygen"]).success();
    let (here, other) = (std::env::consts::ARCH, granary_testkit::other_arch());
    // `{arch}` in a host path names each image's architecture.
    let def = granary_testkit::two_arch_definition(&work, "hello");
    let foreign = work.join(other).join("granary-hello");
    let multi = work.join("multi.gpkg");
    let def_arg = def.to_str().unwrap();
    let built = pack(
        &key,
        &[
            "build",
            def_arg,
            "-o",
            multi.to_str().unwrap(),
            "--target",
            here,
            "--target",
            other,
        ],
    )
    .success();
    assert!(
        built.stdout.contains("images for aarch64, x86_64"),
        "{}",
        built.stdout
    );
    let inspect = run_granary(
        &["pack", "inspect", multi.to_str().unwrap(), "--json"],
        None,
    )
    .success()
    .json();
    assert_eq!(
        inspect["manifest"]["arches"],
        serde_json::json!(["aarch64", "x86_64"])
    );
    let mut programs: Vec<&str> = inspect["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["path"] == "/bin/granary-hello")
        .map(|e| e["arch"].as_str().unwrap())
        .collect();
    programs.sort();
    assert_eq!(programs, ["aarch64", "x86_64"]);

    // The node unpacks the image it runs, and the grain runs from it.
    daemon.granary(&["user", "add", "alice"]).success();
    daemon
        .granary(&["app", "install", multi.to_str().unwrap()])
        .success();
    let sha256 = inspect["sha256"].as_str().unwrap();
    let image = daemon
        .data_dir()
        .join("apps/hello")
        .join(sha256)
        .join("image");
    assert_eq!(
        std::fs::read(image.join("bin/granary-hello")).unwrap(),
        std::fs::read(granary_testkit::hello_binary()).unwrap()
    );
    assert_eq!(daemon.ask("alice/hello", "ping"), "pong");

    // A package for the other architecture only: refused here, with why,
    // and nothing of it unpacked.
    let foreign_only = work.join("foreign.gpkg");
    pack(
        &key,
        &[
            "build",
            def_arg,
            "-o",
            foreign_only.to_str().unwrap(),
            "--target",
            other,
        ],
    )
    .success();
    let refused = daemon
        .granary(&["app", "install", foreign_only.to_str().unwrap()])
        .failure();
    assert!(
        refused.stderr.contains(&format!(
            "has images for {other} only, and this node runs {here}"
        )),
        "{}",
        refused.stderr
    );
    assert_eq!(kept(&daemon), [sha256.to_owned(), format!("{sha256}.gpkg")]);
    assert_eq!(daemon.ask("alice/hello", "ping"), "pong");

    // Another architecture's program that needs a loader is refused at
    // build time: ldd here cannot collect its libraries.
    let mut dynamic = granary_testkit::minimal_program(other);
    dynamic[64..68].copy_from_slice(&3u32.to_le_bytes());
    std::fs::write(&foreign, dynamic).unwrap();
    let refused = pack(
        &key,
        &[
            "build",
            def_arg,
            "-o",
            foreign_only.to_str().unwrap(),
            "--target",
            other,
        ],
    )
    .failure();
    assert!(
        refused.stderr.contains("is linked dynamically"),
        "{}",
        refused.stderr
    );
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
    assert_eq!(daemon.ask("alice/hello", "ping"), "pong");

    // 1.1 crashes at start: the upgrade is rolled back and the grain runs 1.0.
    let bad = work.join("v1.1.gpkg");
    build(
        &key,
        &definition_with(
            &work.join("bad"),
            "1.1",
            &["--crash-at-start"],
            "migrate = [\"/bin/granary-hello\", \"--migrate\"]",
        ),
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
    assert_eq!(daemon.ask("alice/hello", "ping"), "pong");
    // 1.1's migration ran, and was undone with the rest of the upgrade.
    assert!(
        !daemon
            .data_dir()
            .join("grains/alice-hello/data/migrations")
            .exists(),
        "the failed upgrade's migration was rolled back"
    );
    let snaps = daemon
        .granary(&["snapshot", "list", "alice/hello", "--json"])
        .success()
        .json();
    assert!(
        snaps
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["name"].as_str().unwrap().starts_with("upgrade-")),
        "{snaps}"
    );

    // An older or equal version is not an upgrade.
    let refused = daemon
        .granary(&["app", "upgrade", v1.to_str().unwrap()])
        .failure();
    assert!(refused.stderr.contains("not newer"), "{}", refused.stderr);

    // 2.0 works: upgraded, its migration hook ran on the grain's data in
    // the grain's sandbox, the grain restarted on it.
    let v2 = work.join("v2.gpkg");
    build(
        &key,
        &definition_with(
            &work.join("good"),
            "2.0",
            &[],
            "migrate = [\"/bin/granary-hello\", \"--migrate\"]",
        ),
        &v2,
    );
    let out = daemon
        .granary(&["app", "upgrade", v2.to_str().unwrap()])
        .success();
    assert!(out.stdout.contains("from 1.0 to 2.0"), "{}", out.stdout);
    let s = daemon
        .granary(&["grain", "status", "alice/hello", "--json"])
        .success()
        .json();
    assert_eq!(s["state"], "running");
    assert_eq!(daemon.ask("alice/hello", "ping"), "pong");
}

/// Debian's own `/usr/bin/git`, packaged with everything ldd finds plus
/// `/bin/sh` for hooks, runs in a real jail: a push through
/// `git receive-pack` (its hook runs), a clone through `git upload-pack`,
/// and `git http-backend` as a CGI, each inside a sandbox whose root is
/// the unpacked package and nothing else.
#[test]
fn debians_git_runs_from_its_package_in_a_jail() {
    use std::os::unix::fs::MetadataExt;
    use std::process::Command;
    assert_eq!(
        std::fs::metadata("/proc/self").unwrap().uid(),
        0,
        "jails need root"
    );
    let tmp = tempfile::Builder::new()
        .prefix("granary-git-package-")
        .tempdir()
        .unwrap();
    let t = tmp.path();
    let key = t.join("pack.key");
    pack(&key, &["keygen"]).success();
    let def = t.join("git.toml");
    std::fs::write(
        &def,
        "format = 1\n[app]\nkind = \"git\"\nversion = \"2\"\nexec = [\"/usr/bin/git\"]\n\
         [files]\nbinaries = [\"/usr/bin/git\", \"/usr/lib/git-core/git-http-backend\"]\n\
         runtime = [\"/bin/sh\"]\n",
    )
    .unwrap();
    let pkg = t.join("git.gpkg");
    let started = std::time::Instant::now();
    let out = pack(
        &key,
        &["build", def.to_str().unwrap(), "-o", pkg.to_str().unwrap()],
    )
    .success();
    println!(
        "git package: built in {:.2} s, {} bytes\n{}",
        started.elapsed().as_secs_f64(),
        std::fs::metadata(&pkg).unwrap().len(),
        out.stdout
    );

    // Unpack it as the daemon does, and give a grain a dataset with a bare
    // repository and a post-receive hook.
    let bytes = std::fs::read(&pkg).unwrap();
    let limits = granary_package::Limits::default();
    let started = std::time::Instant::now();
    granary_package::open(&bytes, &limits)
        .unwrap()
        .unpack(&t.join("app"), &limits, &[std::env::consts::ARCH])
        .unwrap();
    println!(
        "git package: unpacked in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    for p in [t.to_path_buf(), t.join("app")] {
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    let data = t.join("data");
    let dataset = data.join("grains/git");
    std::fs::create_dir_all(&dataset).unwrap();
    let git = |dir: &Path, args: &[&str]| {
        let out = Command::new("git")
            .args([
                "-c",
                "protocol.ext.allow=always",
                "-c",
                "user.name=T",
                "-c",
                "user.email=t@x",
                "-c",
                "init.defaultBranch=main",
            ])
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "git {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    git(&dataset, &["init", "--bare", "-q", "repo.git"]);
    let hook = dataset.join("repo.git/hooks/post-receive");
    std::fs::write(
        &hook,
        "#!/bin/sh\nwhile read old new ref; do echo \"$ref $new\" > /var/hook-ran; done\n",
    )
    .unwrap();
    std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let uid = granary_jail::DEFAULT_UID_RANGE.start + 950;
    Command::new("chown")
        .args(["-R", &format!("{uid}:{uid}")])
        .arg(&dataset)
        .status()
        .unwrap();

    let jail = granary_jail::JailConfig {
        data_root: data.clone(),
        uid_range: granary_jail::DEFAULT_UID_RANGE,
        cgroup: granary_jail::JailConfig::detect_cgroup(),
        cgroup_parent: "granary-test-git".to_owned(),
    };
    let plan = |name: &str, argv: &[&str], env: &[&str]| {
        let plan = jail
            .plan(&granary_jail::GrainSpec {
                grain: "git".to_owned(),
                image: t.join("app/image"),
                dataset: dataset.clone(),
                host_uid: uid,
                argv: argv.iter().map(|s| s.to_string()).collect(),
                env: env.iter().map(|s| s.to_string()).collect(),
                keep_fds: vec![3],
                limits: granary_jail::Limits::default(),
            })
            .unwrap();
        let path = t.join(format!("plan-{name}.json"));
        std::fs::write(&path, serde_json::to_string(&plan).unwrap()).unwrap();
        path
    };
    let env = ["PATH=/usr/bin:/bin", "HOME=/var"];
    for service in ["upload-pack", "receive-pack"] {
        plan(
            &format!("git-{service}"),
            &[
                "/bin/sh",
                "-c",
                "exec /usr/bin/git \"$0\" /var/repo.git <&3",
                service,
            ],
            &env,
        );
    }
    let launcher = granary_testkit::granary_bin().with_file_name("granary-launcher");
    // git's ext:: transport runs this with the protocol on stdin/stdout;
    // the launcher hands stdin to the grain as fd 3.
    let ext = t.join("ext.sh");
    std::fs::write(
        &ext,
        format!(
            "#!/bin/sh\nexec {} --plan {}/plan-$1.json 3<&0\n",
            launcher.display(),
            t.display()
        ),
    )
    .unwrap();
    let remote = format!("ext::sh {} %S", ext.display());

    // Push: receive-pack and the hook run in the jail.
    let src = t.join("src");
    std::fs::create_dir(&src).unwrap();
    git(&src, &["init", "-q"]);
    std::fs::write(src.join("hello.txt"), "from the host\n").unwrap();
    git(&src, &["add", "hello.txt"]);
    git(&src, &["commit", "-q", "-m", "first"]);
    let head = git(&src, &["rev-parse", "HEAD"]).trim().to_owned();
    git(&src, &["push", "-q", &remote, "main"]);
    assert_eq!(
        std::fs::read_to_string(dataset.join("hook-ran")).unwrap(),
        format!("refs/heads/main {head}\n"),
        "the post-receive hook ran inside the jail"
    );
    // Clone: upload-pack in the jail.
    git(t, &["clone", "-q", &remote, "cloned"]);
    assert_eq!(
        std::fs::read_to_string(t.join("cloned/hello.txt")).unwrap(),
        "from the host\n"
    );
    // http-backend as a CGI.
    let cgi = plan(
        "http-backend",
        &["/usr/lib/git-core/git-http-backend"],
        &[
            "PATH=/usr/bin:/bin",
            "GATEWAY_INTERFACE=CGI/1.1",
            "REQUEST_METHOD=GET",
            "PATH_INFO=/repo.git/info/refs",
            "QUERY_STRING=service=git-upload-pack",
            "GIT_PROJECT_ROOT=/var",
            "GIT_HTTP_EXPORT_ALL=1",
            "REMOTE_ADDR=127.0.0.1",
        ],
    );
    let out = Command::new(&launcher)
        .arg("--plan")
        .arg(&cgi)
        .output()
        .unwrap();
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && body.contains("# service=git-upload-pack") && body.contains(&head),
        "http-backend: {body}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The root holds the package and the grain's mounts, nothing else.
    let ls = plan("ls", &["/bin/sh", "-c", "echo /* /usr/*"], &env);
    let out = Command::new(&launcher)
        .arg("--plan")
        .arg(&ls)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "/bin /dev /lib /lib64 /tmp /usr /var /usr/bin /usr/lib"
    );
    if let Some(driver) = &jail.cgroup {
        granary_jail::cgroup::remove_leftovers(driver, &jail.cgroup_parent, None);
    }
}
