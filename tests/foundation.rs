//! End to end: the real `granary` binary in a temp dir, driven through its
//! CLI, its admin socket and real TLS clients (curl, Python's ssl).

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use granary_testkit::{Daemon, DaemonMode, run_granary};

/// GET over HTTPS with curl, trusting only the daemon's CA. Returns
/// (status code, body).

#[test]
fn user_survives_restart_and_password_still_verifies() {
    let mut daemon = Daemon::start();
    let ports = daemon.ports();
    assert_eq!(ports["pid"].as_u64(), Some(u64::from(daemon.pid())));
    assert_ne!(
        daemon.https_addr().port(),
        0,
        "ports.json must hold the bound port"
    );

    daemon
        .granary_with_stdin(
            &["user", "add", "alice", "--password-stdin"],
            Some("correct horse battery\n"),
        )
        .success();
    let first_port = daemon.https_addr().port();
    daemon.restart();

    let users = daemon.granary(&["user", "list", "--json"]).success().json();
    assert_eq!(users[0]["name"], "alice", "{users}");
    daemon
        .granary_with_stdin(
            &["user", "check-password", "alice"],
            Some("correct horse battery\n"),
        )
        .success();
    let wrong = daemon.granary_with_stdin(
        &["user", "check-password", "alice"],
        Some("wrong horse battery\n"),
    );
    assert_eq!(wrong.code(), Some(1), "{wrong}");
    assert_eq!(wrong.stdout.trim(), "not valid");

    // The password is nowhere in the data dir in clear.
    let grep = Command::new("grep")
        .args(["-r", "-a", "-l", "correct horse battery"])
        .arg(daemon.data_dir())
        .output()
        .unwrap();
    assert!(
        grep.stdout.is_empty(),
        "password found in clear in {}",
        String::from_utf8_lossy(&grep.stdout)
    );
    assert!(
        !daemon.log().contains("correct horse battery"),
        "password logged"
    );

    // A fresh port-0 bind after restart, reported in ports.json.
    let _ = first_port;
    let status = daemon.granary(&["status", "--json"]).success().json();
    assert_eq!(status["healthy"], true);
    assert_eq!(status["counts"]["users"], 1);
    assert_eq!(status["storage_backend"], "plain");
    let sandbox = status["sandbox"].as_str().unwrap();
    assert!(
        sandbox.starts_with("linux namespaces, seccomp"),
        "{sandbox}"
    );
    // The test kit gives each daemon its own range of 1000 uids.
    assert!(
        sandbox.contains("grain uids 1") && sandbox.ends_with("+1000"),
        "{sandbox}"
    );
    assert_eq!(
        status["listeners"]["https"],
        daemon.https_addr().to_string()
    );
    assert_eq!(status["pid"].as_u64(), Some(u64::from(daemon.pid())));
}

#[test]
fn https_health_verifies_against_the_local_ca_with_real_clients() {
    let daemon = Daemon::start();
    let (code, body) = daemon.curl("localhost", "/.well-known/granary/health", &[]);
    assert_eq!(code, "200");
    assert!(body.contains("\"status\":\"ok\""), "{body}");
    // HTTP/2 by ALPN, and a service host name covered by the certificate.
    let (code, _) = daemon.curl(
        "dav.localhost",
        "/.well-known/granary/health",
        &["--http2", "--write-out", "%{http_version}"],
    );
    assert_eq!(code, "2", "the last write-out is the HTTP version");
    // Git's host speaks HTTP/1.1 only (see the gateway's `https.rs`: the
    // libcurl of Debian 12 can send an HTTP/2 upload chunk twice).
    let (code, _) = daemon.curl(
        "git.localhost",
        "/.well-known/granary/health",
        &["--http2", "--write-out", "%{http_version}"],
    );
    assert_eq!(code, "1.1", "the last write-out is the HTTP version");
    let (code, body) = daemon.curl("www.localhost", "/alice/site", &[]);
    assert_eq!(code, "404");
    assert!(body.contains("No Granary app serves"), "{body}");
    // A git route asks for credentials before anything else.
    let (code, _) = daemon.curl("git.localhost", "/alice/site.git/info/refs", &[]);
    assert_eq!(code, "401");

    // Python's ssl (OpenSSL) with default verification: TLS 1.2+ only.
    let port = daemon.https_addr().port();
    let script = format!(
        r#"
import ssl, socket, sys
ctx = ssl.create_default_context(cafile={ca:?})
with socket.create_connection(("127.0.0.1", {port})) as s:
    with ctx.wrap_socket(s, server_hostname="localhost") as t:
        print(t.version())
old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
old.load_verify_locations({ca:?})
old.minimum_version = ssl.TLSVersion.TLSv1
old.maximum_version = ssl.TLSVersion.TLSv1_1
try:
    with socket.create_connection(("127.0.0.1", {port})) as s:
        with old.wrap_socket(s, server_hostname="localhost") as t:
            print("OLD ACCEPTED", t.version())
except (ssl.SSLError, OSError) as e:
    print("old refused")
"#,
        ca = daemon.ca_file().display().to_string(),
    );
    let out = Command::new("python3")
        .arg("-c")
        .arg(&script)
        .output()
        .expect("python3");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.starts_with("TLSv1.3"), "{text}");
    assert!(text.contains("old refused"), "{text}");

    // The CA only vouches for the configured domain (name constraints): a
    // certificate for another name would not be trusted even if issued.
    let ca = std::fs::read_to_string(daemon.ca_file()).unwrap();
    let dump = Command::new("openssl")
        .args(["x509", "-noout", "-text"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(ca.as_bytes())?;
            c.wait_with_output()
        });
    if let Ok(dump) = dump {
        let text = String::from_utf8_lossy(&dump.stdout);
        assert!(
            text.contains("Permitted:") && text.contains("DNS:localhost"),
            "{text}"
        );
    }
}

#[test]
fn second_daemon_on_the_same_data_dir_is_refused() {
    let daemon = Daemon::start();
    let run = daemon.granary(&["serve"]).failure();
    assert!(
        run.stderr.contains("is in use by another granary daemon"),
        "{run}"
    );
    assert!(
        run.stderr.contains(&format!("pid {}", daemon.pid())),
        "{run}"
    );
    assert_eq!(
        run.stderr.trim().lines().count(),
        1,
        "one error line: {run}"
    );
    // The running one is unharmed.
    daemon.granary(&["status"]).success();
    assert_eq!(
        daemon.ports()["pid"].as_u64(),
        Some(u64::from(daemon.pid()))
    );
}

#[test]
fn demo_prints_a_working_password_once() {
    let daemon = Daemon::start_with(DaemonMode::Demo, "");
    let mut password = None;
    let mut banner = String::new();
    while let Some(line) = daemon.next_stdout_line() {
        banner.push_str(&line);
        banner.push('\n');
        if let Some(rest) = line.trim().strip_prefix("Password") {
            password = Some(rest.trim().to_owned());
        }
        if line.starts_with("Stop with") {
            break;
        }
    }
    let password = password.unwrap_or_else(|| panic!("no password in the banner:\n{banner}"));
    assert!(
        banner.contains(&daemon.ca_file().display().to_string()),
        "{banner}"
    );
    assert!(
        banner.contains(&format!(":{}/", daemon.https_addr().port())),
        "{banner}"
    );
    daemon
        .granary_with_stdin(
            &["user", "check-password", "demo"],
            Some(&format!("{password}\n")),
        )
        .success();
    let status = daemon.granary(&["status", "--json"]).success().json();
    assert_eq!(status["counts"]["users"], 1);
    assert!(
        !daemon.log().contains(&password),
        "the demo password must not be logged"
    );
}

#[test]
fn app_passwords_are_per_kind_shown_once_and_revocable() {
    let daemon = Daemon::start();
    daemon.granary(&["user", "add", "bob"]).success();
    let added = daemon
        .granary(&[
            "app-password",
            "add",
            "bob",
            "--kind",
            "git",
            "--label",
            "laptop",
            "--json",
        ])
        .success()
        .json();
    let secret = added["password"].as_str().unwrap().to_owned();
    let id = added["app_password"]["id"].as_i64().unwrap();

    let check = |kind: &str| {
        daemon
            .granary_with_stdin(
                &["user", "check-password", "bob", "--kind", kind],
                Some(&format!("{secret}\n")),
            )
            .code()
    };
    assert_eq!(check("git"), Some(0), "valid for its kind");
    assert_eq!(check("mail"), Some(1), "not valid for another kind");
    let list = daemon
        .granary(&["app-password", "list", "bob", "--json"])
        .success();
    assert!(
        !list.stdout.contains(&secret),
        "listing must not show the secret"
    );
    assert!(
        list.json()[0]["last_used_at"].is_i64(),
        "use is recorded: {}",
        list.stdout
    );

    daemon
        .granary(&["app-password", "revoke", "bob", "--id", &id.to_string()])
        .success();
    assert_eq!(check("git"), Some(1), "revoked");
    let again = daemon
        .granary(&["app-password", "revoke", "bob", "--id", &id.to_string()])
        .failure();
    assert!(
        again
            .stderr
            .contains(&format!("no app password {id} for user bob")),
        "{again}"
    );
}

#[test]
fn bad_user_names_get_one_clear_line_and_change_nothing() {
    let daemon = Daemon::start();
    for (name, expect) in [
        ("Alice", "lowercase"),
        ("git", "reserved"),
        ("postmaster", "reserved"),
        ("a.b", "lowercase"),
    ] {
        let run = daemon.granary(&["user", "add", name]).failure();
        assert!(run.stderr.contains(expect), "{name}: {run}");
        assert_eq!(run.stderr.trim().lines().count(), 1, "{run}");
    }
    let short = daemon
        .granary_with_stdin(
            &["user", "add", "carol", "--password-stdin"],
            Some("short\n"),
        )
        .failure();
    assert!(short.stderr.contains("shorter than 12"), "{short}");
    daemon.granary(&["user", "add", "dave"]).success();
    let dup = daemon.granary(&["user", "add", "dave"]).failure();
    assert!(dup.stderr.contains("user dave already exists"), "{dup}");
    let users = daemon.granary(&["user", "list", "--json"]).success().json();
    assert_eq!(users.as_array().unwrap().len(), 1, "{users}");
}

#[test]
fn corrupt_state_database_is_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(data.join("state")).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::set_permissions(data.join("state"), std::fs::Permissions::from_mode(0o700)).unwrap();
    let db = data.join("state/granary.db");
    let garbage = b"SQLite format 3\0 but then nonsense follows".repeat(100);
    std::fs::write(&db, &garbage).unwrap();
    let run = run_granary(&["--home", data.to_str().unwrap(), "serve"], None).failure();
    assert!(
        run.stderr.contains("is corrupt or not a Granary database"),
        "{run}"
    );
    assert_eq!(run.stderr.trim().lines().count(), 1, "{run}");
    assert_eq!(std::fs::read(&db).unwrap(), garbage);
    assert!(!data.join("run/ports.json").exists());
    assert!(!data.join("run/admin.sock").exists());
}

#[test]
fn bad_config_is_one_line_naming_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("granary.toml");
    std::fs::write(
        &file,
        "domain = \"example.org\"\n[gateway]\nhandshake_timeout = \"5s\"\nsmtp = \"x\"\n",
    )
    .unwrap();
    let run = run_granary(&["config", "check", file.to_str().unwrap()], None).failure();
    let line = run.stderr.trim();
    assert_eq!(line.lines().count(), 1, "{run}");
    assert!(
        line.contains(&file.display().to_string())
            && line.contains("line 4")
            && line.contains("unknown field `smtp`"),
        "{run}"
    );

    // serve refuses it too, before creating anything.
    let run = run_granary(&["--config", file.to_str().unwrap(), "serve"], None).failure();
    assert!(run.stderr.contains("unknown field `smtp`"), "{run}");
    assert!(!dir.path().join("granary-data").exists());

    // Listeners are named; a misspelt one is named back with the known
    // ones.
    std::fs::write(&file, "[listen]\nsmpt = \"127.0.0.1:2525\"\n").unwrap();
    let run = run_granary(&["config", "check", file.to_str().unwrap()], None).failure();
    assert!(
        run.stderr.contains("listen.smpt") && run.stderr.contains("https, ssh, smtp"),
        "{run}"
    );
    std::fs::write(&file, "[listen]\ntaskd = \"127.0.0.1:53589\"\n").unwrap();
    let run = run_granary(&["config", "check", file.to_str().unwrap()], None).success();
    assert!(run.stdout.contains("listen.taskd"), "{run}");

    std::fs::write(&file, "[listen]\nhttps = \"localhost:443\"\n").unwrap();
    let run = run_granary(&["config", "check", file.to_str().unwrap()], None).failure();
    assert!(run.stderr.contains("listen.https"), "{run}");

    // A grain uid range among the host's users is refused (the overlap
    // check against /etc/passwd, group, subuid and subgid is unit-tested in
    // granary-jail).
    std::fs::write(&file, "[jail]\nuid_range = \"65534+10\"\n").unwrap();
    let run = run_granary(&["config", "check", file.to_str().unwrap()], None).failure();
    assert!(
        run.stderr.contains("jail.uid_range") && run.stderr.contains("below 65536"),
        "{run}"
    );
    assert_eq!(run.stderr.trim().lines().count(), 1, "{run}");

    // The printed default config passes its own check.
    let default = run_granary(&["config", "default"], None).success();
    std::fs::write(&file, default.stdout).unwrap();
    run_granary(&["config", "check", file.to_str().unwrap()], None).success();
}

#[test]
fn admin_socket_with_wrong_permissions_is_refused() {
    let daemon = Daemon::start();
    let run_dir = daemon.data_dir().join("run");
    std::fs::set_permissions(&run_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let run = daemon.granary(&["user", "list"]).failure();
    assert!(
        run.stderr.contains("refusing to use the admin socket"),
        "{run}"
    );
    assert!(run.stderr.contains("chmod 700"), "{run}");
    std::fs::set_permissions(&run_dir, std::fs::Permissions::from_mode(0o700)).unwrap();

    let socket = run_dir.join("admin.sock");
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let run = daemon.granary(&["user", "list"]).failure();
    assert!(run.stderr.contains("lets other users in"), "{run}");
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600)).unwrap();

    if nix_is_root() {
        std::os::unix::fs::chown(&socket, Some(54321), None).unwrap();
        let run = daemon.granary(&["user", "list"]).failure();
        assert!(run.stderr.contains("owned by uid 54321"), "{run}");
        std::os::unix::fs::chown(&socket, Some(0), None).unwrap();
    }
    daemon.granary(&["user", "list"]).success();
}

fn nix_is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}

#[test]
fn status_when_not_running_exits_3() {
    let dir = tempfile::tempdir().unwrap();
    let run = run_granary(
        &["--home", dir.path().to_str().unwrap(), "status", "--json"],
        None,
    );
    assert_eq!(run.code(), Some(3), "{run}");
    assert_eq!(run.json()["running"], false);
    assert!(run.stderr.contains("not running"), "{run}");
}

#[test]
fn sigterm_shuts_down_cleanly_and_removes_runtime_files() {
    let mut daemon = Daemon::start();
    let status = daemon.stop();
    assert!(status.success(), "{status}\n{}", daemon.log());
    assert!(!daemon.ports_path().exists());
    assert!(!daemon.data_dir().join("run/admin.sock").exists());
    assert!(daemon.log().contains("stopped"), "{}", daemon.log());
}

#[test]
fn man_pages_and_completions_come_from_the_cli_definition() {
    let dir = tempfile::tempdir().unwrap();
    run_granary(&["man", "--out", dir.path().to_str().unwrap()], None).success();
    for page in [
        "granary.1",
        "granary-user-add.1",
        "granary-app-password-revoke.1",
        "granary-serve.1",
    ] {
        let text = std::fs::read_to_string(dir.path().join(page))
            .unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(text.contains(".TH"), "{page}");
    }
    let bash = run_granary(&["completions", "bash"], None).success();
    assert!(
        bash.stdout.contains("app-password"),
        "completions list subcommands"
    );
    let help = run_granary(&["user", "add", "--help"], None).success();
    assert!(help.stdout.contains("--password-stdin"));
}

#[test]
fn packaged_example_config_passes_its_own_check() {
    let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/granary.toml");
    let run = run_granary(&["config", "check", file.to_str().unwrap()], None).success();
    assert!(run.stdout.contains("/var/lib/granary"), "{run}");
}

#[test]
fn newer_schema_database_is_refused_untouched() {
    let mut daemon = Daemon::start();
    daemon.granary(&["user", "add", "erin"]).success();
    assert!(daemon.stop().success());
    let db = daemon.data_dir().join("state/granary.db");
    let bump = Command::new("python3")
        .arg("-c")
        .arg("import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); c.execute('PRAGMA user_version = 99'); c.commit(); c.close()")
        .arg(&db)
        .status()
        .expect("python3");
    assert!(bump.success());
    let before = std::fs::read(&db).unwrap();
    let run = daemon.granary(&["serve"]).failure();
    assert!(
        run.stderr.contains("schema version 99, newer than"),
        "{run}"
    );
    assert!(run.stderr.contains("run a newer granary"), "{run}");
    assert_eq!(run.stderr.trim().lines().count(), 1, "{run}");
    assert_eq!(
        std::fs::read(&db).unwrap(),
        before,
        "database must be untouched"
    );
}
