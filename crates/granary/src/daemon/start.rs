//! Daemon start-up: the datasets backend, the grain records, and the
//! supervisor on its own thread (reached through [`LocalGrains`]).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use granary_config::Config;
use granary_state::Store;
use granary_supervisor::{LocalGrains, SupervisorThread};

/// The storage backend for every grain's `/var`, as configured; what a
/// crash left of restores, drills and snapshot views is removed.
pub(super) async fn datasets(
    config: &Config,
) -> anyhow::Result<Arc<dyn granary_datasets::Datasets>> {
    let grains_dir = config.data_dir.join("grains");
    let datasets: Arc<dyn granary_datasets::Datasets> = match &config.storage {
        granary_config::StorageBackend::Plain => Arc::new(
            granary_datasets::Plain::new(&grains_dir)
                .with_context(|| format!("cannot use {}", grains_dir.display()))?,
        ),
        granary_config::StorageBackend::Zfs {
            dataset,
            quota_bytes,
        } => Arc::new(
            granary_datasets::Zfs::new(&grains_dir, dataset, *quota_bytes)
                .context("storage.backend = \"zfs\"")?,
        ),
        granary_config::StorageBackend::Btrfs { quota_bytes } => Arc::new(
            granary_datasets::Btrfs::new(&grains_dir, *quota_bytes)
                .context("storage.backend = \"btrfs\"")?,
        ),
    };
    let ds = datasets.clone();
    match tokio::task::spawn_blocking(move || ds.remove_scratch()).await? {
        Ok(removed) => {
            for name in removed {
                tracing::info!(dataset = %name, "removed a leftover scratch dataset");
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot remove leftover scratch datasets"),
    }
    Ok(datasets)
}

/// Makes a grain record for every user and installed app (repairing any a
/// crash missed), then starts the supervisor on its thread: the launcher
/// beside this binary, apps under DATA_DIR/apps.
pub(super) async fn supervisor(
    config: &Config,
    store: &Arc<Store>,
    datasets: Arc<dyn granary_datasets::Datasets>,
    member: Option<Arc<super::cluster::Member>>,
    xmpp_outbound: Option<granary_supervisor::XmppOutbound>,
    https: Option<std::net::SocketAddr>,
) -> anyhow::Result<(LocalGrains, SupervisorThread)> {
    let apps_dir = apps_dir(config)?;
    let launcher = std::env::current_exe()
        .context("cannot find this executable")?
        .with_file_name("granary-launcher");
    if !launcher.exists() {
        tracing::warn!(launcher = %launcher.display(), "granary-launcher is missing beside granary; grains cannot start");
    }
    let uids = granary_state::HostUid::FirstFreeIn(config.uid_range);
    let s = store.clone();
    let made = tokio::task::spawn_blocking(move || s.retrying(|s| s.ensure_grains(uids, "daemon")))
        .await??;
    for g in made {
        tracing::info!(grain = %g.id, "grain record created");
    }
    let g = &config.grains;
    let start_gate = member.clone().map(|member| {
        Arc::new(ClusterGate {
            member,
            runtime: tokio::runtime::Handle::current(),
        }) as Arc<dyn granary_supervisor::StartGate>
    });
    let remote_grants = member.map(|member| {
        Arc::new(ClusterGrants {
            member,
            records: Arc::new(super::ledger::NodeRecords {
                store: store.clone(),
                apps_dir: apps_dir.clone(),
            }),
            runtime: tokio::runtime::Handle::current(),
        }) as Arc<dyn granary_supervisor::RemoteGrants>
    });
    let params = granary_supervisor::SupervisorParams {
        store: store.clone(),
        datasets,
        start_gate,
        remote_grants,
        jail: granary_jail::JailConfig {
            data_root: config.data_dir.join("grains"),
            uid_range: config.uid_range,
            cgroup: granary_jail::JailConfig::detect_cgroup(),
            cgroup_parent: config.cgroup_parent.clone(),
        },
        launcher,
        apps_dir,
        config: granary_supervisor::SupervisorConfig {
            idle_timeout: g.idle_timeout,
            restart_backoff: g.restart_backoff,
            restart_backoff_max: g.restart_backoff_max,
            crash_loop_crashes: g.crash_loop_crashes,
            crash_window: g.crash_window,
            shutdown_grace: g.shutdown_grace,
            max_message_bytes: g.max_message_bytes,
            max_in_flight: g.max_in_flight as usize,
            flood_cutoff: g.flood_cutoff,
            call_timeout: g.call_timeout,
            audit_flush: g.audit_flush,
            snapshot_interval: config.snapshots.interval,
            retention: granary_datasets::Grid {
                rules: config
                    .snapshots
                    .keep
                    .iter()
                    .map(|(period, n)| (period.as_secs() as i64, *n))
                    .collect(),
            },
            freeze_limit: config.snapshots.freeze_limit,
            domain: config.domain.clone(),
            kind_env: [("xmpp".to_owned(), xmpp_env(config, https))].into(),
            xmpp_outbound,
            rooms_per_user: config.xmpp.rooms_per_user,
        },
    };
    LocalGrains::spawn(params).context("cannot start the grain supervisor")
}

/// What chat grains get in their environment: `[xmpp]`, and where their
/// shared files are served (`upload.<domain>`, on the https listener's
/// port; no https listener: no uploads).
fn xmpp_env(config: &Config, https: Option<std::net::SocketAddr>) -> Vec<String> {
    let mut env = config.xmpp.grain_env();
    if let Some(addr) = https {
        let host = format!("upload.{}", config.domain);
        let base = match addr.port() {
            443 => format!("https://{host}"),
            port => format!("https://{host}:{port}"),
        };
        env.push(format!("GRANARY_XMPP_UPLOAD_URL={base}"));
    }
    env
}

/// DATA_DIR/apps, made if missing.
/// Federation with other chat servers (the `xmpp-s2s` listener is on):
/// its dialback secret is derived from the SSH host key, which is kept
/// across restarts.
pub(super) fn federation(
    config: &Config,
    grains: Arc<dyn granary_grains::Grains>,
    chat_domains: Arc<granary_gateway::ChatDomains>,
    tls: &Arc<rustls::ServerConfig>,
    secret: &[u8],
    stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<Arc<granary_gateway::s2s::Federation>> {
    let x = &config.xmpp;
    let checker = granary_gateway::smtp::checks::Checker::new(
        &config.domain,
        x.s2s_resolver.or(config.mail.resolver),
    )
    .map_err(anyhow::Error::msg)
    .context("xmpp.s2s_resolver")?;
    granary_gateway::s2s::Federation::new(
        granary_gateway::s2s::S2sSettings {
            require_verified: x.s2s_require_verified,
            idle: x.s2s_idle,
            connections_per_domain: x.s2s_connections_per_domain,
            stanzas_per_second: x.s2s_stanzas_per_second,
            max_stanza: x.max_stanza_bytes as usize,
            default_port: 5269,
            connect_timeout: std::time::Duration::from_secs(10),
            allow_private_addresses: x.s2s_allow_private_addresses,
        },
        checker,
        grains,
        chat_domains,
        tls.cert_resolver.clone(),
        x.s2s_ca.as_deref(),
        secret,
        stop,
    )
    .map_err(anyhow::Error::msg)
}

/// DATA_DIR/tmp (owner-only), made if missing: where bytes wait in
/// unlinked files, on the data dir's disk.
pub(super) fn scratch_dir(config: &Config) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = config.data_dir.join("tmp");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}

pub(super) fn apps_dir(config: &Config) -> anyhow::Result<PathBuf> {
    let apps_dir = config.data_dir.join("apps");
    std::fs::create_dir_all(&apps_dir)
        .with_context(|| format!("cannot create {}", apps_dir.display()))?;
    Ok(apps_dir)
}

/// The packages `./granary-demo` built and signed with this host's key.
pub(super) fn builtin_packages(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "gpkg"))
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found
}

/// The supervisor's start gate on a cluster node: [`super::cluster::admit`],
/// run on the daemon's runtime (where the etcd client lives) whichever
/// thread asks.
struct ClusterGate {
    member: Arc<super::cluster::Member>,
    runtime: tokio::runtime::Handle,
}

impl granary_supervisor::StartGate for ClusterGate {
    fn admit(
        &self,
        grain: &str,
        image: PathBuf,
        exec: String,
        datasets: Arc<dyn granary_datasets::Datasets>,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<(), granary_supervisor::StartRefused>> + Send>,
    > {
        let member = self.member.clone();
        let grain = grain.to_owned();
        let task = self.runtime.spawn(async move {
            super::cluster::admit(&member, &grain, image, exec, datasets).await
        });
        Box::pin(async move {
            task.await
                .unwrap_or_else(|e| Err(format!("the cluster check failed: {e}")))
                .map_err(granary_supervisor::StartRefused)
        })
    }
}

/// Capabilities whose provider runs on another node, for the supervisor:
/// [`granary_cluster::open_grant`] on the daemon's runtime.
struct ClusterGrants {
    member: Arc<super::cluster::Member>,
    records: Arc<super::ledger::NodeRecords>,
    runtime: tokio::runtime::Handle,
}

impl granary_supervisor::RemoteGrants for ClusterGrants {
    fn befriend(
        &self,
        grain: String,
        jid: String,
        name: String,
    ) -> granary_supervisor::RemoteDeliver {
        let member = self.member.clone();
        let task = self.runtime.spawn(async move {
            let grain = granary_model::GrainId::parse(&grain).ok()?;
            let c = &member.coordinator;
            granary_cluster::befriend_elsewhere(c, &member.node, &member.key, &grain, &jid, &name)
                .await
        });
        Box::pin(async move { task.await.ok().flatten() })
    }

    fn deliver_xmpp(
        &self,
        grain: String,
        stanza: granary_grains::mail::XmppStanza,
    ) -> granary_supervisor::RemoteDeliver {
        let (member, records) = (self.member.clone(), self.records.clone());
        let task = self.runtime.spawn(async move {
            let grain = granary_model::GrainId::parse(&grain).ok()?;
            let c = &member.coordinator;
            granary_cluster::deliver_stanza(c, &*records, &member.node, &member.key, &grain, stanza)
                .await
        });
        Box::pin(async move { task.await.ok().flatten() })
    }

    fn open(&self, grant: i64, holder: String, provider: String) -> granary_supervisor::RemoteOpen {
        let (member, records) = (self.member.clone(), self.records.clone());
        let task = self.runtime.spawn(async move {
            let (Ok(holder), Ok(provider)) = (
                granary_model::GrainId::parse(&holder),
                granary_model::GrainId::parse(&provider),
            ) else {
                return None;
            };
            let c = &member.coordinator;
            granary_cluster::open_grant(
                c,
                &*records,
                &member.node,
                &member.key,
                grant,
                &holder,
                &provider,
            )
            .await
        });
        Box::pin(async move {
            task.await
                .unwrap_or_else(|e| Some(Err(format!("asking the provider's node failed: {e}"))))
        })
    }
}
