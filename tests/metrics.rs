//! `/metrics` end to end: the real daemon's `metrics` listener read with
//! curl, checked by Debian's `promtool check metrics`; a grain crash shown
//! in its counters; `/metrics` refused on the public HTTPS listener; and
//! the shipped alert rules checked by `promtool check rules`.

use std::io::Write;
use std::process::{Command, Stdio};

use granary_testkit::{Daemon, DaemonMode, eventually};

fn require_root() {
    use std::os::unix::fs::MetadataExt;
    let uid = std::fs::metadata("/proc/self").unwrap().uid();
    assert_eq!(
        uid, 0,
        "grain tests build real sandboxes and must run as root"
    );
}

fn metrics(d: &Daemon) -> String {
    let out = Command::new("curl")
        .args(["--silent", "--show-error", "--fail", "--max-time", "20"])
        .arg(format!("http://{}/metrics", d.listener("metrics")))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn promtool(args: &[&str], stdin: &str) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus; ./run-tests installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn metrics_are_prometheus_text_and_show_a_crash() {
    require_root();
    let d = Daemon::start_with(DaemonMode::Serve, "[grains]\nrestart_backoff = \"100ms\"\n");
    let dir = granary_testkit::hello_app(d.dir(), "hello", &[]);
    d.granary(&["app", "install", dir.to_str().unwrap()])
        .success();
    d.granary(&["user", "add", "alice"]).success();
    assert_eq!(d.ask("alice/hello", "ping"), "pong");
    let _ = d.curl("localhost", "/", &[]);

    let text = metrics(&d);
    let (ok, lint) = promtool(&["check", "metrics"], &text);
    assert!(ok, "promtool refused the metrics:\n{lint}\n{text}");
    for want in [
        "granary_grain_state{grain=\"alice-hello\",user=\"alice\",kind=\"hello\",state=\"running\"} 1",
        "granary_grain_crashes_total{grain=\"alice-hello\"} 0",
        "granary_connections_total{protocol=\"https\"}",
        "granary_https_requests_total{code=\"2xx\"}",
        "granary_https_request_duration_seconds_bucket{le=\"+Inf\"}",
        "granary_mail_queue_messages{queue=\"inbound\"} 0",
        "granary_login_failures_total 0",
        "granary_certificate_expiry_timestamp_seconds{certificate=\"server\"}",
    ] {
        assert!(text.contains(want), "{want} missing:\n{text}");
    }
    // What the running grain uses, from its cgroup: some memory, and CPU
    // time that only grows.
    let value = |text: &str, name: &str| -> f64 {
        let prefix = format!("{name}{{grain=\"alice-hello\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} for alice-hello:\n{text}"))
    };
    assert!(value(&text, "granary_grain_memory_bytes") > 0.0);
    let cpu = value(&text, "granary_grain_cpu_seconds_total");
    for _ in 0..50 {
        assert_eq!(d.ask("alice/hello", "ping"), "pong");
    }
    let later = value(&metrics(&d), "granary_grain_cpu_seconds_total");
    assert!(later >= cpu && later > 0.0, "{cpu} then {later}");

    // A crash shows in the counters.
    let _ = d.granary_with_stdin(
        &["grain", "connect", "alice/hello", "hello"],
        Some("crash\n"),
    );
    eventually("the crash in /metrics", granary_testkit::DEADLINE, || {
        metrics(&d)
            .contains("granary_grain_crashes_total{grain=\"alice-hello\"} 1")
            .then_some(())
    });

    // Not on the public listener, whatever the host.
    for host in ["localhost", "git.localhost"] {
        let (code, body) = d.curl(host, "/metrics", &[]);
        assert_eq!(code, "404", "{host}: {body}");
        assert!(!body.contains("granary_grain"), "{body}");
    }
    // Only GET /metrics on the metrics listener.
    let other = Command::new("curl")
        .args([
            "--silent",
            "--output",
            "/dev/null",
            "--write-out",
            "%{http_code}",
        ])
        .arg(format!("http://{}/other", d.listener("metrics")))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&other.stdout), "404");
}

#[test]
fn the_alert_rules_pass_promtool() {
    let rules = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../packaging/prometheus/granary-alerts.yml");
    let (ok, out) = promtool(&["check", "rules", rules.to_str().unwrap()], "");
    assert!(ok, "{out}");
    assert!(out.contains("6 rules found"), "{out}");
}
