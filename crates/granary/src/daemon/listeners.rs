//! The gateway's listeners, by name: each configured one is bound before
//! anything is served (a bad address fails the start), then served by its
//! protocol's module with `serve(listener, shared, shutdown)`.
//!
//! Adding a whole-connection protocol: its module in `granary-gateway`, its
//! name in `granary_config::LISTENERS` (marked available), and its arm in
//! [`serve`] below.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use granary_config::Listen;
use granary_gateway::Shared;
use tokio::sync::watch;

/// The listeners this daemon has a server for (the arms of [`Bound::serve`]).
const SERVED: &[&str] = &[
    "https",
    "ssh",
    "smtp",
    "submission",
    "submissions",
    "imap",
    "imaps",
    "xmpp",
    "xmpps",
    "xmpp-s2s",
    "taskd",
    "http",
    "metrics",
];

/// The configured listeners, bound.
pub(super) struct Bound {
    pub(super) listeners: Vec<(&'static str, tokio::net::TcpListener)>,
}

impl Bound {
    pub(super) async fn bind(listen: &Listen) -> anyhow::Result<Bound> {
        let mut listeners = Vec::new();
        for &(name, addr) in &listen.listeners {
            anyhow::ensure!(
                SERVED.contains(&name),
                "listen.{name}: this build has no {name} server"
            );
            let l = match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => l,
                // Metrics are not worth failing the start over (its default
                // port may be another exporter's).
                Err(e) if name == "metrics" => {
                    tracing::warn!(%addr, error = %e, "cannot listen for metrics (listen.metrics); serving without them");
                    continue;
                }
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("cannot listen on {addr} (listen.{name})"));
                }
            };
            listeners.push((name, l));
        }
        Ok(Bound { listeners })
    }

    /// Name and address actually bound, in order.
    pub(super) fn addresses(&self) -> anyhow::Result<Vec<(&'static str, SocketAddr)>> {
        self.listeners
            .iter()
            .map(|(name, l)| {
                l.local_addr()
                    .with_context(|| format!("the {name} listener's address"))
                    .map(|a| (*name, a))
            })
            .collect()
    }

    /// Serves every listener until `stop` turns true; the handles finish
    /// once each has drained.
    pub(super) fn serve(
        self,
        shared: Arc<Shared>,
        metrics: Arc<super::metrics::Metrics>,
        stop: &watch::Receiver<bool>,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        self.listeners
            .into_iter()
            .map(|(name, listener)| {
                let mut stop = stop.clone();
                let shutdown = async move {
                    let _ = stop.wait_for(|s| *s).await;
                };
                let shared = shared.clone();
                match name {
                    "https" => {
                        tokio::spawn(granary_gateway::https::serve(listener, shared, shutdown))
                    }
                    "ssh" => tokio::spawn(granary_gateway::ssh::serve(listener, shared, shutdown)),
                    "http" => {
                        tokio::spawn(granary_gateway::http::serve(listener, shared, shutdown))
                    }
                    "smtp" => {
                        tokio::spawn(granary_gateway::smtp::serve(listener, shared, shutdown))
                    }
                    "submission" => tokio::spawn(granary_gateway::smtp::serve_submission(
                        listener, shared, shutdown,
                    )),
                    "submissions" => tokio::spawn(granary_gateway::smtp::serve_submissions(
                        listener, shared, shutdown,
                    )),
                    "imap" => {
                        tokio::spawn(granary_gateway::imap::serve(listener, shared, shutdown))
                    }
                    "imaps" => {
                        tokio::spawn(granary_gateway::imap::serve_tls(listener, shared, shutdown))
                    }
                    "xmpp" => {
                        tokio::spawn(granary_gateway::xmpp::serve(listener, shared, shutdown))
                    }
                    "xmpps" => {
                        tokio::spawn(granary_gateway::xmpp::serve_tls(listener, shared, shutdown))
                    }
                    "xmpp-s2s" => {
                        tokio::spawn(granary_gateway::s2s::serve(listener, shared, shutdown))
                    }
                    "taskd" => {
                        tokio::spawn(granary_gateway::taskd::serve(listener, shared, shutdown))
                    }
                    "metrics" => {
                        tokio::spawn(super::metrics::serve(listener, metrics.clone(), shutdown))
                    }
                    other => unreachable!("listen.{other} passed the SERVED check in bind"),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_listener_the_config_offers_has_a_server() {
        for l in granary_config::LISTENERS {
            assert_eq!(
                l.available,
                super::SERVED.contains(&l.name),
                "listen.{}: the config and the daemon disagree on whether it is served",
                l.name
            );
        }
    }
}
