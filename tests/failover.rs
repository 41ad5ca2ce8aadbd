//! When a node dies or is cut off: its grains are failed over to the
//! nodes that hold their newest copies, nothing runs on two nodes at once,
//! and a node that comes back keeps what only it had for its admin.
//!
//! Three real etcd members and three real daemons, each daemon in its own
//! network namespace, so a node's link can be taken down while its
//! processes live on. Lease TTL 2 s, replication every 1 s.
//!
//! `GRANARY_CHAOS_RUNS=N` runs each scenario N times (default once); the
//! soak command in README.md runs them 20 times.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use granary_testkit::cluster::{nodes, three_in_namespaces};
use granary_testkit::etcd::Etcd;
use granary_testkit::netns::Net;
use granary_testkit::{Daemon, eventually};
use serde_json::Value;

fn runs() -> usize {
    std::env::var("GRANARY_CHAOS_RUNS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1)
}

fn config(_: usize) -> (String, String) {
    (String::new(), "replicate_interval = \"1s\"\n".to_owned())
}

/// One write acknowledged by a grain: its number and when the answer
/// came.
#[derive(Debug, Clone)]
struct Ack {
    n: u64,
    at: Instant,
    unix: f64,
}

/// Writes `put 1`, `put 2`, ... to `grain` through the nodes `through`
/// (in turn) until stopped; keeps what was acknowledged.
struct Writer {
    stop: Arc<AtomicBool>,
    acks: Arc<Mutex<Vec<Ack>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    fn start(daemons: &[Daemon], grain: &str, through: &[usize], first: u64) -> Writer {
        let configs: Vec<std::path::PathBuf> =
            through.iter().map(|&i| daemons[i].config_path()).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let acks: Arc<Mutex<Vec<Ack>>> = Arc::default();
        let (s, a, grain) = (stop.clone(), Arc::clone(&acks), grain.to_owned());
        let thread = std::thread::spawn(move || {
            let mut n = first;
            while !s.load(Ordering::Relaxed) {
                for config in &configs {
                    let asked = granary_testkit::run_granary(
                        &[
                            "--config",
                            config.to_str().unwrap(),
                            "grain",
                            "connect",
                            &grain,
                            "hello",
                        ],
                        Some(&format!("put {n}\n")),
                    );
                    if asked.status.success() && asked.stdout.trim() == format!("stored {n}") {
                        let unix = SystemTime::now()
                            .duration_since(SystemTime::UNIX_EPOCH)
                            .unwrap()
                            .as_secs_f64();
                        a.lock().unwrap().push(Ack {
                            n,
                            at: Instant::now(),
                            unix,
                        });
                    }
                    n += 1;
                }
            }
        });
        Writer {
            stop,
            acks,
            thread: Some(thread),
        }
    }

    fn acked(&self) -> usize {
        self.acks.lock().unwrap().len()
    }

    /// How many were acknowledged at or after `unix`.
    fn acked_since(&self, unix: f64) -> usize {
        self.acks
            .lock()
            .unwrap()
            .iter()
            .filter(|a| a.unix >= unix)
            .count()
    }

    fn finish(mut self) -> Vec<Ack> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        std::mem::take(&mut *self.acks.lock().unwrap())
    }
}

impl Drop for Writer {
    /// Its client processes end before the namespaces and daemons go.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The lines of `grain`'s acked.log, asked through node `d`; `None` while
/// it does not answer.
fn acked_through(d: &Daemon, grain: &str) -> Option<Vec<u64>> {
    let run = d.granary_with_stdin(&["grain", "connect", grain, "hello"], Some("acked\n"));
    if !run.status.success() {
        return None;
    }
    Some(
        run.stdout
            .trim()
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|s| s.parse().unwrap())
            .collect(),
    )
}

/// The node `grain` (an id) is placed on, as `d`'s node list tells it,
/// with its copies.
fn placed(d: &Daemon, grain: &str) -> Option<(String, Vec<Value>)> {
    nodes(d).iter().find_map(|n| {
        let r = n["replication"]
            .as_array()?
            .iter()
            .find(|r| r["grain"] == grain)?;
        Some((
            n["name"].as_str()?.to_owned(),
            r["copies_on"].as_array()?.clone(),
        ))
    })
}

/// The failover of `grain` from node `from` that `d`'s node list shows.
fn failover_of(d: &Daemon, from: &str, grain: &str) -> Option<Value> {
    nodes(d)
        .iter()
        .find(|n| n["name"] == from)?
        .get("failed_over")?
        .as_array()?
        .iter()
        .find(|f| f["grain"] == grain)
        .cloned()
}

/// Waits until some node other than node `i` holds a whole copy of
/// `grain` that holds at least one acknowledged write.
fn replicated(daemons: &[Daemon], i: usize, grain: &str) {
    eventually(
        &format!("a copy of {grain} off n{}", i + 1),
        Duration::from_secs(60),
        || {
            let (owner, copies) = placed(&daemons[i], grain)?;
            (owner == format!("n{}", i + 1) && !copies.is_empty()).then_some(())
        },
    );
}

/// Checks what a failover kept of `acks`: the promoted grain's log is
/// exactly the first writes acknowledged (no hole, nothing foreign), and
/// every write acknowledged before the promoted copy's snapshot is in it.
/// The number of acknowledged writes lost.
fn check_kept(acks: &[Ack], promoted: &[u64], failover: &Value) -> usize {
    let acked: Vec<u64> = acks.iter().map(|a| a.n).collect();
    assert!(
        acked.starts_with(promoted) || promoted.starts_with(&acked),
        "the promoted log {promoted:?} is not a prefix of the acknowledged writes {acked:?}"
    );
    let kept = promoted.len().min(acked.len());
    let snapshot = failover["snapshot_unix"].as_f64().unwrap_or(0.0);
    for a in &acks[kept..] {
        assert!(
            a.unix >= snapshot,
            "write {} was acknowledged at {} before the promoted copy's snapshot {snapshot}, yet is lost",
            a.n,
            a.unix
        );
    }
    acked.len() - kept
}

#[test]
fn a_killed_node_is_failed_over_and_a_cut_off_one_fences_itself_first() {
    for run in 1..=runs() {
        let net = Net::create(3);
        let etcd = Etcd::start_on(3, net.host);
        let mut daemons = three_in_namespaces(&etcd, &net, config);
        killed_node(&net, &mut daemons, run);
        partitioned_node(&net, &mut daemons, run);
        flapping_link(&net, &mut daemons, run);
        drop(daemons);
    }
}

/// Scenario 1: n1 is killed hard (kill -9, link down) while a client
/// writes to its grain; the grain answers on another node within the RTO
/// with what was acknowledged up to its last replica; n1 comes back
/// without starting it and lists what only it had.
fn killed_node(net: &Net, daemons: &mut [Daemon], run: usize) {
    daemons[0].granary(&["user", "add", "alice"]).success();
    daemons[0]
        .granary(&["grain", "start", "alice/hello"])
        .success();
    let writer = Writer::start(daemons, "alice/hello", &[0], 1);
    eventually("writes to alice's grain", Duration::from_secs(30), || {
        (writer.acked() >= 5).then_some(())
    });
    replicated(daemons, 0, "alice-hello");
    // A few more writes after the copy: some may be in the window.
    let before = writer.acked();
    eventually("more writes", Duration::from_secs(30), || {
        (writer.acked() >= before + 3).then_some(())
    });
    daemons[0].kill_hard();
    net.set_link(0, false);
    let killed = Instant::now();
    let acks = writer.finish();
    let promoted = eventually(
        "alice's grain to answer on another node",
        Duration::from_secs(90),
        || acked_through(&daemons[1], "alice/hello"),
    );
    let rto = killed.elapsed();
    let failover = eventually("the failover in node list", Duration::from_secs(10), || {
        failover_of(&daemons[1], "n1", "alice-hello")
    });
    let lost = check_kept(&acks, &promoted, &failover);
    let to = failover["to"].as_str().unwrap().to_owned();
    assert!(to == "n2" || to == "n3", "{failover}");
    // The lease expires 2 s after n1's last renewal; the RTO counts from
    // there, and must be under 60 s.
    assert!(rto < Duration::from_secs(62), "answered only after {rto:?}");
    eprintln!(
        "run {run} kill: answered on {to} {rto:?} after the kill (lease TTL 2 s); {lost} of {} acknowledged writes lost, failover says at most {} s",
        acks.len(),
        failover["lost_secs"]
    );

    // n1 comes back: it starts nothing it lost, and lists its data.
    net.set_link(0, true);
    daemons[0].launch();
    let listed = daemons[0]
        .granary(&["node", "reconcile", "--json"])
        .success()
        .json();
    let entry = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["grain"] == "alice-hello")
        .unwrap_or_else(|| panic!("{listed}"))
        .clone();
    assert_eq!(entry["placed_on"], to.as_str(), "{entry}");
    let changes = entry["changes"].as_array().expect("compared").clone();
    if lost > 0 {
        assert!(changes.iter().any(|c| c["path"] == "acked.log"), "{entry}");
    }
    let text = daemons[0].granary(&["node", "reconcile"]).success().stdout;
    assert!(text.contains("alice-hello: runs on"), "{text}");
    // Asked on n1, alice's grain is answered by its new owner, with the
    // promoted data.
    assert_eq!(
        placed(&daemons[0], "alice-hello").map(|p| p.0).as_deref(),
        Some(to.as_str())
    );
    assert_eq!(acked_through(&daemons[0], "alice/hello"), Some(promoted));
    assert!(
        !daemons[0]
            .data_dir()
            .join("grains/alice-hello/data")
            .exists()
    );
}

/// Scenario 2: n2 is cut off (link down, processes alive) while clients
/// write to its grain through n2 itself and through n3. It fences itself
/// before the grain runs elsewhere: no write through n2 is acknowledged
/// after the first one acknowledged by the new owner. After the link
/// heals, n2 takes a new lease and lists its divergent data.
fn partitioned_node(net: &Net, daemons: &mut [Daemon], run: usize) {
    let grain = format!("bob{run}/hello");
    let id = format!("bob{run}-hello");
    daemons[1]
        .granary(&["user", "add", &format!("bob{run}")])
        .success();
    daemons[1].granary(&["grain", "start", &grain]).success();
    let writer = Writer::start(daemons, &grain, &[1], 1);
    eventually("writes to bob's grain", Duration::from_secs(30), || {
        (writer.acked() >= 5).then_some(())
    });
    replicated(daemons, 1, &id);
    let old = writer.finish();
    let first = old.last().map_or(1, |a| a.n + 1);
    // Through n2 itself (its own grain while it trusts its lease) and
    // through n3 (the owner, wherever that is).
    let through_n2 = Writer::start(daemons, &grain, &[1], first);
    let through_n3 = Writer::start(daemons, &grain, &[2], first + 1_000_000);
    net.set_link(1, false);
    let cut = Instant::now();
    let cut_unix = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let failover = eventually(
        "bob's grain to be failed over",
        Duration::from_secs(90),
        || failover_of(&daemons[2], "n2", &id),
    );
    let switched = failover["at_unix"].as_f64().unwrap();
    eventually(
        "a write through n3 to be acknowledged by the new owner",
        Duration::from_secs(60),
        || (through_n3.acked_since(switched) > 0).then_some(()),
    );
    let rto = cut.elapsed();
    let on_n2 = through_n2.finish();
    // Through n3 after the switch: the new owner's. (Before the cut, n3
    // forwarded to n2; between the cut and the switch, nothing answered.)
    let on_new: Vec<Ack> = through_n3
        .finish()
        .into_iter()
        .filter(|a| a.unix >= switched)
        .collect();
    let last_old = on_n2.iter().map(|a| a.at).max();
    let first_new = on_new
        .iter()
        .map(|a| a.at)
        .min()
        .expect("a write after the switch");
    if let Some(last_old) = last_old {
        assert!(
            last_old < first_new,
            "n2 acknowledged a write {:?} after the new owner's first",
            last_old - first_new
        );
    }
    let log = daemons[1].log();
    assert!(
        log.contains("fencing: this node no longer trusts its cluster lease"),
        "{log}"
    );
    eprintln!(
        "run {run} partition: switched to {} about {:.0} s after the cut (TTL 2 s), its first write through n3 answered after {rto:?}; n2 acknowledged {} writes while cut off, its last {:?} before the new owner's first; failover says at most {} s lost",
        failover["to"],
        switched - cut_unix.floor(),
        on_n2.len(),
        last_old.map(|l| first_new - l),
        failover["lost_secs"]
    );
    // Healed: n2 rejoins under a new lease, starts nothing it lost, and
    // lists the grain's data it kept.
    net.set_link(1, true);
    let listed = eventually("n2 to list what it kept", Duration::from_secs(60), || {
        let v = daemons[1]
            .granary(&["node", "reconcile", "--json"])
            .success()
            .json();
        v.as_array()?
            .iter()
            .find(|d| d["grain"] == id.as_str())
            .cloned()
    });
    assert_eq!(listed["placed_on"], failover["to"], "{listed}");
    eventually("n2 up again", Duration::from_secs(30), || {
        let status = daemons[1].granary(&["status", "--json"]);
        let v: Value = serde_json::from_str(&status.stdout).unwrap_or_default();
        (v["cluster"]["lease"] == "live").then_some(())
    });
    // Every acknowledged write through the new owner is in its log, and
    // the old ones acknowledged before the copy's snapshot too.
    let now = acked_through(&daemons[2], &grain).expect("answers");
    for a in &on_new {
        assert!(now.contains(&a.n), "write {} lost from {now:?}", a.n);
    }
    let kept: Vec<u64> = now.iter().copied().filter(|n| *n < 1_000_000).collect();
    let mut all_old = old.clone();
    all_old.extend(on_n2);
    check_kept(&all_old, &kept, &failover);
}

/// The writes `grain` (an id) holds in data node `d` kept aside when it
/// was failed over (`granary node reconcile`), by the kept paths listed.
fn kept_writes(d: &Daemon, grain: &str) -> Vec<u64> {
    let listed = d.granary(&["node", "reconcile", "--json"]).success().json();
    let mut out = Vec::new();
    for entry in listed.as_array().unwrap() {
        if entry["grain"] != grain {
            continue;
        }
        let Some(kept) = entry["kept"].as_str() else {
            continue;
        };
        let text = std::fs::read_to_string(std::path::Path::new(kept).join("acked.log"))
            .unwrap_or_default();
        out.extend(text.lines().filter_map(|l| l.parse::<u64>().ok()));
    }
    out
}

/// Scenario 5: n3's link goes down and up every few seconds, long enough
/// now and then for its lease to expire, while clients write to its grain
/// through n3 and through n1. No acknowledged write is lost: each is in
/// the grain, or in the data n3 kept aside (listed by `reconcile`) when
/// the grain was failed over. None only in kept data was acknowledged
/// after the grain's last failover: the old owner acknowledged nothing
/// once the new one ran.
fn flapping_link(net: &Net, daemons: &mut [Daemon], run: usize) {
    let user = format!("carol{run}");
    let (grain, id) = (format!("{user}/hello"), format!("{user}-hello"));
    daemons[2].granary(&["user", "add", &user]).success();
    daemons[2].granary(&["grain", "start", &grain]).success();
    let through_n3 = Writer::start(daemons, &grain, &[2], 1);
    let through_n1 = Writer::start(daemons, &grain, &[0], 1_000_000);
    replicated(daemons, 2, &id);
    // Down 1.5 s (fenced, not expired), up 3 s, down 4 s (expired: failed
    // over), up 3 s, down 1 s, up.
    for (down, up) in [(1500, 3000), (4000, 3000), (1000, 0)] {
        net.set_link(2, false);
        std::thread::sleep(Duration::from_millis(down));
        net.set_link(2, true);
        std::thread::sleep(Duration::from_millis(up));
    }
    eventually("n3 live again", Duration::from_secs(30), || {
        let status = daemons[2].granary(&["status", "--json"]);
        let v: Value = serde_json::from_str(&status.stdout).unwrap_or_default();
        (v["cluster"]["lease"] == "live").then_some(())
    });
    let mut acks = through_n3.finish();
    acks.extend(through_n1.finish());
    let now = eventually("the grain to answer", Duration::from_secs(60), || {
        acked_through(&daemons[0], &grain)
    });
    let kept = kept_writes(&daemons[2], &id);
    // The 4 s outage is past the 2 s TTL: the grain was failed over.
    let last_failover = failover_of(&daemons[0], "n3", &id)
        .and_then(|f| f["at_unix"].as_f64())
        .expect("the grain was failed over during the long outage");
    let mut only_kept = 0;
    for a in &acks {
        if now.contains(&a.n) {
            continue;
        }
        assert!(
            kept.contains(&a.n),
            "write {} was acknowledged and is lost: not in {now:?} nor kept {kept:?}",
            a.n
        );
        assert!(
            a.unix < last_failover + 1.0,
            "write {} is only in n3's kept data, yet was acknowledged at {} after the failover at {last_failover}",
            a.n,
            a.unix
        );
        only_kept += 1;
    }
    eprintln!(
        "run {run} flapping: {} writes acknowledged, {only_kept} only in n3's kept data (listed by reconcile), none lost",
        acks.len()
    );
}

/// How many times `d` fenced itself so far.
fn fencings(d: &Daemon) -> usize {
    d.log()
        .matches("fencing: this node no longer trusts its cluster lease")
        .count()
}

/// Runs `script` under sh in its own process group until dropped.
struct Load(std::process::Child);

impl Load {
    fn start(script: &str) -> Load {
        use std::os::unix::process::CommandExt;
        Load(
            std::process::Command::new("sh")
                .args(["-c", script])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .process_group(0)
                .spawn()
                .expect("start load"),
        )
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        let group = nix::unistd::Pid::from_raw(-(self.0.id() as i32));
        let _ = nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGKILL);
        let _ = self.0.wait();
    }
}

#[test]
fn a_slow_node_is_never_failed_over_and_etcd_without_quorum_fails_nothing_over() {
    for run in 1..=runs() {
        let net = Net::create(3);
        let mut etcd = Etcd::start_on(3, net.host);
        // A lease TTL of 6 s: an etcd leader election (about a second)
        // must fit in the TTL/2 a node trusts its lease for.
        let daemons = three_in_namespaces(&etcd, &net, |_| {
            (
                String::new(),
                "replicate_interval = \"1s\"\nlease_ttl = \"6s\"\n".to_owned(),
            )
        });
        let user = format!("dave{run}");
        let (grain, id) = (format!("{user}/hello"), format!("{user}-hello"));
        daemons[1].granary(&["user", "add", &user]).success();
        daemons[1].granary(&["grain", "start", &grain]).success();
        replicated(&daemons, 1, &id);

        // Scenario 6: n2 under heavy CPU and disk load (every core busy,
        // a writer syncing 64 MiB files in its data dir) while a client
        // writes to its grain, for 2.5 lease TTLs: its lease renews, so it
        // is never failed over.
        let scratch = daemons[1].data_dir().join("load");
        let load = Load::start(&format!(
            "for i in 1 2 3 4; do (while :; do :; done) & done; \
             while :; do dd if=/dev/zero of={} bs=1M count=64 conv=fsync 2>/dev/null; done",
            scratch.display()
        ));
        let writer = Writer::start(&daemons, &grain, &[1], 1);
        let until = Instant::now() + Duration::from_secs(15);
        let mut looks = 0;
        while Instant::now() < until {
            assert_eq!(failover_of(&daemons[0], "n2", &id), None);
            looks += 1;
        }
        drop(load);
        let _ = std::fs::remove_file(&scratch);
        let acks = writer.finish();
        assert!(!acks.is_empty());
        assert_eq!(failover_of(&daemons[0], "n2", &id), None);
        let fenced = fencings(&daemons[1]);
        eprintln!(
            "run {run} slow node: {} writes acknowledged under load, false failovers 0 ({looks} looks), self-fencings {fenced}",
            acks.len()
        );

        // Scenario 4: one etcd member of three killed, the leader (the
        // worst one to lose), changes nothing: the grain answers through
        // every node and nobody fences.
        let before: Vec<usize> = daemons.iter().map(fencings).collect();
        let leader = eventually("an etcd leader", Duration::from_secs(10), || etcd.leader());
        etcd.kill(leader);
        let writer = Writer::start(&daemons, &grain, &[0, 2], 100_000);
        let until = Instant::now() + Duration::from_secs(12);
        while Instant::now() < until {
            for d in &daemons {
                let status = d.granary(&["status", "--json"]);
                let v: Value = serde_json::from_str(&status.stdout).unwrap_or_default();
                assert_eq!(v["cluster"]["lease"], "live", "{v}");
            }
        }
        let acks = writer.finish();
        assert!(acks.len() > 3, "{acks:?}");
        let after: Vec<usize> = daemons.iter().map(fencings).collect();
        assert_eq!(
            before, after,
            "a node fenced itself with 2 of 3 etcd members up"
        );

        // Two of three killed: no quorum. Every node fences itself and
        // stops its grains; nobody can fail anything over.
        etcd.kill((leader + 1) % 3);
        for (i, d) in daemons.iter().enumerate() {
            eventually(
                &format!("n{} to fence itself", i + 1),
                Duration::from_secs(20),
                || (fencings(d) > after[i]).then_some(()),
            );
        }
        let state = daemons[1]
            .granary(&["grain", "status", &grain, "--json"])
            .success()
            .json();
        assert_eq!(state["state"], "stopped", "{state}");
        // Past the TTL, still no failover was done by anyone.
        let until = Instant::now() + Duration::from_secs(8);
        while Instant::now() < until {
            for d in &daemons {
                assert!(!d.log().contains("failover: took over"));
            }
        }
        eprintln!(
            "run {run} etcd: 1 of 3 members lost changed nothing; 2 of 3 lost fenced all 3 nodes, no failover"
        );
        drop(daemons);
    }
}

/// Scenario 3: a message is sent to alice through the MX of the node that
/// runs her mail grain, and that node is killed right after the 250. The
/// copy of the spool entry another node took before the 250 is delivered
/// into her failed-over grain, exactly once.
#[test]
fn mail_acknowledged_by_a_node_killed_right_after_is_delivered_once_after_failover() {
    use granary_testkit::mail::{DOMAIN, Dns, mail_package, sender_records, swaks_at};
    for run in 1..=runs() {
        let net = Net::create(3);
        let etcd = Etcd::start_on(3, net.host);
        let dns = Dns::start_on(net.host, &sender_records("remote.example"));
        let tmp = tempfile::tempdir().unwrap();
        let mut daemons = three_in_namespaces(&etcd, &net, |_| {
            (
                format!("domain = \"{DOMAIN}\""),
                format!(
                    "replicate_interval = \"1s\"\n[mail]\nresolver = \"{}\"\npostmaster = \"alice\"\nretry_first = \"1s\"\nretry_max = \"2s\"\n",
                    dns.addr
                ),
            )
        });
        let package = mail_package(tmp.path());
        for d in &daemons {
            d.granary(&["app", "install", package.to_str().unwrap()])
                .success();
        }
        daemons[0].granary(&["user", "add", "alice"]).success();
        daemons[0]
            .granary(&["mail", "domain", "add", DOMAIN])
            .success();
        daemons[0]
            .granary(&["grain", "start", "alice/mail"])
            .success();
        replicated(&daemons, 0, "alice-mail");
        let inbox = |d: &Daemon| -> Option<u64> {
            let run = d.granary(&["mail", "status", "alice", "--json"]);
            let s: Value = serde_json::from_str(&run.stdout).ok()?;
            s["mailboxes"]
                .as_array()?
                .iter()
                .find(|m| m["name"] == "INBOX")?["messages"]
                .as_u64()
        };
        let (_, said) = swaks_at(
            daemons[0].listener("smtp"),
            &[
                "--from",
                "sender@remote.example",
                "--to",
                &format!("alice@{DOMAIN}"),
                "--header",
                &format!("Subject: kept {run}"),
                "--body",
                "acknowledged, then the node died",
            ],
        );
        assert!(said.contains("250 2.0.0 Ok: queued as"), "{said}");
        let killed = Instant::now();
        daemons[0].kill_hard();
        net.set_link(0, false);
        let failover = eventually(
            "alice's mail grain to be failed over",
            Duration::from_secs(90),
            || failover_of(&daemons[1], "n1", "alice-mail"),
        );
        let to = if failover["to"] == "n2" { 1 } else { 2 };
        eventually("the message in her inbox", Duration::from_secs(90), || {
            (inbox(&daemons[to]) == Some(1)).then_some(())
        });
        let delivered = killed.elapsed();
        // Once no live node has anything left to deliver, still once.
        for i in [1, 2] {
            eventually(
                &format!("n{}'s spool to empty", i + 1),
                Duration::from_secs(60),
                || {
                    let list = daemons[i]
                        .granary(&["mail", "spool", "list", "--json"])
                        .success()
                        .json();
                    list.as_array()?.is_empty().then_some(())
                },
            );
        }
        assert_eq!(inbox(&daemons[to]), Some(1));
        let adopted = [1, 2].iter().any(|&i| {
            daemons[i]
                .log()
                .contains("took over mail a dead node had acknowledged")
        });
        assert!(adopted, "no node took over n1's copy of the message");
        eprintln!(
            "run {run} mail: acknowledged by n1, killed at once; in alice's inbox on n{} {delivered:?} later, once",
            to + 1
        );
        drop(daemons);
    }
}

/// Fencing on ZFS: a node cut off from etcd stops its grain and makes its
/// dataset read-only; once it may run the grain again (here the only node,
/// so the grain stays placed on it), the next start makes the dataset
/// writable and the grain stores writes again.
#[test]
fn a_fenced_node_makes_its_zfs_datasets_read_only_until_it_may_start_them_again() {
    use granary_datasets::testing::ZfsPool;
    let tmp = tempfile::tempdir().unwrap();
    // Declared first, dropped last: after the daemon.
    let pool = ZfsPool::create(tmp.path(), "256M").unwrap();
    let net = Net::create(1);
    let etcd = Etcd::start_on(3, net.host);
    // A 6 s TTL: fenced 3 s after the last renewal.
    let config = format!(
        "{}[storage]\nbackend = \"zfs\"\nzfs_dataset = \"{}\"\nquota_mib = 64\n",
        granary_testkit::cluster::node_config(&etcd, "n1", "\"x86_64\"")
            .replace("lease_ttl = \"2s\"", "lease_ttl = \"6s\""),
        pool.name
    );
    let mut n1 = Daemon::prepare(granary_testkit::DaemonMode::Serve, &config, "", &[]);
    n1.run_in(net.ns(0), net.ip(0));
    n1.granary(&["cluster", "init"]).success();
    let token = granary_testkit::cluster::token(&n1);
    n1.granary_with_stdin(&["node", "join"], Some(&format!("{token}\n")))
        .success();
    n1.launch();
    let hello = granary_testkit::hello_app(n1.dir(), "hello", &[]);
    n1.granary(&["app", "install", hello.to_str().unwrap()])
        .success();
    n1.granary(&["user", "add", "alice"]).success();
    assert_eq!(n1.ask("alice/hello", "put 1"), "stored 1");

    net.set_link(0, false);
    eventually(
        "the dataset to be made read-only",
        Duration::from_secs(30),
        || {
            n1.log()
                .contains("fencing: dataset read-only grain=alice-hello")
                .then_some(())
        },
    );
    let data = n1.data_dir().join("grains/alice-hello/data");
    let refused = std::fs::write(data.join("late"), "x").unwrap_err();
    assert_eq!(
        refused.raw_os_error(),
        Some(nix::errno::Errno::EROFS as i32),
        "{refused}"
    );
    assert!(n1.data_dir().join("grains/alice-hello/fenced").exists());

    net.set_link(0, true);
    eventually(
        "the grain to store a write again",
        Duration::from_secs(60),
        || {
            let run = n1.granary_with_stdin(
                &["grain", "connect", "alice/hello", "hello"],
                Some("put 2\n"),
            );
            (run.status.success() && run.stdout.trim() == "stored 2").then_some(())
        },
    );
    assert!(!n1.data_dir().join("grains/alice-hello/fenced").exists());
    assert_eq!(n1.ask("alice/hello", "acked"), "1,2");
    drop(n1);
}
