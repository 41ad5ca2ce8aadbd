//! This daemon as a member of a cluster: at start it must be a member
//! (`granary node join`) with this data dir's node key, and it takes its
//! lease; while it runs it renews it and reports its free space; when it
//! stops it releases the lease, so other nodes see it gone at once.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use granary_cluster::{Arch, Coordinator, LeaseState, NodeLease, Refusal};
use granary_config::Config;

/// This node's membership while the daemon runs.
pub(crate) struct Member {
    pub(crate) node: String,
    /// What app images this node runs (`[cluster].arches`).
    pub(crate) arches: Vec<Arch>,
    pub(crate) etcd: Vec<String>,
    pub(crate) coordinator: Coordinator,
    pub(crate) lease: NodeLease,
    /// This node's key, for links it opens to fetch packages and move
    /// grains.
    pub(crate) key: Arc<granary_package::SigningKey>,
    limits: granary_package::Limits,
    /// Where this node's app images live (`DATA_DIR/apps`).
    apps_dir: std::path::PathBuf,
    /// One package fetch at a time: two starts of one app fetch it once.
    fetching: tokio::sync::Mutex<()>,
    /// `[cluster].replicas` and `replicate_interval`.
    pub(crate) replicas: u32,
    pub(crate) replicate_interval: Duration,
    /// The node link address other nodes are told, and the lease TTL
    /// asked for: what a new lease is taken with.
    pub(crate) link: String,
    pub(crate) lease_ttl: Duration,
    /// Set while this node is fenced (`daemon::fence`).
    pub(crate) fenced: std::sync::atomic::AtomicBool,
    /// Set once the daemon begins to stop: failover, rejoining and the
    /// mail keeper take nothing more.
    pub(crate) stopping: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Member")
            .field("node", &self.node)
            .field("lease", &self.lease.id())
            .finish_non_exhaustive()
    }
}

impl Member {
    pub(crate) fn stopping(&self) -> bool {
        self.stopping.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// How the lease stands, and whether the node is fenced because of
    /// it (every grain stopped; cleared once the lease is live again and
    /// the fence has looked).
    pub(crate) fn lease_state(&self) -> &'static str {
        let fenced = self.fenced.load(std::sync::atomic::Ordering::Relaxed);
        match (self.lease.state(), fenced) {
            (LeaseState::Live, false) => "live",
            (LeaseState::Live, true) => "live, still fenced",
            (LeaseState::Lapsing, false) => "lapsing",
            (LeaseState::Lapsing, true) => "lapsing, fenced",
            (LeaseState::Lost, false) => "lost",
            (LeaseState::Lost, true) => "lost, fenced",
        }
    }
}

/// The node link address other nodes are told: `[cluster].address` as
/// written, with the port the kernel picked when it says 0. An address
/// that names no particular interface cannot be told to anyone.
fn advertised(configured: &str, bound: std::net::SocketAddr) -> anyhow::Result<String> {
    if bound.ip().is_unspecified() {
        bail!(
            "cluster.address {configured} names no interface; give this node's own address, the one other nodes reach it at"
        );
    }
    Ok(match configured.rsplit_once(':') {
        Some((host, "0")) => format!("{host}:{}", bound.port()),
        _ => configured.to_owned(),
    })
}

/// Free bytes under the data dir, as this node reports its room.
fn free_bytes(dir: &Path) -> u64 {
    crate::daemon::disk_space(dir).map_or(0, |(free, _)| free)
}

/// Takes this node's lease when `[cluster]` is configured, with its node
/// link bound at `[cluster].address` (served by [`serve_links`] once the
/// grains run); `None` without.
pub(crate) async fn join(
    config: &Config,
) -> anyhow::Result<Option<(Arc<Member>, tokio::net::TcpListener)>> {
    let Some(cluster) = &config.cluster else {
        return Ok(None);
    };
    let links = tokio::net::TcpListener::bind(&cluster.address)
        .await
        .with_context(|| {
            format!(
                "cannot listen for node links on cluster.address {}",
                cluster.address
            )
        })?;
    let link = advertised(&cluster.address, links.local_addr()?)?;
    let coordinator = crate::daemon::ledger::connect_etcd(cluster).await?;
    coordinator.info().await?;
    let key = granary_backup::node_key(&config.data_dir)?.public().hex();
    match coordinator.node(&cluster.node).await? {
        None => bail!(
            "node {:?} is not a member of the cluster: run `granary cluster token` on a member \
             and pipe it to `granary node join` here",
            cluster.node
        ),
        Some(record) if record.key != key => bail!(
            "the cluster's node {:?} has another node key ({}…) than this data dir ({}…): \
             this data dir is not that node",
            cluster.node,
            &record.key[..16.min(record.key.len())],
            &key[..16]
        ),
        Some(_) => {}
    }
    // Host uids are picked from the shared grain records: every node must
    // give grains the same range, or a grain could not run where it moves.
    let mine = config.uid_range.to_string();
    let theirs = coordinator.uid_range(&mine).await?;
    if theirs != mine {
        bail!(
            "jail.uid_range is {mine} here and {theirs} on the cluster's other nodes: \
             every node of a cluster gives grains the same host uid range (grains' uids are picked cluster-wide); \
             set jail.uid_range = \"{theirs}\""
        );
    }
    let lease = coordinator
        .hold_lease(
            &cluster.node,
            cluster.lease_ttl,
            free_bytes(&config.data_dir),
            &link,
        )
        .await?;
    tracing::info!(node = %cluster.node, lease = lease.id(), ttl = ?lease.ttl(), "holding this node's cluster lease");
    let member = Arc::new(Member {
        node: cluster.node.clone(),
        arches: cluster
            .arches
            .iter()
            .filter_map(|a| Arch::parse(a))
            .collect(),
        etcd: cluster.etcd.clone(),
        coordinator,
        lease,
        key: Arc::new(granary_backup::node_key(&config.data_dir)?),
        limits: crate::package_limits(config),
        apps_dir: config.data_dir.join("apps"),
        fetching: tokio::sync::Mutex::new(()),
        replicas: cluster.replicas,
        replicate_interval: cluster.replicate_interval,
        link,
        lease_ttl: cluster.lease_ttl,
        fenced: std::sync::atomic::AtomicBool::new(false),
        stopping: std::sync::atomic::AtomicBool::new(false),
    });
    tokio::spawn(watch(member.clone(), config.data_dir.clone()));
    Ok(Some((member, links)))
}

/// Makes this node's state store a cache of the cluster's shared records
/// (users, credentials, apps, grains, grants, domains: see
/// `granary_state::Ledger`) before anything here writes to it, then keeps
/// it following the log: every new entry is applied as etcd announces it
/// (a watch), and at least every 5 s in case a watch missed one. A node
/// whose database holds records the cluster's log does not is refused.
pub(crate) async fn share_records(
    member: &Arc<Member>,
    store: &Arc<granary_state::Store>,
    config: &Config,
) -> anyhow::Result<()> {
    let local_ca =
        (!matches!(config.tls, granary_config::TlsSource::Files { .. })).then(|| config.tls_dir());
    let domain = config.domain.clone();
    let ledger = Arc::new(crate::daemon::ledger::EtcdLedger::new(
        member.coordinator.clone(),
    ));
    let s = store.clone();
    let joined = tokio::task::spawn_blocking(move || s.share(ledger))
        .await?
        .context("cannot share this node's records with the cluster")?;
    match joined {
        granary_state::Joined::Seeded { records } => tracing::info!(
            records,
            "this node's records are the first of the cluster's shared records"
        ),
        granary_state::Joined::CaughtUp { applied } => {
            tracing::info!(applied, "caught up with the cluster's shared records")
        }
    }
    // The certificate was made from this node's users before it caught up.
    crate::daemon::certificate::refresh(store, local_ca.clone(), &domain).await;
    let (member, store) = (member.clone(), store.clone());
    tokio::spawn(async move {
        let mut seen = None;
        loop {
            // The watch is made before reading, so nothing appended in
            // between goes unnoticed.
            let mut watch = match member.coordinator.watch_log().await {
                Ok(w) => Some(w),
                Err(e) => {
                    tracing::debug!(error = %e, "cannot watch the shared log");
                    None
                }
            };
            loop {
                let s = store.clone();
                match tokio::task::spawn_blocking(move || s.catch_up()).await {
                    Ok(Ok(applied)) => {
                        if seen.is_some_and(|s| s != applied) {
                            tracing::debug!(applied, "applied the cluster's shared records");
                            // Users' subdomains are in the local CA's certificate.
                            crate::daemon::certificate::refresh(&store, local_ca.clone(), &domain)
                                .await;
                        }
                        seen = Some(applied);
                    }
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "cannot apply the cluster's shared records")
                    }
                    Err(e) => tracing::error!(error = %e, "applying the cluster's shared records"),
                }
                let Some(w) = watch.as_mut() else {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    break;
                };
                // A new entry, or 5 s: look again either way.
                if let Ok(Err(e)) = tokio::time::timeout(Duration::from_secs(5), w.changed()).await
                {
                    tracing::debug!(error = %e, "the shared log's watch broke");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    break;
                }
            }
        }
    });
    Ok(())
}

/// Serves node links: other nodes' connections to grains this node runs,
/// asked of `served.grains` (this node's own, never forwarded again),
/// package fetches and moves of grains to this node. The
/// keys accepted are those of members with a live lease, read from etcd
/// at start, whenever an `alive` record changes, and every 10 s.
pub(crate) fn serve_links(
    member: Arc<Member>,
    listener: tokio::net::TcpListener,
    key: granary_package::SigningKey,
    served: granary_cluster::link::Served,
) {
    let members = granary_cluster::link::Members::default();
    tokio::spawn(async move {
        let refresh = async |members: &granary_cluster::link::Members| match member
            .coordinator
            .live_member_keys()
            .await
        {
            Ok(keys) => members.set(keys),
            Err(e) => tracing::warn!(error = %e, "cannot refresh the cluster's node keys"),
        };
        // Known before the first link is taken.
        refresh(&members).await;
        let serving = members.clone();
        tokio::spawn(async move {
            if let Err(e) = granary_cluster::link::serve(listener, &key, serving, served).await {
                tracing::error!(error = %e, "the node link listener failed");
            }
        });
        // Again whenever a node starts, stops or dies, and every 10 s in
        // case a watch missed something.
        loop {
            let changed = member.coordinator.alive_changed();
            if let Ok(Err(e)) = tokio::time::timeout(Duration::from_secs(10), changed).await {
                // etcd unreachable: do not spin on a watch that fails at once.
                tracing::debug!(error = %e, "watching the cluster's nodes");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            refresh(&members).await;
        }
    });
}

/// Reports free space every minute.
async fn watch(member: Arc<Member>, data_dir: std::path::PathBuf) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let free = free_bytes(&data_dir);
                if let Err(e) = member.coordinator.report(&member.lease, free).await {
                    tracing::warn!(error = %e, "cannot report this node's free space");
                }
            }
            () = member.lease.lost() => {
                // `fence::rejoin_when_lost` takes a new one.
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// The architecture of the app's program `exec` (as the grain names it,
/// inside `image`), if it is an ELF file. Opened beneath the image root
/// with no symlinks followed, so nothing outside the image is read.
pub(crate) fn arch_of(image: &Path, exec: &str) -> Option<Arch> {
    use std::io::Read;
    let root = std::fs::File::open(image).ok()?;
    let mut file =
        granary_files::open_beneath(&root, Path::new(exec.trim_start_matches('/')), false).ok()?;
    let mut header = [0u8; 20];
    file.read_exact(&mut header).ok()?;
    Arch::of_elf(&header)
}

/// Whether this node may start `grain` now: the supervisor's start gate on
/// a cluster node (the adapter is in `start.rs`). A grain with no
/// placement yet is placed on this node (it was made here); then the node
/// may start it only under the cluster's start rule
/// ([`granary_cluster::may_start`]), and writes the placement's epoch into
/// its dataset first. Runs on the daemon's runtime, where the etcd
/// client's connection lives.
pub(crate) async fn admit(
    member: &Member,
    grain: &str,
    image: std::path::PathBuf,
    exec: String,
    datasets: Arc<dyn granary_datasets::Datasets>,
) -> Result<(), String> {
    let not_live = || {
        format!(
            "node {} may not start it: this node's cluster lease is {}",
            member.node,
            member.lease_state()
        )
    };
    if !member.lease.is_live() {
        return Err(not_live());
    }
    let c = &member.coordinator;
    let etcd = |e: granary_cluster::ClusterError| format!("cannot check with the cluster: {e}");
    let (ds, g) = (datasets.clone(), grain.to_owned());
    let held = tokio::task::spawn_blocking(move || ds.epoch(&g))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let mut permit = c
        .start_permit(grain, &member.lease, held)
        .await
        .map_err(etcd)?;
    // Refused anyway (placed elsewhere, an older placement): no fetch.
    if let Err(refusal) = &permit
        && *refusal != Refusal::NotPlaced
    {
        tracing::warn!(grain, %refusal, "refused to start a grain on this node");
        return Err(format!("node {} may not start it: {refusal}", member.node));
    }
    if !image.exists() {
        fetch_image(member, &image).await?;
    }
    let arch = tokio::task::spawn_blocking(move || arch_of(&image, &exec))
        .await
        .map_err(|e| e.to_string())?;
    if let Some(arch) = arch
        && !member.arches.contains(&arch)
    {
        let runs: Vec<&str> = member.arches.iter().map(|a| a.as_str()).collect();
        return Err(format!(
            "node {} runs only {} and the app is built for {arch}",
            member.node,
            runs.join(", ")
        ));
    }
    if permit == Err(Refusal::NotPlaced) {
        // Made here, never placed: place it here. If another node placed
        // it first, the rule refuses below.
        match c.place_on(grain, &member.node).await {
            Ok(p) => {
                tracing::info!(grain, node = %p.node, epoch = p.epoch, "placed a new grain on this node")
            }
            Err(granary_cluster::ClusterError::AlreadyPlaced { .. }) => {}
            Err(e @ granary_cluster::ClusterError::NoRoom { .. }) => {
                return Err(format!("node {} may not take it: {e}", member.node));
            }
            Err(e) => return Err(etcd(e)),
        }
        permit = c
            .start_permit(grain, &member.lease, held)
            .await
            .map_err(etcd)?;
    }
    // Data moved here starts only once its placement switched here.
    if let Ok(epoch) = permit {
        let (ds, g) = (datasets.clone(), grain.to_owned());
        tokio::task::spawn_blocking(move || {
            crate::daemon::moves::admit_arrival(&*ds, &g, epoch)?;
            crate::daemon::fence::writable_again(&*ds, &g)
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|why| format!("node {} may not start it yet: {why}", member.node))?;
    }
    let admitted = match permit {
        Ok(epoch) if held == Some(epoch) => Ok(()),
        Ok(epoch) => {
            let g = grain.to_owned();
            tokio::task::spawn_blocking(move || datasets.set_epoch(&g, epoch))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            tracing::debug!(grain, epoch, "cluster start admitted; epoch written");
            Ok(())
        }
        Err(refusal) => {
            tracing::warn!(grain, %refusal, "refused to start a grain on this node");
            Err(format!("node {} may not start it: {refusal}", member.node))
        }
    };
    // Writing the epoch can take a while (ZFS syncs): the lease must still
    // be trusted when the grain starts.
    match admitted {
        Ok(()) if !member.lease.is_live() => Err(not_live()),
        other => other,
    }
}

/// Puts on this node the image of an app another node installed from a
/// signed package: the package is fetched from a live member by its
/// content address (`apps/<kind>/<sha256>`, from the shared app record),
/// its signature and SHA-256 checked, and it is unpacked as an install
/// here would.
pub(crate) async fn fetch_image(member: &Member, image: &Path) -> Result<(), String> {
    // The image path comes from the shared app record: only
    // `<apps dir>/<kind>/<sha256>/image` is fetched, and only into this
    // node's apps dir.
    let parts: Vec<&str> = image
        .strip_prefix(&member.apps_dir)
        .ok()
        .map(|rest| {
            rest.components()
                .map(|c| match c {
                    std::path::Component::Normal(n) => n.to_str().unwrap_or("/"),
                    _ => "/",
                })
                .collect()
        })
        .unwrap_or_default();
    let (kind, sha256) = match parts.as_slice() {
        [kind, sha256, "image"]
            if granary_cluster::link::package_path(&member.apps_dir, kind, sha256).is_some() =>
        {
            ((*kind).to_owned(), (*sha256).to_owned())
        }
        _ => {
            return Err(format!(
                "the app's image is not on node {}, and an app installed unsigned (development mode) is not fetched from other nodes: install it on this node too",
                member.node
            ));
        }
    };
    let apps_dir = member.apps_dir.clone();
    let _one_at_a_time = member.fetching.lock().await;
    if image.exists() {
        return Ok(());
    }
    let nodes = member
        .coordinator
        .nodes()
        .await
        .map_err(|e| format!("cannot list the nodes to fetch the app's package from: {e}"))?;
    let mut tried = Vec::new();
    for n in nodes.iter().filter(|n| n.record.name != member.node) {
        let Some(alive) = &n.alive else { continue };
        let link = match alive.link.is_empty() {
            true => &n.record.address,
            false => &alive.link,
        };
        let fetched = granary_cluster::link::fetch_package(
            link,
            &n.record.key,
            &member.key,
            &kind,
            &sha256,
            member.limits.max_package_bytes,
        )
        .await;
        let bytes = match fetched {
            Ok(bytes) => bytes,
            Err(e) => {
                tried.push(format!("{}: {e}", n.record.name));
                continue;
            }
        };
        let runs = crate::daemon::install::host_first(member.arches.iter().map(|a| a.as_str()));
        let (apps, limits, k, sha, from) = (
            apps_dir.clone(),
            member.limits,
            kind.clone(),
            sha256.clone(),
            n.record.name.clone(),
        );
        let unpacked = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let verified = granary_package::open(&bytes, &limits)?;
            anyhow::ensure!(
                verified.sha256 == sha,
                "its SHA-256 is {}, not the {sha} the app record names",
                verified.sha256
            );
            let (manifest, _) = verified.inspect(&limits)?;
            anyhow::ensure!(manifest.kind == k, "it is an app of kind {}", manifest.kind);
            let pkg = crate::daemon::install::CheckedPackage {
                bytes,
                manifest,
                sha256: sha,
            };
            crate::daemon::install::unpack_package(&apps, &pkg, &limits, &runs)?;
            Ok(())
        })
        .await
        .map_err(|e| e.to_string())?;
        match unpacked {
            Ok(()) => {
                tracing::info!(
                    kind,
                    sha256,
                    from,
                    "fetched an app's package from another node"
                );
                return Ok(());
            }
            Err(e) => tried.push(format!("{from}: {e:#}")),
        }
    }
    if tried.is_empty() {
        tried.push("no other node is up".to_owned());
    }
    Err(format!(
        "the app's package ({kind} {sha256}) is not on node {} and could not be fetched: {}",
        member.node,
        tried.join("; ")
    ))
}

/// Marks the node at rest and releases the lease, on a clean stop.
pub(crate) async fn leave(member: Option<Arc<Member>>) {
    let Some(member) = member else { return };
    // Stopped on purpose: not failed over for a while (a restart). No new
    // lease may clear the mark.
    member.lease.forbid_retake();
    if let Err(e) = member.coordinator.rest(&member.node).await {
        tracing::warn!(error = %e, "cannot mark this node at rest; its grains may be failed over once its lease is gone");
    }
    if let Err(e) = member.lease.release().await {
        tracing::warn!(error = %e, "cannot release this node's lease; it expires by itself");
    }
}

/// How far behind each grain this node runs (with a dataset here) is: seconds
/// since its newest copy on another node was made (none: since it was
/// placed). Empty when nothing is replicated or etcd does not answer
/// within 2 s.
pub(crate) async fn replication_lags(
    member: &Member,
    datasets: &Arc<dyn granary_datasets::Datasets>,
) -> Vec<(String, i64)> {
    if member.replicas == 0 {
        return Vec::new();
    }
    let c = &member.coordinator;
    let read = async {
        Ok::<_, granary_cluster::ClusterError>((c.placements().await?, c.replicas().await?))
    };
    let Ok(Ok((placements, replicas))) =
        tokio::time::timeout(std::time::Duration::from_secs(2), read).await
    else {
        return Vec::new();
    };
    let lags =
        granary_cluster::replication_lag(&placements, &replicas, &member.node, super::unix_now());
    // Only data that exists here can be behind (a grain placed and never
    // run has nothing to copy); its dataset's mount point tells, cheaply.
    lags.into_iter()
        .filter(|(grain, _)| datasets.path(grain).exists())
        .collect()
}
