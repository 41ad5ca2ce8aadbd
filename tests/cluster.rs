//! Several nodes as one cluster: three real etcd members on loopback and
//! three real daemons, each in its own data dir, joined with single-use
//! tokens; leases show who is up, and a node killed hard drops out.
//!
//! The first test talks plain HTTP to etcd on loopback; the fencing test
//! runs etcd as production does, TLS with client certificates (made by
//! the test's own CA). Most tests' nodes share the host's loopback; the
//! last one gives each node its own network namespace and zfs-fuse pool.

use std::time::{Duration, Instant};

use granary_testkit::cluster::{node_config, nodes, token};
use granary_testkit::etcd::Etcd;
use granary_testkit::{Daemon, DaemonMode, Session, eventually};
use serde_json::Value;

fn node(etcd: &Etcd, name: &str, arches: &str) -> Daemon {
    Daemon::prepare(DaemonMode::Serve, &node_config(etcd, name, arches), "", &[])
}

/// Waits until node `d` (named `name`) lists `what` among `list(d)`: it
/// has read the shared records that added it.
fn knows(d: &Daemon, name: &str, what: &str, list: fn(&Daemon) -> Vec<String>) {
    eventually(
        &format!("{name} to know {what}"),
        Duration::from_secs(10),
        || list(d).iter().any(|x| x == what).then_some(()),
    );
}

/// Adds a line to a prepared node's `[cluster]` section.
fn cluster_line(d: &Daemon, line: &str) {
    let path = d.config_path();
    let text = std::fs::read_to_string(&path).unwrap();
    let anchor = "lease_ttl = \"2s\"\n";
    assert!(text.contains(anchor), "{text}");
    std::fs::write(
        &path,
        text.replacen(anchor, &format!("{anchor}{line}\n"), 1),
    )
    .unwrap();
}

fn state_of(d: &Daemon, name: &str) -> Option<String> {
    nodes(d)
        .iter()
        .find(|n| n["name"] == name)
        .map(|n| n["state"].as_str().unwrap_or_default().to_owned())
}

/// Two running nodes of a new cluster on `etcd`, serving `domain` with
/// `extra` config and `listen` listeners, each with the package
/// `package` makes (in `dir`) installed.
fn app_nodes(
    etcd: &Etcd,
    domain: &str,
    extra: &str,
    listen: &str,
    package: impl FnOnce(&std::path::Path) -> std::path::PathBuf,
    dir: &std::path::Path,
) -> (Daemon, Daemon) {
    let prepare = |name: &str| {
        let config = format!(
            "domain = \"{domain}\"\n{}\n{extra}",
            node_config(etcd, name, "\"x86_64\"")
        );
        Daemon::prepare(DaemonMode::Serve, &config, listen, &[])
    };
    let mut n1 = prepare("n1");
    let mut n2 = prepare("n2");
    n2.share_uid_range(&n1);
    n1.granary(&["cluster", "init"]).success();
    for d in [&n1, &n2] {
        d.granary_with_stdin(&["node", "join"], Some(&format!("{}\n", token(&n1))))
            .success();
    }
    n1.launch();
    n2.launch();
    let package = package(dir);
    for d in [&n1, &n2] {
        d.granary(&["app", "install", package.to_str().unwrap()])
            .success();
    }
    (n1, n2)
}

#[test]
fn nodes_join_with_single_use_tokens_hold_leases_and_a_dead_one_drops_out() {
    let etcd = Etcd::start(3);
    let mut n1 = node(&etcd, "n1", "\"x86_64\"");
    let mut n2 = node(&etcd, "n2", "\"x86_64\"");
    let mut n3 = node(&etcd, "n3", "\"aarch64\"");
    // One host uid range for the cluster (grains' uids are picked from the
    // shared records); n3 keeps its own for now, and is refused below.
    n2.share_uid_range(&n1);
    // n1 takes one grain at most (placement by room, below).
    cluster_line(&n1, "max_grains = 1");

    // Nothing to join before the cluster exists.
    let run = n1
        .granary_with_stdin(&["node", "join"], Some("gjoin-00\n"))
        .failure();
    assert!(
        run.stderr.contains("granary cluster init"),
        "{}",
        run.stderr
    );
    let run = n1.granary(&["cluster", "init"]).success();
    assert!(
        run.stdout.starts_with("cluster ") && run.stdout.contains("initialised"),
        "{}",
        run.stdout
    );
    let again = n2.granary(&["cluster", "init"]).failure();
    assert!(
        again.stderr.contains("already holds cluster"),
        "{}",
        again.stderr
    );

    // A node that has not joined does not start.
    let refused = n1
        .granary_within(&["serve"], Duration::from_secs(60))
        .failure();
    assert!(
        refused.stderr.contains("not a member"),
        "{}",
        refused.stderr
    );

    let t1 = token(&n1);
    let run = n1
        .granary_with_stdin(&["node", "join"], Some(&format!("{t1}\n")))
        .success();
    assert!(run.stdout.contains("node n1 joined"), "{}", run.stdout);
    // Used once: a second node cannot use it.
    let reuse = n2
        .granary_with_stdin(&["node", "join"], Some(&format!("{t1}\n")))
        .failure();
    assert!(
        reuse.stderr.contains("unknown, already used or expired"),
        "{}",
        reuse.stderr
    );
    n2.granary_with_stdin(&["node", "join"], Some(&format!("{}\n", token(&n1))))
        .success();
    n3.granary_with_stdin(&["node", "join"], Some(&format!("{}\n", token(&n2))))
        .success();

    n1.launch();
    n2.launch();
    let run = n3
        .granary_within(&["serve"], Duration::from_secs(60))
        .failure();
    assert!(
        run.stderr
            .contains("every node of a cluster gives grains the same host uid range"),
        "{}",
        run.stderr
    );
    n3.share_uid_range(&n1);
    n3.launch();
    let listed = nodes(&n2);
    let names: Vec<&str> = listed.iter().map(|n| n["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["n1", "n2", "n3"]);
    for n in &listed {
        assert_eq!(n["state"], "up", "{n}");
        assert!(n["lease_age_secs"].as_i64().is_some_and(|a| a <= 2), "{n}");
        assert!(n["free_bytes"].as_u64().is_some_and(|b| b > 0), "{n}");
        assert_eq!(n["key"].as_str().map(str::len), Some(64), "{n}");
    }
    assert_eq!(listed[2]["arches"], serde_json::json!(["aarch64"]));
    let table = n3.granary(&["node", "list"]).success().stdout;
    assert!(
        table.starts_with("NODE") && table.contains("aarch64"),
        "{table}"
    );

    let status = n2.granary(&["status", "--json"]).success().json();
    assert_eq!(status["healthy"], true, "{status}");
    assert_eq!(status["cluster"]["node"], "n2", "{status}");
    assert_eq!(status["cluster"]["lease"], "live", "{status}");
    assert_eq!(status["cluster"]["lease_ttl_secs"], 2, "{status}");
    let health: Vec<(&str, &str)> = status["cluster"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["name"].as_str().unwrap(), n["state"].as_str().unwrap()))
        .collect();
    assert_eq!(
        health,
        [("n1", "up"), ("n2", "up"), ("n3", "up")],
        "{status}"
    );
    let text = n2.granary(&["status"]).success().stdout;
    assert!(
        text.contains("cluster        node n2, lease live"),
        "{text}"
    );
    // The doctor asks each other node for its clock over the node link.
    let checks = n2.granary(&["doctor", "--json"]).json();
    for other in ["n1", "n3"] {
        let check = checks
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == format!("clock of node {other}"))
            .unwrap_or_else(|| panic!("no clock check of {other}: {checks:#}"));
        assert_eq!(check["level"], "ok", "{check:#}");
        assert!(
            check["detail"].as_str().unwrap().contains(" ms)"),
            "{check:#}"
        );
    }

    // Users, credentials, apps and grains are the cluster's shared
    // records: alice is added on n1, and n2 knows her a moment later
    // (the shared log's watch). Packages do not travel between nodes yet,
    // so each node installs the app's image itself.
    let users_of = |d: &Daemon| -> Vec<String> {
        d.granary(&["user", "list", "--json"])
            .success()
            .json()
            .as_array()
            .expect("a list")
            .iter()
            .map(|u| u["name"].as_str().unwrap().to_owned())
            .collect()
    };
    for d in [&n1, &n2] {
        let app = granary_testkit::hello_app(d.dir(), "hello", &[]);
        d.granary(&["app", "install", app.to_str().unwrap()])
            .success();
    }
    n1.granary(&["user", "add", "alice"]).success();
    let added = Instant::now();
    knows(&n2, "n2", "alice", users_of);
    eprintln!(
        "a user added on n1 was listed on n2 after {:?}",
        added.elapsed()
    );
    // One set of users: adding her again on n2 is refused as on one node.
    let run = n2.granary(&["user", "add", "alice"]).failure();
    assert!(run.stderr.contains("already exists"), "{}", run.stderr);
    let grains_of = |d: &Daemon| -> Vec<String> {
        let list = d.granary(&["grain", "list", "--json"]).success().json();
        list.as_array()
            .expect("a list")
            .iter()
            .map(|g| g["id"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(grains_of(&n1), ["alice-hello"]);
    assert_eq!(grains_of(&n2), ["alice-hello"]);

    // Placement and fencing: a grain first started on n1 is placed there,
    // with the write's revision as its epoch, which n1 records in the
    // grain's dataset.
    n1.granary(&["grain", "start", "alice/hello"]).success();
    let owned: Vec<u64> = nodes(&n2)
        .iter()
        .map(|n| n["grains"].as_u64().unwrap())
        .collect();
    assert_eq!(owned, [1, 0, 0]);
    let epoch_file = n1.data_dir().join("grains/alice-hello/epoch");
    let epoch: i64 = std::fs::read_to_string(&epoch_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(epoch > 0);
    // Admin calls on a grain go to the node that runs it: asked on n2,
    // n1 stops, starts and reports alice's grain (n2 runs nothing).
    let st = n2
        .granary(&["grain", "status", "alice/hello", "--json"])
        .success()
        .json();
    assert_eq!(st["state"], "running", "{st}");
    let run = n2.granary(&["grain", "stop", "alice/hello"]).success();
    assert!(run.stdout.contains("stopped alice/hello"), "{}", run.stdout);
    assert_eq!(
        n1.granary(&["grain", "status", "alice/hello", "--json"])
            .success()
            .json()["state"],
        "stopped"
    );
    n2.granary(&["grain", "start", "alice/hello"]).success();
    assert_eq!(
        n1.granary(&["grain", "status", "alice/hello", "--json"])
            .success()
            .json()["state"],
        "running"
    );
    n2.granary(&["grain", "logs", "alice/hello"]).success();
    let local: Vec<Value> = n2
        .granary(&["grain", "list", "--json"])
        .success()
        .json()
        .as_array()
        .unwrap()
        .clone();
    assert!(local.iter().all(|g| g["state"] == "stopped"), "{local:?}");
    // Any node reaches the grain: n2 forwards the connection over its
    // node link to n1, which owns it, with n2's identity attached. The
    // marker is only in n1's copy of the data.
    std::fs::write(
        n1.data_dir().join("grains/alice-hello/data/only-on-n1"),
        "x",
    )
    .unwrap();
    assert_eq!(n2.ask("alice/hello", "ls /var"), "only-on-n1");
    assert_eq!(
        n3.ask("alice/hello", "whoami"),
        "user=alice method=admin grain=alice-hello owner=alice kind=hello"
    );
    assert!(
        n1.log().contains("connection forwarded from another node"),
        "{}",
        n1.log()
    );
    // Over HTTPS through n2's gateway: n2 checks alice's app password,
    // n1's grain answers for the identity n2 established. The password
    // is made on n1: n2 has its hash from the shared records.
    let password = granary_testkit::app_password(&n1, "alice", "hello");
    eventually(
        "n2 to know alice's app password",
        Duration::from_secs(10),
        || {
            (n2.granary(&["app-password", "list", "alice", "--json"])
                .success()
                .json()
                .as_array()
                .is_some_and(|a| !a.is_empty()))
            .then_some(())
        },
    );
    let (code, body) = n2.curl(
        "hello.localhost",
        "/whoami",
        &["--user", &format!("alice:{password}")],
    );
    assert_eq!(code, "200", "{body}");
    assert!(
        body.starts_with("user=alice method=app-password credential="),
        "{body}"
    );
    let (code, _) = n2.curl("hello.localhost", "/whoami", &["--user", "alice:wrong"]);
    assert_eq!(code, "401");

    // A grain nobody placed goes, at its first connection, to the node
    // with the most room that runs its app: n1 is full (max_grains = 1,
    // and it runs alice's hello), n3 runs only aarch64, so erin's grain,
    // first asked for through n1, is placed on n2 and runs there. n2 may
    // not have read erin yet: the link tells it how far n1 has read.
    n1.granary(&["user", "add", "erin"]).success();
    assert_eq!(
        n1.ask("erin/hello", "whoami"),
        "user=erin method=admin grain=erin-hello owner=erin kind=hello"
    );
    let owned: Vec<u64> = nodes(&n1)
        .iter()
        .map(|n| n["grains"].as_u64().unwrap())
        .collect();
    assert_eq!(owned, [1, 1, 0]);
    assert!(
        n1.log()
            .contains("placed a new grain on the node with the most room"),
        "{}",
        n1.log()
    );

    // Packages travel by content address: a signed package installed on
    // n1 only, and a grain of it started on n2, which fetches the package
    // from a peer and checks its signature and hash before unpacking it.
    let pkg = granary_testkit::app_package(n1.dir(), "blog", "granary-blog", "");
    n1.granary(&["app", "install", pkg.to_str().unwrap()])
        .success();
    knows(&n2, "n2", "alice-blog", grains_of);
    assert!(!n2.data_dir().join("apps/blog").exists());
    n2.granary(&["grain", "start", "alice/blog"]).success();
    let kept: Vec<String> = std::fs::read_dir(n2.data_dir().join("apps/blog"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    // The image and its package, named by the same content address.
    let mut kept = kept;
    kept.sort();
    assert!(
        kept.len() == 2 && kept[1] == format!("{}.gpkg", kept[0]),
        "{kept:?}"
    );
    assert_eq!(
        std::fs::read(n2.data_dir().join("apps/blog").join(&kept[1])).unwrap(),
        std::fs::read(&pkg).unwrap()
    );
    assert!(
        n2.log()
            .contains("fetched an app's package from another node"),
        "{}",
        n2.log()
    );
    // An app installed unsigned, from a directory, is not fetched.
    let dev = granary_testkit::hello_app(n1.dir(), "devonly", &[]);
    n1.granary(&["app", "install", dev.to_str().unwrap()])
        .success();
    knows(&n2, "n2", "alice-devonly", grains_of);
    let run = n2.granary(&["grain", "start", "alice/devonly"]).failure();
    assert!(
        run.stderr.contains("development mode) is not fetched"),
        "{}",
        run.stderr
    );
    n2.granary(&["grain", "stop", "alice/blog"]).success();

    // Data that a later placement already ran on is not started under an
    // older one.
    n1.granary(&["grain", "stop", "alice/hello"]).success();
    std::fs::write(&epoch_file, format!("{}\n", epoch + 100)).unwrap();
    let run = n1.granary(&["grain", "start", "alice/hello"]).failure();
    assert!(
        run.stderr.contains("newer than this placement"),
        "{}",
        run.stderr
    );
    std::fs::write(&epoch_file, format!("{epoch}\n")).unwrap();
    n1.granary(&["grain", "start", "alice/hello"]).success();

    // Architecture is respected: n3 declares only aarch64 (the one
    // simulated part), so it does not run the x86_64 hello app.
    let app = granary_testkit::hello_app(n3.dir(), "hello", &[]);
    n3.granary(&["app", "install", app.to_str().unwrap()])
        .success();
    n3.granary(&["user", "add", "bob"]).success();
    knows(&n1, "n1", "bob", users_of);
    let run = n3.granary(&["grain", "start", "bob/hello"]).failure();
    assert!(
        run.stderr
            .contains("node n3 runs only aarch64 and the app is built for x86_64"),
        "{}",
        run.stderr
    );
    assert_eq!(nodes(&n1)[2]["grains"], 0, "nothing placed on n3");
    // A package with an image for each architecture, installed on n1, is
    // one n3 runs: it fetches the package from n1, unpacks the aarch64
    // image and takes the grain. (This host cannot run aarch64 code: the
    // image's program, a minimal aarch64 ELF file, gets no further than
    // its exec; what counts here is that n3 took the grain.)
    let both = granary_testkit::two_arch_package(n1.dir(), "both");
    n1.granary(&["app", "install", both.to_str().unwrap()])
        .success();
    knows(&n3, "n3", "bob-both", grains_of);
    let run = n3.granary(&["grain", "start", "bob/both"]);
    assert!(!run.stderr.contains("runs only"), "{run}");
    assert_eq!(nodes(&n1)[2]["grains"], 1, "bob's grain placed on n3");
    let sha = granary_package::sha256_hex(&std::fs::read(&both).unwrap());
    let program = n3
        .data_dir()
        .join("apps/both")
        .join(&sha)
        .join("image/bin/granary-hello");
    assert_eq!(
        std::fs::read(program).unwrap(),
        granary_testkit::minimal_program("aarch64")
    );

    // A live node cannot be removed, even dropping its grains' placements.
    let run = n1.granary(&["node", "remove", "n3", "--force"]).failure();
    assert!(run.stderr.contains("stop its daemon"), "{}", run.stderr);

    // n3 dies hard: it holds its lease no more, and drops out within
    // about the TTL (2 s), without anyone doing anything.
    n3.kill_hard();
    let died = Instant::now();
    eventually("n3 to show as down", Duration::from_secs(15), || {
        (state_of(&n1, "n3").as_deref() == Some("down")).then_some(())
    });
    let detected = died.elapsed();
    eprintln!("a node killed hard showed as down after {detected:?} (lease TTL 2 s)");
    assert!(
        detected >= Duration::from_millis(900),
        "down after {detected:?}: before its TTL?"
    );
    assert_eq!(state_of(&n1, "n1").as_deref(), Some("up"));
    // bob's grain is placed on it: removing it drops that placement only
    // when asked to.
    let run = n1.granary(&["node", "remove", "n3"]).failure();
    assert!(
        run.stderr.contains("still owns 1 grain(s); pass --force"),
        "{}",
        run.stderr
    );
    let run = n1.granary(&["node", "remove", "n3", "--force"]).success();
    assert!(
        run.stdout.contains("placement dropped for: bob-both"),
        "{}",
        run.stdout
    );
    assert_eq!(state_of(&n1, "n3"), None);

    // The shared records outlive any one node: a fresh node joining
    // after n3 died reads users n3 added, and a node that starts again
    // catches up with what was written while it was away.
    // A drained node takes no new grains, and stays drained across its
    // restart.
    let run = n1.granary(&["node", "drain", "n2", "--no-move"]).success();
    assert!(
        run.stdout.contains("node n2 drained")
            && run.stdout.contains("keeps running its 2 grain(s)"),
        "{}",
        run.stdout
    );
    let status = n2.stop();
    assert!(status.success(), "{}", n2.log());
    n1.granary(&["user", "add", "carol"]).success();
    // No node can take carol's grain now (n1 full, n2 drained and
    // stopped, n3 gone): her first connection is refused with each
    // node's reason rather than squeezed onto n1.
    let run = n1
        .granary_with_stdin(
            &["grain", "connect", "carol/hello", "hello"],
            Some("whoami\n"),
        )
        .failure();
    assert!(
        run.stderr.contains("no node can take") && run.stderr.contains("n1: full"),
        "{}",
        run.stderr
    );
    let mut n4 = node(&etcd, "n4", "\"x86_64\"");
    n4.share_uid_range(&n1);
    n4.granary_with_stdin(&["node", "join"], Some(&format!("{}\n", token(&n1))))
        .success();
    n4.launch();
    assert_eq!(users_of(&n4), ["alice", "bob", "carol", "erin"]);
    n2.launch();
    assert_eq!(users_of(&n2), ["alice", "bob", "carol", "erin"]);
    assert_eq!(state_of(&n1, "n2").as_deref(), Some("drained"));
    let run = n2.granary(&["grain", "start", "bob/hello"]).failure();
    assert!(run.stderr.contains("n2: drained"), "{}", run.stderr);
    n1.granary(&["node", "undrain", "n2"]).success();
    assert_eq!(state_of(&n1, "n2").as_deref(), Some("up"));
    n2.granary(&["grain", "start", "bob/hello"]).success();
    n2.granary(&["grain", "stop", "bob/hello"]).success();
    assert!(
        n2.log()
            .contains("caught up with the cluster's shared records"),
        "{}",
        n2.log()
    );
    // (A node with records of its own is refused: granary-state's tests.)
    drop(n4);

    // A clean stop releases the lease at once, and marks the node at
    // rest (its grains are not failed over): stopped on the first look.
    let status = n2.stop();
    assert!(status.success(), "{}", n2.log());
    assert_eq!(state_of(&n1, "n2").as_deref(), Some("stopped"));
    // Its membership survives: it comes back up.
    n2.launch();
    assert_eq!(state_of(&n1, "n2").as_deref(), Some("up"));

    // Another data dir calling itself n1 is not n1: the name is taken,
    // and its key is not the one the cluster pinned for n1.
    let imposter = node(&etcd, "n1", "\"x86_64\"");
    let run = imposter
        .granary_with_stdin(&["node", "join"], Some(&format!("{}\n", token(&n1))))
        .failure();
    assert!(run.stderr.contains("already a member"), "{}", run.stderr);
    let run = imposter
        .granary_within(&["serve"], Duration::from_secs(60))
        .failure();
    assert!(run.stderr.contains("another node key"), "{}", run.stderr);
    drop(imposter);
    drop((n1, n2, n3));
}

#[test]
fn a_node_cut_off_from_etcd_fences_itself_before_its_lease_can_expire() {
    // etcd over TLS, with client certificates.
    let mut etcd = Etcd::start_tls(3);
    let mut n1 = node(&etcd, "n1", "\"x86_64\"");
    n1.granary(&["cluster", "init"]).success();
    n1.granary_with_stdin(&["node", "join"], Some(&format!("{}\n", token(&n1))))
        .success();
    n1.launch();
    let app = granary_testkit::hello_app(n1.dir(), "hello", &[]);
    n1.granary(&["app", "install", app.to_str().unwrap()])
        .success();
    n1.granary(&["user", "add", "alice"]).success();
    n1.granary(&["grain", "start", "alice/hello"]).success();
    let state = |d: &Daemon| {
        d.granary(&["grain", "status", "alice/hello", "--json"])
            .success()
            .json()["state"]
            .clone()
    };
    assert_eq!(state(&n1), "running");

    // Two of three etcd members die: no quorum, no renewal. Within TTL/2
    // (1 s) and a check period the node stops trusting its lease and
    // stops its grain, before etcd could let anyone else have it (2 s).
    etcd.kill(0);
    etcd.kill(1);
    let cut = Instant::now();
    eventually(
        "the grain to be stopped by fencing",
        Duration::from_secs(20),
        || (state(&n1) == "stopped").then_some(()),
    );
    let seen_after = cut.elapsed();
    // What matters is the node's own decision: it fenced itself while
    // less than the TTL had passed since its last confirmed renewal was
    // sent, so before etcd could have dropped its lease. (When the test
    // saw the grain stopped also counts its polling, on a busy machine.)
    let log = n1.log();
    let line = log
        .lines()
        .find(|l| l.contains("fencing: this node no longer trusts its cluster lease"))
        .unwrap_or_else(|| panic!("no fencing in the log:\n{log}"));
    let since = line
        .split("since_renewal=")
        .nth(1)
        .and_then(|v| v.split_whitespace().next())
        .unwrap_or_else(|| panic!("{line}"));
    let since = match since.strip_suffix("ms") {
        Some(ms) => Duration::from_secs_f64(ms.parse::<f64>().unwrap() / 1000.0),
        None => Duration::from_secs_f64(since.trim_end_matches('s').parse().unwrap()),
    };
    eprintln!(
        "fenced {since:?} after its last confirmed renewal (lease TTL 2 s); the grain was seen stopped {seen_after:?} after quorum was lost"
    );
    assert!(
        since < Duration::from_secs(2),
        "fenced only {since:?} after the last renewal, past the TTL: {line}"
    );
    let stopped = log
        .lines()
        .position(|l| l.contains("fencing: grain stopped grain=alice-hello"));
    assert!(stopped.is_some(), "{log}");
    let run = n1.granary(&["grain", "start", "alice/hello"]).failure();
    assert!(
        run.stderr.contains("may not start it")
            || run.stderr.contains("cannot check with the cluster"),
        "{}",
        run.stderr
    );
    assert_eq!(state(&n1), "stopped");
    let status = n1.granary(&["status", "--json"]);
    let json = status.json();
    assert_eq!(json["healthy"], false, "{json}");
    assert_ne!(json["cluster"]["lease"], "live", "{json}");
    drop(n1);
}

/// Asks `hello` of `grain` through the node whose config is `config`,
/// from a thread of its own; `None` when the connection failed.
fn put_through(config: &std::path::Path, grain: &str, n: u64) -> Option<String> {
    let run = granary_testkit::run_granary(
        &[
            "--config",
            config.to_str().unwrap(),
            "grain",
            "connect",
            grain,
            "hello",
        ],
        Some(&format!("put {n}\n")),
    );
    run.status
        .success()
        .then(|| run.stdout.trim_end().to_owned())
}

#[test]
fn a_grain_moves_to_another_node_with_its_data_and_loses_no_acknowledged_write() {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering};
    let etcd = Etcd::start(1);
    let mut n1 = node(&etcd, "n1", "\"x86_64\"");
    let mut n2 = node(&etcd, "n2", "\"x86_64\"");
    let mut n3 = node(&etcd, "n3", "\"x86_64\"");
    n2.share_uid_range(&n1);
    n3.share_uid_range(&n1);
    n1.granary(&["cluster", "init"]).success();
    for d in [&n1, &n2, &n3] {
        d.granary_with_stdin(&["node", "join"], Some(&format!("{}\n", token(&n1))))
            .success();
    }
    n1.launch();
    n2.launch();
    n3.launch();
    for d in [&n1, &n2, &n3] {
        let app = granary_testkit::hello_app(d.dir(), "hello", &[]);
        d.granary(&["app", "install", app.to_str().unwrap()])
            .success();
    }
    n1.granary(&["user", "add", "alice"]).success();
    n1.granary(&["grain", "start", "alice/hello"]).success();
    // 12 MiB of data, more than one pre-copy round takes as "small", a
    // nested file and a symlink.
    let data = n1.data_dir().join("grains/alice-hello/data");
    let big: Vec<u8> = (0..12u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(data.join("big"), &big).unwrap();
    std::fs::create_dir_all(data.join("sub/dir")).unwrap();
    std::fs::write(data.join("sub/dir/note"), "moved with it").unwrap();
    std::os::unix::fs::symlink("sub/dir/note", data.join("link")).unwrap();

    // A client writes through n2 all along: before the move n2 forwards
    // to n1, during the cut-over it is refused and retries, after it n2
    // runs the grain. Every `stored N` it got must survive.
    let acked: Mutex<Vec<(u64, Instant)>> = Mutex::default();
    let done = AtomicBool::new(false);
    let n2_config = n2.config_path();
    let report = std::thread::scope(|s| {
        s.spawn(|| {
            let mut n = 1;
            while !done.load(Ordering::SeqCst) {
                if put_through(&n2_config, "alice/hello", n) == Some(format!("stored {n}")) {
                    acked.lock().unwrap().push((n, Instant::now()));
                    n += 1;
                }
            }
        });
        let count = || acked.lock().unwrap().len();
        eventually("writes before the move", Duration::from_secs(30), || {
            (count() >= 5).then_some(())
        });
        let run = n1
            .granary(&["grain", "move", "alice/hello", "--to", "n2", "--json"])
            .success();
        let after = count();
        eventually("writes after the move", Duration::from_secs(30), || {
            (count() >= after + 5).then_some(())
        });
        done.store(true, Ordering::SeqCst);
        run
    });
    assert!(
        report.stderr.contains("\"phase\":\"move final\""),
        "{}",
        report.stderr
    );
    let r = report.json();
    eprintln!("move report: {r}");
    assert_eq!(
        (r["from"].as_str(), r["to"].as_str()),
        (Some("n1"), Some("n2"))
    );
    assert!(r["epoch"].as_i64() > r["from_epoch"].as_i64(), "{r}");
    let rounds: Vec<u64> = r["rounds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_u64().unwrap())
        .collect();
    assert!(rounds.len() >= 2 && rounds[0] > 12 << 20, "{rounds:?}");
    let acked = acked.into_inner().unwrap();
    let gap = acked.windows(2).map(|w| w[1].1 - w[0].1).max().unwrap();
    eprintln!(
        "{} writes acknowledged; the longest wait between two was {gap:?}; downtime {} ms",
        acked.len(),
        r["downtime_ms"]
    );

    // Everything acknowledged is there, on n2 only.
    let stored: Vec<String> = n2
        .ask("alice/hello", "acked")
        .split(',')
        .map(str::to_owned)
        .collect();
    for (n, _) in &acked {
        assert!(stored.contains(&n.to_string()), "{n} lost: {stored:?}");
    }
    let moved = n2.data_dir().join("grains/alice-hello/data");
    assert!(std::fs::read(moved.join("big")).unwrap() == big);
    assert_eq!(
        std::fs::read_to_string(moved.join("link")).unwrap(),
        "moved with it"
    );
    let owned: Vec<u64> = nodes(&n1)
        .iter()
        .map(|n| n["grains"].as_u64().unwrap())
        .collect();
    assert_eq!(owned, [0, 1, 0]);
    let epoch = std::fs::read_to_string(n2.data_dir().join("grains/alice-hello/epoch")).unwrap();
    assert_eq!(epoch.trim(), r["epoch"].to_string());
    // n1's copy is fenced: kept aside (n1's start gate refuses it: OwnedBy).
    assert!(!data.exists());
    let kept = r["fenced_as"].as_str().unwrap();
    assert!(
        kept.contains(".retired/alice-hello-moved-")
            && std::path::Path::new(kept).join("big").exists(),
        "{kept}"
    );
    // Asked on n1, the grain's status comes from n2, which runs it.
    assert_eq!(
        n1.granary(&["grain", "status", "alice/hello", "--json"])
            .success()
            .json()["state"],
        "running"
    );

    // A copy left in place by a crash between the switch and the retire
    // (as if: the old data and epoch put back) is fenced when n1 starts.
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("stale"), "old").unwrap();
    std::fs::write(
        n1.data_dir().join("grains/alice-hello/epoch"),
        format!("{}\n", r["from_epoch"]),
    )
    .unwrap();
    assert!(n1.stop().success());
    n1.launch();
    assert!(!data.exists());
    assert!(
        n1.data_dir()
            .join(format!(
                "grains/.retired/alice-hello-stale-{}/stale",
                r["epoch"]
            ))
            .exists()
    );
    assert!(n1.log().contains("fenced a stale copy"), "{}", n1.log());

    // Moves that cannot be, refused with the reason.
    let run = n2
        .granary(&["grain", "move", "alice/hello", "--to", "n9"])
        .failure();
    assert!(run.stderr.contains("no node \"n9\""), "{}", run.stderr);
    let run = n1
        .granary(&["grain", "move", "alice/hello", "--to", "n2"])
        .failure();
    assert!(
        run.stderr.contains("already runs on node n2"),
        "{}",
        run.stderr
    );

    // And back, asked on n1 (n2, its owner, drives the move), onto a node
    // that keeps a fenced copy of it.
    let back = n1
        .granary(&["grain", "move", "alice/hello", "--to", "n1"])
        .success();
    assert!(
        back.stdout
            .contains("alice/hello moved from node n2 to node n1"),
        "{}",
        back.stdout
    );
    let again = n1.ask("alice/hello", "acked");
    assert_eq!(again, stored.join(","));
    assert!(n1.data_dir().join("grains/alice-hello/data/big").exists());
    assert!(!moved.exists());

    // A node that holds data of the grain already takes nothing: the move
    // is refused before anything changes, and the grain runs on.
    let stale = n3.data_dir().join("grains/alice-hello/data");
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::write(stale.join("old"), "stale").unwrap();
    let run = n1
        .granary(&["grain", "move", "alice/hello", "--to", "n3"])
        .failure();
    assert!(
        run.stderr
            .contains("node n3 already holds data of alice-hello"),
        "{}",
        run.stderr
    );
    assert_eq!(n2.ask("alice/hello", "acked"), stored.join(","));
    std::fs::remove_dir_all(n3.data_dir().join("grains/alice-hello")).unwrap();

    // A drain, asked on n2, moves every grain n1 runs to n2 and n3 (where
    // there is most room: the nodes share one disk here, so which one
    // depends on when each last reported): alice's and nineteen more,
    // one of them stopped, which stays stopped until it is used.
    let mut users = vec!["alice".to_owned()];
    for i in 1..=19 {
        let user = format!("u{i}");
        n1.granary(&["user", "add", &user]).success();
        let grain = format!("{user}/hello");
        // Started on n1, so placed there (a first connection would place
        // it by room, and these nodes share a disk).
        n1.granary(&["grain", "start", &grain]).success();
        assert_eq!(n1.ask(&grain, &format!("put {i}")), format!("stored {i}"));
        users.push(user);
    }
    n1.granary(&["grain", "stop", "u1/hello"]).success();
    let run = n2.granary(&["node", "drain", "n1", "--json"]).success();
    let drained = run.json();
    let drained = drained.as_array().unwrap();
    assert_eq!(drained.len(), 20, "{drained:?}");
    for d in drained {
        assert!(d["error"].is_null(), "{d}");
        assert!(d["to"] == "n2" || d["to"] == "n3", "{d}");
    }
    let owned: Vec<u64> = nodes(&n3)
        .iter()
        .map(|n| n["grains"].as_u64().unwrap())
        .collect();
    assert!(owned[0] == 0 && owned[1] + owned[2] == 20, "{owned:?}");
    assert_eq!(state_of(&n3, "n1").as_deref(), Some("drained"));
    let downtimes: Vec<u64> = drained
        .iter()
        .map(|d| d["report"]["downtime_ms"].as_u64().unwrap())
        .collect();
    eprintln!("drained 20 grains off n1: {owned:?}; downtimes (ms) {downtimes:?}");
    // Every grain answers, through the drained node too, with its data.
    for (i, user) in users.iter().enumerate().skip(1) {
        assert_eq!(n1.ask(&format!("{user}/hello"), "acked"), i.to_string());
    }
    assert_eq!(n1.ask("alice/hello", "acked"), stored.join(","));
    drop((n1, n2, n3));
}

#[test]
fn a_grains_data_is_replicated_to_another_node_and_its_lag_is_an_alert_once_behind() {
    let etcd = Etcd::start(1);
    let mut n1 = node(&etcd, "n1", "\"x86_64\"");
    let mut n2 = node(&etcd, "n2", "\"x86_64\"");
    n2.share_uid_range(&n1);
    for d in [&n1, &n2] {
        cluster_line(d, "replicate_interval = \"1s\"");
    }
    n1.granary(&["cluster", "init"]).success();
    for d in [&n1, &n2] {
        d.granary_with_stdin(&["node", "join"], Some(&format!("{}\n", token(&n1))))
            .success();
    }
    n1.launch();
    n2.launch();
    for d in [&n1, &n2] {
        let app = granary_testkit::hello_app(d.dir(), "hello", &[]);
        d.granary(&["app", "install", app.to_str().unwrap()])
            .success();
    }
    n1.granary(&["user", "add", "alice"]).success();
    // Started on n1, so placed there.
    n1.granary(&["grain", "start", "alice/hello"]).success();
    assert_eq!(n1.ask("alice/hello", "put 1"), "stored 1");

    // A copy on n2, whole, with what alice's grain acknowledged; then the
    // next write reaches it too, in a later round's delta.
    let copy = n2.data_dir().join("replicas/alice-hello");
    let holds = |text: &str| {
        let state = std::fs::read_to_string(copy.join("state.json")).unwrap_or_default();
        let acked = std::fs::read_to_string(copy.join("data/acked.log")).unwrap_or_default();
        (state.contains("\"whole\":true") && acked == text).then_some(())
    };
    eventually("a whole copy on n2", Duration::from_secs(30), || {
        holds("1\n")
    });
    assert_eq!(n1.ask("alice/hello", "put 2"), "stored 2");
    eventually("the copy to catch up", Duration::from_secs(30), || {
        holds("1\n2\n")
    });
    // The copy holds what the grain's data held when the snapshot it is of
    // was taken: nothing was written since, so the data itself.
    let source = n1.data_dir().join("grains/alice-hello/data");
    eventually(
        "the copy to equal its source",
        Duration::from_secs(30),
        || {
            (granary_testkit::tree_contents(&copy.join("data"))
                == granary_testkit::tree_contents(&source))
            .then_some(())
        },
    );
    let listed = nodes(&n2);
    let lag = &listed[0]["replication"][0];
    assert_eq!(lag["grain"], "alice-hello", "{listed:?}");
    assert_eq!(lag["copies_on"], serde_json::json!(["n2"]), "{lag}");
    assert!(lag["lag_secs"].as_i64().is_some_and(|l| l < 10), "{lag}");
    let table = n1.granary(&["node", "list"]).success().stdout;
    assert!(table.contains("REPL LAG"), "{table}");
    // Healthy while the copies keep up (a round on this loaded machine
    // can take longer than the 1 s interval now and then).
    eventually("n1 healthy", Duration::from_secs(30), || {
        // An unhealthy node's status exits 1: read it either way.
        let run = n1.granary(&["status", "--json"]);
        let status: Value = serde_json::from_str(&run.stdout).unwrap_or_default();
        (status["healthy"] == true
            && status["cluster"]["replication_lagging"] == serde_json::json!([]))
        .then_some(())
    });
    // Only the snapshot the copy is of (the next delta's base) is kept,
    // with at most one round's in flight.
    let snaps = n1
        .granary(&["snapshot", "list", "alice/hello", "--json"])
        .success()
        .json();
    let replica_snaps = snaps
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["name"].as_str().unwrap().starts_with("replica-"))
        .count();
    assert!((1..=2).contains(&replica_snaps), "{snaps}");

    // With n2 gone no copy is made, and after three intervals n1 says so.
    n2.kill_hard();
    eventually("the lag to be an alert", Duration::from_secs(30), || {
        // An unhealthy node's status exits 1.
        let run = n1.granary(&["status", "--json"]);
        let status: Value = serde_json::from_str(&run.stdout).unwrap_or_default();
        (!run.status.success()
            && status["healthy"] == false
            && status["cluster"]["replication_lagging"][0]
                .as_str()
                .is_some_and(|l| l.starts_with("alice-hello ")))
        .then_some(())
    });
    let text = n1.granary(&["status"]).failure().stdout;
    assert!(text.contains("REPLICATION    behind"), "{text}");
    // /metrics says how far behind, in seconds.
    let metrics = std::process::Command::new("curl")
        .args(["--silent", "--fail"])
        .arg(format!("http://{}/metrics", n1.listener("metrics")))
        .output()
        .unwrap();
    let metrics = String::from_utf8_lossy(&metrics.stdout);
    let lag: i64 = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix("granary_grain_replication_lag_seconds{grain=\"alice-hello\"} ")
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no replication lag in:\n{metrics}"));
    assert!(lag >= 3, "{lag}");
    // A grain removed for good is no longer placed nor behind.
    n1.granary(&["user", "remove", "alice", "--purge"])
        .success();
    let status = n1.granary(&["status", "--json"]).success().json();
    assert_eq!(
        status["cluster"]["replication_lagging"],
        serde_json::json!([])
    );
    assert_eq!(nodes(&n1)[0]["grains"], 0);
    drop((n1, n2));
}

#[test]
fn a_grant_reaches_a_provider_on_another_node_and_a_revoke_on_any_node_cuts_it() {
    let etcd = Etcd::start(1);
    let mut n1 = node(&etcd, "n1", "\"x86_64\"");
    let mut n2 = node(&etcd, "n2", "\"x86_64\"");
    let mut n3 = node(&etcd, "n3", "\"x86_64\"");
    n2.share_uid_range(&n1);
    n3.share_uid_range(&n1);
    n1.granary(&["cluster", "init"]).success();
    for d in [&n1, &n2, &n3] {
        d.granary_with_stdin(&["node", "join"], Some(&format!("{}\n", token(&n1))))
            .success();
    }
    n1.launch();
    n2.launch();
    n3.launch();
    // The example app as `hello` (the provider: it offers `notify`) and
    // as `relay` (the holder).
    for d in [&n1, &n2, &n3] {
        for kind in ["hello", "relay"] {
            let app = granary_testkit::hello_app(d.dir(), kind, &[]);
            d.granary(&["app", "install", app.to_str().unwrap()])
                .success();
        }
    }
    n1.granary(&["user", "add", "alice"]).success();
    let users_of = |d: &Daemon| -> Vec<String> {
        let list = d.granary(&["user", "list", "--json"]).success().json();
        list.as_array()
            .expect("a list")
            .iter()
            .map(|u| u["name"].as_str().unwrap().to_owned())
            .collect()
    };
    knows(&n2, "n2", "alice", users_of);
    // The provider runs on n1, the holder on n2.
    n1.granary(&["grain", "start", "alice/hello"]).success();
    n2.granary(&["grain", "start", "alice/relay"]).success();
    // Each was placed where it started (the epoch file is written by the
    // node that runs it).
    let epoch = |d: &Daemon, g: &str| d.data_dir().join(format!("grains/{g}/epoch")).exists();
    assert!(epoch(&n1, "alice-hello") && !epoch(&n2, "alice-hello"));
    assert!(epoch(&n2, "alice-relay") && !epoch(&n1, "alice-relay"));

    let grant = |d: &Daemon| -> String {
        let g = d
            .granary(&[
                "grant",
                "add",
                "--from",
                "alice/relay",
                "--to",
                "alice/hello",
                "--cap",
                "notify:site",
                "--json",
            ])
            .success()
            .json();
        g["id"].as_i64().unwrap().to_string()
    };
    // Made on n1; the holder's node reads it from the shared records.
    let id = grant(&n1);
    let mut relay = Session::open(&n2, "alice/relay");
    eventually("n2 to know the grant", Duration::from_secs(10), || {
        (relay.ask("hold notify:site") == "ok").then_some(())
    });
    assert_eq!(relay.ask("call site r1"), "ok");
    assert_eq!(relay.ask("call site r2"), "ok");
    // The provider's object checks its own argument, across the link too.
    assert!(relay.ask("call blog r3").contains("for site, not blog"));
    // The calls ran in n1's grain: its notifications file has them.
    assert_eq!(n1.ask("alice/hello", "notifications"), "2");
    // The provider stops (idle, or an admin): the next call starts it
    // again on n1, and the holder does not notice.
    n1.granary(&["grain", "stop", "alice/hello"]).success();
    assert_eq!(relay.ask("call site r4"), "ok");
    assert_eq!(n1.ask("alice/hello", "notifications"), "3");
    // The provider moves to n3: n1 ends the link it served the capability
    // on, and the holder's node links to n3. A call in the instant of the
    // switch may fail (the provider is down then); the next ones reach n3.
    n1.granary(&["grain", "move", "alice/hello", "--to", "n3"])
        .success();
    assert!(epoch(&n3, "alice-hello"));
    eventually(
        "the capability to follow its provider",
        Duration::from_secs(10),
        || (relay.ask("call site moved") == "ok").then_some(()),
    );
    let moved: u64 = n3.ask("alice/hello", "notifications").parse().unwrap();
    assert!(moved >= 4, "{moved}");

    // Revoked on the provider's node: the held capability is cut at once.
    n3.granary(&["grant", "revoke", &id]).success();
    let cut = relay.ask("call site r5");
    assert!(cut.contains("revoked"), "{cut}");
    assert!(relay.ask("hold notify:site").contains("no grant"));

    // Granted again, and revoked on the holder's node: cut at once too.
    let id = grant(&n1);
    eventually("n2 to know the new grant", Duration::from_secs(10), || {
        (relay.ask("hold notify:site") == "ok").then_some(())
    });
    assert_eq!(relay.ask("call site r6"), "ok");
    n2.granary(&["grant", "revoke", &id]).success();
    let cut = relay.ask("call site r7");
    assert!(cut.contains("revoked"), "{cut}");

    // Granted again, and revoked on a third node, which runs neither: the
    // two nodes cut it once they have read the revoke from the shared
    // records.
    let id = grant(&n1);
    eventually(
        "n2 to know the third grant",
        Duration::from_secs(10),
        || (relay.ask("hold notify:site") == "ok").then_some(()),
    );
    assert_eq!(relay.ask("call site r8"), "ok");
    n1.granary(&["grant", "revoke", &id]).success();
    let revoked = Instant::now();
    eventually(
        "the revoke to reach n1 and n2",
        Duration::from_secs(5),
        || relay.ask("call site r9").contains("revoked").then_some(()),
    );
    eprintln!(
        "a revoke made on a third node cut the capability after {:?}",
        revoked.elapsed()
    );
    relay.close();
    // r1, r2, r4, r6, r8, and the r9s that ran before the revoke landed.
    let ran: u64 = n3.ask("alice/hello", "notifications").parse().unwrap();
    assert!(ran >= 6, "{ran}");
}

/// A node of a cluster whose users' names are under `example.test`.
fn web_node(etcd: &Etcd, name: &str) -> Daemon {
    let config = format!(
        "domain = \"example.test\"\n{}",
        node_config(etcd, name, "\"x86_64\"")
    );
    Daemon::prepare(DaemonMode::Serve, &config, "", &[])
}

#[test]
fn git_and_the_blog_answer_through_any_node_wherever_their_grains_run() {
    const DOMAIN: &str = "example.test";
    let etcd = Etcd::start(1);
    let mut n1 = web_node(&etcd, "n1");
    let mut n2 = web_node(&etcd, "n2");
    let mut n3 = web_node(&etcd, "n3");
    n2.share_uid_range(&n1);
    n3.share_uid_range(&n1);
    n1.granary(&["cluster", "init"]).success();
    for d in [&n1, &n2, &n3] {
        d.granary_with_stdin(&["node", "join"], Some(&format!("{}\n", token(&n1))))
            .success();
    }
    n1.launch();
    n2.launch();
    n3.launch();
    let tmp = tempfile::tempdir().unwrap();
    let packages = [
        granary_testkit::git_package(tmp.path()),
        granary_testkit::app_package(tmp.path(), "blog", "granary-blog", ""),
    ];
    for d in [&n1, &n2, &n3] {
        for pkg in &packages {
            d.granary(&["app", "install", pkg.to_str().unwrap()])
                .success();
        }
    }
    // Alice and her credentials are made on n1 and used through n2 and n3.
    n1.granary(&["user", "add", "alice"]).success();
    let password = granary_testkit::app_password(&n1, "alice", "git");
    let users_of = |d: &Daemon| -> Vec<String> {
        let list = d.granary(&["user", "list", "--json"]).success().json();
        list.as_array()
            .expect("a list")
            .iter()
            .map(|u| u["name"].as_str().unwrap().to_owned())
            .collect()
    };
    for (d, name) in [(&n2, "n2"), (&n3, "n3")] {
        knows(d, name, "alice", users_of);
    }
    // Her git grain runs on n1, her blog on n2.
    n1.granary(&["grain", "start", "alice/git"]).success();
    n2.granary(&["grain", "start", "alice/blog"]).success();
    let epoch = |d: &Daemon, g: &str| d.data_dir().join(format!("grains/{g}/epoch")).exists();
    assert!(epoch(&n1, "alice-git") && epoch(&n2, "alice-blog"));
    let read = n1
        .granary(&[
            "grant",
            "add",
            "--from",
            "alice/blog",
            "--to",
            "alice/git",
            "--cap",
            "git.read:site",
            "--json",
        ])
        .success()
        .json();
    n1.granary(&[
        "grant",
        "add",
        "--from",
        "alice/git",
        "--to",
        "alice/blog",
        "--cap",
        "notify:site",
    ])
    .success();

    let client = |d| granary_testkit::GitClient {
        daemon: d,
        home: tmp.path().join("home"),
        domain: DOMAIN,
    };
    std::fs::create_dir_all(tmp.path().join("home")).unwrap();
    let (via2, via3) = (client(&n2), client(&n3));
    let work = tmp.path().join("site");
    std::fs::create_dir_all(&work).unwrap();
    let version = |n: u32| {
        std::fs::write(work.join("index.html"), format!("<h1>version {n}</h1>\n")).unwrap();
        std::fs::write(
            work.join("big.bin"),
            granary_testkit::noise(u64::from(n), 400_000),
        )
        .unwrap();
    };
    version(1);
    via2.ok(&work, &["init", "-q"]);
    via2.ok(&work, &["add", "."]);
    via2.ok(&work, &["commit", "-q", "-m", "v1"]);
    let head = via2.ok(&work, &["rev-parse", "HEAD"]);
    // Pushed through n2 (HTTPS, her app password checked by n2), it lands
    // in her git grain on n1.
    via2.ok(
        &work,
        &[
            "push",
            "-q",
            &via2.url(Some(("alice", &password)), "alice/site.git"),
            "main",
        ],
    );
    let refs = n1.data_dir().join("grains/alice-git/data");
    assert!(refs.exists());
    assert!(
        !n2.data_dir().join("grains/alice-git/data").exists()
            || std::fs::read_dir(n2.data_dir().join("grains/alice-git/data"))
                .unwrap()
                .next()
                .is_none(),
        "n2 keeps none of alice's repositories"
    );
    // Cloned through n3 over HTTPS: the same commit and bytes.
    let dest = tmp.path().join("clone-https");
    via3.ok(
        tmp.path(),
        &[
            "clone",
            "-q",
            &via3.url(Some(("alice", &password)), "alice/site.git"),
            dest.to_str().unwrap(),
        ],
    );
    assert_eq!(via3.ok(&dest, &["rev-parse", "HEAD"]), head);
    assert_eq!(
        std::fs::read(dest.join("big.bin")).unwrap(),
        granary_testkit::noise(1, 400_000)
    );
    // And over SSH through n3, with a key registered on n2.
    let key = granary_testkit::ssh_key(&n2, tmp.path(), "alice");
    let dest = tmp.path().join("clone-ssh");
    let (ok, out) = via3.git_ssh(
        tmp.path(),
        &key,
        &[
            "clone",
            "-q",
            &via3.ssh_url("alice", "alice/site.git"),
            dest.to_str().unwrap(),
        ],
    );
    assert!(ok, "{out}");
    assert_eq!(via3.ok(&dest, &["rev-parse", "HEAD"]), head);

    // The push notified the blog on n2 (git on n1 holds notify:site), which
    // read the site from git on n1 (git.read:site): served through n3.
    let site = format!("alice.{DOMAIN}");
    eventually("version 1 through n3", Duration::from_secs(20), || {
        let (code, body) = n3.curl(&site, "/", &[]);
        (code == "200" && body.contains("version 1")).then_some(())
    });
    // The blog's read is revoked on n3: a push through n1 reaches git, the
    // blog is told, cannot read it, and keeps serving version 1.
    let id = read["id"].as_i64().unwrap().to_string();
    n3.granary(&["grant", "revoke", &id]).success();
    version(2);
    let via1 = client(&n1);
    via1.ok(&work, &["commit", "-q", "-a", "-m", "v2"]);
    via1.ok(
        &work,
        &[
            "push",
            "-q",
            &via1.url(Some(("alice", &password)), "alice/site.git"),
            "main",
        ],
    );
    eventually(
        "the blog to be refused the read",
        Duration::from_secs(20),
        || {
            let logs = n3
                .granary(&["grain", "logs", "alice/blog"])
                .success()
                .stdout;
            logs.contains("cannot rebuild from site").then_some(())
        },
    );
    let (code, body) = n1.curl(&site, "/", &[]);
    assert_eq!(code, "200");
    assert!(body.contains("version 1"), "{body}");

    // Alice disabled on n3: n1, which verified her password moments ago
    // (and would trust it for a minute), refuses it as soon as it reads the
    // shared log, and her git grain there is stopped.
    let stopped = n3.granary(&["user", "disable", "alice"]).success();
    assert!(stopped.stdout.contains("disabled alice"), "{stopped}");
    let refused = tmp.path().join("refused");
    eventually("n1 to refuse alice", Duration::from_secs(10), || {
        let _ = std::fs::remove_dir_all(&refused);
        let (ok, out) = via1.git(
            tmp.path(),
            &[
                "clone",
                "-q",
                &via1.url(Some(("alice", &password)), "alice/site.git"),
                refused.to_str().unwrap(),
            ],
        );
        (!ok && out.contains("Authentication failed")).then_some(())
    });
    eventually("alice's git grain to stop", Duration::from_secs(10), || {
        let git = n1
            .granary(&["grain", "status", "alice/git", "--json"])
            .success()
            .json();
        (git["state"] != "running").then_some(())
    });
    // Enabled on n2: n1 lets her in again.
    n2.granary(&["user", "enable", "alice"]).success();
    eventually("n1 to let alice in", Duration::from_secs(10), || {
        let _ = std::fs::remove_dir_all(&refused);
        let (ok, _) = via1.git(
            tmp.path(),
            &[
                "clone",
                "-q",
                &via1.url(Some(("alice", &password)), "alice/site.git"),
                refused.to_str().unwrap(),
            ],
        );
        ok.then_some(())
    });
}

#[test]
fn mail_taken_by_any_node_reaches_the_mail_grain_on_its_node_and_is_refused_while_no_second_node_can_keep_it()
 {
    use granary_testkit::mail::{DOMAIN, Dns, mail_package, run_python, sender_records};
    let dns = Dns::start(&sender_records("remote.example"));
    let etcd = Etcd::start(1);
    // Replicated every second: a delivered message's spool entry stays
    // until a copy of the grain made after it exists.
    let mail = format!(
        "replicate_interval = \"1s\"\n[mail]\nresolver = \"{}\"\npostmaster = \"alice\"\nretry_first = \"1s\"\nretry_max = \"2s\"\n",
        dns.addr
    );
    let tmp = tempfile::tempdir().unwrap();
    let (mut n1, n2) = app_nodes(&etcd, DOMAIN, &mail, "", mail_package, tmp.path());
    n1.granary(&["user", "add", "alice"]).success();
    n1.granary(&["mail", "domain", "add", DOMAIN]).success();
    let password = granary_testkit::app_password(&n1, "alice", "mail");
    // Her mail grain runs on n1.
    n1.granary(&["grain", "start", "alice/mail"]).success();
    assert!(n1.data_dir().join("grains/alice-mail/epoch").exists());

    let swaks_said = |d: &Daemon, subject: &str| {
        let to = format!("alice@{DOMAIN}");
        let subject = format!("Subject: {subject}");
        let args = ["--from", "sender@remote.example", "--to", &to];
        let more = ["--header", &subject, "--body", "through the other node"];
        granary_testkit::mail::swaks_at(d.listener("smtp"), &[&args[..], &more[..]].concat()).1
    };
    let swaks = |d: &Daemon, subject: &str| {
        let text = swaks_said(d, subject);
        text.contains("250 2.0.0 Ok: queued as").then_some(text)
    };
    let inbox = |d: &Daemon| -> u64 {
        let s = d
            .granary(&["mail", "status", "alice", "--json"])
            .success()
            .json();
        s["mailboxes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == "INBOX")
            .and_then(|m| m["messages"].as_u64())
            .unwrap_or(0)
    };
    let spool = |d: &Daemon| -> usize {
        let list = d.granary(&["mail", "spool", "list", "--json"]).success();
        list.json().as_array().map_or(0, Vec::len)
    };
    // Taken by n2's MX (once n2 has read alice and the domain), kept in
    // n2's spool until n1's grain has stored it.
    eventually("n2 to take mail for alice", Duration::from_secs(10), || {
        swaks(&n2, "first")
    });
    eventually(
        "the message in alice's inbox",
        Duration::from_secs(20),
        || (inbox(&n1) == 1).then_some(()),
    );
    assert_eq!(inbox(&n2), 1, "asked on n2, n1's grain answers");
    eventually("n2's spool to empty", Duration::from_secs(10), || {
        (spool(&n2) == 0).then_some(())
    });
    assert!(
        !n2.data_dir().join("grains/alice-mail/epoch").exists(),
        "the grain never started on n2"
    );
    // Read over IMAP through n2: n2 checks the app password made on n1.
    let read = r#"
import imaplib, os, ssl
ctx = ssl.create_default_context(cafile=os.environ["CA"])
m = imaplib.IMAP4_SSL("127.0.0.1", int(os.environ["PORT"]), ssl_context=ctx)
m.login("alice", os.environ["PASSWORD"])
m.select("INBOX")
typ, data = m.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
print(data[0][1].decode().strip())
m.logout()
"#;
    let env = [
        ("CA", n2.ca_file().display().to_string()),
        ("PORT", n2.listener("imaps").port().to_string()),
        ("PASSWORD", password.clone()),
    ];
    let (ok, out) = run_python(read, &env);
    assert!(ok && out.contains("Subject: first"), "{out}");

    // Every message n2 took was copied to n1 before the 250, and the copy
    // went once alice's grain had the message.
    eventually("n1 to drop its copies", Duration::from_secs(30), || {
        let dir = n1.data_dir().join("spool-copies/n2/spool");
        let left = std::fs::read_dir(&dir).map_or(0, |d| d.count());
        (left == 0).then_some(())
    });
    // n1 stops: n2 has no other node to keep a second copy on, so it
    // answers 451 rather than 250 from one disk: the sender tries again.
    n1.stop();
    let said = swaks_said(&n2, "second");
    assert!(said.contains("451 4.3.0"), "{said}");
    assert_eq!(spool(&n2), 0);
    n1.launch();
    eventually(
        "n2 to take it once n1 is back",
        Duration::from_secs(30),
        || swaks(&n2, "second"),
    );
    eventually(
        "the second message in alice's inbox",
        Duration::from_secs(30),
        || (inbox(&n1) == 2).then_some(()),
    );
    eventually("n2's spool to empty again", Duration::from_secs(10), || {
        (spool(&n2) == 0).then_some(())
    });
}

#[test]
fn chat_answers_through_any_node_wherever_each_users_grain_runs() {
    use granary_testkit::xmpp::{DOMAIN, helper_lib};
    let etcd = Etcd::start(1);
    let tmp = tempfile::tempdir().unwrap();
    let (n1, n2) = app_nodes(
        &etcd,
        DOMAIN,
        "",
        "",
        granary_testkit::xmpp_package,
        tmp.path(),
    );
    for u in ["alice", "bob"] {
        n1.granary(&["user", "add", u]).success();
    }
    let alice = granary_testkit::app_password(&n1, "alice", "xmpp");
    let bob = granary_testkit::app_password(&n1, "bob", "xmpp");
    // Alice's chat grain runs on n1, Bob's on n2 (once n2 has read him).
    n1.granary(&["grain", "start", "alice/xmpp"]).success();
    eventually(
        "n2 to start bob's chat grain",
        Duration::from_secs(10),
        || {
            n2.granary(&["grain", "start", "bob/xmpp"])
                .status
                .success()
                .then_some(())
        },
    );
    // Each logs in through the node that does not run their grain: the
    // node checks the app password made on n1 and forwards the stream;
    // their messages go from grain to grain across the nodes.
    let env = [
        ("PYTHONPATH", helper_lib(tmp.path()).display().to_string()),
        ("XMPP_DOMAIN", DOMAIN.to_owned()),
        ("XMPP_CA", n1.ca_file().display().to_string()),
        ("XMPP_PASSWORD_ALICE", alice),
        ("XMPP_PASSWORD_BOB", bob),
        // The helper's default listener; each client below names its own.
        ("XMPP_PORT", n1.listener("xmpp").port().to_string()),
        ("N1_PORT", n1.listener("xmpp").port().to_string()),
        ("N2_PORT", n2.listener("xmpp").port().to_string()),
        ("N2_CA", n2.ca_file().display().to_string()),
    ];
    let script = r#"
from granary_xmpp_test import *

async def main():
    alice = await Client("alice", "laptop", address=("127.0.0.1", int(os.environ["N2_PORT"])),
                         cafile=os.environ["N2_CA"]).online()
    bob = await Client("bob", "phone", address=("127.0.0.1", int(os.environ["N1_PORT"])),
                       cafile=os.environ["XMPP_CA"]).online()
    alice.send_presence_subscription(pto=bob.boundjid.bare)
    await next_of(alice.presences, lambda p: p["from"].bare == bob.boundjid.bare)
    await next_of(bob.presences, lambda p: p["from"].bare == alice.boundjid.bare)
    await alice.get_roster()
    assert alice.client_roster[bob.boundjid.bare]["subscription"] == "both"
    alice.send_message(mto=bob.boundjid.bare, mbody="across the nodes", mtype="chat")
    m = await next_of(bob.messages, lambda m: m["body"] == "across the nodes")
    assert m["from"] == alice.boundjid, m["from"]
    bob.send_message(mto=m["from"], mbody="and back", mtype="chat")
    m = await next_of(alice.messages, lambda m: m["body"] == "and back")
    assert m["from"] == bob.boundjid, m["from"]
    # One sender's messages keep their order across the nodes.
    for i in range(30):
        alice.send_message(mto=bob.boundjid.bare, mbody=f"n{i}", mtype="chat")
    got = []
    while len(got) < 30:
        m = await next_of(bob.messages, lambda m: str(m["body"]).startswith("n"))
        got.append(str(m["body"]))
    assert got == [f"n{i}" for i in range(30)], got
    for c in (alice, bob):
        c.disconnect()

run(main)
"#;
    let (ok, out) = granary_testkit::mail::run_python(script, &env);
    assert!(
        ok && out.lines().any(|l| l.trim() == "ok"),
        "the client script failed:\n{out}"
    );
    // Neither grain ever ran on the node its user logged in through.
    assert!(!n2.data_dir().join("grains/alice-xmpp/epoch").exists());
    assert!(!n1.data_dir().join("grains/bob-xmpp/epoch").exists());
    assert!(n2.data_dir().join("grains/bob-xmpp/epoch").exists());
    // Asked on either node, the owner answers for the chat grain's status.
    let status = n2
        .granary(&["grain", "status", "alice/xmpp", "--json"])
        .success()
        .json();
    assert_eq!(status["state"], "running", "{status}");

    // A contact invite of Alice's (grain on n1) taken by Carol, whose
    // grain runs on n2: both become contacts, Alice's roster changed by
    // n1 at n2's asking.
    n1.granary(&["user", "add", "carol"]).success();
    let carol = granary_testkit::app_password(&n1, "carol", "xmpp");
    eventually(
        "n2 to start carol's chat grain",
        Duration::from_secs(10),
        || {
            n2.granary(&["grain", "start", "carol/xmpp"])
                .status
                .success()
                .then_some(())
        },
    );
    let made = n1
        .granary(&["invite", "create", "--for", "alice"])
        .success()
        .stdout;
    let link = made
        .lines()
        .find_map(|l| l.strip_prefix("    ").filter(|l| l.starts_with("http")))
        .unwrap_or_else(|| panic!("no invite link in:\n{made}"));
    let token = link.rsplit('/').next().unwrap().to_owned();
    let mut env = env.to_vec();
    env.extend([("XMPP_PASSWORD_CAROL", carol), ("TOKEN", token)]);
    let script = r#"
from granary_xmpp_test import *

async def main():
    alice = await Client("alice", "laptop", address=("127.0.0.1", int(os.environ["N1_PORT"])),
                         cafile=os.environ["XMPP_CA"]).online()
    # Alice's app asks her before approving anyone: only the invite does.
    alice.roster.auto_authorize = None
    alice.roster.auto_subscribe = False
    carol = await Client("carol", "phone", address=("127.0.0.1", int(os.environ["N1_PORT"])),
                         cafile=os.environ["XMPP_CA"]).online()
    carol.send_raw("<presence type='subscribe' to='alice@chat.test'>"
                   f"<preauth xmlns='urn:xmpp:pars:0' token='{os.environ['TOKEN']}'/></presence>")
    await next_of(alice.presences, lambda p: p["from"].bare == "carol@chat.test")
    await next_of(carol.presences, lambda p: p["from"].bare == "alice@chat.test")
    await alice.get_roster()
    await carol.get_roster()
    assert alice.client_roster["carol@chat.test"]["subscription"] == "both", alice.client_roster
    assert carol.client_roster["alice@chat.test"]["subscription"] == "both", carol.client_roster
    for c in (alice, carol):
        c.disconnect()

run(main)
"#;
    let (ok, out) = granary_testkit::mail::run_python(script, &env);
    assert!(
        ok && out.lines().any(|l| l.trim() == "ok"),
        "the invite script failed:\n{out}"
    );
    assert!(!n1.data_dir().join("grains/carol-xmpp/epoch").exists());
}

#[test]
fn taskwarrior_syncs_over_taskd_through_any_node() {
    use granary_testkit::tasks::{DOMAIN, TasksHost};
    let etcd = Etcd::start(1);
    let dir = tempfile::tempdir().unwrap();
    let taskd = "taskd = \"127.0.0.1:0\"\n";
    let (n1, n2) = app_nodes(
        &etcd,
        DOMAIN,
        "",
        taskd,
        granary_testkit::tasks_package,
        dir.path(),
    );
    n1.granary(&["user", "add", "alice"]).success();
    // Her tasks grain runs on n1.
    n1.granary(&["grain", "start", "alice/tasks"]).success();
    let (n2_port, n2_ca) = (n2.listener("taskd").port(), n2.ca_file());
    let host = TasksHost::around(n1, dir);
    // Two replicas with certificates n1 issued: A syncs through n1, B
    // through n2 (its taskrc names n2's listener, and trusts both nodes'
    // CAs, as each node serves its own certificate).
    let a = host.task_replica("alice", "a");
    let b = host.task_replica("alice", "b");
    let rc = std::fs::read_to_string(&b.taskrc).unwrap();
    let ca_line = rc.lines().find(|l| l.starts_with("taskd.ca=")).unwrap();
    let n1_ca = std::fs::read_to_string(&ca_line["taskd.ca=".len()..]).unwrap();
    let bundle = b.taskrc.with_file_name("both-cas.pem");
    std::fs::write(
        &bundle,
        format!("{n1_ca}{}", std::fs::read_to_string(&n2_ca).unwrap()),
    )
    .unwrap();
    let rc: Vec<String> = rc
        .lines()
        .map(|l| {
            if l.starts_with("taskd.server=") {
                format!("taskd.server=tasks.{DOMAIN}:{n2_port}")
            } else if l.starts_with("taskd.ca=") {
                format!("taskd.ca={}", bundle.display())
            } else {
                l.to_owned()
            }
        })
        .collect();
    std::fs::write(&b.taskrc, rc.join("\n") + "\n").unwrap();

    a.ok(&["add", "buy milk"]);
    let out = a.ok(&["sync", "init"]);
    assert!(!out.contains("error"), "{out}");
    b.ok(&["sync"]);
    assert!(b.ok(&["export"]).contains("buy milk"));
    b.ok(&["add", "call mum"]);
    b.ok(&["sync"]);
    a.ok(&["sync"]);
    assert!(a.ok(&["export"]).contains("call mum"));
    // The grain never ran on n2: n2 authenticated B's certificate (issued
    // by n1, found in the shared records) and forwarded the sync.
    assert!(!n2.data_dir().join("grains/alice-tasks/epoch").exists());
    // A revoked certificate is refused on every node.
    let certs = host
        .daemon
        .granary(&["tasks", "certs", "alice", "--json"])
        .success()
        .json();
    for c in certs.as_array().unwrap() {
        let id = c["id"].to_string();
        host.daemon
            .granary(&["tasks", "revoke-cert", "alice", &id])
            .success();
    }
    // (n2 may sync once more before it has read the revoke: the shared
    // records reach it within a second.)
    let refusal = eventually(
        "n2 to refuse B's certificate",
        Duration::from_secs(10),
        || {
            let (ok, out) = b.task(&["sync"]);
            (!ok).then_some(out)
        },
    );
    // Taskwarrior's words for the server's 430 "Access denied".
    assert!(
        refusal.contains("your credentials are incorrect"),
        "{refusal}"
    );
}

#[test]
fn on_zfs_pools_a_grain_is_replicated_and_moves_between_nodes_with_its_data() {
    use granary_datasets::testing::ZfsPool;
    // Pools outlive the daemons (declared first, dropped last); each node
    // has its own, and one zfs-fuse daemon serves both.
    let tmp = tempfile::tempdir().unwrap();
    let pool = |name: &str| {
        let dir = tmp.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        ZfsPool::create(&dir, "256M").unwrap()
    };
    let pools = [pool("p1"), pool("p2")];
    let etcd = Etcd::start(1);
    let zfs_node = |name: &str, pool: &ZfsPool| {
        let config = format!(
            "{}replicate_interval = \"1s\"\n[storage]\nbackend = \"zfs\"\nzfs_dataset = \"{}\"\nquota_mib = 64\n",
            node_config(&etcd, name, "\"x86_64\""),
            pool.name
        );
        Daemon::prepare(DaemonMode::Serve, &config, "", &[])
    };
    let mut n1 = zfs_node("n1", &pools[0]);
    let mut n2 = zfs_node("n2", &pools[1]);
    n2.share_uid_range(&n1);
    n1.granary(&["cluster", "init"]).success();
    for d in [&n1, &n2] {
        d.granary_with_stdin(&["node", "join"], Some(&format!("{}\n", token(&n1))))
            .success();
    }
    n1.launch();
    n2.launch();
    for d in [&n1, &n2] {
        let app = granary_testkit::hello_app(d.dir(), "hello", &[]);
        d.granary(&["app", "install", app.to_str().unwrap()])
            .success();
    }
    let zfs = |args: &[&str]| -> Option<String> {
        let out = std::process::Command::new("zfs")
            .args(args)
            .output()
            .unwrap();
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    let epoch_of = |pool: &ZfsPool| {
        zfs(&[
            "get",
            "-H",
            "-o",
            "value",
            "granary:epoch",
            &format!("{}/alice-hello", pool.name),
        ])
    };
    n1.granary(&["user", "add", "alice"]).success();
    n1.granary(&["grain", "start", "alice/hello"]).success();
    assert_eq!(n1.ask("alice/hello", "put 1"), "stored 1");
    assert_eq!(n1.ask("alice/hello", "put 2"), "stored 2");
    // Its dataset is on n1's pool, fenced with the placement's epoch.
    let first: i64 = epoch_of(&pools[0]).unwrap().parse().unwrap();
    assert!(first > 0);
    let data = n1.data_dir().join("grains/alice-hello/data");
    std::fs::create_dir_all(data.join("notes")).unwrap();
    std::fs::write(data.join("notes/today"), "written on n1").unwrap();

    // Replicated from n1's snapshots into n2's copy.
    let copy = n2.data_dir().join("replicas/alice-hello/data");
    eventually(
        "a copy on n2 of what n1 holds",
        Duration::from_secs(30),
        || {
            (std::fs::read_to_string(copy.join("acked.log")).unwrap_or_default() == "1\n2\n"
                && copy.join("notes/today").exists())
            .then_some(())
        },
    );

    // Moved to n2: its data lands in a dataset of n2's pool, under a newer
    // epoch, and n1's dataset is no longer the grain's.
    n1.granary(&["grain", "move", "alice/hello", "--to", "n2"])
        .success();
    let moved: i64 = epoch_of(&pools[1])
        .expect("a dataset on n2's pool")
        .parse()
        .unwrap();
    assert!(moved > first, "{moved} after {first}");
    assert_eq!(epoch_of(&pools[0]), None, "n1's dataset was retired");
    assert_eq!(n2.ask("alice/hello", "acked"), "1,2");
    let on_n2 = n2.data_dir().join("grains/alice-hello/data/notes/today");
    assert_eq!(std::fs::read_to_string(on_n2).unwrap(), "written on n1");
    assert_eq!(n2.ask("alice/hello", "put 3"), "stored 3");

    // And back, through n1 (which asks n2 to drive it).
    n1.granary(&["grain", "move", "alice/hello", "--to", "n1"])
        .success();
    let back: i64 = epoch_of(&pools[0])
        .expect("a dataset on n1's pool again")
        .parse()
        .unwrap();
    assert!(back > moved);
    assert_eq!(n1.ask("alice/hello", "acked"), "1,2,3");
    drop((n1, n2));
}

/// The whole cluster as the issue describes it: three etcd members, and
/// three nodes each in its own network namespace (its own veth on a
/// bridge, its own address), with its own data dir and its own zfs-fuse
/// pool (one zfs-fuse daemon for all). Clients reach the nodes over their
/// links, and the nodes reach each other and etcd the same way.
#[test]
fn three_nodes_in_their_own_namespaces_and_pools_serve_every_grain_from_any_node() {
    use granary_datasets::testing::ZfsPool;
    use granary_testkit::netns::Net;
    const DOMAIN: &str = "example.test";
    let tmp = tempfile::tempdir().unwrap();
    // Declared first, dropped last: after the daemons.
    let pools: Vec<ZfsPool> = (0..3)
        .map(|i| {
            let dir = tmp.path().join(format!("pool{i}"));
            std::fs::create_dir_all(&dir).unwrap();
            ZfsPool::create(&dir, "512M").unwrap()
        })
        .collect();
    let net = Net::create(3);
    let etcd = Etcd::start_on(3, net.host);
    let daemons = granary_testkit::cluster::three_in_namespaces(&etcd, &net, |i| {
        (
            format!("domain = \"{DOMAIN}\""),
            format!(
                "replicate_interval = \"1s\"\n[storage]\n#{}\n",
                pools[i].name
            ),
        )
    });
    let packages = [
        granary_testkit::git_package(tmp.path()),
        granary_testkit::app_package(tmp.path(), "blog", "granary-blog", ""),
    ];
    for d in &daemons {
        for pkg in &packages {
            d.granary(&["app", "install", pkg.to_str().unwrap()])
                .success();
        }
    }
    let [n1, n2, n3] = &daemons[..] else {
        unreachable!()
    };
    // Each node listens on its own address, not on loopback.
    for (i, d) in daemons.iter().enumerate() {
        assert_eq!(d.https_addr().ip(), std::net::IpAddr::V4(net.ip(i)));
    }
    let listed = nodes(n3);
    assert_eq!(listed.len(), 3);
    assert!(listed.iter().all(|n| n["state"] == "up"), "{listed:?}");

    // A user and her password made on n1; her git grain on n1, her blog
    // on n2.
    n1.granary(&["user", "add", "alice"]).success();
    let password = granary_testkit::app_password(n1, "alice", "git");
    let users_of = |d: &Daemon| -> Vec<String> {
        let list = d.granary(&["user", "list", "--json"]).success().json();
        list.as_array()
            .expect("a list")
            .iter()
            .map(|u| u["name"].as_str().unwrap().to_owned())
            .collect()
    };
    knows(n3, "n3", "alice", users_of);
    n1.granary(&["grain", "start", "alice/git"]).success();
    n2.granary(&["grain", "start", "alice/blog"]).success();
    for (from, to, cap) in [
        ("alice/blog", "alice/git", "git.read:site"),
        ("alice/git", "alice/blog", "notify:site"),
    ] {
        n1.granary(&["grant", "add", "--from", from, "--to", to, "--cap", cap])
            .success();
    }
    // Pushed through n2 over n2's link, it lands on n1; cloned through n3
    // with the password made on n1, the same commit and bytes.
    std::fs::create_dir_all(tmp.path().join("home")).unwrap();
    let client = |d| granary_testkit::GitClient {
        daemon: d,
        home: tmp.path().join("home"),
        domain: DOMAIN,
    };
    let (via2, via3) = (client(n2), client(n3));
    let work = tmp.path().join("site");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::write(work.join("index.html"), "<h1>in namespaces</h1>\n").unwrap();
    std::fs::write(work.join("big.bin"), granary_testkit::noise(7, 300_000)).unwrap();
    via2.ok(&work, &["init", "-q"]);
    via2.ok(&work, &["add", "."]);
    via2.ok(&work, &["commit", "-q", "-m", "first"]);
    let head = via2.ok(&work, &["rev-parse", "HEAD"]);
    let url = |c: &granary_testkit::GitClient| c.url(Some(("alice", &password)), "alice/site.git");
    via2.ok(&work, &["push", "-q", &url(&via2), "main"]);
    let dest = tmp.path().join("clone");
    via3.ok(
        tmp.path(),
        &["clone", "-q", &url(&via3), dest.to_str().unwrap()],
    );
    assert_eq!(via3.ok(&dest, &["rev-parse", "HEAD"]), head);
    assert_eq!(
        std::fs::read(dest.join("big.bin")).unwrap(),
        granary_testkit::noise(7, 300_000)
    );
    // The blog on n2 read it from git on n1, and n3 serves it.
    eventually("the blog through n3", Duration::from_secs(20), || {
        let (code, body) = n3.curl(&format!("alice.{DOMAIN}"), "/", &[]);
        (code == "200" && body.contains("in namespaces")).then_some(())
    });
    // Git's dataset is on n1's pool, and its copy on another node equals it.
    let git_copy = |d: &Daemon| d.data_dir().join("replicas/alice-git/data");
    let source = n1.data_dir().join("grains/alice-git/data");
    eventually(
        "a copy of alice's git equal to it",
        Duration::from_secs(30),
        || {
            let want = granary_testkit::tree_contents(&source);
            [n2, n3]
                .iter()
                .any(|d| granary_testkit::tree_contents(&git_copy(d)) == want)
                .then_some(())
        },
    );

    // A move while a client writes through n3: no acknowledged write is
    // lost, and the longest wait between two acknowledgements is printed.
    n1.granary(&["grain", "start", "alice/hello"]).success();
    let acked: std::sync::Mutex<Vec<(u64, Instant)>> = Default::default();
    let done = std::sync::atomic::AtomicBool::new(false);
    let n3_config = n3.config_path();
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut n = 1;
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                if put_through(&n3_config, "alice/hello", n) == Some(format!("stored {n}")) {
                    acked.lock().unwrap().push((n, Instant::now()));
                    n += 1;
                }
            }
        });
        let count = || acked.lock().unwrap().len();
        eventually("writes before the move", Duration::from_secs(30), || {
            (count() >= 5).then_some(())
        });
        n1.granary(&["grain", "move", "alice/hello", "--to", "n2"])
            .success();
        let after = count();
        eventually("writes after the move", Duration::from_secs(30), || {
            (count() >= after + 5).then_some(())
        });
        done.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    let acked = acked.into_inner().unwrap();
    let gap = acked.windows(2).map(|w| w[1].1 - w[0].1).max().unwrap();
    eprintln!(
        "{} writes acknowledged through n3 across the move; the longest wait between two: {gap:?}",
        acked.len()
    );
    let last = acked.last().unwrap().0;
    let want: Vec<String> = (1..=last).map(|n| n.to_string()).collect();
    assert_eq!(n2.ask("alice/hello", "acked"), want.join(","));

    // n2 is drained: its grains (hello, blog) move to the others and
    // answer there; the site is still served through n2.
    n2.granary(&["node", "drain", "n2"]).success();
    assert_eq!(
        nodes(n1)
            .iter()
            .find(|n| n["name"] == "n2")
            .map(|n| n["grains"].clone()),
        Some(serde_json::json!(0))
    );
    assert_eq!(n2.ask("alice/hello", "acked"), want.join(","));
    let (code, body) = n2.curl(&format!("alice.{DOMAIN}"), "/", &[]);
    assert!(
        code == "200" && body.contains("in namespaces"),
        "{code} {body}"
    );
    n2.granary(&["node", "undrain", "n2"]).success();
}
