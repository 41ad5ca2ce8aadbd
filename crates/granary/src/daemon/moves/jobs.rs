//! Moves asked for by name: a grain's move driven by whichever node owns
//! it, and a drain, which moves every grain off a node; either asked here
//! or forwarded over the node link to the node that must drive it.

use granary_backup::progress::Progress;
use granary_cluster::moves::{GrainCall, Job, Target};
use granary_grains::GrainId;
use serde::Serialize;
use tokio::sync::mpsc;

use super::{MoveReport, Source, move_out, msg};

/// Runs `job` on this node: a move of a grain it owns or a drain of
/// itself; asked here (`asked_by` is `None`), a job another node must
/// drive is forwarded to it over the node link. The report, as JSON.
pub(crate) async fn run(
    src: Source,
    job: Job,
    progress: mpsc::Sender<Progress>,
    asked_by: Option<&str>,
) -> Result<String, String> {
    let me = src.member.node.clone();
    match job {
        Job::Move { grain, to } => {
            let id = GrainId::parse(&grain).map_err(msg)?;
            let owner = src
                .member
                .coordinator
                .placement(&grain)
                .await
                .map_err(|e| format!("cannot check with the cluster: {e}"))?
                .map(|p| p.node);
            match owner {
                Some(owner) if owner != me && asked_by.is_none() => {
                    forward(&src, &owner, Job::Move { grain, to }, progress).await
                }
                _ => Ok(json(&move_out(src, id, to, progress).await?)),
            }
        }
        Job::Drain { node } if node == me => Ok(json(&drain(src, progress).await?)),
        Job::Drain { node } => match asked_by {
            None => forward(&src, &node, Job::Drain { node: node.clone() }, progress).await,
            Some(by) => Err(format!("node {by} asked node {me} to drain {node}")),
        },
        // Another node's admin asked this one, which runs the grain: on
        // this node's own grains, never forwarded again.
        Job::Grain { grain, call } => grain_call(&src, &grain, call).await,
    }
}

async fn grain_call(src: &Source, grain: &str, call: GrainCall) -> Result<String, String> {
    let id = GrainId::parse(grain).map_err(msg)?;
    let g = &src.grains;
    let failed = |e: granary_grains::GrainError| e.to_string();
    Ok(match call {
        GrainCall::Start { answering } => {
            let how = match answering {
                true => granary_grains::Start::Answering,
                false => granary_grains::Start::Running,
            };
            g.start(&id, how).await.map_err(failed)?;
            "null".to_owned()
        }
        GrainCall::Stop => json(&g.stop(&id).await.map_err(failed)?),
        GrainCall::Status => json(&g.status(&id).await.map_err(failed)?),
        GrainCall::Logs { max_bytes } => {
            let log = g.logs(&id, max_bytes.min(24 << 10)).await.map_err(failed)?;
            json(&hex::encode(log))
        }
        GrainCall::Snapshot { label } => json(&g.snapshot(&id, &label).await.map_err(failed)?),
        GrainCall::Snapshots => json(&g.snapshots(&id).await.map_err(failed)?),
        GrainCall::Prune => json(&g.prune(&id).await.map_err(failed)?),
        GrainCall::Rollback { snapshot } => {
            json(&g.rollback(&id, &snapshot).await.map_err(failed)?)
        }
        GrainCall::MailStatus => json(&g.mail_status(&id).await.map_err(failed)?),
        GrainCall::XmppStatus => json(&g.xmpp_status(&id).await.map_err(failed)?),
        GrainCall::XmppBefriend { jid, name } => {
            g.xmpp_befriend(&id, &jid, &name).await.map_err(failed)?;
            "null".to_owned()
        }
        GrainCall::XmppRoomMembers => json(&g.xmpp_room_members(&id).await.map_err(failed)?),
    })
}

fn json<T: Serialize>(report: &T) -> String {
    serde_json::to_string(report).expect("reports serialize")
}

/// Asks node `node` to run `job`, its progress passed on.
async fn forward(
    src: &Source,
    node: &str,
    job: Job,
    progress: mpsc::Sender<Progress>,
) -> Result<String, String> {
    let nodes = src
        .member
        .coordinator
        .nodes()
        .await
        .map_err(|e| format!("cannot check with the cluster: {e}"))?;
    let n = nodes
        .iter()
        .find(|n| n.record.name == node)
        .ok_or_else(|| format!("no node {node:?} in the cluster"))?;
    let link = match &n.alive {
        None => return Err(format!("node {node} is down: it must run this itself")),
        Some(a) if !a.link.is_empty() => a.link.clone(),
        Some(_) => n.record.address.clone(),
    };
    let t = Target {
        address: &link,
        key: &n.record.key,
    };
    tracing::info!(node, ?job, "asking another node to run a job");
    granary_cluster::moves::run(&t, &src.member.key, job, |line| {
        if let Ok(p) = serde_json::from_str::<Progress>(&line) {
            let _ = progress.try_send(p);
        }
    })
    .await
    .map_err(|e| format!("node {node}: {e}"))
}

/// One grain of a drain: where it went and how, or why it did not.
#[derive(Debug, Serialize)]
pub(crate) struct Drained {
    pub grain: String,
    pub to: Option<String>,
    pub report: Option<MoveReport>,
    pub error: Option<String>,
}

/// Moves every grain placed on this node to the live, undrained node with
/// the most room that runs its app, two at a time. This node is marked
/// drained first, so nothing new is placed here meanwhile. Where each
/// grain goes is planned up front, biggest first, counting what the
/// earlier ones take from each node's room (the room nodes report is a
/// minute old at most, and knows nothing of this drain).
async fn drain(src: Source, progress: mpsc::Sender<Progress>) -> Result<Vec<Drained>, String> {
    use futures::StreamExt;
    let c = &src.member.coordinator;
    let me = src.member.node.clone();
    let etcd = |e: granary_cluster::ClusterError| format!("cannot check with the cluster: {e}");
    c.set_drained(&me, true).await.map_err(etcd)?;
    let mine: Vec<String> = c
        .placements()
        .await
        .map_err(etcd)?
        .into_iter()
        .filter(|p| p.node == me)
        .map(|p| p.grain)
        .collect();
    tracing::info!(node = me, grains = mine.len(), "draining this node");
    let datasets = src.datasets.clone();
    let mut sized: Vec<(String, u64)> = tokio::task::spawn_blocking(move || {
        mine.into_iter()
            .map(|g| {
                let bytes =
                    granary_backup::tree::changed_bytes(&datasets.path(&g), None).unwrap_or(0);
                (g, bytes)
            })
            .collect()
    })
    .await
    .map_err(msg)?;
    sized.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let mut nodes = c.nodes().await.map_err(etcd)?;
    let mut plan = Vec::new();
    for (grain, bytes) in sized {
        let arches = match GrainId::parse(&grain) {
            Ok(id) => src.records.arches_of(&id).await.ok().flatten(),
            Err(_) => None,
        }
        .unwrap_or_else(|| src.member.arches.clone());
        // Only nodes with room for it (and 1 GiB to spare).
        let roomy: Vec<granary_cluster::NodeStatus> = nodes
            .iter()
            .filter(|n| {
                n.alive
                    .as_ref()
                    .is_some_and(|a| a.free_bytes >= bytes.saturating_add(1 << 30))
            })
            .cloned()
            .collect();
        let to = match roomy.is_empty() {
            true => Err(format!("no node has room for its {bytes} bytes")),
            false => granary_cluster::choose_node(&arches, &roomy).map(str::to_owned),
        };
        if let Ok(name) = &to
            && let Some(n) = nodes.iter_mut().find(|n| n.record.name == *name)
        {
            n.grains += 1;
            if let Some(alive) = n.alive.as_mut() {
                alive.free_bytes = alive.free_bytes.saturating_sub(bytes);
            }
        }
        plan.push((grain, to));
    }
    let mut done: Vec<Drained> = futures::stream::iter(plan)
        .map(|(g, to)| drain_one(src.clone(), g, to, progress.clone()))
        .buffer_unordered(2)
        .collect()
        .await;
    done.sort_by(|a, b| a.grain.cmp(&b.grain));
    Ok(done)
}

async fn drain_one(
    src: Source,
    grain: String,
    to: Result<String, String>,
    progress: mpsc::Sender<Progress>,
) -> Drained {
    let failed = |grain: String, to: Option<String>, e: String| Drained {
        grain,
        to,
        report: None,
        error: Some(e),
    };
    let id = match GrainId::parse(&grain) {
        Ok(id) => id,
        Err(e) => return failed(grain, None, e.to_string()),
    };
    let to = match to {
        Ok(to) => to,
        Err(why) => return failed(id.shown(), None, format!("no node can take it: {why}")),
    };
    match move_out(src, id.clone(), to.clone(), progress).await {
        Ok(report) => Drained {
            grain: id.shown(),
            to: Some(to),
            report: Some(report),
            error: None,
        },
        Err(e) => failed(id.shown(), Some(to), e),
    }
}
