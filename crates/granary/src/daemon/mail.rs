//! Mail at start-up: the inbound spool (`DATA_DIR/spool`), the MX's
//! checks and limits, and the deliverer that moves spooled mail into
//! users' mail grains.

use std::sync::Arc;

use anyhow::Context;
use granary_config::Config;
use granary_gateway::smtp::{Checker, Mx, MxSettings};
use granary_grains::Grains;
use granary_model::MailAddress;
use granary_spool::{Deliverer, LocalUser, Spool, SpoolSettings};
use granary_state::{MailRoute, Store};
use tokio::sync::watch;

/// The spool and what reads and writes it.
pub(super) struct MailSetup {
    pub(super) spool: Arc<Spool>,
    pub(super) mx: Arc<Mx>,
}

/// Opens the spool and makes the MX's parts.
pub(super) async fn setup(config: &Config, owner: u32) -> anyhow::Result<MailSetup> {
    let mail = &config.mail;
    let dir = config.data_dir.join("spool");
    let settings = SpoolSettings {
        lifetime: mail.spool_lifetime,
        retry_first: mail.retry_first,
        retry_max: mail.retry_max,
        hostname: mail.hostname.clone(),
    };
    let spool = tokio::task::spawn_blocking(move || Spool::open(&dir, owner, settings))
        .await?
        .context("cannot open the mail spool")?;
    let checker = Checker::new(&mail.hostname, mail.resolver)
        .map_err(anyhow::Error::msg)
        .context("mail.resolver")?;
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
        },
        spool.clone(),
        checker,
    ));
    Ok(MailSetup { spool, mx })
}

/// Delivers spooled mail until `stop` turns true.
pub(super) fn deliver(
    spool: Arc<Spool>,
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
    let mut stop = stop;
    tokio::spawn(Deliverer::new(spool, grains, local_user).run(async move {
        let _ = stop.wait_for(|s| *s).await;
    }))
}
