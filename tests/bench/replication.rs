//! Replication of many grains: N grains (50; 4 in smoke mode) run on node
//! 1, each given 1 MiB of new data and then written to continuously
//! (`put`, each acknowledged once durable), replicated to node 2 every
//! interval (5 s; 2 s in smoke mode). Reports:
//! - the round that carried the new data: its bytes and time, against
//!   `rsync -a` of the same grains' data on the same disk (the peer: how
//!   a jail's data is copied to another box by hand), and the ratio;
//! - the replication lag per grain, sampled every second while the
//!   writers run (from `granary node list --json`): median and largest,
//!   in seconds and in intervals (the aim: under two);
//! - once the writers stop, how many copies equal their source (every
//!   entry's kind, mode and bytes).
//!
//! One etcd member and two nodes on loopback, sharing one disk.
//!
//!   GRANARY_BIN=$PWD/target/release/granary cargo bench -p granary-e2e --bench replication
//!   GRANARY_BIN=$PWD/target/debug/granary cargo bench -p granary-e2e --bench replication -- --smoke
//!
//! Root, with apt's etcd-server, etcd-client and rsync (skipped without them).

#[path = "support.rs"]
mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use granary_testkit::etcd::Etcd;
use granary_testkit::{Daemon, DaemonMode, eventually};
use support::{have, median};

/// The `replication round` lines of a daemon's log: (grains, bytes, ms).
fn rounds(log: &str) -> Vec<(u64, u64, u64)> {
    let field = |line: &str, name: &str| -> Option<u64> {
        let at = line.find(&format!("{name}="))? + name.len() + 1;
        let digits: String = line[at..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().ok()
    };
    log.lines()
        .filter(|l| l.contains("replication round"))
        .filter_map(|l| Some((field(l, "grains")?, field(l, "bytes")?, field(l, "millis")?)))
        .collect()
}

/// Every grain's replication lag in seconds, as node 1 lists it.
fn lags(n: &Daemon) -> Vec<i64> {
    let list = n.granary(&["node", "list", "--json"]).success().json();
    list.as_array()
        .unwrap()
        .iter()
        .flat_map(|node| node["replication"].as_array().cloned().unwrap_or_default())
        .filter_map(|r| r["lag_secs"].as_i64())
        .collect()
}

fn main() {
    let smoke = std::env::args().any(|a| a == "--smoke");
    for tool in ["etcd", "etcdctl", "rsync"] {
        if !have(tool) {
            eprintln!(
                "{tool} is missing (apt install etcd-server etcd-client rsync); skipping the replication benchmark"
            );
            return;
        }
    }
    let (count, interval, run) = if smoke { (4, 2, 6) } else { (50, 5, 60) };
    let etcd = Etcd::start(1);
    let endpoints: Vec<String> = etcd
        .endpoints()
        .iter()
        .map(|e| format!("\"{e}\""))
        .collect();
    let config = |name: &str| {
        format!(
            "[cluster]\netcd = [{}]\nnode = \"{name}\"\naddress = \"127.0.0.1:0\"\nreplicas = 1\n\
             replicate_interval = \"{interval}s\"\n[grains]\nidle_timeout = \"1h\"\n",
            endpoints.join(", ")
        )
    };
    let mut nodes = [
        Daemon::prepare(DaemonMode::Serve, &config("n1"), "", &[]),
        Daemon::prepare(DaemonMode::Serve, &config("n2"), "", &[]),
    ];
    nodes[1].share_uid_range(&nodes[0]);
    nodes[0].granary(&["cluster", "init"]).success();
    for n in &nodes {
        let token = nodes[0].granary(&["cluster", "token"]).success().stdout;
        n.granary_with_stdin(&["node", "join"], Some(&token))
            .success();
    }
    for n in &mut nodes {
        n.launch();
    }
    for n in &nodes {
        let app = granary_testkit::hello_app(n.dir(), "hello", &[]);
        n.granary(&["app", "install", app.to_str().unwrap()])
            .success();
    }
    let [n1, n2] = &nodes;
    let users: Vec<String> = (0..count).map(|i| format!("g{i:02}")).collect();
    for u in &users {
        n1.granary(&["user", "add", u]).success();
        n1.granary(&["grain", "start", &format!("{u}/hello")])
            .success();
    }
    let data = |u: &str| n1.data_dir().join(format!("grains/{u}-hello/data"));
    let copy = |u: &str| n2.data_dir().join(format!("replicas/{u}-hello/data"));
    // Every copy made once, before the new data goes in.
    eventually(
        "a first copy of every grain",
        Duration::from_secs(120),
        || users.iter().all(|u| copy(u).exists()).then_some(()),
    );
    let before = rounds(&n1.log()).len();
    for u in &users {
        support::fill(&data(u).join("blob"), 1 << 20);
    }
    let written = Instant::now();
    eventually(
        "the new data in every copy",
        Duration::from_secs(300),
        || {
            users
                .iter()
                .all(|u| std::fs::metadata(copy(u).join("blob")).is_ok_and(|m| m.len() == 1 << 20))
                .then_some(())
        },
    );
    let reached = written.elapsed();
    // The rounds that carried it (one, or two when the data went in
    // while a round ran): their grains, bytes and time added up.
    // A round reports once it has recorded every copy: after they show.
    let carried = eventually("the rounds' reports", Duration::from_secs(60), || {
        let sum = rounds(&n1.log())
            .into_iter()
            .skip(before)
            .fold((0, 0, 0), |a, r| (a.0 + r.0, a.1 + r.1, a.2 + r.2));
        (sum.1 >= (count as u64) << 20).then_some(sum)
    });
    // The peer: the same grains' data copied with rsync on the same disk.
    let scratch = n1.dir().join("rsync-copy");
    let started = Instant::now();
    let mut rsync = std::process::Command::new("rsync");
    rsync.arg("-a");
    for u in &users {
        rsync.arg(data(u));
    }
    support::sh(rsync.arg(&scratch));
    support::sh(&mut std::process::Command::new("sync"));
    let peer = started.elapsed();
    let _ = std::fs::remove_dir_all(&scratch);
    println!("replicating {count} grains every {interval} s from node 1 to node 2 (same disk):");
    println!(
        "  the rounds carrying {count} MiB of new data: {} grains, {:.1} MiB in {:.2} s; \
         rsync -a of the same grains: {:.2} s; ratio {:.2}x (in every copy {:.1} s after it was written)",
        carried.0,
        carried.1 as f64 / f64::from(1 << 20),
        carried.2 as f64 / 1000.0,
        peer.as_secs_f64(),
        carried.2 as f64 / 1000.0 / peer.as_secs_f64(),
        reached.as_secs_f64()
    );

    // Writers: four threads, each over its share of the grains.
    let stop = AtomicBool::new(false);
    let acked = AtomicU64::new(0);
    let config_path = n1.config_path();
    let mut samples: Vec<f64> = Vec::new();
    let rounds_before = rounds(&n1.log()).len();
    std::thread::scope(|s| {
        for t in 0..4 {
            let (users, stop, acked, config_path) = (&users, &stop, &acked, &config_path);
            s.spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    for u in users.iter().skip(t).step_by(4) {
                        n += 1;
                        let run = granary_testkit::run_granary(
                            &[
                                "--config",
                                config_path.to_str().unwrap(),
                                "grain",
                                "connect",
                                &format!("{u}/hello"),
                                "hello",
                            ],
                            Some(&format!("put {n}\n")),
                        );
                        if run.status.success() {
                            acked.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                }
            });
        }
        let end = Instant::now() + Duration::from_secs(run);
        let mut tick = Instant::now();
        while Instant::now() < end {
            tick += Duration::from_secs(1);
            samples.extend(lags(n1).into_iter().map(|l| l as f64));
            std::thread::sleep(tick.saturating_duration_since(Instant::now()));
        }
        stop.store(true, Ordering::SeqCst);
    });
    let steady: Vec<(u64, u64, u64)> = rounds(&n1.log()).into_iter().skip(rounds_before).collect();
    let most = samples.iter().cloned().fold(0.0, f64::max);
    let (round_ms, round_bytes): (Vec<f64>, u64) = (
        steady.iter().map(|r| r.2 as f64).collect(),
        steady.iter().map(|r| r.1).sum(),
    );
    println!(
        "  while {} writes were acknowledged in {run} s: lag median {:.0} s, largest {most:.0} s \
         ({:.1} intervals; aim under 2: {}); {} rounds, median {:.2} s each, {:.1} KiB sent in all",
        acked.load(Ordering::SeqCst),
        median(samples.clone()),
        most / interval as f64,
        if most < 2.0 * interval as f64 {
            "met"
        } else {
            "missed"
        },
        steady.len(),
        median(round_ms) / 1000.0,
        round_bytes as f64 / 1024.0
    );
    // Writes stopped: every copy catches up and equals its source.
    let equal = |u: &str| {
        granary_testkit::tree_contents(&copy(u)) == granary_testkit::tree_contents(&data(u))
    };
    let caught_up = Instant::now();
    let deadline = Duration::from_secs(3 * interval + 60);
    while caught_up.elapsed() < deadline && !users.iter().all(|u| equal(u)) {
        std::thread::sleep(Duration::from_millis(500));
    }
    let same = users.iter().filter(|u| equal(u)).count();
    println!("  after the writers stopped: {same} of {count} copies equal their source");
    assert_eq!(same, count, "a copy differs from its source");
}
