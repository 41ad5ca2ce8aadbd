//! [`ClusterGrains`]: `Grains` on a cluster node. A connection to a grain
//! another node owns goes over a node link to that node; everything else
//! (a grain placed here, or not placed yet, and every other call) is this
//! node's own [`Grains`].
//!
//! What is built so far: connections (the gateway's and `granary grain
//! connect`'s) reach the owner wherever it runs. Admin calls (start, stop,
//! status, snapshots, mail delivery) act on this node's grains; they
//! follow the placement when the shared records do (issue 19).

use std::sync::Arc;

use granary_grains::mail::{MailDelivery, MailStatus, XmppStanza, XmppStatus};
use granary_grains::{
    Connection, GrainError, GrainStatus, Grains, GrainsFuture, Identity, Peer, Problem, Snapshot,
    SnapshotTaken, Start,
};
use granary_model::GrainId;
use granary_package::SigningKey;

use crate::{Coordinator, Route};

/// How long a connection waits for etcd to say where its grain runs.
const ROUTE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(2);

pub struct ClusterGrains {
    local: Arc<dyn Grains>,
    coordinator: Coordinator,
    node: String,
    key: Arc<SigningKey>,
}

impl ClusterGrains {
    pub fn new(
        local: Arc<dyn Grains>,
        coordinator: Coordinator,
        node: String,
        key: SigningKey,
    ) -> ClusterGrains {
        ClusterGrains {
            local,
            coordinator,
            node,
            key: Arc::new(key),
        }
    }
}

impl Grains for ClusterGrains {
    fn connect(
        &self,
        grain: &GrainId,
        service: &str,
        identity: Identity,
        peer: Peer,
    ) -> GrainsFuture<Connection> {
        let (local, c, me, key) = (
            self.local.clone(),
            self.coordinator.clone(),
            self.node.clone(),
            self.key.clone(),
        );
        let (grain, service) = (grain.clone(), service.to_owned());
        Box::pin(async move {
            // Running here means placed here (the start gate saw to it,
            // and fencing stops it when the lease lapses): no need to ask.
            if local
                .status(&grain)
                .await
                .is_ok_and(|s| s.state == "running")
            {
                return local.connect(&grain, &service, identity, peer).await;
            }
            let asked = tokio::time::timeout(ROUTE_DEADLINE, c.route(grain.as_ref(), &me)).await;
            let route = match asked {
                Ok(Ok(route)) => route,
                // etcd cannot say: try here; the start gate refuses a
                // grain this node does not hold.
                Ok(Err(e)) => {
                    tracing::warn!(%grain, error = %e, "cannot read the grain's placement; trying this node");
                    None
                }
                Err(_) => {
                    tracing::warn!(%grain, "etcd did not say where the grain runs in time; trying this node");
                    None
                }
            };
            match route {
                None => local.connect(&grain, &service, identity, peer).await,
                Some(Route {
                    node, link: None, ..
                }) => Err(GrainError::new(
                    &grain,
                    Problem::Busy(format!("its node {node} is down")),
                )),
                Some(Route {
                    node,
                    link: Some(link),
                    key: node_key,
                }) => {
                    tracing::debug!(%grain, node, link, "forwarding a connection to the owner node");
                    crate::link::connect(&link, &node_key, &key, &grain, &service, identity, peer)
                        .await
                }
            }
        })
    }

    fn start(&self, grain: &GrainId, how: Start) -> GrainsFuture<()> {
        self.local.start(grain, how)
    }
    fn stop(&self, grain: &GrainId) -> GrainsFuture<bool> {
        self.local.stop(grain)
    }
    fn status(&self, grain: &GrainId) -> GrainsFuture<GrainStatus> {
        self.local.status(grain)
    }
    fn list(&self) -> GrainsFuture<Vec<GrainStatus>> {
        self.local.list()
    }
    fn logs(&self, grain: &GrainId, max_bytes: u64) -> GrainsFuture<Vec<u8>> {
        self.local.logs(grain, max_bytes)
    }
    fn snapshot(&self, grain: &GrainId, label: &str) -> GrainsFuture<SnapshotTaken> {
        self.local.snapshot(grain, label)
    }
    fn snapshots(&self, grain: &GrainId) -> GrainsFuture<Vec<Snapshot>> {
        self.local.snapshots(grain)
    }
    fn prune(&self, grain: &GrainId) -> GrainsFuture<Vec<String>> {
        self.local.prune(grain)
    }
    fn rollback(&self, grain: &GrainId, snapshot: &str) -> GrainsFuture<bool> {
        self.local.rollback(grain, snapshot)
    }
    fn hold(&self, grain: &GrainId, reason: &str) -> GrainsFuture<()> {
        self.local.hold(grain, reason)
    }
    fn release(&self, grain: &GrainId) -> GrainsFuture<()> {
        self.local.release(grain)
    }
    fn forget(&self, grain: &GrainId) -> GrainsFuture<()> {
        self.local.forget(grain)
    }
    fn grant_revoked(&self, grant: i64) -> GrainsFuture<()> {
        self.local.grant_revoked(grant)
    }
    fn deliver_mail(&self, grain: &GrainId, mail: MailDelivery) -> GrainsFuture<()> {
        self.local.deliver_mail(grain, mail)
    }
    fn mail_status(&self, grain: &GrainId) -> GrainsFuture<MailStatus> {
        self.local.mail_status(grain)
    }
    fn xmpp_status(&self, grain: &GrainId) -> GrainsFuture<XmppStatus> {
        self.local.xmpp_status(grain)
    }
    fn xmpp_befriend(&self, grain: &GrainId, jid: &str, name: &str) -> GrainsFuture<()> {
        self.local.xmpp_befriend(grain, jid, name)
    }
    fn xmpp_room_members(&self, grain: &GrainId) -> GrainsFuture<Vec<String>> {
        self.local.xmpp_room_members(grain)
    }
    fn deliver_xmpp(&self, grain: &GrainId, stanza: XmppStanza) -> GrainsFuture<()> {
        self.local.deliver_xmpp(grain, stanza)
    }
}
