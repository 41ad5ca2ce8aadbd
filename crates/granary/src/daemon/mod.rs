//! The daemon: owns the data dir, the state database, the listeners and the
//! admin socket, and shuts all of them down cleanly on SIGTERM or SIGINT.
//!
//! Start-up order matters for "bad input changes nothing": the data dir lock
//! is taken before the database is opened, and the database is checked
//! before anything listens.
//!
//! Rooms: `start.rs` (datasets, supervisor), `listeners.rs` (the gateway's
//! named listeners), `directory.rs` (what the gateway asks of the state),
//! `mail.rs` (the inbound spool, the MX's parts, the deliverer),
//! `admin/` (the admin socket, one file per concern), `backups/`,
//! `install.rs` (apps on disk), `demo.rs`, `ports.rs`, `lock.rs`.

mod acme;
mod admin;
mod backups;
mod certificate;
mod cluster;
mod demo;
mod directory;
pub(crate) mod fence;
pub(crate) mod install;
pub(crate) mod ledger;
mod listeners;
mod lock;
mod mail;
mod mail_keep;
mod memory;
mod metrics;
mod moves;
pub(crate) use moves::reconcile;
mod ports;
mod start;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use granary_config::{Config, TlsSource};
use granary_state::Store;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

pub(crate) use ports::Ports;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Serve,
    Demo,
}

/// What `granary status` reports about this daemon, fixed at start.
#[derive(Debug, Clone)]
pub(crate) struct DaemonInfo {
    pub(crate) started: Instant,
    /// Users whose web home has the admin pages (`web.admins`; the demo
    /// user in the demo).
    pub(crate) admins: Vec<String>,
    /// The ACME certificate's status and the renew trigger; `None`
    /// without `tls.acme`.
    pub(crate) acme: Option<Arc<granary_gateway::acme::Acme>>,
    pub(crate) data_dir: PathBuf,
    pub(crate) domain: String,
    pub(crate) storage_backend: &'static str,
    /// The ZFS pool the datasets live in (the doctor reads its health).
    pub(crate) zfs_pool: Option<String>,
    pub(crate) sandbox: String,
    pub(crate) ca_file: Option<PathBuf>,
    pub(crate) listeners: Vec<(String, String)>,
    /// `mail.hostname`: the MX and submission host, as DNS must name it.
    pub(crate) mail_hostname: String,
    pub(crate) mta_sts_mode: String,
    /// `mail.resolver`: the DNS server mail lookups (and the doctor) ask.
    pub(crate) mail_resolver: Option<std::net::SocketAddr>,
    /// The gateway's failed-login limiter (shared with it), for the
    /// sources it refuses now.
    pub(crate) limiter: Arc<granary_gateway::LoginLimiter>,
    /// This node's cluster membership; `None` without `[cluster]`.
    pub(crate) cluster: Option<Arc<cluster::Member>>,
}

/// Now, in Unix seconds (0 if the clock is before 1970).
pub(crate) fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

impl DaemonInfo {
    /// The address a named listener is bound to, if it listens.
    pub(crate) fn listener(&self, name: &str) -> Option<std::net::SocketAddr> {
        self.listeners
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, a)| a.parse().ok())
    }

    /// The ports mail clients reach this host's mail listeners on.
    pub(crate) fn mail_ports(&self) -> granary_gateway::smtp::records::MailPorts {
        let port = |name: &str| self.listener(name).map(|a| a.port());
        granary_gateway::smtp::records::MailPorts {
            submission: port("submission"),
            submissions: port("submissions"),
            imap: port("imap"),
            imaps: port("imaps"),
        }
    }
}

/// Bytes available to an unprivileged writer, and the size, of the
/// filesystem holding `dir` (what `df` shows).
pub(crate) fn disk_space(dir: &std::path::Path) -> nix::Result<(u64, u64)> {
    let v = nix::sys::statvfs::statvfs(dir)?;
    // The field types are narrower on 32-bit targets.
    #[allow(clippy::unnecessary_cast)]
    let (avail, blocks, frag) = (
        v.blocks_available() as u64,
        v.blocks() as u64,
        v.fragment_size() as u64,
    );
    Ok((avail * frag, blocks * frag))
}

pub(crate) fn run(config: Config, mode: Mode) -> anyhow::Result<()> {
    memory::tune();
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

    let domains = config.tls_dir().join("domains");
    let (tls, ca_file) = match &config.tls {
        TlsSource::LocalCa | TlsSource::Acme(_) => {
            let mut users: Vec<String> = store.list_users()?.into_iter().map(|u| u.name).collect();
            if mode == Mode::Demo && !users.iter().any(|u| u == demo::DEMO_USER) {
                users.push(demo::DEMO_USER.to_owned());
            }
            let files = granary_gateway::tls::local_ca::ensure(
                &config.tls_dir(),
                &config.domain,
                &users,
                owner,
            )?;
            // With ACME, the CA's certificate once there is one.
            let (cert, key) = match &config.tls {
                TlsSource::Acme(_) => {
                    let acme = acme::Files::new(&config.tls_dir());
                    acme.bootstrap(&files, owner)?;
                    (acme.cert(), acme.key())
                }
                _ => (files.server_cert, files.server_key),
            };
            let tls = granary_gateway::tls::server_config(&cert, &key, Some(&domains))?;
            (tls, Some(files.ca_cert))
        }
        TlsSource::Files { cert, key } => (
            granary_gateway::tls::server_config(cert, key, Some(&domains))?,
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
    let bound = listeners::Bound::bind(&config.listen).await?;
    let addresses = bound.addresses()?;
    let ssh_host_key =
        granary_gateway::ssh::host_key(&config.data_dir.join("ssh/host_ed25519_key"))?;
    let admin_socket = config.admin_socket();
    let admin_listener = admin::bind(&admin_socket)?;

    // A cluster node shares its records before anything writes them.
    let (member, links) = match cluster::join(&config).await? {
        Some((m, l)) => {
            cluster::share_records(&m, &store, &config).await?;
            (Some(m), Some(l))
        }
        None => (None, None),
    };

    let demo = match mode {
        Mode::Demo => Some(demo::ensure_demo_user(&store, &config.domain).await?),
        Mode::Serve => None,
    };
    let limiter: Arc<granary_gateway::LoginLimiter> = Arc::default();
    let acme = match &config.tls {
        TlsSource::Acme(_) => Some(Arc::new(granary_gateway::acme::Acme::new()?)),
        _ => None,
    };
    let mut admins = config.web_admins.clone();
    if mode == Mode::Demo {
        admins.push(demo::DEMO_USER.to_owned());
    }
    let info = DaemonInfo {
        admins,
        acme: acme.clone(),
        cluster: member.clone(),
        started: Instant::now(),
        data_dir: config.data_dir.clone(),
        domain: config.domain.clone(),
        storage_backend: config.storage.name(),
        zfs_pool: match &config.storage {
            granary_config::StorageBackend::Zfs { dataset, .. } => {
                dataset.split('/').next().map(str::to_owned)
            }
            _ => None,
        },
        sandbox: granary_jail::describe_host(config.uid_range),
        ca_file: ca_file.clone(),
        listeners: addresses
            .iter()
            .map(|(n, a)| ((*n).to_owned(), a.to_string()))
            .collect(),
        mail_hostname: config.mail.hostname.clone(),
        mta_sts_mode: config.mail.mta_sts_mode.clone(),
        mail_resolver: config.mail.resolver,
        limiter: limiter.clone(),
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let datasets = start::datasets(&config).await?;
    ledger::load_quotas(&store, &*datasets)?;
    // Chat stanzas for other domains go from the supervisor to the
    // gateway's federation, when the xmpp-s2s listener is on.
    let federates = addresses.iter().any(|(n, _)| *n == "xmpp-s2s");
    let (to_other_servers, from_grains) = match federates {
        true => {
            let (tx, rx) = tokio::sync::mpsc::channel(4096);
            (Some(tx), Some(rx))
        }
        false => (None, None),
    };
    let (grains, supervisor) = start::supervisor(
        &config,
        &store,
        datasets.clone(),
        member.clone(),
        to_other_servers,
        addresses
            .iter()
            .find(|(n, _)| *n == "https")
            .map(|(_, a)| *a),
    )
    .await?;
    tokio::spawn(memory::trim_after_exits(supervisor.grain_exits()));
    let mut grains: Arc<dyn granary_grains::Grains> = Arc::new(grains);
    // This node's own grains, never forwarded (moves drive them).
    let local_grains = grains.clone();
    // Other nodes' spool copies kept here (`mail_keep`).
    let spool_copies = Arc::new(mail_keep::CopiesHere::new(
        &config.data_dir,
        config.mail.spool_lifetime.max(config.mail.queue_lifetime),
    ));
    if let (Some(m), Some(links)) = (&member, links) {
        let local = grains.clone();
        tokio::spawn(fence::fence_on_lapse(
            m.clone(),
            local.clone(),
            datasets.clone(),
        ));
        if let Err(e) = moves::fence_stale(m, &store, datasets.clone(), &config.data_dir).await {
            tracing::warn!(error = %e, "cannot look for stale copies of grains other nodes run");
        }
        tokio::spawn(fence::rejoin_when_lost(
            m.clone(),
            local.clone(),
            store.clone(),
            datasets.clone(),
            config.data_dir.clone(),
        ));
        let records: Arc<dyn granary_cluster::Records> = Arc::new(ledger::NodeRecords {
            store: store.clone(),
            apps_dir: start::apps_dir(&config)?,
        });
        let copies = Arc::new(moves::Copies::new(&config.data_dir));
        let moves = Arc::new(moves::NodeMoves::new(
            m.clone(),
            store.clone(),
            datasets.clone(),
            local.clone(),
            start::apps_dir(&config)?,
            copies.clone(),
        ));
        if let Some(cluster) = &config.cluster {
            let src = moves::Source {
                member: m.clone(),
                grains: local.clone(),
                datasets: datasets.clone(),
                records: records.clone(),
            };
            moves::replicate(
                src.clone(),
                copies.clone(),
                cluster.replicas,
                cluster.replicate_interval,
            );
            moves::take_over_failed(src, store.clone(), copies);
        }
        cluster::serve_links(
            m.clone(),
            links,
            granary_backup::node_key(&config.data_dir)?,
            granary_cluster::link::Served {
                grains: local.clone(),
                apps_dir: start::apps_dir(&config)?,
                scratch: start::scratch_dir(&config)?,
                records: records.clone(),
                moves,
                spools: spool_copies.clone(),
            },
        );
        ledger::follow_revocations(store.clone(), local.clone());
        // Connections to grains other nodes own go to them.
        grains = Arc::new(granary_cluster::ClusterGrains::new(
            local,
            m.coordinator.clone(),
            m.node.clone(),
            granary_backup::node_key(&config.data_dir)?,
            records,
        ));
    }
    let chat_domains = Arc::new(granary_gateway::ChatDomains::new(
        &config.domain,
        Arc::new(directory::StateDirectory {
            store: store.clone(),
            postmaster: None,
            domain: config.domain.clone(),
            uids: granary_state::HostUid::FirstFreeIn(config.uid_range),
            local_ca: None,
        }),
    ));
    let s2s = match from_grains {
        Some(rx) => {
            let secret = ssh_host_key
                .to_bytes()
                .map(|b| b.to_vec())
                .context("the SSH host key, for the dialback secret")?;
            let fed = start::federation(
                &config,
                grains.clone(),
                chat_domains.clone(),
                &tls,
                &secret,
                stop_rx.clone(),
            )?;
            fed.start(rx);
            Some(fed)
        }
        None => None,
    };
    let mail = mail::setup(&config, nix::unistd::geteuid().as_raw(), &store, &addresses).await?;
    if let Some(m) = &member {
        mail_keep::keep(
            m.clone(),
            mail.spool.clone(),
            mail.outbound.clone(),
            spool_copies.clone(),
            m.replicate_interval,
        );
    }
    let builtin = match mode {
        Mode::Demo => start::builtin_packages(&config.data_dir.join("builtin-apps")),
        Mode::Serve => Vec::new(),
    };
    let (installed_tx, installed) = tokio::sync::oneshot::channel();
    let metrics_datasets = datasets.clone();
    // The web home reaches the admin thread on a socket pair of its own,
    // served a WebGate only.
    let (web_gate, web_front) =
        std::os::unix::net::UnixStream::pair().context("the web home's socket pair")?;
    let verified: Arc<granary_gateway::VerifiedLogins> = Arc::default();
    if member.is_some() {
        ledger::follow_disabled(store.clone(), local_grains.clone(), verified.clone());
        ledger::follow_quotas(store.clone(), datasets.clone());
    }
    let web_listeners: Vec<(String, std::net::SocketAddr)> = addresses
        .iter()
        .map(|(n, a)| ((*n).to_owned(), *a))
        .collect();
    let admin = admin::spawn(
        admin_listener,
        admin::AdminSetup {
            store: store.clone(),
            grains: grains.clone(),
            local_grains,
            datasets: datasets.clone(),
            apps_dir: start::apps_dir(&config)?,
            uids: granary_state::HostUid::FirstFreeIn(config.uid_range),
            package_limits: crate::package_limits(&config),
            image_arches: crate::image_arches(&config),
            info,
            backup: config.backup.clone(),
            data_dir: config.data_dir.clone(),
            preinstall: builtin.clone(),
            installed: installed_tx,
            local_ca: (!matches!(config.tls, TlsSource::Files { .. })).then(|| config.tls_dir()),
            spool: mail.spool.clone(),
            outbound: mail.outbound.clone(),
            dkim: mail.dkim.clone(),
            web: Some(web_gate),
            web_key: crate::web::seal_key(&config.data_dir)?,
            verified: verified.clone(),
        },
        stop_rx.clone(),
    )?;
    let home = crate::web::start(
        web_front,
        crate::web::Setup {
            domain: config.domain.clone(),
            limiter: limiter.clone(),
            mail: mail.mx.settings.clients.clone(),
            listeners: web_listeners,
        },
    )?;

    // postmaster@ and abuse@ reach the configured user; in the demo, the
    // demo user unless one is configured.
    let postmaster = config
        .mail
        .postmaster
        .clone()
        .or_else(|| (mode == Mode::Demo).then(|| demo::DEMO_USER.to_owned()));
    let g = &config.gateway;
    let directory: Arc<dyn granary_gateway::directory::Directory> =
        Arc::new(directory::StateDirectory {
            store: store.clone(),
            postmaster: postmaster.clone(),
            domain: config.domain.clone(),
            uids: granary_state::HostUid::FirstFreeIn(config.uid_range),
            local_ca: (!matches!(config.tls, TlsSource::Files { .. })).then(|| config.tls_dir()),
        });
    let shared = Arc::new(granary_gateway::Shared {
        domain: config.domain.clone(),
        directory,
        grains: grains.clone(),
        limiter,
        verified,
        tls,
        ssh_host_key,
        settings: granary_gateway::Settings {
            handshake_timeout: g.handshake_timeout,
            header_timeout: g.header_timeout,
            drain_timeout: g.drain_timeout,
            max_header_bytes: g.max_header_bytes,
            upstream_idle: g.upstream_idle,
            ..granary_gateway::Settings::default()
        },
        mx: Some(mail.mx.clone()),
        s2s,
        chat_domains,
        // A cluster's nodes each have their own CA (or none); the
        // certificates any of them issued are in the shared records.
        taskd_clients: match (&config.cluster, ca_file.clone()) {
            (Some(_), _) => Some(granary_gateway::TaskdClients::Issued),
            (None, ca) => ca.map(granary_gateway::TaskdClients::LocalCa),
        },
        home: Some(home),
        stats: Arc::default(),
        acme: acme.clone(),
    });
    let metrics = Arc::new(metrics::Metrics {
        shared: shared.clone(),
        datasets: metrics_datasets,
        store: store.clone(),
        snapshot_interval: config.snapshots.interval,
        certificate: match &config.tls {
            TlsSource::Files { cert, .. } => cert.clone(),
            TlsSource::LocalCa => config.tls_dir().join("server.pem"),
            TlsSource::Acme(_) => acme::Files::new(&config.tls_dir()).cert(),
        },
        tls_dir: config.tls_dir(),
        member: member.clone(),
    });
    let served = bound.serve(shared, metrics, &stop_rx);
    // The CA's checks come to the listeners: order once they answer.
    if let (TlsSource::Acme(c), Some(a)) = (&config.tls, &acme) {
        let files = acme::Files::new(&config.tls_dir());
        let (domain, store) = (config.domain.clone(), store.clone());
        acme::start(c.clone(), files, domain, store, a.clone(), stop_rx.clone());
    }
    let delivering = mail::deliver(&mail, grains, store.clone(), postmaster, stop_rx.clone());

    // Signals are watched from here on, before ports.json tells anyone the
    // daemon is up (a SIGTERM right after it appeared killed the daemon
    // uncleanly), and also while the demo waits for its built-in apps.
    let stop = wait_for_signal()?;

    let ports = Ports {
        pid: std::process::id(),
        listeners: addresses
            .iter()
            .map(|(n, a)| ((*n).to_owned(), *a))
            .collect(),
        admin_socket: admin_socket.clone(),
    };
    ports.write(&config.ports_file())?;
    let listening: Vec<String> = addresses.iter().map(|(n, a)| format!("{n}={a}")).collect();
    store.record_event(
        "daemon",
        "daemon.start",
        "-",
        &format!("pid={} {}", ports.pid, listening.join(" ")),
    )?;
    tracing::info!(listeners = %listening.join(" "), admin = %admin_socket.display(), data = %config.data_dir.display(), "granary is running");

    tokio::pin!(stop);
    let mut stopped = false;
    if demo.is_some() {
        // The banner's steps need the built-in apps in place.
        tokio::select! {
            _ = installed => {}
            () = &mut stop => stopped = true,
        }
    }
    if let (Some(secrets), false) = (demo, stopped) {
        let https = ports.listeners.get("https").copied();
        match https {
            Some(https) => demo::print_banner(
                &config,
                https,
                |name| ports.listeners.get(name).copied(),
                ca_file.as_deref(),
                &secrets,
                &builtin,
            ),
            None => println!("Granary demo is running (listen.https is off)."),
        }
    }

    if !stopped {
        stop.await;
    }
    tracing::info!("shutting down");
    // Failover, rejoining and the mail keeper take nothing more.
    if let Some(m) = &member {
        m.stopping.store(true, std::sync::atomic::Ordering::SeqCst);
    }
    let _ = stop_tx.send(true);
    for task in served {
        let _ = task.await;
    }
    let _ = delivering.await;
    admin.join();
    supervisor.stop().await;
    cluster::leave(member).await;
    let _ = std::fs::remove_file(config.ports_file());
    let _ = std::fs::remove_file(&admin_socket);
    store.record_event("daemon", "daemon.stop", "-", "")?;
    tracing::info!("stopped");
    Ok(())
}

/// Watches SIGTERM and SIGINT from now on; the future ends at the first.
fn wait_for_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    })
}
