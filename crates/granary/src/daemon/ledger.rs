//! The cluster's log of shared records as this node's state store sees
//! it: `granary_state::Ledger` over `granary_cluster`'s etcd log.

use std::future::Future;
use std::time::Duration;

use granary_cluster::{Coordinator, LEDGER_DEADLINE};

/// The shared log for a node's state store, which calls it from blocking
/// code: each call runs the etcd request on the daemon's runtime and waits.
pub(crate) struct EtcdLedger {
    coordinator: Coordinator,
    runtime: tokio::runtime::Handle,
}

impl EtcdLedger {
    /// Must be made on the runtime whose etcd connection it uses.
    pub(crate) fn new(coordinator: Coordinator) -> EtcdLedger {
        EtcdLedger {
            coordinator,
            runtime: tokio::runtime::Handle::current(),
        }
    }

    /// Runs `f` on the daemon's runtime (its timers too) and waits, at
    /// most `deadline` when given: a write holds the state database while
    /// it appends, so an etcd that stopped answering must not hold it long.
    fn wait<T, F: Future<Output = Result<T, granary_cluster::ClusterError>>>(
        &self,
        f: F,
        deadline: Option<Duration>,
    ) -> Result<T, String> {
        let run = async {
            match deadline {
                Some(d) => tokio::time::timeout(d, f)
                    .await
                    .map_err(|_| format!("etcd did not answer within {d:?}"))?
                    .map_err(|e| e.to_string()),
                None => f.await.map_err(|e| e.to_string()),
            }
        };
        // On a runtime worker, hand its other tasks on first; on a blocking
        // thread this runs as it is.
        tokio::task::block_in_place(|| self.runtime.block_on(run))
    }
}

impl granary_state::Ledger for EtcdLedger {
    fn id(&self) -> Result<String, String> {
        self.wait(
            async { self.coordinator.info().await.map(|i| i.id) },
            Some(LEDGER_DEADLINE),
        )
    }

    fn entries_after(&self, seq: u64) -> Result<Vec<(u64, Vec<u8>)>, String> {
        // Deadlines per page, in log_after.
        self.wait(self.coordinator.log_after(seq), None)
    }

    fn append(&self, seq: u64, entry: &[u8]) -> Result<bool, String> {
        self.wait(
            self.coordinator.log_append(seq, entry),
            Some(LEDGER_DEADLINE),
        )
        .map_err(|e| format!("{e} (if etcd took the change after all, every node applies it)"))
    }
}

/// Connects to the cluster's etcd as `[cluster]` says: over TLS with the
/// CA and client certificate named there when its URLs are `https://`.
pub(crate) async fn connect_etcd(
    cluster: &granary_config::Cluster,
) -> anyhow::Result<granary_cluster::Coordinator> {
    use anyhow::Context;
    let tls = match &cluster.etcd_tls {
        None => None,
        Some(files) => {
            // Parsed here, so a wrong file is named; tonic would only say
            // "transport error" at the first request.
            let read = |path: &std::path::Path, key: &str| -> anyhow::Result<Vec<u8>> {
                use rustls::pki_types::pem::PemObject;
                use rustls::pki_types::{CertificateDer, PrivateKeyDer};
                let bytes = std::fs::read(path)
                    .with_context(|| format!("cannot read cluster.{key} {}", path.display()))?;
                let usable = if key == "etcd_key" {
                    PrivateKeyDer::from_pem_slice(&bytes).is_ok()
                } else {
                    let certs: Vec<_> = CertificateDer::pem_slice_iter(&bytes).collect();
                    !certs.is_empty() && certs.iter().all(Result::is_ok)
                };
                if !usable {
                    anyhow::bail!(
                        "cluster.{key} {}: not a PEM {}",
                        path.display(),
                        if key == "etcd_key" {
                            "private key"
                        } else {
                            "certificate"
                        }
                    );
                }
                Ok(bytes)
            };
            Some(granary_cluster::EtcdTls {
                ca: read(&files.ca, "etcd_ca")?,
                client: match &files.client {
                    Some((cert, key)) => Some((read(cert, "etcd_cert")?, read(key, "etcd_key")?)),
                    None => None,
                },
            })
        }
    };
    granary_cluster::Coordinator::connect(&cluster.etcd, &cluster.prefix, tls.as_ref())
        .await
        .with_context(|| format!("cannot reach etcd at {}", cluster.etcd.join(", ")))
}

/// The shared records as the cluster layer asks about them.
pub(crate) struct NodeRecords {
    pub(crate) store: std::sync::Arc<granary_state::Store>,
    pub(crate) apps_dir: std::path::PathBuf,
}

impl granary_cluster::Records for NodeRecords {
    fn arches_of(
        &self,
        grain: &granary_model::GrainId,
    ) -> granary_grains::GrainsFuture<Option<Vec<granary_cluster::Arch>>> {
        let (store, apps_dir, id) = (self.store.clone(), self.apps_dir.clone(), grain.to_string());
        Box::pin(async move {
            Ok(tokio::task::spawn_blocking(move || {
                let g = store.grain(&id).ok()??;
                let app = store.app(&g.kind).ok()??;
                let manifest = granary_model::Manifest::parse(&app.manifest).ok()?;
                // A package with an image per architecture says which.
                if !manifest.arches.is_empty() {
                    let arches = manifest
                        .arches
                        .iter()
                        .filter_map(|a| granary_cluster::Arch::parse(a));
                    return Some(arches.collect());
                }
                let exec = manifest.exec.first()?.clone();
                let image = apps_dir.join(app.image_dir()).join("image");
                crate::daemon::cluster::arch_of(&image, &exec).map(|a| vec![a])
            })
            .await
            .ok()
            .flatten())
        })
    }

    fn position(&self) -> u64 {
        self.store.position()
    }

    fn reach(
        &self,
        n: u64,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send>> {
        let store = self.store.clone();
        Box::pin(async move {
            if store.position() >= n {
                return Ok(());
            }
            let reading = store.clone();
            tokio::task::spawn_blocking(move || reading.catch_up())
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            match store.position() {
                at if at >= n => Ok(()),
                at => Err(format!("read the log to entry {at}, not {n}")),
            }
        })
    }
}

/// Cuts, on this node, every live capability of a grant another node
/// revoked: after the shared records move on (looked at every 200 ms, a
/// read of one counter), the revoked grants are compared with those
/// already cut. A revoke made on this node has cut its own at once; telling
/// the supervisor again is harmless. A grant is known by more than its id,
/// which a later grant may be given once the first is deleted.
pub(crate) fn follow_revocations(
    store: std::sync::Arc<granary_state::Store>,
    grains: std::sync::Arc<dyn granary_grains::Grains>,
) {
    tokio::spawn(async move {
        let mut cut = std::collections::BTreeSet::new();
        // The first pass tells every revoke: one may have been applied
        // after the supervisor started and before this looked.
        let mut seen = None;
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let now = store.position();
            if seen == Some(now) {
                continue;
            }
            let s = store.clone();
            let revoked = tokio::task::spawn_blocking(move || s.revoked_grants()).await;
            let Ok(Ok(revoked)) = revoked else {
                continue;
            };
            seen = Some(now);
            for (id, what) in revoked {
                if cut.insert((id, what)) {
                    tracing::debug!(grant = id, "a revoked grant; cutting its capabilities here");
                    let _ = grains.grant_revoked(id).await;
                }
            }
        }
    });
}

/// Stops `user`'s own grains through `grains` (on-demand instances such as
/// a group chat they made serve others too, and are left running): how
/// disabling a user ends their open sessions. How many were running.
pub(crate) async fn stop_user_grains(
    store: &std::sync::Arc<granary_state::Store>,
    grains: &dyn granary_grains::Grains,
    user: &str,
) -> u32 {
    let (s, u) = (store.clone(), user.to_owned());
    let list = match tokio::task::spawn_blocking(move || s.grains_where(Some(&u), None)).await {
        Ok(Ok(list)) => list,
        _ => {
            tracing::warn!(user, "cannot list a disabled user's grains to stop them");
            return 0;
        }
    };
    let mut stopped = 0;
    for g in list.iter().filter(|g| g.instance.is_empty()) {
        let Ok(id) = granary_grains::GrainId::parse(&g.id) else {
            continue;
        };
        match grains.stop(&id).await {
            Ok(true) => stopped += 1,
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(grain = %g.id, error = %e, "cannot stop a disabled user's grain")
            }
        }
    }
    stopped
}

/// Follows users disabled on any node (through the shared log): this
/// node forgets its verified logins and stops their grains it runs, as
/// the node where it was done did with its own.
pub(crate) fn follow_disabled(
    store: std::sync::Arc<granary_state::Store>,
    grains: std::sync::Arc<dyn granary_grains::Grains>,
    verified: std::sync::Arc<granary_gateway::VerifiedLogins>,
) {
    tokio::spawn(async move {
        // The first look is what was disabled before this node started.
        let mut known: Option<std::collections::BTreeSet<(String, i64)>> = None;
        let mut seen = None;
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let now = store.position();
            if seen == Some(now) {
                continue;
            }
            let s = store.clone();
            let Ok(Ok(disabled)) = tokio::task::spawn_blocking(move || s.disabled_users()).await
            else {
                continue;
            };
            seen = Some(now);
            let disabled: std::collections::BTreeSet<(String, i64)> =
                disabled.into_iter().collect();
            let fresh: Vec<String> = match &known {
                Some(k) => disabled.difference(k).map(|(u, _)| u.clone()).collect(),
                None => Vec::new(),
            };
            known = Some(disabled);
            if fresh.is_empty() {
                continue;
            }
            verified.forget_all();
            for user in fresh {
                let stopped = stop_user_grains(&store, &*grains, &user).await;
                tracing::info!(
                    user,
                    stopped,
                    "a user disabled on another node; stopped their grains here"
                );
            }
        }
    });
}

/// A grain quota as the state keeps it: 0 for none, else bytes.
pub(crate) fn quota(stored: u64) -> granary_datasets::Quota {
    match stored {
        0 => granary_datasets::Quota::Unlimited,
        b => granary_datasets::Quota::Bytes(b),
    }
}

/// Tells the storage every grain's quota the admin set (at start).
pub(crate) fn load_quotas(
    store: &granary_state::Store,
    datasets: &dyn granary_datasets::Datasets,
) -> Result<(), granary_state::StateError> {
    if let Some(quotas) = datasets.quotas() {
        let set = store.grain_quotas()?;
        quotas.replace(set.into_iter().map(|(id, q)| (id, quota(q))));
    }
    Ok(())
}

/// The grains whose dataset here has another quota than the one kept for
/// them (what a node that was away when it changed still has).
fn stale_quotas(
    store: &granary_state::Store,
    datasets: &dyn granary_datasets::Datasets,
) -> Vec<(String, granary_datasets::Quota)> {
    let (Some(quotas), Ok(spaces), Ok(grains)) =
        (datasets.quotas(), datasets.spaces(), store.list_grains())
    else {
        return Vec::new();
    };
    grains
        .into_iter()
        .filter_map(|g| {
            let space = spaces.get(&g.id)?;
            (space.quota != quotas.limit(&g.id)).then(|| {
                let q = quotas.get(&g.id);
                (g.id, q)
            })
        })
        .collect()
}

/// Follows quotas set on any node (through the shared log): the storage
/// here keeps them for the datasets it makes, and applies a changed one to
/// the grain's dataset here, if the grain runs here (replicas are plain
/// copies, without quotas).
pub(crate) fn follow_quotas(
    store: std::sync::Arc<granary_state::Store>,
    datasets: std::sync::Arc<dyn granary_datasets::Datasets>,
) {
    if datasets.quotas().is_none() {
        return;
    }
    tokio::spawn(async move {
        let mut known: Option<std::collections::BTreeMap<String, u64>> = None;
        let mut seen = None;
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let now = store.position();
            if seen == Some(now) {
                continue;
            }
            let s = store.clone();
            let Ok(Ok(set)) = tokio::task::spawn_blocking(move || s.grain_quotas()).await else {
                continue;
            };
            seen = Some(now);
            let set: std::collections::BTreeMap<String, u64> = set.into_iter().collect();
            // The first look applies every quota, and puts back the
            // default where a dataset here has another: one may have
            // changed while this node was away, and a ZFS dataset keeps
            // the old.
            let first = known.is_none();
            let before = known.replace(set.clone()).unwrap_or_default();
            let changed: Vec<(String, granary_datasets::Quota)> = set
                .iter()
                .filter(|(id, q)| before.get(*id) != Some(q))
                .map(|(id, q)| (id.clone(), quota(*q)))
                .chain(
                    before
                        .keys()
                        .filter(|id| !set.contains_key(*id))
                        .map(|id| (id.clone(), granary_datasets::Quota::Default)),
                )
                .collect();
            let (d, s) = (datasets.clone(), store.clone());
            let _ = tokio::task::spawn_blocking(move || {
                let mut changed = changed;
                if first {
                    changed.extend(stale_quotas(&s, &*d));
                }
                for (id, q) in changed {
                    match d.set_quota(&id, q) {
                        Ok(()) => tracing::debug!(grain = id, quota = ?q, "quota applied"),
                        Err(e) => {
                            // The state says so: what this node makes
                            // from now on follows it all the same.
                            if let Some(quotas) = d.quotas() {
                                quotas.put(&id, q);
                            }
                            tracing::warn!(grain = id, error = %e, "a quota set on another node cannot be applied to the dataset here");
                        }
                    }
                }
            })
            .await;
        }
    });
}
