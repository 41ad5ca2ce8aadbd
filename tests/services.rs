//! The gateway's service table and named listeners, end to end: a new
//! HTTP app is an app plus an entry (the example app at `hello.<domain>`),
//! every hand-off carries the real identity, and the domain's front page
//! says what Granary is.

use granary_testkit::{Daemon, eventually};

fn require_root() {
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        std::fs::metadata("/proc/self").unwrap().uid(),
        0,
        "these tests build real sandboxes and must run as root"
    );
}

/// An app password of `kind` for `user`: (id, password).
fn app_password(daemon: &Daemon, user: &str, kind: &str) -> (i64, String) {
    let out = daemon
        .granary(&["app-password", "add", user, "--kind", kind, "--json"])
        .success()
        .json();
    (
        out["app_password"]["id"].as_i64().expect("an id"),
        out["password"].as_str().expect("a password").to_owned(),
    )
}

#[test]
fn the_example_app_is_served_at_its_host_with_the_identity_it_was_given() {
    require_root();
    let daemon = Daemon::start();
    let dir = granary_testkit::hello_app(daemon.dir(), "hello", &[]);
    daemon
        .granary(&["app", "install", dir.to_str().unwrap()])
        .success();
    for user in ["alice", "bob"] {
        daemon.granary(&["user", "add", user]).success();
    }
    let (alice_id, alice) = app_password(&daemon, "alice", "hello");
    let (bob_id, bob) = app_password(&daemon, "bob", "hello");

    // Over HTTPS: the grain's connection was accepted for alice, by app
    // password, and each request says the same.
    let (code, body) = daemon.curl(
        "hello.localhost",
        "/whoami",
        &["--user", &format!("alice:{alice}")],
    );
    assert_eq!(code, "200", "{body}");
    assert!(
        body.starts_with(&format!(
            "user=alice method=app-password credential={alice_id} protocol=https request-user=alice request-auth=app-password request-peer=127.0.0.1:"
        )),
        "{body}"
    );
    // Bob reaches his own grain, not alice's.
    let (code, body) = daemon.curl(
        "hello.localhost",
        "/whoami",
        &["--user", &format!("bob:{bob}")],
    );
    assert_eq!(code, "200", "{body}");
    assert!(
        body.starts_with(&format!(
            "user=bob method=app-password credential={bob_id} "
        )),
        "{body}"
    );
    let grains = daemon
        .granary(&["grain", "list", "--json"])
        .success()
        .json();
    let running: Vec<&str> = grains
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| g["state"] == "running")
        .map(|g| g["id"].as_str().unwrap())
        .collect();
    assert_eq!(running.len(), 2, "{grains}");
    assert!(running.contains(&"alice-hello") && running.contains(&"bob-hello"));

    // No credentials, a wrong password, another kind's password: 401.
    let (code, _) = daemon.curl("hello.localhost", "/whoami", &[]);
    assert_eq!(code, "401");
    let (code, _) = daemon.curl("hello.localhost", "/", &["--user", "alice:not-it"]);
    assert_eq!(code, "401");
    let (_, git) = app_password(&daemon, "alice", "git");
    let (code, _) = daemon.curl("hello.localhost", "/", &["--user", &format!("alice:{git}")]);
    assert_eq!(code, "401");

    // Over `granary grain connect`: the admin, on the owner's behalf.
    assert_eq!(
        daemon.ask("alice/hello", "whoami"),
        "user=alice method=admin grain=alice-hello owner=alice kind=hello"
    );

    // Status and ports.json list every bound listener by name.
    let status = daemon.granary(&["status", "--json"]).success().json();
    for name in ["https", "ssh"] {
        assert_eq!(
            status["listeners"][name],
            daemon.ports()["listeners"][name],
            "{status}"
        );
    }
}

#[test]
fn the_front_page_says_what_this_is_and_unknown_hosts_say_so() {
    let daemon = Daemon::start();
    let (code, body) = daemon.curl("localhost", "/", &[]);
    assert_eq!(code, "200");
    assert!(
        body.contains("Granary on localhost") && body.contains("git.localhost"),
        "{body}"
    );
    // (Not a name the local CA covers, so curl is told not to check it.)
    let (code, body) = daemon.curl("nothing.example", "/x", &["--insecure"]);
    assert_eq!(code, "404");
    assert!(
        body.contains("No Granary app serves https://nothing.example/x"),
        "{body}"
    );
    // A grain that does not exist (no blog app is installed) is the
    // client's mistake, not a 5xx.
    // With a single-label domain (`localhost`, as the demo has) clients
    // do not match `*.localhost`: the local CA names each user's subdomain,
    // and the gateway picks the new certificate up without a restart.
    daemon.granary(&["user", "add", "carol"]).success();
    let (code, body) = eventually(
        "the certificate to name carol.localhost",
        granary_testkit::DEADLINE,
        || daemon.try_curl("carol.localhost", "/", &[]).ok(),
    );
    assert_eq!(code, "404", "{body}");
}

/// The lines of the demo banner's block that starts with `title`, up to
/// the next empty line, with the two-space indent removed.
fn banner_block(banner: &[String], title: &str) -> Vec<String> {
    banner
        .iter()
        .skip_while(|l| !l.starts_with(title))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter(|l| !l.trim_start().starts_with('('))
        .map(|l| l.trim().to_owned())
        .collect()
}

/// Found when the project was tried as a new user: the demo printed an
/// account password nothing accepted, and `git.localhost` does not resolve
/// on Debian. Its next steps are now run here exactly as printed.
#[test]
fn the_demo_banner_steps_work_when_pasted() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let packages = [
        granary_testkit::git_package(tmp.path()),
        granary_testkit::app_package(tmp.path(), "blog", "granary-blog", ""),
        granary_testkit::mail::mail_package(tmp.path()),
        granary_testkit::dav_package(tmp.path()),
    ];
    // The mail checks ask a DNS server of the test's own.
    let dns = granary_testkit::mail::Dns::start(&[]);
    let daemon = Daemon::start_with_builtin(
        granary_testkit::DaemonMode::Demo,
        &format!("[mail]\nresolver = \"{}\"\n", dns.addr),
        &packages,
    );
    let mut banner = Vec::new();
    while let Some(line) = daemon.next_stdout_line() {
        let done = line.starts_with("Stop with Ctrl-C");
        banner.push(line);
        if done {
            break;
        }
    }
    let git_steps = banner_block(&banner, "Try git");
    let blog_steps = banner_block(&banner, "Publish it");
    assert_eq!(git_steps.len(), 3, "{banner:#?}");
    assert_eq!(blog_steps.len(), 4, "{banner:#?}");
    let curl = blog_steps.last().unwrap().clone();
    // One shell, as a user pasting would have; the last line (curl) is run
    // until the blog shows the page.
    let script = [&git_steps[..], &blog_steps[..3]].concat().join("\n");
    let home = tmp.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let out = std::process::Command::new("sh")
        .args(["-e", "-c", &script])
        .env("HOME", &home)
        .env("TMPDIR", tmp.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the banner's steps failed:\n{script}\n{}{}\n--- daemon log\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        daemon.log()
    );
    let page = eventually(
        "the blog to show the pushed page",
        granary_testkit::DEADLINE,
        || {
            let out = std::process::Command::new("sh")
                .args(["-c", &curl])
                .output()
                .unwrap();
            let body = String::from_utf8_lossy(&out.stdout).into_owned();
            body.contains("Hello from Granary").then_some(body)
        },
    );
    assert!(page.contains("<h1>"), "{page}");

    // Mail: the send and status steps as printed, then the IMAP read.
    let mail_steps = banner_block(&banner, "Try mail");
    let read = banner_block(&banner, "Read it");
    assert_eq!((mail_steps.len(), read.len()), (2, 1), "{banner:#?}");
    let out = std::process::Command::new("sh")
        .args(["-e", "-c", &mail_steps.join("\n")])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{mail_steps:#?}\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let fetched = eventually(
        "the demo's IMAP step to show the mail",
        granary_testkit::DEADLINE,
        || {
            let out = std::process::Command::new("sh")
                .args(["-c", &read[0]])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.contains("Subject: hello").then_some(text)
        },
    );
    assert!(fetched.contains("Subject: hello"), "{fetched}");

    // Calendars: the listing step as printed shows the default calendar.
    let dav = banner_block(&banner, "Try calendars");
    assert_eq!(dav.len(), 1, "{banner:#?}");
    let out = std::process::Command::new("sh")
        .args(["-c", &dav[0]])
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(
        listing.contains("<D:href>/calendars/demo/calendar/</D:href>"),
        "{dav:?}\n{listing}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(daemon);
    drop(dns);
}
