//! Mail at start-up: the inbound spool (`DATA_DIR/spool`), the outbound
//! queue (`DATA_DIR/outbound`), the DKIM keys (`DATA_DIR/dkim`), the MX's
//! checks and limits, and the deliverers that move spooled mail into
//! users' mail grains and queued mail to other servers.

use std::sync::Arc;

use anyhow::Context;
use granary_config::Config;
use granary_gateway::smtp::outbound::{Remote, RemoteSettings};
use granary_gateway::smtp::{Checker, DkimKeys, Mx, MxSettings};
use granary_grains::Grains;
use granary_model::MailAddress;
use granary_spool::{Deliverer, LocalUser, Spool, SpoolSettings};
use granary_state::{MailRoute, Store};
use tokio::sync::watch;

/// The spools and what reads and writes them.
pub(super) struct MailSetup {
    pub(super) spool: Arc<Spool>,
    pub(super) outbound: Arc<Spool>,
    pub(super) dkim: DkimKeys,
    pub(super) mx: Arc<Mx>,
    remote: Arc<Remote>,
}

/// Opens the spools, makes missing DKIM keys, and the MX's parts.
pub(super) async fn setup(
    config: &Config,
    owner: u32,
    store: &Arc<Store>,
    listeners: &[(&'static str, std::net::SocketAddr)],
) -> anyhow::Result<MailSetup> {
    let port = |name: &str| {
        listeners
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, a)| a.port())
    };
    let mail = &config.mail;
    let open = |name: &str, lifetime| {
        let dir = config.data_dir.join(name);
        let settings = SpoolSettings {
            lifetime,
            retry_first: mail.retry_first,
            retry_max: mail.retry_max,
            hostname: mail.hostname.clone(),
            delay_warning: Some(mail.delay_warning),
        };
        tokio::task::spawn_blocking(move || Spool::open(&dir, owner, settings))
    };
    let spool = open("spool", mail.spool_lifetime)
        .await?
        .context("cannot open the mail spool")?;
    let outbound = open("outbound", mail.queue_lifetime)
        .await?
        .context("cannot open the outbound mail queue")?;
    let dkim = DkimKeys::new(config.data_dir.join("dkim"));
    let (keys, domains_of) = (dkim.clone(), store.clone());
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        for d in domains_of.mail_domains()? {
            keys.ensure(&d.domain)
                .with_context(|| format!("DKIM keys for {}", d.domain))?;
        }
        Ok(())
    })
    .await??;
    let checker = Checker::new(&mail.hostname, mail.resolver)
        .map_err(anyhow::Error::msg)
        .context("mail.resolver")?;
    let remote = Remote::new(
        RemoteSettings {
            hostname: mail.hostname.clone(),
            port: mail.outbound_port,
            connect_timeout: std::time::Duration::from_secs(30),
            command_timeout: mail.command_timeout,
            data_timeout: mail.data_timeout,
            mta_sts_port: mail.mta_sts_port,
        },
        checker.clone(),
        mail.outbound_ca.as_deref(),
    )
    .map_err(anyhow::Error::msg)?;
    let mx = Arc::new(Mx::new(
        MxSettings {
            hostname: mail.hostname.clone(),
            max_message_bytes: mail.max_message_bytes,
            max_recipients: mail.max_recipients,
            max_connections_per_ip: mail.max_connections_per_ip,
            max_messages_per_ip: mail.max_messages_per_ip,
            command_timeout: mail.command_timeout,
            data_timeout: mail.data_timeout,
            send_max_recipients: mail.send_max_recipients,
            send_per_hour: mail.send_per_hour,
            mta_sts_mode: mail.mta_sts_mode.clone(),
            clients: granary_gateway::autoconfig::MailClients {
                hostname: mail.hostname.clone(),
                imaps: port("imaps"),
                submissions: port("submissions"),
                imap: port("imap"),
                submission: port("submission"),
            },
        },
        spool.clone(),
        outbound.clone(),
        dkim.clone(),
        checker,
    ));
    Ok(MailSetup {
        spool,
        outbound,
        dkim,
        mx,
        remote: Arc::new(remote),
    })
}

/// Delivers spooled mail (into grains) and queued mail (to other
/// servers) until `stop` turns true.
pub(super) fn deliver(
    setup: &MailSetup,
    grains: Arc<dyn Grains>,
    store: Arc<Store>,
    postmaster: Option<String>,
    stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let local_user: LocalUser = Arc::new(move |address: String| {
        let (store, postmaster) = (store.clone(), postmaster.clone());
        Box::pin(async move {
            let address = MailAddress::parse(&address).ok()?;
            tokio::task::spawn_blocking(move || {
                match store.route_mail(&address, postmaster.as_deref()) {
                    Ok(MailRoute::User(u)) => Some(u),
                    _ => None,
                }
            })
            .await
            .ok()
            .flatten()
        })
    });
    let mut inbound_stop = stop.clone();
    let inbound = tokio::spawn(
        Deliverer::new(setup.spool.clone(), grains, local_user.clone())
            .bouncing_out(setup.outbound.clone())
            .run(async move {
                let _ = inbound_stop.wait_for(|s| *s).await;
            }),
    );
    let mut outbound_stop = stop;
    let outbound = tokio::spawn(
        Deliverer::to(
            setup.outbound.clone(),
            setup.remote.clone(),
            local_user,
            setup.spool.clone(),
        )
        .run(async move {
            let _ = outbound_stop.wait_for(|s| *s).await;
        }),
    );
    tokio::spawn(async move {
        let _ = inbound.await;
        let _ = outbound.await;
    })
}
