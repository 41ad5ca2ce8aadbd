//! Nothing acknowledged is lost and nothing is delivered twice: the
//! daemon killed with mail in its spool, the mail grain killed in the
//! middle of deliveries, a full mailbox.

use std::collections::BTreeMap;

use granary_testkit::mail::{MailHost, run_python, sender_records};
use granary_testkit::{DEADLINE, eventually};

const SEND: &str = r#"
import smtplib, os
s = smtplib.SMTP("127.0.0.1", int(os.environ["SMTP_PORT"]))
s.ehlo("client.remote.example")
pad = "x" * int(os.environ.get("PAD", "0"))
for i in range(int(os.environ["FIRST"]), int(os.environ["FIRST"]) + int(os.environ["COUNT"])):
    s.sendmail("sender@remote.example", ["alice@example.org"],
        "Subject: m%d\r\nMessage-ID: <m%d@remote.example>\r\n\r\n%s\r\n" % (i, i, pad))
s.quit()
"#;

/// Message-IDs in alice's INBOX, with how often each is there.
const IDS: &str = r#"
import imaplib, os, ssl
ctx = ssl.create_default_context(cafile=os.environ["CA"])
m = imaplib.IMAP4_SSL(os.environ["IMAP_HOST"], int(os.environ["IMAPS_PORT"]), ssl_context=ctx)
m.login(os.environ["USER"], os.environ["PASSWORD"])
m.select("INBOX", readonly=True)
typ, data = m.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
for part in data:
    if isinstance(part, tuple):
        print("ID", part[1].decode().strip())
m.logout()
"#;

fn send(h: &MailHost, first: u32, count: u32, pad: usize) {
    send_with(h.client_env("alice", "-"), first, count, pad)
}

fn send_with(mut env: Vec<(&'static str, String)>, first: u32, count: u32, pad: usize) {
    env.push(("FIRST", first.to_string()));
    env.push(("COUNT", count.to_string()));
    env.push(("PAD", pad.to_string()));
    let (ok, out) = run_python(SEND, &env);
    assert!(ok, "{out}");
}

/// How many copies of each Message-ID alice has.
fn copies(h: &MailHost) -> BTreeMap<String, usize> {
    let pw = h.password("alice");
    let (ok, out) = run_python(IDS, &h.client_env("alice", &pw));
    assert!(ok, "{out}");
    let mut seen = BTreeMap::new();
    for l in out.lines().filter_map(|l| l.strip_prefix("ID ")) {
        *seen.entry(l.to_owned()).or_insert(0) += 1;
    }
    seen
}

fn assert_exactly_once(h: &MailHost, n: u32) {
    let seen = copies(h);
    assert_eq!(seen.len(), n as usize, "{seen:?}");
    let twice: Vec<_> = seen.iter().filter(|(_, c)| **c != 1).collect();
    assert!(twice.is_empty(), "delivered more than once: {twice:?}");
}

fn grain_pid(h: &MailHost) -> Option<u64> {
    h.daemon
        .granary(&["grain", "status", "alice/mail", "--json"])
        .success()
        .json()["pid"]
        .as_u64()
}

fn host(extra: &str) -> MailHost {
    MailHost::start(
        &["alice"],
        &sender_records("remote.example"),
        "max_messages_per_ip = 10000\n",
        extra,
    )
}

#[test]
fn killing_the_daemon_mid_delivery_loses_nothing_and_duplicates_nothing() {
    let mut h = host("");
    send(&h, 0, 40, 20_000);
    // Some are in the grain, some still in the spool.
    eventually("deliveries under way", DEADLINE, || {
        (h.count("alice", "INBOX") >= 5).then_some(())
    });
    h.daemon.crash_and_restart();
    eventually("all 40 delivered after the restart", DEADLINE, || {
        (h.count("alice", "INBOX") >= 40 && h.spool().is_empty()).then_some(())
    });
    assert_exactly_once(&h, 40);
}

#[test]
fn killing_the_mail_grain_mid_delivery_loses_nothing_and_duplicates_nothing() {
    let h = host("");
    send(&h, 0, 1, 0);
    h.wait_for("alice", "INBOX", 1);
    let sender = std::thread::scope(|s| {
        let env = h.client_env("alice", "-");
        let t = s.spawn(move || send_with(env, 1, 40, 100_000));
        for at in [5, 15, 25] {
            eventually("more deliveries", DEADLINE, || {
                (h.count("alice", "INBOX") >= at).then_some(())
            });
            if let Some(pid) = grain_pid(&h) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        t.join()
    });
    assert!(sender.is_ok());
    eventually("all 41 delivered", DEADLINE, || {
        (h.count("alice", "INBOX") >= 41 && h.spool().is_empty()).then_some(())
    });
    assert_exactly_once(&h, 41);
    let status = h
        .daemon
        .granary(&["grain", "status", "alice/mail", "--json"])
        .success()
        .json();
    assert!(status["crashes"].as_u64().unwrap() >= 1, "{status}");
}

/// Where a grain's dataset is mounted on the host.
fn mountpoint(pool: &str, grain: &str) -> std::path::PathBuf {
    let out = std::process::Command::new("zfs")
        .args(["list", "-H", "-o", "name,mountpoint", "-r", pool])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .filter_map(|l| l.split_once('\t'))
        .find(|(name, _)| name.ends_with(grain))
        .map(|(_, m)| m.into())
        .unwrap_or_else(|| panic!("no dataset for {grain}: {text}"))
}

#[test]
fn a_full_mailbox_keeps_mail_in_the_spool_across_a_crash_until_space_is_freed() {
    use std::io::Write;
    let tmp = tempfile::tempdir().unwrap();
    let pool = granary_datasets::testing::ZfsPool::create(tmp.path(), "256M").unwrap();
    let mut h = host(&format!(
        "[storage]\nbackend = \"zfs\"\nzfs_dataset = \"{}\"\nquota_mib = 32\n",
        pool.name
    ));
    send(&h, 0, 1, 0);
    h.wait_for("alice", "INBOX", 1);
    // Fill the grain's dataset to its quota, as a big mailbox would.
    let filler = mountpoint(&pool.name, "alice-mail").join("filler");
    {
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = granary_testkit::noise(3, 1 << 20);
        while f.write_all(&chunk).is_ok() && f.sync_data().is_ok() {}
    }
    send(&h, 1, 1, 300_000);
    // Accepted (250) and waiting: a temporary failure, never a bounce.
    let waiting = eventually("a failed attempt on the full mailbox", DEADLINE, || {
        h.spool()
            .into_iter()
            .find(|m| m["attempts"].as_u64().unwrap_or(0) >= 1)
    });
    assert!(
        waiting["last_error"].as_str().unwrap().contains("full"),
        "{waiting}"
    );
    assert_eq!(waiting["recipients"][0]["state"], "waiting");
    h.daemon.crash_and_restart();
    assert_eq!(h.spool().len(), 1, "the message survived the crash");
    std::fs::remove_file(&filler).unwrap();
    h.daemon.granary(&["mail", "spool", "retry"]).success();
    eventually("delivered once space is free", DEADLINE, || {
        (h.count("alice", "INBOX") == 2 && h.spool().is_empty()).then_some(())
    });
    assert_exactly_once(&h, 2);
    drop(h);
    drop(pool);
}
