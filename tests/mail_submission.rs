//! Mail, part 2: submission. Real clients (swaks, Python's smtplib) send
//! through the `submission` (STARTTLS) and `submissions` (TLS) listeners of
//! the real daemon, with app passwords, into real jailed mail grains.

use granary_testkit::mail::{DOMAIN, MailHost, run_python, sender_records};

fn host(users: &[&str], extra_mail: &str) -> MailHost {
    MailHost::start(users, &sender_records("remote.example"), extra_mail, "")
}

/// Reads the message of the user's INBOX whose subject has `SUBJECT`
/// over IMAPS; prints its header block.
const READ_SUBJECT: &str = r#"
import imaplib, os, ssl
ctx = ssl.create_default_context(cafile=os.environ["CA"])
m = imaplib.IMAP4_SSL(os.environ["IMAP_HOST"], int(os.environ["IMAPS_PORT"]), ssl_context=ctx)
m.login(os.environ["USER"], os.environ["PASSWORD"])
m.select("INBOX")
typ, data = m.search(None, "SUBJECT", os.environ["SUBJECT"])
typ, msg = m.fetch(data[0].split()[-1], "(BODY.PEEK[])")
print(msg[0][1].decode().split("\r\n\r\n")[0])
m.logout()
"#;

#[test]
fn swaks_submits_with_auth_over_starttls_and_over_tls_from_the_start() {
    let h = host(&["alice", "bob"], "");
    let pw = h.password("alice");
    let ca = h.daemon.ca_file().display().to_string();
    let common = |auth: &'static str| {
        vec![
            "--from".to_owned(),
            format!("alice@{DOMAIN}"),
            "--to".to_owned(),
            format!("bob@{DOMAIN}"),
            "--auth".to_owned(),
            auth.to_owned(),
            "--auth-user".to_owned(),
            "alice".to_owned(),
            "--auth-password".to_owned(),
            pw.clone(),
            "--tls-verify".to_owned(),
            "--tls-ca-path".to_owned(),
            ca.clone(),
        ]
    };
    let mut args = common("PLAIN");
    args.extend([
        "--tls".to_owned(),
        "--header".to_owned(),
        "Subject: starttls".to_owned(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, out) = h.swaks_at(h.submission(), &args);
    assert!(ok, "{out}");
    assert!(out.contains("235 2.7.0 Authentication successful"), "{out}");
    let mut args = common("LOGIN");
    args.extend([
        "--tlsc".to_owned(),
        "--header".to_owned(),
        "Subject: implicit".to_owned(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, out) = h.swaks_at(h.submissions(), &args);
    assert!(ok, "{out}");
    assert!(out.contains("250 2.0.0 Ok: queued as"), "{out}");
    h.wait_for("bob", "INBOX", 2);
    let bob = h.password("bob");
    let mut env = h.client_env("bob", &bob);
    env.push(("SUBJECT", "implicit".to_owned()));
    let (ok, out) = run_python(READ_SUBJECT, &env);
    assert!(ok, "{out}");
    assert!(out.contains("Subject: implicit"), "{out}");
    assert!(out.contains("with ESMTPSA"), "{out}");
    assert!(
        !out.contains("Authentication-Results"),
        "submitted mail is not checked as if from outside: {out}"
    );
}

#[test]
fn auth_needs_tls_bad_passwords_fail_and_nobody_sends_as_someone_else() {
    let h = host(&["alice", "bob"], "");
    h.daemon
        .granary(&["mail", "alias", "add", &format!("sales@{DOMAIN}"), "alice"])
        .success();
    let pw = h.password("alice");
    let script = r#"
import base64, os, smtplib, ssl
port = int(os.environ["SUBMISSION_PORT"])
plain = base64.b64encode(b"\0alice\0" + os.environ["PASSWORD"].encode()).decode()
s = smtplib.SMTP("127.0.0.1", port)
s.ehlo("laptop")
print("AUTH OFFERED IN CLEAR", s.has_extn("auth"))
print("AUTH IN CLEAR", s.docmd("AUTH", "PLAIN " + plain))
print("MAIL IN CLEAR", s.docmd("MAIL", "FROM:<alice@example.org>"))
s.starttls(context=ssl.create_default_context(cafile=os.environ["CA"]))
s.ehlo("laptop")
print("AUTH OFFERED", s.esmtp_features.get("auth").strip())
try:
    s.login("alice", "not-the-password")
except smtplib.SMTPAuthenticationError as e:
    print("BAD PASSWORD", e.smtp_code)
s.login("alice", os.environ["PASSWORD"])
print("AS BOB", s.docmd("MAIL", "FROM:<bob@example.org>"))
print("RSET", s.rset()[0])
print("AS ALICE", s.docmd("MAIL", "FROM:<alice+lists@example.org>")[0])
print("RCPT", s.docmd("RCPT", "TO:<bob@example.org>")[0])
print("FORGED FROM", s.data(b"From: Bob <bob@example.org>\r\nSubject: x\r\n\r\nhi\r\n"))
s.rset()
s.sendmail("sales@example.org", ["bob@example.org"], b"From: Sales <Sales@example.org>\r\nSubject: from the alias\r\n\r\nhi\r\n")
print("ALIAS SENT")
s.quit()
"#;
    let (ok, out) = run_python(script, &h.client_env("alice", &pw));
    assert!(ok, "{out}");
    assert!(out.contains("AUTH OFFERED IN CLEAR False"), "{out}");
    assert!(out.contains("AUTH IN CLEAR (538, b'5.7.11 "), "{out}");
    assert!(
        out.contains("MAIL IN CLEAR (530, b'5.7.0 Authentication required')"),
        "{out}"
    );
    assert!(out.contains("AUTH OFFERED PLAIN LOGIN"), "{out}");
    assert!(out.contains("BAD PASSWORD 535"), "{out}");
    assert!(
        out.contains("AS BOB (553, b'5.7.1 <bob@example.org>: not one of your addresses')"),
        "{out}"
    );
    assert!(out.contains("AS ALICE 250"), "{out}");
    assert!(out.contains("RCPT 250"), "{out}");
    assert!(
        out.contains(
            "FORGED FROM (553, b'5.7.1 From: <bob@example.org> is not one of your addresses')"
        ),
        "{out}"
    );
    assert!(out.contains("ALIAS SENT"), "{out}");
    h.wait_for("bob", "INBOX", 1);
}

#[test]
fn missing_date_and_message_id_are_added_and_limits_hold() {
    let h = host(
        &["alice", "bob"],
        "send_per_hour = 2\nsend_max_recipients = 1\n",
    );
    let pw = h.password("alice");
    let script = r#"
import os, smtplib, ssl
ctx = ssl.create_default_context(cafile=os.environ["CA"])
s = smtplib.SMTP_SSL("127.0.0.1", int(os.environ["SUBMISSIONS_PORT"]), context=ctx)
s.login("alice@example.org", os.environ["PASSWORD"])
s.sendmail("alice@example.org", ["bob@example.org"], b"From: alice@example.org\r\nSubject: bare\r\n\r\nno date, no id\r\n")
print("SENT 1")
s.mail("alice@example.org")
s.rcpt("bob@example.org")
print("SECOND RCPT", s.rcpt("alice@example.org"))
s.rset()
s.sendmail("alice@example.org", ["bob@example.org"], b"From: alice@example.org\r\nSubject: two\r\n\r\n2\r\n")
print("SENT 2")
print("THIRD", s.docmd("MAIL", "FROM:<alice@example.org>"))
s.quit()
"#;
    let (ok, out) = run_python(script, &h.client_env("alice", &pw));
    assert!(ok, "{out}");
    assert!(out.contains("SENT 1"), "{out}");
    assert!(
        out.contains("SECOND RCPT (452, b'4.5.3 Too many recipients')"),
        "{out}"
    );
    assert!(out.contains("SENT 2"), "{out}");
    assert!(
        out.contains("THIRD (451, b'4.7.1 You sent 2 messages this hour"),
        "{out}"
    );
    h.wait_for("bob", "INBOX", 2);
    let bob = h.password("bob");
    let mut env = h.client_env("bob", &bob);
    env.push(("SUBJECT", "bare".to_owned()));
    let (ok, out) = run_python(READ_SUBJECT, &env);
    assert!(ok, "{out}");
    assert!(out.contains("Subject: bare"), "{out}");
    assert!(
        out.contains("\r\nDate: ") || out.contains("\nDate: "),
        "{out}"
    );
    assert!(out.contains("Message-ID: <"), "{out}");
}

#[test]
fn clients_configure_themselves_from_autoconfig_and_a_profile() {
    let h = host(&["alice"], "");
    let https = h.daemon.listener("https");
    let ca = h.daemon.ca_file();
    let curl = |host: &str, path: &str, user: Option<&str>| {
        let mut cmd = std::process::Command::new("curl");
        cmd.args(["-sS", "-w", "\n%{http_code}", "--cacert"])
            .arg(&ca)
            .arg("--resolve")
            .arg(format!("{host}:{}:127.0.0.1", https.port()))
            .arg(format!("https://{host}:{}{path}", https.port()));
        if let Some(u) = user {
            cmd.args(["-u", u]);
        }
        let out = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap();
        (code.to_owned(), body.to_owned())
    };
    // Thunderbird's two places, read by Python's XML parser.
    let read_xml = r#"
import os, sys, xml.etree.ElementTree as ET
root = ET.fromstring(sys.stdin.read())
for s in root.iter():
    if s.tag in ("incomingServer", "outgoingServer"):
        print(s.tag, s.get("type"), s.find("hostname").text, s.find("port").text,
              s.find("socketType").text, s.find("username").text)
"#;
    for (host, path) in [
        (
            format!("autoconfig.{DOMAIN}"),
            "/mail/config-v1.1.xml?emailaddress=alice%40example.org",
        ),
        (
            DOMAIN.to_owned(),
            "/.well-known/autoconfig/mail/config-v1.1.xml",
        ),
    ] {
        let (code, xml) = curl(&host, path, None);
        assert_eq!(code, "200", "{xml}");
        let out = pipe_python(read_xml, &xml);
        assert!(
            out.contains(&format!(
                "incomingServer imap {DOMAIN} {} SSL %EMAILADDRESS%",
                h.imaps().port()
            )),
            "{out}"
        );
        assert!(
            out.contains(&format!(
                "outgoingServer smtp {DOMAIN} {} SSL %EMAILADDRESS%",
                h.submissions().port()
            )),
            "{out}"
        );
    }
    // The Apple profile needs a login; plistlib reads it.
    let (code, _) = curl(&format!("mail.{DOMAIN}"), "/mobileconfig", None);
    assert_eq!(code, "401");
    let (code, _) = curl(
        &format!("mail.{DOMAIN}"),
        "/mobileconfig",
        Some("alice:wrong-password"),
    );
    assert_eq!(code, "401");
    let pw = h.password("alice");
    let (code, profile) = curl(
        &format!("mail.{DOMAIN}"),
        "/mobileconfig",
        Some(&format!("alice:{pw}")),
    );
    assert_eq!(code, "200", "{profile}");
    let read_plist = r#"
import plistlib, sys
p = plistlib.loads(sys.stdin.buffer.read())
a = p["PayloadContent"][0]
print(p["PayloadType"], a["PayloadType"], a["EmailAddress"], a["IncomingMailServerHostName"],
      a["IncomingMailServerPortNumber"], a["OutgoingMailServerPortNumber"], a["IncomingMailServerUsername"])
"#;
    let out = pipe_python(read_plist, &profile);
    assert_eq!(
        out.trim(),
        format!(
            "Configuration com.apple.mail.managed alice@{DOMAIN} {DOMAIN} {} {} alice",
            h.imaps().port(),
            h.submissions().port()
        )
    );
}

/// Runs a Python `script` with `input` on its standard input.
fn pipe_python(script: &str, input: &str) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new(granary_testkit::mail::python())
        .arg("-c")
        .arg(script)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
