//! Mail with the clients and peers people really use: mbsync (isync)
//! syncing 500 messages both ways, and Debian's Postfix relaying to our
//! MX.

use std::path::Path;
use std::process::Command;

use granary_testkit::mail::{DOMAIN, MailHost, run_python, sender_records};
use granary_testkit::postfix::Postfix;
use granary_testkit::{DEADLINE, eventually};

fn host(users: &[&str]) -> MailHost {
    MailHost::start(
        users,
        &sender_records("remote.example"),
        "max_messages_per_ip = 10000\n",
        "",
    )
}

const SEND_MANY: &str = r#"
import smtplib, os
s = smtplib.SMTP("127.0.0.1", int(os.environ["SMTP_PORT"]))
s.ehlo("client.remote.example")
for i in range(int(os.environ["COUNT"])):
    s.sendmail("sender@remote.example", ["alice@example.org"],
        "From: sender@remote.example\r\nTo: alice@example.org\r\nSubject: server %d\r\nMessage-ID: <server-%d@remote.example>\r\n\r\nfrom the server side %d\r\n" % (i, i, i))
s.quit()
"#;

fn mbsync(config: &Path) -> (bool, String) {
    let out = Command::new("mbsync")
        .args(["-c", config.to_str().unwrap(), "-a"])
        .output()
        .expect("mbsync (apt install isync; ./run-tests does)");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Files in a Maildir folder's cur/ and new/.
fn maildir(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for sub in ["cur", "new"] {
        if let Ok(entries) = std::fs::read_dir(dir.join(sub)) {
            out.extend(entries.flatten().map(|e| e.path()));
        }
    }
    out
}

#[test]
fn mbsync_syncs_500_messages_both_ways_with_flags_and_then_has_nothing_to_do() {
    let h = host(&["alice"]);
    let pw = h.password("alice");
    let mut env = h.client_env("alice", &pw);
    env.push(("COUNT", "250".to_owned()));
    let (ok, out) = run_python(SEND_MANY, &env);
    assert!(ok, "{out}");
    h.wait_for("alice", "INBOX", 250);

    let local = h.dir.path().join("Mail");
    let inbox = local.join("INBOX");
    for sub in ["cur", "new", "tmp"] {
        std::fs::create_dir_all(inbox.join(sub)).unwrap();
    }
    for i in 0..250 {
        // Half of them read already, a few flagged.
        let flags = match i % 10 {
            0 => ":2,FS",
            1..=4 => ":2,S",
            _ => ":2,",
        };
        let name = format!("17000{i:05}.M{i}P1.laptop{flags}");
        std::fs::write(
            inbox.join("cur").join(name),
            format!("From: alice@example.org\r\nSubject: laptop {i}\r\nMessage-ID: <laptop-{i}@example.org>\r\n\r\nwritten offline {i}\r\n"),
        )
        .unwrap();
    }
    let config = h.dir.path().join("mbsyncrc");
    std::fs::write(
        &config,
        format!(
            "IMAPAccount granary\nTunnel \"openssl s_client -quiet -connect 127.0.0.1:{} -CAfile {} -verify_ip 127.0.0.1 -verify_return_error\"\n\
             User alice\nPass {pw}\nSSLType None\n\n\
             IMAPStore remote\nAccount granary\n\n\
             MaildirStore local\nPath {}/\nInbox {}\nSubFolders Verbatim\n\n\
             Channel sync\nFar :remote:\nNear :local:\nPatterns INBOX\nCreate Both\nExpunge Both\nSyncState *\nSync All\n",
            h.imaps().port(),
            h.daemon.ca_file().display(),
            local.display(),
            inbox.display(),
        ),
    )
    .unwrap();
    let (ok, out) = mbsync(&config);
    assert!(ok, "{out}\n{}", h.daemon.log());
    assert_eq!(maildir(&inbox).len(), 500, "{out}");
    h.wait_for("alice", "INBOX", 500);
    let status = h.status("alice");
    let unseen = status["mailboxes"][0]["unseen"].as_u64().unwrap();
    // 250 from the server unread, 125 of the laptop's were unread.
    assert_eq!(unseen, 250 + 125, "{status}");

    // Flags both ways: read every server message locally, flag one on
    // the server.
    for f in maildir(&inbox) {
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        if !name.contains(",S") && !name.contains("S") || name.ends_with(":2,") {
            let new = if name.contains(":2,") {
                format!("{name}S")
            } else {
                format!("{name}:2,S")
            };
            std::fs::rename(&f, inbox.join("cur").join(new)).unwrap();
        }
    }
    let flag_one = r#"
import imaplib, os, ssl
ctx = ssl.create_default_context(cafile=os.environ["CA"])
m = imaplib.IMAP4_SSL(os.environ["IMAP_HOST"], int(os.environ["IMAPS_PORT"]), ssl_context=ctx)
m.login(os.environ["USER"], os.environ["PASSWORD"])
m.select("INBOX")
typ, data = m.uid("SEARCH", None, "HEADER", "Message-ID", "server-7@remote.example")
m.uid("STORE", data[0].split()[0], "+FLAGS", "(\\Flagged)")
m.logout()
"#;
    let (ok, out) = run_python(flag_one, &h.client_env("alice", &pw));
    assert!(ok, "{out}");
    let (ok, out) = mbsync(&config);
    assert!(ok, "{out}");
    eventually("every message read on the server", DEADLINE, || {
        (h.status("alice")["mailboxes"][0]["unseen"] == 0).then_some(())
    });
    let flagged = maildir(&inbox)
        .iter()
        .filter(|f| {
            let n = f.file_name().unwrap().to_string_lossy().into_owned();
            n.rsplit_once(":2,").is_some_and(|(_, fl)| fl.contains('F'))
                && std::fs::read_to_string(f).unwrap().contains("server-7@")
        })
        .count();
    assert_eq!(flagged, 1, "the server's flag reached the laptop");

    // Nothing changed since: a third run moves nothing.
    let before: Vec<_> = {
        let mut v: Vec<String> = maildir(&inbox)
            .iter()
            .map(|f| f.display().to_string())
            .collect();
        v.sort();
        v
    };
    let (ok, out) = mbsync(&config);
    assert!(ok, "{out}");
    let after: Vec<_> = {
        let mut v: Vec<String> = maildir(&inbox)
            .iter()
            .map(|f| f.display().to_string())
            .collect();
        v.sort();
        v
    };
    assert_eq!(before, after, "{out}");
    assert!(
        out.contains("pulled 0 new message(s) and 0 flag update(s)")
            && out.contains("pushed 0 new message(s) and 0 flag update(s)")
            || !out.contains("pulled"),
        "{out}"
    );
    assert_eq!(h.count("alice", "INBOX"), 500);
}

/// Debian's Postfix as a sending MTA with our MX as its relay, STARTTLS
/// required and our CA trusted.
fn sending_postfix(relay: std::net::SocketAddr, ca: &Path) -> Postfix {
    Postfix::start(
        false,
        &format!(
            "master_service_disable = inet\nmyhostname = sender.remote.example\nmydomain = remote.example\n\
             myorigin = remote.example\nmydestination =\n\
             relayhost = [{ip}]:{port}\nsmtp_dns_support_level = disabled\nsmtp_host_lookup = native\n\
             smtp_tls_security_level = encrypt\nsmtp_tls_CAfile = {ca}\nsmtp_tls_loglevel = 1\n\
             default_destination_concurrency_limit = 1\nsmtp_destination_recipient_limit = 50\n",
            ip = relay.ip(),
            port = relay.port(),
            ca = ca.display(),
        ),
    )
}

#[test]
fn postfix_relays_to_alice_and_bob_in_one_transaction_over_starttls() {
    let h = host(&["alice", "bob"]);
    let pf = sending_postfix(h.smtp(), &h.daemon.ca_file());
    pf.send(
        "carol@remote.example",
        &[&format!("alice@{DOMAIN}"), &format!("bob@{DOMAIN}")],
        "From: carol@remote.example\r\nSubject: to you both\r\n\r\nhello from Postfix\r\n",
    );
    eventually("both inboxes to get it", DEADLINE, || {
        (h.count("alice", "INBOX") == 1 && h.count("bob", "INBOX") == 1).then_some(())
    });
    let log = pf.log();
    assert!(log.contains("status=sent"), "{log}");
    // One transaction: Postfix relayed once, for both recipients.
    let relayed = log.lines().filter(|l| l.contains("status=sent")).count();
    assert_eq!(relayed, 2, "{log}");
    let queue_ids: std::collections::BTreeSet<&str> = log
        .lines()
        .filter(|l| l.contains("status=sent"))
        .filter_map(|l| l.split("queued as ").nth(1))
        .map(|s| s.trim_end_matches(')').trim())
        .collect();
    assert_eq!(queue_ids.len(), 1, "one MX transaction: {log}");
    // STARTTLS, and our certificate chains to the CA Postfix was given.
    assert!(log.contains("Trusted TLS connection established"), "{log}");
}
