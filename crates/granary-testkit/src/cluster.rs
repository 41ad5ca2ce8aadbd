//! A cluster's nodes as the e2e tests make them: the `[cluster]` section
//! of a node on a test etcd, a join token, and `granary node list`.

use serde_json::Value;

use crate::Daemon;
use crate::etcd::Etcd;

/// The `[cluster]` section of node `name` (running `arches`, quoted and
/// comma-separated) on `etcd`, with a 2 s lease TTL.
pub fn node_config(etcd: &Etcd, name: &str, arches: &str) -> String {
    let endpoints: Vec<String> = etcd
        .endpoints()
        .iter()
        .map(|e| format!("\"{e}\""))
        .collect();
    let tls = match &etcd.tls {
        Some(t) => format!(
            "etcd_ca = {:?}\netcd_cert = {:?}\netcd_key = {:?}\n",
            t.ca, t.client_cert, t.client_key
        ),
        None => String::new(),
    };
    format!(
        "[cluster]\netcd = [{}]\n{tls}node = \"{name}\"\naddress = \"127.0.0.1:0\"\narches = [{arches}]\nlease_ttl = \"2s\"\n",
        endpoints.join(", ")
    )
}

/// A single-use join token made on `from`.
pub fn token(from: &Daemon) -> String {
    let run = from
        .granary(&["cluster", "token", "--ttl", "10m"])
        .success();
    assert!(run.stderr.contains("once"), "{}", run.stderr);
    run.stdout.trim().to_owned()
}

/// `granary node list --json` on `d`.
pub fn nodes(d: &Daemon) -> Vec<Value> {
    d.granary(&["node", "list", "--json"])
        .success()
        .json()
        .as_array()
        .expect("a list")
        .clone()
}

/// Three nodes `n1`..`n3` of a new cluster on `etcd` (which listens on
/// `net.host`), each in its namespace of `net`, launched, with the hello
/// app installed on each. `config(i)` gives what goes in node `i`'s
/// config before its `[cluster]` section and what after it (so a line
/// there extends it; a `lease_ttl` there replaces the 2 s one).
pub fn three_in_namespaces(
    etcd: &Etcd,
    net: &crate::netns::Net,
    config: impl Fn(usize) -> (String, String),
) -> Vec<Daemon> {
    let mut daemons: Vec<Daemon> = (0..3)
        .map(|i| {
            let (before, after) = config(i);
            let mut cluster = node_config(etcd, &format!("n{}", i + 1), "\"x86_64\"");
            if after.contains("lease_ttl =") {
                cluster = cluster.replace("lease_ttl = \"2s\"\n", "");
            }
            let text = format!("{before}\n{cluster}{after}");
            let mut d = Daemon::prepare(crate::DaemonMode::Serve, &text, "", &[]);
            d.run_in(net.ns(i), net.ip(i));
            d
        })
        .collect();
    for i in 1..3 {
        daemons[i].share_uid_range(&daemons[0]);
    }
    daemons[0].granary(&["cluster", "init"]).success();
    for d in &daemons {
        d.granary_with_stdin(
            &["node", "join"],
            Some(&format!("{}\n", token(&daemons[0]))),
        )
        .success();
    }
    for d in &mut daemons {
        d.launch();
    }
    for d in &daemons {
        let hello = crate::hello_app(d.dir(), "hello", &[]);
        d.granary(&["app", "install", hello.to_str().unwrap()])
            .success();
    }
    daemons
}
