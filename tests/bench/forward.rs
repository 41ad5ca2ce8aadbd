//! The cost of reaching a grain through another node: HTTPS requests to
//! alice's hello grain, which runs on node 1, sent to node 1's gateway
//! (direct) and to node 2's (forwarded over the node link, TLS 1.3), in
//! alternating rounds of one run; requests/s, p50 and p99 of each, and
//! the ratios.
//!
//! Three etcd members and two nodes on loopback, both nodes and the grain
//! on CPU 1, wrk (one thread, 64 connections, kept alive) on CPU 0. The
//! gateway keeps its upstream connections to a grain pooled, so what a
//! forwarded request adds is the link's extra hop on an open stream.
//!
//!   GRANARY_BIN=$PWD/target/release/granary cargo bench -p granary-e2e --bench forward
//!   GRANARY_BIN=$PWD/target/debug/granary cargo bench -p granary-e2e --bench forward -- --smoke
//!
//! Root, with apt's etcd-server, etcd-client and wrk (skipped without them).

#[path = "support.rs"]
mod support;

use granary_testkit::etcd::Etcd;
use granary_testkit::{Daemon, DaemonMode};
use support::{have, median};

/// wrk against `url` with basic auth: (requests/s, p50 ms, p99 ms).
/// wrk through the gateway as `auth` (user:password).
fn wrk(url: &str, auth: &str, secs: u32) -> (f64, f64, f64) {
    use base64::Engine;
    let basic = base64::engine::general_purpose::STANDARD.encode(auth);
    let headers = [
        "Host: hello.localhost".to_owned(),
        format!("Authorization: Basic {basic}"),
    ];
    support::wrk(url, &headers, secs, true)
}

fn main() {
    let smoke = std::env::args().any(|a| a == "--smoke");
    for tool in ["etcd", "etcdctl", "wrk", "taskset"] {
        if !have(tool) {
            eprintln!(
                "{tool} is missing (apt install etcd-server etcd-client wrk); skipping the forwarding benchmark"
            );
            return;
        }
    }
    let (rounds, secs) = if smoke { (1, 1) } else { (5, 5) };
    let etcd = Etcd::start(3);
    let endpoints: Vec<String> = etcd
        .endpoints()
        .iter()
        .map(|e| format!("\"{e}\""))
        .collect();
    let config = |name: &str| {
        format!(
            "[grains]\nidle_timeout = \"1h\"\n[gateway]\nupstream_idle = \"1h\"\n[cluster]\netcd = [{}]\nnode = \"{name}\"\naddress = \"127.0.0.1:0\"\n",
            endpoints.join(", ")
        )
    };
    granary_testkit::pin_daemons_to(1);
    let mut n1 = Daemon::prepare(DaemonMode::Serve, &config("n1"), "", &[]);
    let mut n2 = Daemon::prepare(DaemonMode::Serve, &config("n2"), "", &[]);
    // One host uid range per cluster.
    n2.share_uid_range(&n1);
    n1.granary(&["cluster", "init"]).success();
    for n in [&n1, &n2] {
        let token = n1.granary(&["cluster", "token"]).success().stdout;
        n.granary_with_stdin(&["node", "join"], Some(&token))
            .success();
    }
    n1.launch();
    n2.launch();
    // Users are the cluster's: alice is added once; the (unsigned) app is
    // installed on each node.
    for n in [&n1, &n2] {
        let app = granary_testkit::hello_app(n.dir(), "hello", &[]);
        n.granary(&["app", "install", app.to_str().unwrap()])
            .success();
    }
    n1.granary(&["user", "add", "alice"]).success();
    granary_testkit::eventually(
        "node 2 to know alice",
        std::time::Duration::from_secs(10),
        || {
            n2.granary(&["user", "list", "--json"])
                .success()
                .stdout
                .contains("\"alice\"")
                .then_some(())
        },
    );
    let passwords: Vec<String> = [&n1, &n2]
        .iter()
        .map(|n| granary_testkit::app_password(n, "alice", "hello"))
        .collect();
    n1.granary(&["grain", "start", "alice/hello"]).success();
    let url = |n: &Daemon| format!("https://127.0.0.1:{}/whoami", n.https_addr().port());
    let (direct_url, forwarded_url) = (url(&n1), url(&n2));
    let (direct_auth, forwarded_auth) = (
        format!("alice:{}", passwords[0]),
        format!("alice:{}", passwords[1]),
    );
    // Warm both paths (logins verified and cached, pools filled).
    wrk(&direct_url, &direct_auth, 1);
    wrk(&forwarded_url, &forwarded_auth, 1);
    let (mut direct, mut forwarded) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        direct.push(wrk(&direct_url, &direct_auth, secs));
        forwarded.push(wrk(&forwarded_url, &forwarded_auth, secs));
    }
    let med =
        |v: &[(f64, f64, f64)], f: fn(&(f64, f64, f64)) -> f64| median(v.iter().map(f).collect());
    let (dr, dp50, dp99) = (
        med(&direct, |r| r.0),
        med(&direct, |r| r.1),
        med(&direct, |r| r.2),
    );
    let (fr, fp50, fp99) = (
        med(&forwarded, |r| r.0),
        med(&forwarded, |r| r.1),
        med(&forwarded, |r| r.2),
    );
    println!(
        "HTTPS to a grain on node 1, wrk -c64 on CPU 0, nodes on CPU 1, {rounds} alternating rounds of {secs} s (medians):"
    );
    println!(
        "  direct (node 1's gateway)      {dr:>9.0} req/s  p50 {dp50:>6.2} ms  p99 {dp99:>6.2} ms"
    );
    println!(
        "  forwarded (node 2 -> node 1)   {fr:>9.0} req/s  p50 {fp50:>6.2} ms  p99 {fp99:>6.2} ms"
    );
    println!(
        "  forwarded/direct: requests/s {:.2}x, p50 {:.2}x, p99 {:.2}x",
        fr / dr,
        fp50 / dp50,
        fp99 / dp99
    );
}
