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

    fn finish(mut self) -> Vec<Ack> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        std::mem::take(&mut *self.acks.lock().unwrap())
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
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
    let failover = eventually(
        "bob's grain to be failed over",
        Duration::from_secs(90),
        || failover_of(&daemons[2], "n2", &id),
    );
    eventually(
        "a write through n3 to be acknowledged",
        Duration::from_secs(60),
        || (through_n3.acked() > 0).then_some(()),
    );
    let rto = cut.elapsed();
    let on_n2 = through_n2.finish();
    let on_new = through_n3.finish();
    let last_old = on_n2.iter().map(|a| a.at).max();
    let first_new = on_new.iter().map(|a| a.at).min().unwrap();
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
        "run {run} partition: failed over to {} after {rto:?}; n2 acknowledged {} writes while cut off, its last {:?} before the new owner's first; failover says at most {} s lost",
        failover["to"],
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
