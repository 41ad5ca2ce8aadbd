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
