//! What moving a grain costs: `granary grain move` of a grain holding 1 MiB,
//! 100 MiB and 1 GiB between two nodes (and back), against copying the
//! same data by hand with the grain stopped (`cp -a` on the same disk,
//! the peer: what moving a jail's data by hand costs in downtime). For
//! each: the move's total time, its downtime (the grain stopped: the last
//! delta, the switch, the start) and the copy's time, and the ratios.
//! Then a drain of a node running 20 grains: total time, and the median
//! and largest downtime.
//!
//! One etcd member and two nodes on loopback, sharing one disk;
//! replication off so nothing else copies meanwhile.
//!
//!   GRANARY_BIN=$PWD/target/release/granary cargo bench -p granary-e2e --bench moves
//!   GRANARY_BIN=$PWD/target/debug/granary cargo bench -p granary-e2e --bench moves -- --smoke
//!
//! Root, with apt's etcd-server and etcd-client (skipped without them).

#[path = "support.rs"]
mod support;

use std::time::{Duration, Instant};

use granary_testkit::etcd::Etcd;
use granary_testkit::{Daemon, DaemonMode};
use support::{have, median};

/// `granary grain move` of `grain` to `to`, asked on `on`: (total time,
/// downtime) from its report.
fn move_to(on: &Daemon, grain: &str, to: &str) -> (Duration, Duration) {
    let started = Instant::now();
    let report = on
        .granary(&["grain", "move", grain, "--to", to, "--json"])
        .success()
        .json();
    let total = started.elapsed();
    let down = Duration::from_millis(report["downtime_ms"].as_u64().unwrap());
    eprintln!(
        "    ({grain} to {to}: pre-copy rounds {} bytes, final {} bytes)",
        report["rounds"], report["final_bytes"]
    );
    (total, down)
}

fn main() {
    let smoke = std::env::args().any(|a| a == "--smoke");
    for tool in ["etcd", "etcdctl"] {
        if !have(tool) {
            eprintln!(
                "{tool} is missing (apt install etcd-server etcd-client); skipping the moves benchmark"
            );
            return;
        }
    }
    let sizes: &[(u64, &str)] = if smoke {
        &[(1 << 20, "1 MiB")]
    } else {
        &[
            (1 << 20, "1 MiB"),
            (100 << 20, "100 MiB"),
            (1 << 30, "1 GiB"),
        ]
    };
    let drained = if smoke { 2 } else { 20 };
    let etcd = Etcd::start(1);
    let endpoints: Vec<String> = etcd
        .endpoints()
        .iter()
        .map(|e| format!("\"{e}\""))
        .collect();
    let config = |name: &str| {
        format!(
            "[cluster]\netcd = [{}]\nnode = \"{name}\"\naddress = \"127.0.0.1:0\"\nreplicas = 0\n",
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
    n1.granary(&["user", "add", "alice"]).success();
    n1.granary(&["grain", "start", "alice/hello"]).success();
    println!("moving a running grain between two nodes, against cp -a of its data (same disk):");
    println!("  data      move total   downtime   cp -a     total/cp   downtime/cp");
    let mut owner = 0;
    for (bytes, name) in sizes {
        let data = nodes[owner].data_dir().join("grains/alice-hello/data");
        let _ = std::fs::remove_file(data.join("blob"));
        support::fill(&data.join("blob"), *bytes);
        // The peer: the same data copied with the service stopped.
        let copy = nodes[owner].dir().join("copy");
        let _ = std::fs::remove_dir_all(&copy);
        let started = Instant::now();
        support::sh(
            std::process::Command::new("cp")
                .arg("-a")
                .arg(&data)
                .arg(&copy),
        );
        support::sh(&mut std::process::Command::new("sync"));
        let cp = started.elapsed();
        std::fs::remove_dir_all(&copy).unwrap();
        let (to, on) = (if owner == 0 { "n2" } else { "n1" }, &nodes[owner]);
        let (total, down) = move_to(on, "alice/hello", to);
        owner = 1 - owner;
        println!(
            "  {name:<9} {:>8.2} s  {:>7.0} ms  {:>6.2} s  {:>8.2}x  {:>10.3}x",
            total.as_secs_f64(),
            down.as_secs_f64() * 1000.0,
            cp.as_secs_f64(),
            total.as_secs_f64() / cp.as_secs_f64(),
            down.as_secs_f64() / cp.as_secs_f64()
        );
    }
    // A drain: `drained` small grains on n1 (alice's is elsewhere or
    // counted), all moved off.
    for i in 0..drained {
        let user = format!("d{i}");
        n1.granary(&["user", "add", &user]).success();
        n1.granary(&["grain", "start", &format!("{user}/hello")])
            .success();
    }
    let started = Instant::now();
    let report = n2
        .granary(&["node", "drain", "n1", "--json"])
        .success()
        .json();
    let total = started.elapsed();
    let downs: Vec<f64> = report
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["report"]["downtime_ms"].as_f64().unwrap())
        .collect();
    let most = downs.iter().cloned().fold(0.0, f64::max);
    println!(
        "drain of a node running {} grains: {:.2} s in all, downtime median {:.0} ms, largest {most:.0} ms",
        downs.len(),
        total.as_secs_f64(),
        median(downs.clone())
    );
}
