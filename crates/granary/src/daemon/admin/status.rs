//! `Admin.status`: health, versions, counts, listeners, the login
//! limiter and this node's place in a cluster.

use std::sync::Arc;

use granary_schema::admin_capnp::admin;

use super::{Ctx, blocking, state_failure};

pub(super) async fn fill(ctx: &Ctx, mut results: admin::StatusResults) -> Result<(), capnp::Error> {
    let store = ctx.store.clone();
    let (counts, schema) = blocking(move || {
        Ok((
            store.counts().map_err(state_failure)?,
            store.schema_version().map_err(state_failure)?,
        ))
    })
    .await?;
    let info = &ctx.info;
    let (lagging, nodes) = match &info.cluster {
        Some(member) => tokio::join!(lagging_grains(member, &ctx.datasets), node_health(member)),
        None => (Vec::new(), Vec::new()),
    };
    let mut s = results.get().init_status();
    s.set_healthy(true);
    s.set_version(env!("CARGO_PKG_VERSION"));
    s.set_schema_version(schema);
    s.set_pid(std::process::id());
    s.set_uptime_seconds(info.started.elapsed().as_secs());
    s.set_data_dir(info.data_dir.to_string_lossy().as_ref());
    s.set_domain(&info.domain);
    s.set_storage_backend(info.storage_backend);
    s.set_sandbox(&info.sandbox);
    s.set_ca_file(
        info.ca_file
            .as_deref()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default()
            .as_str(),
    );
    s.set_users(counts.users);
    s.set_app_passwords(counts.app_passwords);
    s.set_apps(counts.apps);
    s.set_grains(counts.grains);
    s.set_grants(counts.grants);
    let limiter = info.limiter.state();
    s.set_login_sources(limiter.tracked);
    s.set_refused_count(limiter.refused_count);
    let mut refused = s
        .reborrow()
        .init_refused_sources(limiter.refused.len() as u32);
    for (i, r) in limiter.refused.iter().enumerate() {
        let mut out = refused.reborrow().get(i as u32);
        out.set_source(&r.source);
        out.set_for_secs(r.for_secs);
        out.set_strikes(r.strikes);
    }
    if let Some(member) = &info.cluster {
        let state = member.lease_state();
        if state != "live" || !lagging.is_empty() {
            s.set_healthy(false);
        }
        let mut c = s.reborrow().init_cluster();
        c.set_node(&member.node);
        c.set_lease(state);
        c.set_lease_ttl_secs(member.lease.ttl().as_secs() as u32);
        c.set_since_renewal_ms(member.lease.since_renewal().as_millis() as u64);
        let mut etcd = c.reborrow().init_etcd(member.etcd.len() as u32);
        for (i, e) in member.etcd.iter().enumerate() {
            etcd.set(i as u32, e);
        }
        c.set_replicate_interval_secs(member.replicate_interval.as_secs() as u32);
        let mut list = c.reborrow().init_replication_lagging(lagging.len() as u32);
        for (i, l) in lagging.iter().enumerate() {
            list.set(i as u32, l);
        }
        let mut list = c.init_nodes(nodes.len() as u32);
        for (i, (n, state)) in nodes.iter().enumerate() {
            let mut out = list.reborrow().get(i as u32);
            out.set_name(&n.record.name);
            out.set_state(state);
            out.set_lease_age_secs(n.lease_age_secs.unwrap_or(-1));
            out.set_grains(n.grains as u32);
            out.set_free_bytes(n.alive.as_ref().map_or(0, |a| a.free_bytes));
        }
    }
    let mut listeners = s.init_listeners(info.listeners.len() as u32);
    for (i, (name, address)) in info.listeners.iter().enumerate() {
        let mut l = listeners.reborrow().get(i as u32);
        l.set_name(name);
        l.set_address(address);
    }
    Ok(())
}

/// Every member and its state; none when etcd does not answer in 2 s.
async fn node_health(
    member: &crate::daemon::cluster::Member,
) -> Vec<(granary_cluster::NodeStatus, &'static str)> {
    let c = &member.coordinator;
    let read =
        async { Ok::<_, granary_cluster::ClusterError>((c.nodes().await?, c.resting().await?)) };
    match tokio::time::timeout(std::time::Duration::from_secs(2), read).await {
        Ok(Ok((nodes, resting))) => nodes
            .into_iter()
            .map(|n| {
                let state = n.state(&resting);
                (n, state)
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// Grains this node runs whose newest copy elsewhere is more than three
/// replication intervals old ("alice-mail 250s"); none when replication is
/// off or etcd does not answer within 2 s.
async fn lagging_grains(
    member: &crate::daemon::cluster::Member,
    datasets: &Arc<dyn granary_datasets::Datasets>,
) -> Vec<String> {
    let lags = crate::daemon::cluster::replication_lags(member, datasets).await;
    let limit = 3 * member.replicate_interval.as_secs() as i64;
    lags.into_iter()
        // Only data that exists here can be behind.
        .filter(|(grain, lag)| *lag > limit && datasets.has_data(grain).unwrap_or(false))
        .map(|(grain, lag)| format!("{grain} {lag}s"))
        .collect()
}
