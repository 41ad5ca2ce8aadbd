//! The daemon: owns the data dir, the state database, the listeners and the
//! admin socket, and shuts all of them down cleanly on SIGTERM or SIGINT.
//!
//! Start-up order matters for "bad input changes nothing": the data dir lock
//! is taken before the database is opened, and the database is checked
//! before anything listens.

mod admin_server;
mod backup_admin;
mod gateway_backend;
mod grain_admin;
mod lock;
mod ports;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use granary_config::{Config, TlsSource};
use granary_gateway::https;
use granary_model::UserName;
use granary_state::Store;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

pub(crate) use ports::Ports;

/// The demo user `granary demo` creates.
pub(crate) const DEMO_USER: &str = "demo";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Serve,
    Demo,
}

/// What `granary status` reports about this daemon, fixed at start.
#[derive(Debug, Clone)]
pub(crate) struct DaemonInfo {
    pub(crate) started: Instant,
    pub(crate) data_dir: PathBuf,
    pub(crate) domain: String,
    pub(crate) storage_backend: &'static str,
    pub(crate) sandbox: String,
    pub(crate) ca_file: Option<PathBuf>,
    pub(crate) listeners: Vec<(String, String)>,
}

pub(crate) fn run(config: Config, mode: Mode) -> anyhow::Result<()> {
    crate::logging::install(&config)?;
    crate::check_uid_range(&config)?;
    let owner = nix::unistd::geteuid().as_raw();

    granary_files::ensure_private_dir(&config.data_dir, owner)
        .context("cannot use the data dir")?;
    granary_files::ensure_private_dir(&config.run_dir(), owner)
        .context("cannot use the run dir")?;
    let _lock = lock::DataDirLock::acquire(&config.lock_file())?;

    let state_dir = config
        .state_db()
        .parent()
        .expect("state db has a parent")
        .to_path_buf();
    granary_files::ensure_private_dir(&state_dir, owner).context("cannot use the state dir")?;
    let store = Arc::new(Store::open(&config.state_db())?);

    let (tls, ca_file) = match &config.tls {
        TlsSource::LocalCa => {
            let files =
                granary_gateway::tls::local_ca::ensure(&config.tls_dir(), &config.domain, owner)?;
            let tls = granary_gateway::tls::server_config(
                &files.server_cert,
                &files.server_key,
                Some(&config.tls_dir().join("domains")),
            )?;
            (tls, Some(files.ca_cert))
        }
        TlsSource::Files { cert, key } => (
            granary_gateway::tls::server_config(
                cert,
                key,
                Some(&config.tls_dir().join("domains")),
            )?,
            None,
        ),
    };

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("granary")
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(serve(config, mode, store, tls, ca_file))
}

async fn serve(
    config: Config,
    mode: Mode,
    store: Arc<Store>,
    tls: Arc<rustls::ServerConfig>,
    ca_file: Option<PathBuf>,
) -> anyhow::Result<()> {
    let https_listener = tokio::net::TcpListener::bind(config.listen.https)
        .await
        .with_context(|| format!("cannot listen on {} (listen.https)", config.listen.https))?;
    let https_addr = https_listener
        .local_addr()
        .context("https listener address")?;

    let ssh_listener = tokio::net::TcpListener::bind(config.listen.ssh)
        .await
        .with_context(|| format!("cannot listen on {} (listen.ssh)", config.listen.ssh))?;
    let ssh_addr = ssh_listener.local_addr().context("ssh listener address")?;
    let ssh_key = granary_gateway::ssh::host_key(&config.data_dir.join("ssh/host_ed25519_key"))
        .map_err(|e| anyhow::anyhow!("the SSH host key: {e}"))?;

    let admin_socket = config.admin_socket();
    let admin_listener = admin_server::bind(&admin_socket)?;

    let demo_password = match mode {
        Mode::Demo => Some(ensure_demo_user(&store).await?),
        Mode::Serve => None,
    };

    let info = DaemonInfo {
        started: Instant::now(),
        data_dir: config.data_dir.clone(),
        domain: config.domain.clone(),
        storage_backend: config.storage.name(),
        sandbox: granary_jail::describe_host(config.uid_range),
        ca_file: ca_file.clone(),
        listeners: vec![
            ("https".to_owned(), https_addr.to_string()),
            ("ssh".to_owned(), ssh_addr.to_string()),
        ],
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut grains = grains_setup(&config, &store).await?;
    if mode == Mode::Demo {
        grains.preinstall = builtin_packages(&config.data_dir.join("builtin-apps"));
    }
    let builtin = grains.preinstall.clone();
    let (connect_tx, connect_rx) = tokio::sync::mpsc::channel(256);
    grains.connects = Some(connect_rx);
    let admin = admin_server::spawn(admin_listener, store.clone(), info, grains, stop_rx.clone())?;
    let backend: Arc<dyn granary_gateway::proxy::Backend> =
        Arc::new(gateway_backend::DaemonBackend {
            store: store.clone(),
            connect: connect_tx,
        });
    let gateway = Arc::new(granary_gateway::proxy::Gateway::new(
        &config.domain,
        backend.clone(),
        config.gateway.upstream_idle,
    ));
    gateway.start_janitor();
    let ssh_task = tokio::spawn(granary_gateway::ssh::serve(
        ssh_listener,
        // An SSH session idle for ten minutes is closed.
        granary_gateway::ssh::config(ssh_key, std::time::Duration::from_secs(600)),
        backend,
        gateway.limiter(),
    ));

    let ports = Ports {
        pid: std::process::id(),
        https: https_addr,
        ssh: ssh_addr,
        admin_socket: admin_socket.clone(),
    };
    ports.write(&config.ports_file())?;
    store.record_event(
        "daemon",
        "daemon.start",
        "-",
        &format!("pid={} https={https_addr}", ports.pid),
    )?;
    tracing::info!(https = %https_addr, ssh = %ssh_addr, admin = %admin_socket.display(), data = %config.data_dir.display(), "granary is running");

    if let Some(password) = demo_password {
        print_demo_banner(&config, https_addr, ca_file.as_deref(), &password, &builtin);
    }

    let mut https_stop = stop_rx.clone();
    let https_task = tokio::spawn(https::serve(
        https_listener,
        tls,
        https::Timeouts {
            handshake: config.gateway.handshake_timeout,
            header_read: config.gateway.header_timeout,
            drain: config.gateway.drain_timeout,
            max_header_bytes: config.gateway.max_header_bytes,
        },
        Some(gateway),
        async move {
            let _ = https_stop.wait_for(|stop| *stop).await;
        },
    ));

    wait_for_signal().await?;
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    let _ = https_task.await;
    ssh_task.abort();
    admin.join();
    let _ = std::fs::remove_file(config.ports_file());
    let _ = std::fs::remove_file(&admin_socket);
    store.record_event("daemon", "daemon.stop", "-", "")?;
    tracing::info!("stopped");
    Ok(())
}

/// The supervisor's parts: plain-directory datasets under DATA_DIR/grains,
/// apps under DATA_DIR/apps, the launcher beside this binary, and a grain
/// record for every user and installed app (repairing any a crash missed).
async fn grains_setup(
    config: &Config,
    store: &Arc<Store>,
) -> anyhow::Result<admin_server::GrainsSetup> {
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
    // What a crash left of restores, drills and snapshot views.
    let ds = datasets.clone();
    match tokio::task::spawn_blocking(move || ds.remove_scratch()).await? {
        Ok(removed) => {
            for name in removed {
                tracing::info!(dataset = %name, "removed a leftover scratch dataset");
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot remove leftover scratch datasets"),
    }
    let apps_dir = config.data_dir.join("apps");
    std::fs::create_dir_all(&apps_dir)
        .with_context(|| format!("cannot create {}", apps_dir.display()))?;
    let launcher = std::env::current_exe()
        .context("cannot find this executable")?
        .with_file_name("granary-launcher");
    if !launcher.exists() {
        tracing::warn!(launcher = %launcher.display(), "granary-launcher is missing beside granary; grains cannot start");
    }
    let uids = granary_state::HostUid::FirstFreeIn(config.uid_range);
    let s = store.clone();
    let made = tokio::task::spawn_blocking(move || s.ensure_grains(uids, "daemon")).await??;
    for g in made {
        tracing::info!(grain = %g.id, "grain record created");
    }
    let g = &config.grains;
    Ok(admin_server::GrainsSetup {
        params: granary_supervisor::SupervisorParams {
            store: store.clone(),
            datasets,
            jail: granary_jail::JailConfig {
                data_root: grains_dir,
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
            },
        },
        uids,
        preinstall: Vec::new(),
        backup: config.backup.clone(),
        data_dir: config.data_dir.clone(),
        connects: None,
        package_limits: crate::package_limits(config),
    })
}

/// The packages `./granary-demo` built and signed with this host's key.
fn builtin_packages(dir: &std::path::Path) -> Vec<PathBuf> {
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

async fn wait_for_signal() -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    Ok(())
}

/// Makes sure the demo user exists and gives it a fresh generated password,
/// which is returned to be printed once (only its hash is stored).
async fn ensure_demo_user(store: &Arc<Store>) -> anyhow::Result<String> {
    let store = store.clone();
    tokio::task::spawn_blocking(move || -> anyhow::Result<String> {
        let name = UserName::new(DEMO_USER)?;
        let password = granary_auth::generate_password()?;
        let hash = granary_auth::hash_password(&password)?;
        if store.user(&name)?.is_some() {
            store.set_password_hash(&name, &hash, "demo")?;
        } else {
            store.add_user(&name, &hash, "demo")?;
        }
        Ok(password)
    })
    .await
    .context("demo user setup panicked")?
}

fn print_demo_banner(
    config: &Config,
    https: SocketAddr,
    ca_file: Option<&std::path::Path>,
    password: &str,
    builtin: &[PathBuf],
) {
    let port = https.port();
    let host = &config.domain;
    let home = config.data_dir.display();
    let ca = ca_file.map_or_else(
        || "(admin-provided certificate)".to_owned(),
        |p| p.display().to_string(),
    );
    println!(
        "\
Granary demo is running.

  HTTPS          https://{host}:{port}/   (listening on {https})
  Health check   curl --cacert {ca} https://{host}:{port}{health}
  CA certificate {ca}
  User           {DEMO_USER}
  Password       {password}
                 (shown once: only its argon2id hash is stored; a new one is made on each demo start)
  Built-in apps  {apps}
  Admin          granary --home {home} status
                 granary --home {home} user add alice
                 granary --home {home} grain list

Stop with Ctrl-C.",
        health = https::HEALTH_PATH,
        apps = if builtin.is_empty() {
            "none (./granary-demo builds and signs them into DATA_DIR/builtin-apps)".to_owned()
        } else {
            builtin
                .iter()
                .filter_map(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
                .collect::<Vec<_>>()
                .join(", ")
        },
    );
}
