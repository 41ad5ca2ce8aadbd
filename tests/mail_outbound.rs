//! Mail, part 2: sending to other domains. Two real daemons: this host
//! (example.org) sends through its outbound queue to a second Granary
//! host (remote.example), found through the test's own DNS server. The
//! second host checks SPF, DKIM and DMARC on arrival with `mail-auth`;
//! Python's `dkimpy` checks the DKIM signatures independently.

use granary_testkit::mail::{DOMAIN, MailHost, Record, run_python};
use granary_testkit::postfix::Postfix;
use granary_testkit::{DEADLINE, eventually};

const REMOTE: &str = "remote.example";

/// What `granary mail dns DOMAIN --json` prints, as records the test DNS
/// server can answer (MX and TXT; the SRV and CNAME records are not
/// needed here), plus the address of the MX host.
fn published(host: &MailHost, domain: &str) -> Vec<Record> {
    let json = host
        .daemon
        .granary(&["mail", "dns", domain, "--json"])
        .success()
        .json();
    let mut out = Vec::new();
    for r in json.as_array().expect("records") {
        let name = r["name"].as_str().unwrap().trim_end_matches('.').to_owned();
        let value = r["value"].as_str().unwrap().to_owned();
        match r["type"].as_str().unwrap() {
            "MX" => {
                let (pref, mx) = value.split_once(' ').unwrap();
                let mx = mx.trim_end_matches('.').to_owned();
                out.push(Record::A(mx.clone(), "127.0.0.1".to_owned()));
                out.push(Record::Mx(name, mx, pref.parse().unwrap()));
            }
            "TXT" => out.push(Record::Txt(name, value)),
            _ => {}
        }
    }
    out
}

/// Bob's host, then ours sending to it through `remote_port`.
fn pair() -> (MailHost, MailHost) {
    pair_with("")
}

/// [`pair`], with `extra` in our host's `[mail]`.
fn pair_with(extra: &str) -> (MailHost, MailHost) {
    let remote = MailHost::start_for(REMOTE, &["bob"], &[], "", "");
    let ca = remote.daemon.ca_file().display().to_string();
    let records = vec![
        Record::Mx(REMOTE.to_owned(), format!("mx.{REMOTE}"), 10),
        Record::A(format!("mx.{REMOTE}"), "127.0.0.1".to_owned()),
        Record::Mx(
            "bounce.example".to_owned(),
            "mx.bounce.example".to_owned(),
            10,
        ),
        Record::A("mx.bounce.example".to_owned(), "127.0.0.1".to_owned()),
    ];
    let ours = MailHost::start(
        &["alice"],
        &records,
        &format!(
            "outbound_port = {}\noutbound_ca = \"{ca}\"\n{extra}",
            remote.smtp().port()
        ),
        "",
    );
    (ours, remote)
}

const SEND: &str = r#"
import os, smtplib, ssl
ctx = ssl.create_default_context(cafile=os.environ["CA"])
s = smtplib.SMTP_SSL("127.0.0.1", int(os.environ["SUBMISSIONS_PORT"]), context=ctx)
s.login("alice", os.environ["PASSWORD"])
s.sendmail("alice@example.org", [os.environ["TO"]],
    ("From: Alice <alice@example.org>\r\nTo: " + os.environ["TO"] + "\r\nSubject: "
     + os.environ["SUBJECT"] + "\r\n\r\nHello from example.org.\r\n..a line with a dot\r\n").encode())
s.quit()
print("SENT")
"#;

fn send(host: &MailHost, to: &str, subject: &str) {
    let pw = host.password("alice");
    let mut env = host.client_env("alice", &pw);
    env.push(("TO", to.to_owned()));
    env.push(("SUBJECT", subject.to_owned()));
    let (ok, out) = run_python(SEND, &env);
    assert!(ok && out.contains("SENT"), "{out}");
}

/// The raw message in `user`'s INBOX whose subject has `subject`.
fn fetch(host: &MailHost, user: &str, subject: &str) -> String {
    let script = r#"
import imaplib, os, ssl
ctx = ssl.create_default_context(cafile=os.environ["CA"])
m = imaplib.IMAP4_SSL("127.0.0.1", int(os.environ["IMAPS_PORT"]), ssl_context=ctx)
m.login(os.environ["USER"], os.environ["PASSWORD"])
m.select("INBOX")
typ, data = m.search(None, "SUBJECT", os.environ["SUBJECT"])
typ, msg = m.fetch(data[0].split()[-1], "(BODY.PEEK[])")
print(msg[0][1].decode())
m.logout()
"#;
    let pw = host.password(user);
    let mut env = host.client_env(user, &pw);
    env.push(("SUBJECT", subject.to_owned()));
    let (ok, out) = run_python(script, &env);
    assert!(ok, "{out}");
    out
}

#[test]
fn mail_to_another_domain_arrives_signed_and_passes_spf_dkim_and_dmarc() {
    let (ours, mut remote) = pair();
    // The remote's resolver learns our domain's records as we publish them.
    let mut records = published(&ours, DOMAIN);
    assert!(
        records.iter().any(
            |r| matches!(r, Record::Txt(n, v) if n.starts_with("ed-") && v.contains("k=ed25519"))
        ),
        "{records:?}"
    );
    records.push(Record::A(DOMAIN.to_owned(), "127.0.0.1".to_owned()));
    remote.dns.replace(&records);

    send(&ours, &format!("bob@{REMOTE}"), "across");
    remote.wait_for("bob", "INBOX", 1);
    let message = fetch(&remote, "bob", "across");
    assert!(
        message.contains("\r\n..a line with a dot") || message.contains("\n..a line with a dot"),
        "{message}"
    );
    let ar = message
        .lines()
        .skip_while(|l| !l.starts_with("Authentication-Results:"))
        .take_while(|l| {
            l.starts_with("Authentication-Results:") || l.starts_with(char::is_whitespace)
        })
        .collect::<Vec<_>>()
        .join(" ");
    assert!(ar.contains("spf=pass"), "{ar}");
    assert!(ar.contains("dkim=pass"), "{ar}");
    assert!(ar.contains("dmarc=pass"), "{ar}");
    assert!(
        ours.daemon
            .granary(&["mail", "queue", "list", "--json"])
            .success()
            .json()
            == serde_json::json!([])
    );

    // The remote's gateway serves its MTA-STS policy, as its records say.
    let https = remote.daemon.listener("https");
    let out = std::process::Command::new("curl")
        .args(["-sS", "--fail", "--cacert"])
        .arg(remote.daemon.ca_file())
        .arg("--resolve")
        .arg(format!("mta-sts.{REMOTE}:{}:127.0.0.1", https.port()))
        .arg(format!(
            "https://mta-sts.{REMOTE}:{}/.well-known/mta-sts.txt",
            https.port()
        ))
        .output()
        .unwrap();
    let policy = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        policy,
        format!("version: STSv1\r\nmode: testing\r\nmx: {REMOTE}\r\nmax_age: 86400\r\n")
    );
    let zone = remote
        .daemon
        .granary(&["mail", "dns", REMOTE])
        .success()
        .stdout;
    assert!(
        zone.contains(&format!(
            "_mta-sts.{REMOTE}.\t3600\tIN\tTXT\t\"v=STSv1; id="
        )),
        "{zone}"
    );
    assert!(
        zone.contains(&format!("_submissions._tcp.{REMOTE}.")),
        "{zone}"
    );

    // dkimpy, with the DNS answers we publish, verifies both signatures.
    let keys: serde_json::Map<String, serde_json::Value> = records
        .iter()
        .filter_map(|r| match r {
            Record::Txt(n, v) if n.contains("._domainkey.") => {
                Some((n.clone(), serde_json::Value::String(v.clone())))
            }
            _ => None,
        })
        .collect();
    let verify = r#"
import dkim, json, os, sys
keys = json.loads(os.environ["KEYS"])
msg = sys.stdin.buffer.read().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
def dns(name, timeout=5):
    return keys.get(name.decode().rstrip("."), "").encode()
d = dkim.DKIM(msg)
sigs = [l for l in msg.split(b"\r\n") if l.lower().startswith(b"dkim-signature:")]
print("SIGNATURES", len(sigs))
for i in range(len(sigs)):
    print("VERIFIED", i, d.verify(idx=i, dnsfunc=dns))
"#;
    let body = message.trim_end_matches('\n').to_owned() + "\n";
    let mut child = std::process::Command::new(granary_testkit::mail::python())
        .arg("-c")
        .arg(verify)
        .env("KEYS", serde_json::Value::Object(keys).to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("SIGNATURES 2"), "{text}");
    assert!(
        text.contains("VERIFIED 0 True") && text.contains("VERIFIED 1 True"),
        "{text}"
    );
}

#[test]
fn a_refusal_bounces_to_the_sender_and_a_missing_domain_too() {
    let (ours, _remote) = pair();
    // Bob's host refuses an unknown user at RCPT: a permanent failure.
    send(&ours, &format!("nobody@{REMOTE}"), "to nobody");
    ours.wait_for("alice", "INBOX", 1);
    let bounce = fetch(&ours, "alice", "Undelivered");
    assert!(bounce.contains("multipart/report"), "{bounce}");
    assert!(
        bounce.contains(&format!("Final-Recipient: rfc822; nobody@{REMOTE}")),
        "{bounce}"
    );
    assert!(bounce.contains("5.1.1"), "{bounce}");
    // A domain that does not exist bounces without a connection.
    send(&ours, "x@no-such-domain.example", "nowhere");
    ours.wait_for("alice", "INBOX", 2);
    // Python's email parser reads the report as a client would.
    let parse = r#"
import email, imaplib, os, ssl
ctx = ssl.create_default_context(cafile=os.environ["CA"])
m = imaplib.IMAP4_SSL("127.0.0.1", int(os.environ["IMAPS_PORT"]), ssl_context=ctx)
m.login(os.environ["USER"], os.environ["PASSWORD"])
m.select("INBOX")
typ, data = m.search(None, "ALL")
for n in data[0].split():
    typ, msg = m.fetch(n, "(BODY.PEEK[])")
    report = email.message_from_bytes(msg[0][1])
    assert report.get_content_type() == "multipart/report", report.get_content_type()
    status = [p for p in report.walk() if p.get_content_type() == "message/delivery-status"][0]
    for block in status.get_payload():
        if block.get("Final-Recipient"):
            print("FAILED", block.get("Final-Recipient"), block.get("Status"))
m.logout()
"#;
    let pw = ours.password("alice");
    let (ok, out) = run_python(parse, &ours.client_env("alice", &pw));
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!("FAILED rfc822; nobody@{REMOTE} 5.1.1")),
        "{out}"
    );
    assert!(
        out.contains("FAILED rfc822; x@no-such-domain.example 5.1.2"),
        "{out}"
    );
}

#[test]
fn a_server_that_cannot_be_reached_is_retried_the_sender_told_and_held_mail_waits() {
    let (ours, remote) = pair_with("delay_warning = \"1s\"\n");
    let port = remote.smtp().port();
    // Hold everything the queue gets, then stop the remote.
    drop(remote);
    send(&ours, &format!("bob@{REMOTE}"), "later");
    let queue = ours
        .daemon
        .granary(&["mail", "queue", "list", "--json"])
        .success()
        .json();
    let entry = &queue.as_array().unwrap()[0];
    assert_eq!(entry["recipients"][0]["address"], format!("bob@{REMOTE}"));
    let id = entry["id"].as_str().unwrap().to_owned();
    eventually("a failed attempt", DEADLINE, || {
        let q = ours
            .daemon
            .granary(&["mail", "queue", "list", "--json"])
            .success()
            .json();
        let e = &q.as_array().unwrap()[0];
        (e["attempts"].as_u64().unwrap_or(0) >= 1).then(|| {
            assert!(e["last_error"].as_str().unwrap().starts_with("4."), "{e}");
        })
    });
    // Still undelivered after delay_warning: Alice hears once, and can
    // read why.
    ours.wait_for("alice", "INBOX", 1);
    let notice = fetch(&ours, "alice", "Delayed");
    assert!(notice.contains("Action: delayed"), "{notice}");
    assert!(notice.contains("Will-Retry-Until: "), "{notice}");
    assert!(
        notice.contains(&format!("Final-Recipient: rfc822; bob@{REMOTE}")),
        "{notice}"
    );
    ours.daemon
        .granary(&["mail", "queue", "hold", &id])
        .success();
    let q = ours
        .daemon
        .granary(&["mail", "queue", "list", "--json"])
        .success()
        .json();
    assert_eq!(q[0]["held"], true);
    let text = ours
        .daemon
        .granary(&["mail", "queue", "list"])
        .success()
        .stdout;
    assert!(text.contains("held"), "{text}");
    let _ = port;
    ours.daemon
        .granary(&["mail", "queue", "delete", &id])
        .success();
    let q = ours
        .daemon
        .granary(&["mail", "queue", "list", "--json"])
        .success()
        .json();
    assert_eq!(q, serde_json::json!([]));
}

/// Every record `granary mail dns DOMAIN --json` prints, as the test DNS
/// server answers them, plus the mail host's address.
fn zone(host: &MailHost, domain: &str) -> Vec<(String, Record)> {
    let json = host
        .daemon
        .granary(&["mail", "dns", domain, "--json"])
        .success()
        .json();
    let mut out = Vec::new();
    for r in json.as_array().expect("records") {
        let name = r["name"].as_str().unwrap().trim_end_matches('.').to_owned();
        let value = r["value"].as_str().unwrap().to_owned();
        let record = match r["type"].as_str().unwrap() {
            "MX" => {
                let (pref, mx) = value.split_once(' ').unwrap();
                Record::Mx(
                    name.clone(),
                    mx.trim_end_matches('.').to_owned(),
                    pref.parse().unwrap(),
                )
            }
            "TXT" => Record::Txt(name.clone(), value),
            "SRV" => {
                let f: Vec<&str> = value.split(' ').collect();
                Record::Srv(
                    name.clone(),
                    f[3].trim_end_matches('.').to_owned(),
                    f[2].parse().unwrap(),
                    f[0].parse().unwrap(),
                    f[1].parse().unwrap(),
                )
            }
            "CNAME" => Record::Cname(name.clone(), value.trim_end_matches('.').to_owned()),
            other => panic!("an unexpected record type {other}"),
        };
        out.push((format!("{name}. {}", r["type"].as_str().unwrap()), record));
    }
    out
}

#[test]
fn the_published_records_make_the_doctor_pass_and_each_missing_one_fails_by_name() {
    let mut host = MailHost::start(&["alice"], &[], "", "");
    let records = zone(&host, DOMAIN);
    assert!(records.len() >= 12, "{records:?}");
    let host_address = Record::A(DOMAIN.to_owned(), "127.0.0.1".to_owned());
    let mut all: Vec<Record> = records.iter().map(|(_, r)| r.clone()).collect();
    all.push(host_address.clone());
    host.dns.replace(&all);
    let run = host.daemon.granary(&["doctor", "--json"]);
    let checks = run.json();
    let failed: Vec<&serde_json::Value> = checks
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["level"] == "fail")
        .collect();
    assert!(failed.is_empty(), "{failed:#?}");
    assert!(run.status.success());
    // The chat SRV records are checked too: not published here, so warned
    // about (clients fall back to the domain's address), by name.
    for service in ["_xmpp-client", "_xmpps-client", "_xmpp-server"] {
        let name = format!("SRV {service}._tcp.{DOMAIN}. SRV");
        let c = checks
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name.as_str())
            .unwrap_or_else(|| panic!("{name} not checked: {checks:#}"));
        assert_eq!(c["level"], "warn", "{c:#}");
        assert!(c["fix"].as_str().unwrap().contains("publish:"), "{c:#}");
    }
    // The service hosts of installed apps (git here): not published, so
    // warned about by name; the
    // listeners answer at the domain's address (loopback here).
    let find = |checks: &serde_json::Value, name: &str| -> serde_json::Value {
        checks
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("{name} not checked: {checks:#}"))
            .clone()
    };
    let git_app = granary_testkit::git_package(host.dir.path());
    host.daemon
        .granary(&["app", "install", git_app.to_str().unwrap()])
        .success();
    assert!(
        !checks.to_string().contains(&format!("git.{DOMAIN} A/AAAA")),
        "no git host checked before the app is installed"
    );
    let checks = host.daemon.granary(&["doctor", "--json"]).json();
    let git = find(&checks, &format!("git.{DOMAIN} A/AAAA"));
    assert_eq!(git["level"], "warn", "{git:#}");
    assert!(git["fix"].as_str().unwrap().contains("CNAME"), "{git:#}");
    let https = find(
        &checks,
        &format!("listen.https at {}", host.daemon.https_addr()),
    );
    assert_eq!(https["level"], "ok", "{https:#}");
    let mut with_git = all.clone();
    with_git.push(Record::A(format!("git.{DOMAIN}"), "127.0.0.1".to_owned()));
    host.dns.replace(&with_git);
    let checks = host.daemon.granary(&["doctor", "--json"]).json();
    assert_eq!(
        find(&checks, &format!("git.{DOMAIN} A/AAAA"))["level"],
        "ok"
    );
    // Each record taken away in turn: the doctor fails and names it.
    for (i, (label, _)) in records.iter().enumerate() {
        let mut some: Vec<Record> = records
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, (_, r))| r.clone())
            .collect();
        some.push(host_address.clone());
        host.dns.replace(&some);
        let run = host.daemon.granary(&["doctor", "--json"]);
        assert!(
            !run.status.success(),
            "{label} missing, yet the doctor passed"
        );
        let checks = run.json();
        let failed: Vec<String> = checks
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["level"] == "fail")
            .map(|c| format!("{}: {} ({})", c["name"], c["detail"], c["fix"]))
            .collect();
        let (name, kind) = label.split_once(' ').unwrap();
        assert_eq!(failed.len(), 1, "{label}: {failed:#?}");
        assert!(
            failed[0].contains(&format!("{name} {kind}")) && failed[0].contains("publish:"),
            "{label}: {failed:#?}"
        );
    }
    // The text form says what to do.
    let text = host.daemon.granary(&["doctor"]).stdout;
    assert!(text.contains("fix: publish:"), "{text}");
    // Each name's certificate: verified, and how long it has left.
    let checks = host.daemon.granary(&["doctor", "--json"]).json();
    let domain_cert = checks
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["area"] == "certificate" && c["name"] == DOMAIN)
        .expect("the domain's certificate is checked")
        .clone();
    assert_eq!(domain_cert["level"], "ok", "{domain_cert:#}");
    assert!(
        domain_cert["detail"]
            .as_str()
            .unwrap()
            .contains("expires in"),
        "{domain_cert:#}"
    );
    // A second mail domain: the local CA's certificate does not name its
    // hosts, and the doctor says so by name.
    host.daemon
        .granary(&["mail", "domain", "add", "other.test"])
        .success();
    let checks = host.daemon.granary(&["doctor", "--json"]).json();
    let cert_fails: Vec<String> = checks
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["area"] == "certificate" && c["level"] == "fail")
        .map(|c| c["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        cert_fails,
        [
            "autoconfig.other.test",
            "mail.other.test",
            "mta-sts.other.test"
        ],
        "{checks:#}"
    );
}

#[test]
fn a_rotated_key_signs_only_once_its_record_is_published() {
    let mut host = MailHost::start(&["alice"], &[], "", "");
    let publish = |host: &mut MailHost| {
        let mut all: Vec<Record> = zone(host, DOMAIN).into_iter().map(|(_, r)| r).collect();
        all.push(Record::A(DOMAIN.to_owned(), "127.0.0.1".to_owned()));
        host.dns.replace(&all);
    };
    publish(&mut host);
    let first = host
        .daemon
        .granary(&["mail", "dkim", "list", DOMAIN, "--json"])
        .success()
        .json();
    assert_eq!(first.as_array().unwrap().len(), 2);
    let rotated = host
        .daemon
        .granary(&["mail", "dkim", "rotate", DOMAIN, "--json"])
        .success()
        .json();
    let keys = rotated.as_array().unwrap();
    assert_eq!(keys.len(), 4);
    assert_eq!(keys.iter().filter(|k| k["pending"] == true).count(), 2);
    assert!(keys.iter().filter(|k| k["signing"] == true).all(|k| {
        first
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["selector"] == k["selector"])
    }));
    // Not in DNS yet: activation is refused, naming the record.
    let refused = host.daemon.granary(&["mail", "dkim", "activate", DOMAIN]);
    assert!(!refused.status.success());
    assert!(
        refused
            .stderr
            .contains("._domainkey.example.org is not published yet"),
        "{}",
        refused.stderr
    );
    // `mail dns` lists the pending keys; published, they activate.
    publish(&mut host);
    host.daemon
        .granary(&["mail", "dkim", "activate", DOMAIN])
        .success();
    let after = host
        .daemon
        .granary(&["mail", "dkim", "list", DOMAIN, "--json"])
        .success()
        .json();
    let signing: Vec<&serde_json::Value> = after
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["signing"] == true)
        .collect();
    assert_eq!(signing.len(), 2);
    assert!(signing.iter().all(|k| {
        !first
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["selector"] == k["selector"])
    }));
    // The doctor is content with all four published.
    let run = host.daemon.granary(&["doctor", "--json"]);
    assert!(run.status.success(), "{}", run.stdout);
}

/// Debian's Postfix as the MX of sink.example: Bob's mail into a maildir
/// under `maps`, and RCPT and DATA checked against access maps there the
/// test can change (then `reload`).
fn postfix_mx(maps: &std::path::Path) -> Postfix {
    let postfix = nix::unistd::User::from_name("postfix")
        .unwrap()
        .expect("the postfix user (apt install postfix)");
    let mail = maps.join("mail");
    std::fs::create_dir_all(&mail).unwrap();
    nix::unistd::chown(&mail, Some(postfix.uid), Some(postfix.gid)).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(maps, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::write(
        maps.join("vmailbox"),
        "bob@sink.example sink.example/bob/\n",
    )
    .unwrap();
    std::fs::write(maps.join("rcpt"), "").unwrap();
    std::fs::write(maps.join("data"), "").unwrap();
    std::fs::write(maps.join("warn"), "127.0.0.1 WARN holding DATA\n").unwrap();
    let m = maps.display();
    Postfix::start(
        true,
        &format!(
            "myhostname = mx.sink.example\nmydestination =\nvirtual_mailbox_domains = sink.example\n\
             virtual_mailbox_base = {m}/mail\nvirtual_mailbox_maps = texthash:{m}/vmailbox\n\
             virtual_uid_maps = static:{uid}\nvirtual_gid_maps = static:{gid}\nvirtual_minimum_uid = 1\n\
             smtpd_restriction_classes = slow\n\
             slow = check_client_access texthash:{m}/warn, sleep 60\n\
             smtpd_recipient_restrictions = check_recipient_access texthash:{m}/rcpt, reject_unauth_destination\n\
             smtpd_data_restrictions = check_client_access texthash:{m}/data\n",
            uid = postfix.uid,
            gid = postfix.gid,
        ),
    )
}

/// Messages in Bob's maildir at the Postfix MX.
fn maildir_count(maps: &std::path::Path) -> usize {
    std::fs::read_dir(maps.join("mail/sink.example/bob/new"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn to_postfix(port: u16) -> MailHost {
    MailHost::start(
        &["alice"],
        &[
            Record::Mx("sink.example".into(), "mx.sink.example".into(), 10),
            Record::A("mx.sink.example".into(), "127.0.0.1".into()),
        ],
        &format!("outbound_port = {port}\n"),
        "",
    )
}

#[test]
fn a_4xx_from_a_real_postfix_is_retried_and_the_message_arrives_once() {
    let maps = tempfile::tempdir().unwrap();
    std::fs::write(
        maps.path().join("rcpt"),
        "bob@sink.example 450 4.2.0 try again later\n",
    )
    .unwrap();
    let pf = postfix_mx(maps.path());
    std::fs::write(
        maps.path().join("rcpt"),
        "bob@sink.example 450 4.2.0 try again later\n",
    )
    .unwrap();
    pf.reload();
    let ours = to_postfix(pf.port.unwrap());
    send(&ours, "bob@sink.example", "later, once");
    eventually("Postfix to refuse with 450", DEADLINE, || {
        let q = ours
            .daemon
            .granary(&["mail", "queue", "list", "--json"])
            .success()
            .json();
        let e = q.as_array()?.first()?.clone();
        (e["attempts"].as_u64()? >= 1).then_some(e)
    });
    assert!(pf.log().contains("450 4.2.0"), "{}", pf.log());
    assert_eq!(maildir_count(maps.path()), 0);
    // Postfix takes it now.
    std::fs::write(maps.path().join("rcpt"), "").unwrap();
    pf.reload();
    eventually("the message in Bob's maildir", DEADLINE, || {
        (maildir_count(maps.path()) == 1).then_some(())
    });
    eventually("the queue to empty", DEADLINE, || {
        (ours
            .daemon
            .granary(&["mail", "queue", "list", "--json"])
            .success()
            .json()
            == serde_json::json!([]))
        .then_some(())
    });
    assert_eq!(maildir_count(maps.path()), 1, "delivered once");
}

#[test]
fn killing_the_daemon_mid_transaction_delivers_once_after_the_restart() {
    let maps = tempfile::tempdir().unwrap();
    let pf = postfix_mx(maps.path());
    // Postfix stalls at DATA (before anything is committed on its side).
    std::fs::write(maps.path().join("data"), "127.0.0.1 slow\n").unwrap();
    pf.reload();
    let mut ours = to_postfix(pf.port.unwrap());
    send(&ours, "bob@sink.example", "through a crash");
    eventually("our daemon to be waiting at DATA", DEADLINE, || {
        pf.log().contains("holding DATA").then_some(())
    });
    // Postfix will take the next try (the stalled session sleeps on);
    // then our daemon dies in the middle of its transaction.
    std::fs::write(maps.path().join("data"), "").unwrap();
    pf.reload();
    ours.daemon.crash_and_restart();
    eventually("the message in Bob's maildir", DEADLINE, || {
        (maildir_count(maps.path()) == 1).then_some(())
    });
    eventually("the queue to empty", DEADLINE, || {
        (ours
            .daemon
            .granary(&["mail", "queue", "list", "--json"])
            .success()
            .json()
            == serde_json::json!([]))
        .then_some(())
    });
    assert_eq!(maildir_count(maps.path()), 1, "delivered exactly once");
}

#[test]
fn an_enforced_mta_sts_policy_holds_mail_for_an_mx_whose_certificate_does_not_verify() {
    // Bob's host enforces MTA-STS, but its MX name is not in its
    // certificate (which covers remote.example and its subdomains).
    let remote = MailHost::start_for(
        REMOTE,
        &["bob"],
        &[],
        "mta_sts_mode = \"enforce\"\nhostname = \"mx.elsewhere.test\"\n",
        "",
    );
    let ours = MailHost::start(
        &["alice"],
        &[
            Record::Mx(REMOTE.to_owned(), "mx.elsewhere.test".to_owned(), 10),
            Record::A("mx.elsewhere.test".to_owned(), "127.0.0.1".to_owned()),
            Record::Txt(
                format!("_mta-sts.{REMOTE}"),
                "v=STSv1; id=2026120501".to_owned(),
            ),
            Record::A(format!("mta-sts.{REMOTE}"), "127.0.0.1".to_owned()),
        ],
        &format!(
            "outbound_port = {}\noutbound_ca = \"{}\"\nmta_sts_port = {}\n",
            remote.smtp().port(),
            remote.daemon.ca_file().display(),
            remote.daemon.listener("https").port()
        ),
        "",
    );
    send(&ours, &format!("bob@{REMOTE}"), "policy says no");
    let held = eventually("a refused attempt", DEADLINE, || {
        let q = ours
            .daemon
            .granary(&["mail", "queue", "list", "--json"])
            .success()
            .json();
        let e = q.as_array()?.first()?.clone();
        (e["attempts"].as_u64()? >= 1).then_some(e)
    });
    let why = held["last_error"].as_str().unwrap();
    assert!(
        why.starts_with("4.7.5") && why.contains("MTA-STS") && why.contains("does not verify"),
        "{why}"
    );
    assert!(ours.daemon.log().contains("MTA-STS policy fetched"));
    // Nothing reached Bob's host in clear, or at all.
    assert_eq!(remote.count("bob", "INBOX"), 0);
    assert!(remote.spool().is_empty());
}
