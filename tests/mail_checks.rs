//! What the MX checks and decides: SPF, DKIM and DMARC verdicts in
//! Authentication-Results (DKIM signed by an independent signer, Python's
//! dkimpy), DMARC p=reject honoured, addresses (aliases, +tags,
//! postmaster, catch-all), and hostile MIME stored and fetchable.

use std::process::Command;

use granary_testkit::mail::{DOMAIN, MailHost, Record, run_python, sender_records};
use granary_testkit::{DEADLINE, eventually};

const READ_LAST: &str = r#"
import imaplib, os, ssl
ctx = ssl.create_default_context(cafile=os.environ["CA"])
m = imaplib.IMAP4_SSL(os.environ["IMAP_HOST"], int(os.environ["IMAPS_PORT"]), ssl_context=ctx)
m.login(os.environ["USER"], os.environ["PASSWORD"])
m.select(os.environ.get("MAILBOX", "INBOX"), readonly=True)
typ, data = m.fetch("*", "(BODY.PEEK[HEADER])")
print(data[0][1].decode(errors="replace"))
m.logout()
"#;

fn last_header(h: &MailHost, user: &str, mailbox: &str) -> String {
    let pw = h.password(user);
    let mut env = h.client_env(user, &pw);
    env.push(("MAILBOX", mailbox.to_owned()));
    let (ok, out) = run_python(READ_LAST, &env);
    assert!(ok, "{out}");
    // Unfold, so verdicts are on one line each.
    out.replace("\r\n\t", " ").replace("\n\t", " ")
}

const SIGN_AND_SEND: &str = r#"
import dkim, os, smtplib
key = open(os.environ["KEY"], "rb").read()
msg = (b"From: Dana <dana@signed.example>\r\nTo: alice@example.org\r\nSubject: signed\r\n"
       b"Message-ID: <signed-1@signed.example>\r\nDate: Thu, 03 Dec 2026 12:00:00 +0000\r\n\r\nsigned body\r\n")
sig = dkim.sign(msg, b"s1", b"signed.example", key, include_headers=[b"from", b"to", b"subject", b"message-id", b"date"])
s = smtplib.SMTP("127.0.0.1", int(os.environ["SMTP_PORT"]))
s.ehlo("mail.signed.example")
s.sendmail("dana@signed.example", ["alice@example.org"], sig + msg)
s.quit()
"#;

#[test]
fn spf_dkim_and_dmarc_passes_are_recorded_for_the_user() {
    let tmp = tempfile::tempdir().unwrap();
    let key = tmp.path().join("dkim.pem");
    let ok = Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&key)
        .status()
        .unwrap();
    assert!(ok.success());
    let der = Command::new("openssl")
        .args(["pkey", "-pubout", "-outform", "DER", "-in"])
        .arg(&key)
        .output()
        .unwrap();
    let public = base64_encode(&der.stdout);
    let mut records = sender_records("signed.example");
    records.push(Record::Txt(
        "s1._domainkey.signed.example".into(),
        format!("v=DKIM1; k=rsa; p={public}"),
    ));
    records.push(Record::Txt(
        "_dmarc.signed.example".into(),
        "v=DMARC1; p=reject".into(),
    ));
    let h = MailHost::start(&["alice"], &records, "", "");
    let mut env = h.client_env("alice", "-");
    env.push(("KEY", key.display().to_string()));
    let (ok, out) = run_python(SIGN_AND_SEND, &env);
    assert!(ok, "{out}");
    h.wait_for("alice", "INBOX", 1);
    let header = last_header(&h, "alice", "INBOX");
    let ar = header
        .lines()
        .find(|l| l.starts_with("Authentication-Results: example.org"))
        .unwrap_or_else(|| panic!("{header}"));
    assert!(ar.contains("dkim=pass"), "{ar}");
    assert!(
        ar.contains("header.d=signed.example") || ar.contains("header.i="),
        "{ar}"
    );
    assert!(ar.contains("spf=pass"), "{ar}");
    assert!(ar.contains("dmarc=pass"), "{ar}");
    assert!(
        header.contains("Received: from mail.signed.example ([127.0.0.1])"),
        "{header}"
    );
}

fn base64_encode(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn a_dmarc_reject_policy_refuses_forged_mail_at_the_end_of_data() {
    let mut records = sender_records("remote.example");
    records.push(Record::Txt(
        "evil.example".into(),
        "v=spf1 ip4:192.0.2.1 -all".into(),
    ));
    records.push(Record::Txt(
        "_dmarc.evil.example".into(),
        "v=DMARC1; p=reject".into(),
    ));
    records.push(Record::Txt(
        "relaxed.example".into(),
        "v=spf1 ip4:192.0.2.1 -all".into(),
    ));
    records.push(Record::Txt(
        "_dmarc.relaxed.example".into(),
        "v=DMARC1; p=none".into(),
    ));
    let h = MailHost::start(&["alice"], &records, "", "");
    let (ok, out) = h.swaks(&[
        "--from",
        "ceo@evil.example",
        "--to",
        &format!("alice@{DOMAIN}"),
        "--header",
        "From: CEO <ceo@evil.example>",
    ]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("550 5.7.1 Rejected: the DMARC policy of evil.example"),
        "{out}"
    );
    // p=none: taken, with the failure recorded for the user and filters.
    let (ok, out) = h.swaks(&[
        "--from",
        "x@relaxed.example",
        "--to",
        &format!("alice@{DOMAIN}"),
        "--header",
        "From: <x@relaxed.example>",
    ]);
    assert!(ok, "{out}");
    h.wait_for("alice", "INBOX", 1);
    let header = last_header(&h, "alice", "INBOX");
    assert!(header.contains("spf=fail"), "{header}");
    assert!(header.contains("dmarc=fail"), "{header}");
    assert!(h.spool().is_empty());
}

#[test]
fn aliases_tags_postmaster_and_catch_all_reach_their_users() {
    let h = MailHost::start(&["alice", "bob"], &sender_records("remote.example"), "", "");
    let d = &h.daemon;
    d.granary(&["mail", "alias", "add", "sales@example.org", "bob"])
        .success();
    let e = d
        .granary(&["mail", "alias", "add", "alice@example.org", "bob"])
        .failure();
    assert!(e.stderr.contains("alice's own address"), "{}", e.stderr);
    let e = d
        .granary(&["mail", "alias", "add", "x@nowhere.example", "bob"])
        .failure();
    assert!(
        e.stderr.contains("granary mail domain add nowhere.example"),
        "{}",
        e.stderr
    );
    let aliases = d
        .granary(&["mail", "alias", "list", "--json"])
        .success()
        .json();
    assert_eq!(aliases[0]["address"], "sales@example.org");
    let send = |to: &str| h.swaks(&["--from", "s@remote.example", "--to", to]);
    for to in [
        "Sales+Q4@example.org",
        "alice+lists@example.org",
        "postmaster@example.org",
        "ABUSE@example.org",
    ] {
        let (ok, out) = send(to);
        assert!(ok, "{to}: {out}");
    }
    let (ok, out) = send("nobody@example.org");
    assert!(!ok && out.contains("550 5.1.1"), "{out}");
    d.granary(&["mail", "catch-all", DOMAIN, "bob"]).success();
    let (ok, out) = send("nobody@example.org");
    assert!(ok, "{out}");
    // postmaster and abuse go to mail.postmaster (the helper makes it the
    // first user, alice).
    eventually("every message in its inbox", DEADLINE, || {
        (h.count("alice", "INBOX") == 3 && h.count("bob", "INBOX") == 2).then_some(())
    });
    let domains = d
        .granary(&["mail", "domain", "list", "--json"])
        .success()
        .json();
    assert_eq!(domains[0]["catch_all"], "bob");
    assert_eq!(domains[0]["aliases"], 1);
    let status = h.status("bob");
    let addresses: Vec<&str> = status["addresses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(addresses, ["bob@example.org", "sales@example.org"]);
    d.granary(&["mail", "catch-all", DOMAIN, "--none"])
        .success();
    let (ok, _) = send("nobody@example.org");
    assert!(!ok);
}

const HOSTILE: &str = r#"
import os, smtplib
msgs = []
deep = "Subject: deep\r\n"
for i in range(1000):
    deep += 'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (i, i)
deep += "Content-Type: text/plain\r\n\r\nbottom\r\n"
msgs.append(deep.encode())
wide = 'Subject: wide\r\nContent-Type: multipart/mixed; boundary="z"\r\n\r\n'
wide += "".join("--z\r\nContent-Type: text/plain\r\n\r\npart %d\r\n" % i for i in range(10000)) + "--z--\r\n"
msgs.append(wide.encode())
msgs.append(b"Subject: broken\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n!!! not base64 ===\r\n")
msgs.append(b"Subject: \xe8\xa8\xad\xff 8-bit header\r\nFrom: \xc3\xa9 <x@remote.example>\r\n\r\nbody\r\n")
msgs.append(b"Subject: nul\r\n\r\nbefore\x00after\r\n")
s = smtplib.SMTP("127.0.0.1", int(os.environ["SMTP_PORT"]))
s.ehlo("client.remote.example")
for m in msgs:
    s.sendmail("s@remote.example", ["alice@example.org"], m)
s.quit()
"#;

const FETCH_ALL: &str = r#"
import imaplib, os, ssl
ctx = ssl.create_default_context(cafile=os.environ["CA"])
m = imaplib.IMAP4_SSL(os.environ["IMAP_HOST"], int(os.environ["IMAPS_PORT"]), ssl_context=ctx)
m.login(os.environ["USER"], os.environ["PASSWORD"])
m.select("INBOX")
for i in range(1, 6):
    for item in ["(BODYSTRUCTURE ENVELOPE)", "(BODY.PEEK[])", "(BODY.PEEK[1])", "(BODY.PEEK[1.MIME])", "(BINARY.PEEK[1])", "(BODY.PEEK[2.1])"]:
        typ, data = m.fetch(str(i), item)
        print(i, item, typ)
typ, data = m.search(None, "TEXT", "bottom")
print("SEARCH", typ, data)
m.logout()
"#;

#[test]
fn hostile_mime_is_stored_and_fetchable_without_crashing_the_grain() {
    let h = MailHost::start(&["alice"], &sender_records("remote.example"), "", "");
    let (ok, out) = run_python(HOSTILE, &h.client_env("alice", "-"));
    assert!(ok, "{out}");
    h.wait_for("alice", "INBOX", 5);
    let pw = h.password("alice");
    let (ok, out) = run_python(FETCH_ALL, &h.client_env("alice", &pw));
    assert!(ok, "{out}\n{}", h.daemon.log());
    assert!(!out.contains(" NO"), "{out}");
    assert!(out.contains("SEARCH OK"), "{out}");
    let status = h
        .daemon
        .granary(&["grain", "status", "alice/mail", "--json"])
        .success()
        .json();
    assert_eq!(status["oom_kills"], 0, "{status}");
    assert_eq!(status["crashes"], 0, "{status}");
}

const TRAIN: &str = r#"
import imaplib, os, ssl
ctx = ssl.create_default_context(cafile=os.environ["CA"])
m = imaplib.IMAP4_SSL(os.environ["IMAP_HOST"], int(os.environ["IMAPS_PORT"]), ssl_context=ctx)
m.login(os.environ["USER"], os.environ["PASSWORD"])
m.select("INBOX")
typ, spam = m.uid("SEARCH", None, "SUBJECT", "winner")
typ, ham = m.uid("SEARCH", None, "SUBJECT", "agenda")
m.uid("MOVE", b",".join(spam[0].split()), "Junk")
m.uid("MOVE", b",".join(ham[0].split()), "Archive")
print("TRAINED", len(spam[0].split()), len(ham[0].split()))
m.logout()
"#;

#[test]
fn the_junk_filter_learns_from_the_users_moves_and_files_new_mail() {
    let h = MailHost::start(
        &["alice"],
        &sender_records("remote.example"),
        "max_messages_per_ip = 1000\n",
        "",
    );
    let send = |subject: &str, body: &str| {
        let (ok, out) = h.swaks(&[
            "--from",
            "s@remote.example",
            "--to",
            "alice@example.org",
            "--header",
            &format!("Subject: {subject}"),
            "--body",
            body,
        ]);
        assert!(ok, "{out}");
    };
    for i in 0..6 {
        send(
            &format!("You are a winner {i}"),
            "claim your casino prize now cheap pills offer",
        );
        send(
            &format!("Project agenda {i}"),
            "notes for the tuesday meeting about the project plan",
        );
    }
    h.wait_for("alice", "INBOX", 12);
    let pw = h.password("alice");
    let (ok, out) = run_python(TRAIN, &h.client_env("alice", &pw));
    assert!(ok, "{out}");
    assert!(out.contains("TRAINED 6 6"), "{out}");
    send("Another winner", "casino prize offer cheap pills claim now");
    send("Tuesday agenda", "the project meeting notes");
    eventually("the filter's verdicts", DEADLINE, || {
        (h.count("alice", "Junk") == 7 && h.count("alice", "INBOX") == 1).then_some(())
    });
}
