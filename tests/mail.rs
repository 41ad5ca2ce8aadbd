//! Mail, part 1, end to end: the real daemon, real jailed mail grains,
//! and real clients (swaks, Python's smtplib, imaplib and imapclient).

use granary_testkit::mail::{DOMAIN, MailHost, run_python, sender_records};

fn host(users: &[&str]) -> MailHost {
    MailHost::start(users, &sender_records("remote.example"), "", "")
}

#[test]
fn mail_from_swaks_reaches_the_inbox_and_unknown_recipients_are_refused_at_rcpt() {
    let h = host(&["alice", "bob"]);
    let (ok, out) = h.swaks(&[
        "--from",
        "sender@remote.example",
        "--to",
        &format!("alice@{DOMAIN}"),
        "--header",
        "Subject: first",
        "--body",
        "hello alice",
        "--pipeline",
    ]);
    assert!(ok, "{out}");
    assert!(out.contains("250 2.0.0 Ok: queued as"), "{out}");
    h.wait_for("alice", "INBOX", 1);
    let (ok, out) = h.swaks(&[
        "--from",
        "sender@remote.example",
        "--to",
        &format!("nobody@{DOMAIN}"),
    ]);
    assert!(!ok);
    assert!(
        out.contains("550 5.1.1 <nobody@example.org>: no such user here"),
        "{out}"
    );
    let (ok, out) = h.swaks(&[
        "--from",
        "sender@remote.example",
        "--to",
        "someone@elsewhere.example",
    ]);
    assert!(!ok);
    assert!(out.contains("550 5.7.1"), "{out}");
    let status = h.status("alice");
    assert_eq!(status["deliveries"], 1);
    assert!(status["last_delivery"].as_i64().unwrap() > 0);
    assert!(h.spool().is_empty());
}

const IMAPLIB_READ: &str = r#"
import imaplib, os, ssl
ctx = ssl.create_default_context(cafile=os.environ["CA"])
m = imaplib.IMAP4_SSL(os.environ["IMAP_HOST"], int(os.environ["IMAPS_PORT"]), ssl_context=ctx)
m.login(os.environ["USER"], os.environ["PASSWORD"])
typ, data = m.select("INBOX")
assert typ == "OK", data
typ, data = m.search(None, "ALL")
ids = data[0].split()
typ, msg = m.fetch(ids[-1], "(BODY.PEEK[])")
body = msg[0][1].decode()
print("SUBJECT", [l for l in body.split("\r\n") if l.startswith("Subject:")][0])
print("AR", "Authentication-Results: example.org" in body)
m.logout()
"#;

#[test]
fn imaplib_over_imaps_reads_what_smtplib_sent() {
    let h = host(&["alice"]);
    let send = r#"
import smtplib, os
s = smtplib.SMTP("127.0.0.1", int(os.environ["SMTP_PORT"]))
s.ehlo("client.remote.example")
s.sendmail("sender@remote.example", ["alice@example.org"], "Subject: via smtplib\r\nAuthentication-Results: example.org; spf=pass forged=yes\r\n\r\nbody\r\n")
s.quit()
"#;
    let pw = h.password("alice");
    let env = h.client_env("alice", &pw);
    let (ok, out) = run_python(send, &env);
    assert!(ok, "{out}");
    h.wait_for("alice", "INBOX", 1);
    let (ok, out) = run_python(IMAPLIB_READ, &env);
    assert!(ok, "{out}\n{}", h.daemon.log());
    assert!(out.contains("SUBJECT Subject: via smtplib"), "{out}");
    assert!(!out.contains("forged=yes"), "{out}");
    assert!(out.contains("AR True"), "{out}");
}
