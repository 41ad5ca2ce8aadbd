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

    // Saving a sent message with an attachment: a 3 MB APPEND, read back
    // whole.
    let append = r#"
import imaplib, os, ssl, hashlib
ctx = ssl.create_default_context(cafile=os.environ["CA"])
m = imaplib.IMAP4_SSL(os.environ["IMAP_HOST"], int(os.environ["IMAPS_PORT"]), ssl_context=ctx)
m.login(os.environ["USER"], os.environ["PASSWORD"])
line = b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlqa2xtbm9wcXJzdHV2d3h5ejAxMjM0\r\n"
msg = b"Subject: attachment\r\n\r\n" + line * (3 * 1024 * 1024 // len(line))
typ, data = m.append("Sent", "(\\Seen)", None, msg)
assert typ == "OK", data
m.select("Sent")
typ, data = m.search(None, "ALL")
typ, got = m.fetch(data[0].split()[-1], "(BODY.PEEK[])")
print("SAME", hashlib.sha256(got[0][1]).hexdigest() == hashlib.sha256(msg).hexdigest(), len(msg))
m.logout()
"#;
    let (ok, out) = run_python(append, &env);
    assert!(ok, "{out}");
    assert!(out.contains("SAME True"), "{out}");
}

const STARTTLS_SMTP: &str = r#"
import os, socket, ssl
ctx = ssl.create_default_context(cafile=os.environ["CA"])
s = socket.create_connection(("127.0.0.1", int(os.environ["SMTP_PORT"])))
f = s.makefile("rb")
def reply():
    lines = []
    while True:
        l = f.readline().decode()
        lines.append(l)
        if l[3:4] == " ":
            return "".join(lines)
assert reply().startswith("220 ")
s.sendall(b"EHLO client.remote.example\r\n")
assert "STARTTLS" in reply()
# STARTTLS and a NOOP in one segment: the NOOP was sent in clear and must
# never be answered, before or after the handshake.
s.sendall(b"STARTTLS\r\nNOOP\r\n")
r = reply()
assert r.startswith("220 2.0.0"), r
t = ctx.wrap_socket(s, server_hostname="127.0.0.1")
f = t.makefile("rb")
t.sendall(b"EHLO client.remote.example\r\n")
r = reply()
assert r.startswith("250-"), r
assert "STARTTLS" not in r, r
t.sendall(b"QUIT\r\n")
print("FIRST", reply().strip())
"#;

const STARTTLS_IMAP: &str = r#"
import os, socket, ssl
ctx = ssl.create_default_context(cafile=os.environ["CA"])
s = socket.create_connection(("127.0.0.1", int(os.environ["IMAP_PORT"])))
f = s.makefile("rb")
g = f.readline().decode()
assert "LOGINDISABLED" in g and "STARTTLS" in g, g
s.sendall(("a LOGIN %s %s\r\n" % (os.environ["USER"], os.environ["PASSWORD"])).encode())
l = f.readline().decode()
assert l.startswith("a NO [PRIVACYREQUIRED]"), l
s.sendall(b"b STARTTLS\r\nc NOOP\r\n")
l = f.readline().decode()
assert l.startswith("b OK"), l
t = ctx.wrap_socket(s, server_hostname="127.0.0.1")
f = t.makefile("rb")
t.sendall(b"d CAPABILITY\r\n")
lines = [f.readline().decode(), f.readline().decode()]
assert lines[0].startswith("* CAPABILITY") and "AUTH=PLAIN" in lines[0], lines
assert lines[1].startswith("d OK"), lines
t.sendall(("e LOGIN %s %s\r\n" % (os.environ["USER"], os.environ["PASSWORD"])).encode())
l = f.readline().decode()
assert l.startswith("e OK [CAPABILITY IMAP4rev1 IMAP4rev2"), l
t.sendall(b"f NOOP\r\n")
l = f.readline().decode()
assert l.startswith("f OK"), l
print("NEVER c:", "c OK" not in "".join(lines))
"#;

#[test]
fn plaintext_pipelined_after_starttls_is_never_answered() {
    let h = host(&["alice"]);
    let pw = h.password("alice");
    let env = h.client_env("alice", &pw);
    let (ok, out) = run_python(STARTTLS_SMTP, &env);
    assert!(ok, "{out}");
    assert!(out.contains("FIRST 221"), "{out}");
    let (ok, out) = run_python(STARTTLS_IMAP, &env);
    assert!(ok, "{out}\n{}", h.daemon.log());
}

#[test]
fn swaks_over_starttls_with_a_25_mb_message() {
    let h = host(&["alice"]);
    let big = h.dir.path().join("big.bin");
    std::fs::write(&big, granary_testkit::noise(7, 25 << 20)).unwrap();
    let (ok, out) = h.swaks(&[
        "--from",
        "sender@remote.example",
        "--to",
        &format!("alice@{DOMAIN}"),
        "--tls",
        "--tls-ca-path",
        h.daemon.ca_file().to_str().unwrap(),
        "--tls-verify",
        "--pipeline",
        "--attach",
        &format!("@{}", big.display()),
        "--suppress-data",
    ]);
    assert!(ok, "{out}");
    assert!(out.contains("250 2.0.0 Ok: queued as"), "{out}");
    h.wait_for("alice", "INBOX", 1);
    let status = h.status("alice");
    let inbox = status["mailboxes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "INBOX")
        .unwrap()
        .clone();
    assert!(inbox["bytes"].as_u64().unwrap() > 25 << 20, "{status}");
}

const IDLE_PAIR: &str = r#"
import os, ssl, time
from imapclient import IMAPClient
ctx = ssl.create_default_context(cafile=os.environ["CA"])
def client():
    c = IMAPClient(os.environ["IMAP_HOST"], port=int(os.environ["IMAPS_PORT"]), ssl=True, ssl_context=ctx)
    c.login(os.environ["USER"], os.environ["PASSWORD"])
    c.select_folder("INBOX")
    return c
phone, laptop = client(), client()
phone.idle()
uids = laptop.search("ALL")
laptop.add_flags(uids[:1], [b"\\Flagged"])
start = time.monotonic()
seen = phone.idle_check(timeout=5)
elapsed = time.monotonic() - start
phone.idle_done()
print("FLAGS", any(b"\\Flagged" in repr(r).encode() for r in seen), "within", elapsed < 1.0, seen)
phone.idle()
laptop.append("INBOX", b"Subject: appended\r\n\r\nnew\r\n")
start = time.monotonic()
seen = phone.idle_check(timeout=5)
elapsed = time.monotonic() - start
phone.idle_done()
print("EXISTS", any(r[1] == b"EXISTS" for r in seen), "within", elapsed < 1.0, seen)
phone.idle()
laptop.delete_messages(uids[:1])
laptop.expunge()
start = time.monotonic()
seen = []
while time.monotonic() - start < 5 and not any(r[1] == b"EXPUNGE" for r in seen):
    seen += phone.idle_check(timeout=5)
elapsed = time.monotonic() - start
phone.idle_done()
print("EXPUNGE", any(r[1] == b"EXPUNGE" for r in seen), "within", elapsed < 1.0, seen)
phone.logout(); laptop.logout()
"#;

#[test]
fn a_second_imap_session_sees_flags_new_mail_and_expunges_through_idle() {
    let h = host(&["alice"]);
    h.swaks(&["--from", "s@remote.example", "--to", "alice@example.org"]);
    h.wait_for("alice", "INBOX", 1);
    let pw = h.password("alice");
    let (ok, out) = run_python(IDLE_PAIR, &h.client_env("alice", &pw));
    assert!(ok, "{out}\n{}", h.daemon.log());
    assert!(out.contains("FLAGS True within True"), "{out}");
    assert!(out.contains("EXISTS True within True"), "{out}");
    assert!(out.contains("EXPUNGE True within True"), "{out}");
}

const SNOOP: &str = r##"
import imaplib, os, ssl
ctx = ssl.create_default_context(cafile=os.environ["CA"])
m = imaplib.IMAP4_SSL(os.environ["IMAP_HOST"], int(os.environ["IMAPS_PORT"]), ssl_context=ctx)
m.login(os.environ["USER"], os.environ["PASSWORD"])
print("LIST", m.list()[1])
for name in ["../alice", "/var/mail", "#shared/alice", "alice/INBOX", "~alice", "Other Users/alice"]:
    print("SELECT", name, m.select('"%s"' % name)[0])
m.select("INBOX")
print("SEARCH", m.search(None, "ALL")[1])
print("COPY", m.copy("1:*", '"../alice/INBOX"')[0])
print("STATUS", m.status('"../alice"', "(MESSAGES)")[0])
m.logout()
try:
    m = imaplib.IMAP4_SSL(os.environ["IMAP_HOST"], int(os.environ["IMAPS_PORT"]), ssl_context=ctx)
    m.login("alice", os.environ["PASSWORD"])
    print("ALICE WITH BOBS PASSWORD: logged in")
except imaplib.IMAP4.error as e:
    print("ALICE WITH BOBS PASSWORD: refused", e)
"##;

#[test]
fn bob_cannot_reach_alices_mail_by_any_command() {
    let h = host(&["alice", "bob"]);
    h.swaks(&[
        "--from",
        "s@remote.example",
        "--to",
        "alice@example.org",
        "--header",
        "Subject: for alice only",
    ]);
    h.wait_for("alice", "INBOX", 1);
    let pw = h.password("bob");
    let (ok, out) = run_python(SNOOP, &h.client_env("bob", &pw));
    assert!(ok, "{out}");
    assert!(!out.contains("alice only"), "{out}");
    for line in out.lines().filter(|l| l.starts_with("SELECT")) {
        assert!(line.ends_with("NO"), "{line}\n{out}");
    }
    assert!(
        out.contains("SEARCH [b'']"),
        "bob's own INBOX is empty: {out}"
    );
    assert!(out.contains("STATUS NO"), "{out}");
    assert!(out.contains("ALICE WITH BOBS PASSWORD: refused"), "{out}");
    assert_eq!(h.count("alice", "INBOX"), 1);
}
