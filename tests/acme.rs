//! Certificates from an ACME CA: Debian's `pebble` issues them for the
//! domain, its service hosts and the users' subdomains, checking the names
//! by HTTP-01 on the gateway's plain HTTP listener and by TLS-ALPN-01 on
//! its HTTPS listener, through a DNS server the test starts. What the
//! gateway serves is checked with `openssl s_client` against pebble's
//! root. One test renews early (pebble issues 60-second certificates: an
//! order on a loaded machine takes seconds, and one due at once is refused);
//! one stops pebble and checks that the old certificate keeps serving.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use granary_testkit::mail::{Dns, Record};
use granary_testkit::pebble::{Pebble, PebblePlan};
use granary_testkit::{Daemon, DaemonMode, eventually};

const DOMAIN: &str = "acme.test";

/// What `openssl s_client` sees for `name` at `addr`, verified against
/// `root`: (verified, serial).
fn served(addr: SocketAddr, name: &str, root: &std::path::Path) -> (bool, String) {
    let script = format!(
        "openssl s_client -connect {addr} -servername {name} -verify_hostname {name} -CAfile {} -verify_return_error </dev/null 2>/dev/null \
         | tee /dev/stderr | openssl x509 -noout -serial",
        root.display()
    );
    let out = Command::new("sh").arg("-c").arg(&script).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let session = String::from_utf8_lossy(&out.stderr);
    let verified = session.contains("Verify return code: 0 (ok)");
    let serial = text
        .trim()
        .strip_prefix("serial=")
        .unwrap_or_default()
        .to_owned();
    (verified, serial)
}

/// A daemon for `DOMAIN` with user alice, certificates from the pebble
/// `plan` will start, by `challenge`; and the DNS server pebble asks.
fn daemon(plan: &PebblePlan, challenge: &str) -> (Daemon, Dns) {
    let dns = Dns::start(&[Record::Wildcard(DOMAIN.into(), "127.0.0.1".into())]);
    let daemon = Daemon::start_full(
        DaemonMode::Serve,
        &format!(
            "domain = \"{DOMAIN}\"\n[tls]\nacme = \"{}\"\nacme_ca = \"{}\"\nacme_contact = \"admin@{DOMAIN}\"\nacme_challenge = \"{challenge}\"\n",
            plan.directory(),
            plan.tls_root().display()
        ),
        "http = \"127.0.0.1:0\"\n",
        &[],
    );
    daemon.granary(&["user", "add", "alice"]).success();
    (daemon, dns)
}

fn status(daemon: &Daemon) -> serde_json::Value {
    daemon
        .granary(&["certificates", "status", "--json"])
        .success()
        .json()
}

fn names(daemon: &Daemon) -> Vec<String> {
    status(daemon)["names"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn http_01_issues_for_every_name_and_renews_at_two_thirds() {
    let plan = PebblePlan::new();
    let (daemon, dns) = daemon(&plan, "http-01");
    let https = daemon.https_addr();
    let http = daemon.listener("http");

    // The CA is not up yet: the first order fails, the local CA's
    // certificate serves, and status says why.
    let first = eventually("the first order to fail", Duration::from_secs(60), || {
        let s = status(&daemon);
        (s["failures"].as_u64() >= Some(1)).then_some(s)
    });
    assert!(first["not_after"].is_null(), "{first}");
    assert!(
        !first["error"].as_str().unwrap_or_default().is_empty(),
        "{first}"
    );
    let shown = daemon.granary(&["status"]).success().stdout;
    assert!(shown.contains("CERTIFICATE    ordering failed"), "{shown}");
    let (_, local) = served(https, &format!("git.{DOMAIN}"), &daemon.ca_file());
    assert!(
        !local.is_empty(),
        "the local CA's certificate serves meanwhile"
    );

    // Plain HTTP sends everything but challenges to HTTPS.
    let out = Command::new("curl")
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{redirect_url}",
            "-H",
        ])
        .arg(format!("Host: git.{DOMAIN}"))
        .arg(format!("http://{http}/alice/notes.git/info/refs?x=1"))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("308 https://git.{DOMAIN}/alice/notes.git/info/refs?x=1")
    );

    let pebble = plan.start(dns.addr, http.port(), https.port(), 60);
    let renew = daemon.granary_within(&["certificates", "renew"], Duration::from_secs(180));
    assert!(
        renew.status.success(),
        "{renew}\npebble:\n{}\ndaemon:\n{}",
        pebble.log(),
        daemon.log()
    );
    let root = pebble.issuing_root();
    let names = names(&daemon);
    assert!(names.contains(&format!("alice.{DOMAIN}")), "{names:?}");
    assert!(names.contains(&format!("mta-sts.{DOMAIN}")), "{names:?}");
    // One certificate for every name (two at most, should the daemon's
    // own renewal land in the middle of this pass).
    let mut serials = std::collections::BTreeSet::new();
    for name in &names {
        let (verified, s) = served(https, name, &root);
        assert!(verified, "{name} does not verify against pebble's root");
        serials.insert(s);
    }
    assert!(serials.len() <= 2, "{serials:?}");
    let serial = served(https, DOMAIN, &root).1;
    let s = status(&daemon);
    assert!(s["error"].is_null(), "{s}");
    let (not_after, renew_at) = (
        s["not_after"].as_i64().unwrap(),
        s["renew_at"].as_i64().unwrap(),
    );
    assert!((19..=21).contains(&(not_after - renew_at)), "{s}");

    // Two thirds into its 60 seconds the daemon renews by itself, and the
    // new certificate serves without a restart.
    let renewed = eventually(
        "the certificate renewed by itself",
        Duration::from_secs(150),
        || {
            let (verified, s) = served(https, DOMAIN, &root);
            (verified && !s.is_empty() && s != serial).then_some(s)
        },
    );
    assert_ne!(renewed, serial);
    let metrics = Command::new("curl")
        .args(["-sS"])
        .arg(format!("http://{}/metrics", daemon.listener("metrics")))
        .output()
        .unwrap();
    let metrics = String::from_utf8_lossy(&metrics.stdout);
    let count = |outcome: &str| -> u64 {
        let prefix = format!("granary_acme_orders_total{{outcome=\"{outcome}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {outcome} count in:\n{metrics}"))
    };
    assert!(count("failed") >= 1 && count("issued") >= 1, "{metrics}");
    drop(pebble);
}

#[test]
fn tls_alpn_01_issues_and_the_old_certificate_serves_while_the_ca_is_down() {
    let plan = PebblePlan::new();
    let (daemon, dns) = daemon(&plan, "tls-alpn-01");
    let https = daemon.https_addr();
    let mut pebble: Pebble = plan.start(dns.addr, 9, https.port(), 3600);
    let renew = daemon.granary_within(&["certificates", "renew"], Duration::from_secs(180));
    assert!(
        renew.status.success(),
        "{renew}\npebble:\n{}\ndaemon:\n{}",
        pebble.log(),
        daemon.log()
    );
    let root = pebble.issuing_root();
    let (verified, serial) = served(https, &format!("dav.{DOMAIN}"), &root);
    assert!(verified && !serial.is_empty());
    let (verified, same) = served(https, &format!("alice.{DOMAIN}"), &root);
    assert!(verified && same == serial);

    // A handshake offering acme-tls/1 while nothing is being ordered gets
    // no certificate.
    let probe = Command::new("sh")
        .arg("-c")
        .arg(format!("openssl s_client -connect {https} -servername {DOMAIN} -alpn acme-tls/1 </dev/null 2>&1"))
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&probe.stdout).contains("BEGIN CERTIFICATE"));

    pebble.stop();
    let failed = daemon.granary_within(&["certificates", "renew"], Duration::from_secs(180));
    assert_eq!(failed.code(), Some(1), "{failed}");
    assert!(failed.stderr.contains("stays in service"), "{failed}");
    let (verified, still) = served(https, &format!("dav.{DOMAIN}"), &root);
    assert!(
        verified && still == serial,
        "the old certificate keeps serving"
    );
    let shown = daemon.granary(&["status"]).success().stdout;
    assert!(
        shown.contains("CERTIFICATE    ordering failed 1 time(s)"),
        "{shown}"
    );
}
