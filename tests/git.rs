//! Git over HTTPS end to end: the real daemon, its gateway (TLS from the
//! local CA, HTTP Basic with app passwords), a git grain started on demand
//! running Debian's git in the jail, and the real git client, which
//! resolves the name through `http.curloptResolve` and trusts the local CA
//! file, never with verification turned off.

use std::path::Path;
use std::process::Command;

use granary_testkit::{Daemon, DaemonMode};

const DOMAIN: &str = "example.test";

/// The git app as a signed package, built with `granary pack build`.
fn git_package(dir: &Path) -> std::path::PathBuf {
    let key = dir.join("pack.key");
    let pack = |args: &[&str]| {
        let mut all = vec!["pack"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--key", key.to_str().unwrap()]);
        granary_testkit::run_granary(&all, None).success()
    };
    pack(&["keygen"]);
    let def = dir.join("git-package.toml");
    std::fs::write(
        &def,
        format!(
            "format = 1\n[app]\nkind = \"git\"\nversion = \"0.1.0\"\nexec = [\"/bin/granary-git\"]\n\
             services = [\"http\"]\n[limits]\nmemory_mib = 256\npids = 64\n\
             [files]\nbinaries = [\"/usr/bin/git\", \"/usr/lib/git-core/git-http-backend\"]\n\
             runtime = [\"/bin/sh\"]\ncopy = [{{ from = \"{}\", to = \"/bin/granary-git\" }}]\n",
            granary_testkit::static_binary("granary-git").display()
        ),
    )
    .unwrap();
    let out = dir.join("git.gpkg");
    pack(&["build", def.to_str().unwrap(), "-o", out.to_str().unwrap()]);
    out
}

struct Client<'a> {
    daemon: &'a Daemon,
    home: std::path::PathBuf,
}

impl Client<'_> {
    fn url(&self, cred: Option<(&str, &str)>, path: &str) -> String {
        let port = self.daemon.https_addr().port();
        match cred {
            Some((u, p)) => format!("https://{u}:{p}@git.{DOMAIN}:{port}/{path}"),
            None => format!("https://git.{DOMAIN}:{port}/{path}"),
        }
    }

    /// Runs git with the name resolved to the daemon and the local CA
    /// trusted; returns (success, stdout + stderr).
    fn git(&self, dir: &Path, args: &[&str]) -> (bool, String) {
        let port = self.daemon.https_addr().port();
        let out = Command::new("git")
            .args([
                "-c",
                &format!("http.curloptResolve=git.{DOMAIN}:{port}:127.0.0.1"),
                "-c",
                "user.name=Alice",
                "-c",
                "user.email=alice@example.test",
                "-c",
                "init.defaultBranch=main",
            ])
            .args(args)
            .current_dir(dir)
            .env("GIT_SSL_CAINFO", self.daemon.ca_file())
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("HOME", &self.home)
            .env_remove("GIT_DIR")
            .output()
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    fn ok(&self, dir: &Path, args: &[&str]) -> String {
        let (ok, out) = self.git(dir, args);
        assert!(
            ok,
            "git {args:?}:\n{out}\n--- daemon log ---\n{}",
            self.daemon.log()
        );
        out
    }
}

fn app_password(daemon: &Daemon, user: &str) -> String {
    let added = daemon
        .granary(&[
            "app-password",
            "add",
            user,
            "--kind",
            "git",
            "--label",
            "laptop",
            "--json",
        ])
        .success()
        .json();
    added["password"].as_str().unwrap().to_owned()
}

#[test]
fn push_and_clone_over_https_through_the_gateway() {
    let daemon = Daemon::start_with(DaemonMode::Serve, &format!("domain = \"{DOMAIN}\"\n"));
    let tmp = tempfile::tempdir().unwrap();
    let pkg = git_package(tmp.path());
    daemon
        .granary(&["app", "install", pkg.to_str().unwrap()])
        .success();
    daemon.granary(&["user", "add", "alice"]).success();
    daemon.granary(&["user", "add", "bob"]).success();
    let alice = app_password(&daemon, "alice");
    let bob = app_password(&daemon, "bob");
    let home = tmp.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let client = Client {
        daemon: &daemon,
        home,
    };

    // A repository with a few files, pushed: the first push creates it.
    let work = tmp.path().join("work");
    std::fs::create_dir_all(work.join("docs")).unwrap();
    std::fs::write(work.join("index.html"), "<h1>Alice</h1>\n").unwrap();
    std::fs::write(
        work.join("docs/notes.txt"),
        granary_testkit::noise(1, 300_000),
    )
    .unwrap();
    client.ok(&work, &["init", "-q"]);
    client.ok(&work, &["add", "."]);
    client.ok(&work, &["commit", "-q", "-m", "first"]);
    let head = client.ok(&work, &["rev-parse", "HEAD"]);
    client.ok(
        &work,
        &[
            "push",
            "-q",
            &client.url(Some(("alice", &alice)), "alice/site.git"),
            "main",
        ],
    );

    // Cloned back byte for byte, over protocol v2 and v0.
    for (n, version) in ["2", "0"].iter().enumerate() {
        let dest = tmp.path().join(format!("clone{n}"));
        client.ok(
            tmp.path(),
            &[
                "-c",
                &format!("protocol.version={version}"),
                "clone",
                "-q",
                &client.url(Some(("alice", &alice)), "alice/site.git"),
                dest.to_str().unwrap(),
            ],
        );
        assert_eq!(client.ok(&dest, &["rev-parse", "HEAD"]), head);
        assert_eq!(
            std::fs::read(dest.join("docs/notes.txt")).unwrap(),
            granary_testkit::noise(1, 300_000)
        );
    }

    // Bob cannot read Alice's repository, and the answer is the same
    // whether or not it exists.
    let (ok, out) = client.git(
        tmp.path(),
        &[
            "ls-remote",
            &client.url(Some(("bob", &bob)), "alice/site.git"),
        ],
    );
    assert!(!ok && out.contains("403"), "{out}");
    let (ok, out2) = client.git(
        tmp.path(),
        &[
            "ls-remote",
            &client.url(Some(("bob", &bob)), "alice/nothing.git"),
        ],
    );
    assert!(!ok && out2.contains("403"), "{out2}");
    // No credentials, or a wrong password: 401.
    let (ok, out) = client.git(
        tmp.path(),
        &["ls-remote", &client.url(None, "alice/site.git")],
    );
    assert!(!ok, "{out}");
    let (ok, out) = client.git(
        tmp.path(),
        &[
            "ls-remote",
            &client.url(Some(("alice", "wrong-password")), "alice/site.git"),
        ],
    );
    assert!(
        !ok && (out.contains("401") || out.contains("Authentication failed")),
        "{out}"
    );
    // The account password is not an app password.
    assert!(!daemon.log().contains(&alice), "no password is logged");
}
