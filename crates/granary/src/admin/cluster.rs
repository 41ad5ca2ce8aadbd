//! `granary cluster` and `granary node`, against etcd.

use std::process::ExitCode;

use anyhow::{Context, anyhow};
use granary_cluster::{Arch, Coordinator, NodeRecord, NodeStatus};
use granary_config::Config;
use serde::Serialize;

use crate::cli::{ClusterCommand, NodeCommand};

fn settings(config: &Config) -> anyhow::Result<&granary_config::Cluster> {
    config.cluster.as_ref().ok_or_else(|| {
        anyhow!(
            "this node's configuration has no [cluster] section; add one naming the etcd members \
             and this node (`granary config default` shows it)"
        )
    })
}

/// Moves every grain off drained node `name`, through this node's daemon
/// (which asks `name` over the node link when it is another node).
fn drain(config: &Config, name: &str, json: bool) -> anyhow::Result<ExitCode> {
    use granary_schema::admin_capnp::admin;
    let report = super::connection::with_admin(config, |admin: admin::Client| async move {
        let mut req = super::grains(&admin).drain_request();
        req.get().set_node(name);
        req.get().set_progress(super::backup::printer(json));
        let response = req
            .send()
            .promise
            .await
            .map_err(super::connection::remote)?;
        super::connection::text(
            response
                .get()
                .map_err(super::connection::remote)?
                .get_report_json(),
        )
    })
    .context("the node is drained, but its grains were not moved")?;
    let moved: Vec<serde_json::Value> = serde_json::from_str(&report)?;
    let failed = moved.iter().filter(|m| !m["error"].is_null()).count();
    if json {
        super::client::print_json(&moved)?;
    } else {
        for m in &moved {
            let grain = m["grain"].as_str().unwrap_or("");
            match m["error"].as_str() {
                Some(e) => println!("{grain}: not moved: {e}"),
                None => println!(
                    "{grain} moved to node {} ({} ms down)",
                    m["to"].as_str().unwrap_or(""),
                    m["report"]["downtime_ms"]
                ),
            }
        }
        println!(
            "{} of {} grain(s) moved off node {name}",
            moved.len() - failed,
            moved.len()
        );
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Runs `f` against the cluster's etcd on a runtime of its own.
fn with_cluster<T>(
    config: &Config,
    f: impl AsyncFnOnce(Coordinator, &granary_config::Cluster) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let cluster = settings(config)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start a runtime")?;
    runtime.block_on(async {
        let c = crate::daemon::ledger::connect_etcd(cluster).await?;
        f(c, cluster).await
    })
}

pub(crate) fn cluster(config: &Config, cmd: &ClusterCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        ClusterCommand::Init => {
            let info = with_cluster(config, async |c, _| Ok(c.init().await?))?;
            println!("cluster {} initialised", info.id);
            eprintln!(
                "Next: `granary cluster token` prints a join token; on each node, \
                 `granary node join` reads it from standard input."
            );
        }
        ClusterCommand::Token { ttl } => {
            let token = with_cluster(config, async |c, _| Ok(c.issue_token(*ttl).await?))?;
            eprintln!(
                "This token lets one node join, once, within {}s; Granary keeps only its hash.",
                ttl.as_secs()
            );
            println!("{token}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Serialize)]
struct NodeView<'a> {
    name: &'a str,
    state: &'static str,
    lease_age_secs: Option<i64>,
    arches: &'a [Arch],
    address: &'a str,
    key: &'a str,
    max_grains: u32,
    free_bytes: Option<u64>,
    grains: usize,
    drained: bool,
    /// The grains it runs, each with how many seconds of writes a failover
    /// to its newest copy on another node would lose, and where copies are.
    replication: Vec<GrainLag>,
    /// The most of those.
    replication_lag_secs: Option<i64>,
    /// Grains failed over from it when its lease expired, each with how
    /// much of its writes the failover lost at most.
    failed_over: Vec<FailedOver>,
}

#[derive(Serialize)]
struct FailedOver {
    grain: String,
    to: String,
    at_unix: i64,
    /// The copy promoted.
    promoted: String,
    lost_secs: i64,
}

#[derive(Serialize)]
struct GrainLag {
    grain: String,
    lag_secs: i64,
    copies_on: Vec<String>,
}

fn view<'a>(n: &'a NodeStatus, resting: &[String]) -> NodeView<'a> {
    NodeView {
        name: &n.record.name,
        state: n.state(resting),
        lease_age_secs: n.lease_age_secs,
        arches: &n.record.arches,
        address: &n.record.address,
        key: &n.record.key,
        max_grains: n.record.max_grains,
        free_bytes: n.alive.as_ref().map(|a| a.free_bytes),
        grains: n.grains,
        drained: n.record.drained,
        replication: Vec::new(),
        replication_lag_secs: None,
        failed_over: Vec::new(),
    }
}

pub(crate) fn node(config: &Config, cmd: &NodeCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        NodeCommand::Join => {
            let token = super::client::read_secret_line().context("reading the join token")?;
            // The data dir as the daemon makes it (owner-only), before the
            // node key is made inside it.
            granary_files::ensure_private_dir(&config.data_dir, nix::unistd::geteuid().as_raw())
                .context("cannot use the data dir")?;
            let key = granary_backup::node_key(&config.data_dir)?;
            let record = with_cluster(config, async |c, s| {
                let arches = s
                    .arches
                    .iter()
                    .map(|a| Arch::parse(a).ok_or_else(|| anyhow!("cluster.arches: {a:?}")))
                    .collect::<anyhow::Result<Vec<_>>>()?;
                let record = NodeRecord {
                    name: s.node.clone(),
                    arches,
                    address: s.address.clone(),
                    key: key.public().hex(),
                    max_grains: s.max_grains,
                    drained: false,
                    // Set by the coordinator.
                    joined_unix: 0,
                };
                Ok(c.join(&token, &record).await?)
            })?;
            println!(
                "node {} joined (node key {}); start its daemon with `granary serve`",
                record.name,
                &record.key[..16]
            );
        }
        NodeCommand::List { output } => {
            let (nodes, placements, replicas, resting, failovers) =
                with_cluster(config, async |c, _| {
                    Ok((
                        c.nodes().await?,
                        c.placements().await?,
                        c.replicas().await?,
                        c.resting().await?,
                        c.failovers().await?,
                    ))
                })?;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            let views: Vec<NodeView> = nodes
                .iter()
                .map(|n| {
                    let mut v = view(n, &resting);
                    v.failed_over = failovers
                        .iter()
                        .filter(|(_, f)| f.from == v.name)
                        .map(|(grain, f)| FailedOver {
                            grain: grain.clone(),
                            to: f.to.clone(),
                            at_unix: f.at_unix,
                            promoted: f.label.clone(),
                            lost_secs: f.lost_secs,
                        })
                        .collect();
                    let lags =
                        granary_cluster::replication_lag(&placements, &replicas, v.name, now);
                    v.replication_lag_secs = lags.iter().map(|(_, l)| *l).max();
                    v.replication = lags
                        .into_iter()
                        .map(|(grain, lag_secs)| GrainLag {
                            copies_on: replicas
                                .iter()
                                .filter(|r| r.grain == grain && r.node != v.name)
                                .map(|r| r.node.clone())
                                .collect(),
                            grain,
                            lag_secs,
                        })
                        .collect();
                    v
                })
                .collect();
            if output.json {
                super::client::print_json(&views)?;
            } else {
                let rows: Vec<Vec<String>> = views
                    .iter()
                    .map(|v| {
                        let arches: Vec<&str> = v.arches.iter().map(|a| a.as_str()).collect();
                        vec![
                            v.name.to_owned(),
                            v.state.to_owned(),
                            v.lease_age_secs.map_or("-".into(), |a| format!("{a}s")),
                            arches.join(","),
                            format!("{}/{}", v.grains, v.max_grains),
                            v.free_bytes
                                .map_or("-".into(), |b| format!("{} GiB", b >> 30)),
                            v.replication_lag_secs
                                .map_or("-".into(), |l| format!("{l}s")),
                            v.address.to_owned(),
                        ]
                    })
                    .collect();
                super::table::print(
                    &[
                        "NODE", "STATE", "LEASE", "ARCH", "GRAINS", "FREE", "REPL LAG", "ADDRESS",
                    ],
                    &rows,
                );
                for v in &views {
                    for f in &v.failed_over {
                        println!(
                            "{} failed over from {} to {} ({}s ago): at most {} s of its writes lost (on {}: `granary node reconcile` there)",
                            f.grain,
                            v.name,
                            f.to,
                            (now - f.at_unix).max(0),
                            f.lost_secs,
                            v.name
                        );
                    }
                }
            }
        }
        NodeCommand::Drain {
            name,
            no_move,
            output,
        } => {
            let grains = with_cluster(config, async |c, _| {
                c.set_drained(name, true).await?;
                Ok(c.placements()
                    .await?
                    .iter()
                    .filter(|p| p.node == *name)
                    .count())
            })?;
            if !output.json {
                println!("node {name} drained: it takes no new grains");
            }
            if *no_move || grains == 0 {
                if output.json {
                    super::client::print_json(&Vec::<()>::new())?;
                } else if grains > 0 {
                    println!("it keeps running its {grains} grain(s)");
                }
                return Ok(ExitCode::SUCCESS);
            }
            return drain(config, name, output.json);
        }
        NodeCommand::Reconcile { output } => {
            let list = crate::daemon::reconcile::list(&config.data_dir).map_err(|e| anyhow!(e))?;
            if output.json {
                super::client::print_json(&list)?;
            } else if list.is_empty() {
                println!("no grain of this node was failed over while it was away");
            }
            if !output.json {
                for d in &list {
                    println!(
                        "{}: runs on {} since its failover (epoch {}) from copy {}",
                        d.grain, d.placed_on, d.epoch, d.promoted
                    );
                    println!(
                        "  this node's data is kept at {}",
                        d.kept.as_deref().unwrap_or("(none: there was no data)")
                    );
                    match &d.changes {
                        None => println!("  (the promoted copy's snapshot was gone: not compared)"),
                        Some(c) if c.is_empty() => {
                            println!("  nothing differs: no write was lost")
                        }
                        Some(changes) => {
                            println!("  written here after that copy, not in the grain now:");
                            for c in changes {
                                println!("    {:<8} {} ({} bytes)", c.change, c.path, c.bytes);
                            }
                        }
                    }
                }
            }
        }
        NodeCommand::Undrain { name } => {
            with_cluster(config, async |c, _| Ok(c.set_drained(name, false).await?))?;
            println!("node {name} undrained: it takes new grains again");
        }
        NodeCommand::Remove { name, force } => {
            let dropped =
                with_cluster(config, async |c, _| Ok(c.remove_node(name, *force).await?))?;
            println!("node {name} removed");
            if !dropped.is_empty() {
                println!("placement dropped for: {}", dropped.join(", "));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
