//! Nobody can lock a user out: failed logins refuse the place they come
//! from, never the user. A stranger sends wrong passwords for alice from
//! one address (127.0.0.1) until it is refused; alice, from another
//! address (127.0.0.2, the same loopback range), still gets in with her
//! app password over HTTPS (curl), while the stranger's address is refused
//! even with the right password. Her registered SSH key gets in from
//! either address: password failures never refuse a key. `granary status`
//! shows the refused address.

use std::path::Path;
use std::process::Command;

use granary_testkit::{Daemon, app_host, git_package};

const DOMAIN: &str = "example.test";

/// The HTTP status of an authenticated request to alice's git service,
/// made from `from` (a loopback address) with `user:password`.
fn https_code(d: &Daemon, from: &str, user: &str, password: &str) -> String {
    let port = d.https_addr().port();
    let out = Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
        .arg(d.ca_file())
        .arg("--resolve")
        .arg(format!("git.{DOMAIN}:{port}:127.0.0.1"))
        .args(["--interface", from, "-u"])
        .arg(format!("{user}:{password}"))
        .arg(format!(
            "https://git.{DOMAIN}:{port}/alice/site.git/info/refs?service=git-upload-pack"
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// OpenSSH as alice with `key`, bound to `from`; what it printed on
/// standard error.
fn ssh_from(d: &Daemon, from: &str, key: &Path) -> String {
    let out = Command::new("ssh")
        .args(["-b", from, "-i"])
        .arg(key)
        .args([
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
            "-p",
        ])
        .arg(d.ssh_addr().port().to_string())
        .args(["alice@127.0.0.1", "git-upload-pack 'alice/site.git'"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_stranger_cannot_lock_alice_out() {
    let (d, dir, passwords) = app_host(DOMAIN, "", "", git_package, "git", &["alice"]);
    let password = &passwords["alice"];
    let key = dir.path().join("alice_key");
    let made = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key)
        .status()
        .unwrap();
    assert!(made.success());
    d.granary(&[
        "ssh-key",
        "add",
        "alice",
        key.with_extension("pub").to_str().unwrap(),
    ])
    .success();

    // The stranger, from 127.0.0.1: ten wrong passwords, then refused
    // before anything is checked, even the right one.
    let codes: Vec<String> = (0..11)
        .map(|_| https_code(&d, "127.0.0.1", "alice", "not her password"))
        .collect();
    assert_eq!(&codes[..10], vec!["401"; 10].as_slice(), "{codes:?}");
    assert_eq!(codes[10], "429", "{codes:?}");
    assert_eq!(https_code(&d, "127.0.0.1", "alice", password), "429");
    // A key cannot be guessed: the refused address still logs in with it.
    let ssh = ssh_from(&d, "127.0.0.1", &key);
    assert!(
        !ssh.contains("Permission denied"),
        "alice's key was refused: {ssh}"
    );
    // An unknown key is refused.
    let stranger = dir.path().join("stranger_key");
    let made = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&stranger)
        .status()
        .unwrap();
    assert!(made.success());
    let refused = ssh_from(&d, "127.0.0.2", &stranger);
    assert!(refused.contains("Permission denied"), "{refused}");

    // Alice, from 127.0.0.2: her app password and her key work.
    let hers = https_code(&d, "127.0.0.2", "alice", password);
    assert!(hers != "401" && hers != "429", "alice was refused: {hers}");
    let ssh = ssh_from(&d, "127.0.0.2", &key);
    assert!(
        !ssh.contains("Permission denied"),
        "alice's key was refused: {ssh}"
    );
    // A mistake of hers is one failure of her address, not a refusal.
    assert_eq!(https_code(&d, "127.0.0.2", "alice", "typo"), "401");

    let status = d.granary(&["status", "--json"]).success().json();
    let refused = status["logins"]["refused"].as_array().unwrap();
    assert_eq!(refused.len(), 1, "{status}");
    assert_eq!(refused[0]["source"], "127.0.0.1", "{status}");
    assert_eq!(status["logins"]["refused_count"], 1, "{status}");
    assert!(refused[0]["for_secs"].as_u64().unwrap() <= 300, "{status}");
    let text = d.granary(&["status"]).success().stdout;
    assert!(
        text.contains("1 source(s) refused") && text.contains("127.0.0.1 for"),
        "{text}"
    );
}
