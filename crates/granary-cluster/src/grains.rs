//! [`ClusterGrains`]: `Grains` on a cluster node. A connection to a grain
//! another node owns goes over a node link to that node; everything else
//! (a grain placed here, or not placed yet, and every other call) is this
//! node's own [`Grains`].
//!
//! What is built so far: connections (the gateway's and `granary grain
//! connect`'s) reach the owner wherever it runs, and a grain nobody placed
//! yet is placed, at its first connection, on the node with the most room
//! that runs its app. Admin calls (start, stop, status, logs, snapshots,
//! rollbacks, mail and chat status) are run by the node that owns the
//! grain, and mail and chat deliveries are handed to it. A capability whose provider runs on another
//! node is served by that node over a link ([`open_grant`]).

use std::sync::Arc;

use granary_grains::mail::{MailDelivery, MailStatus, XmppStanza, XmppStatus};
use granary_grains::{
    Connection, GrainError, GrainStatus, Grains, GrainsFuture, Identity, Peer, Problem, Snapshot,
    SnapshotTaken, Start,
};
use granary_model::GrainId;
use granary_package::SigningKey;

use crate::moves::GrainCall;
use crate::{Arch, ClusterError, Coordinator, Located, Route};

/// What the daemon's shared records tell the cluster layer.
pub trait Records: Send + Sync {
    /// The architectures the app of `grain` runs on, when this node can
    /// tell (its image is here); `None` otherwise.
    fn arches_of(&self, grain: &GrainId) -> GrainsFuture<Option<Vec<Arch>>>;
    /// How far this node has applied the shared records' log.
    fn position(&self) -> u64;
    /// Applies the log up to at least `n` if this node is behind it (a
    /// connection forwarded by a node that has seen more, such as a user
    /// made a moment ago); `Err` says why it is still behind.
    fn reach(
        &self,
        n: u64,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send>>;
}

/// How long a connection waits for etcd to say where its grain runs.
const ROUTE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(2);

pub struct ClusterGrains {
    local: Arc<dyn Grains>,
    coordinator: Coordinator,
    node: String,
    key: Arc<SigningKey>,
    records: Arc<dyn Records>,
}

impl ClusterGrains {
    pub fn new(
        local: Arc<dyn Grains>,
        coordinator: Coordinator,
        node: String,
        key: SigningKey,
        records: Arc<dyn Records>,
    ) -> ClusterGrains {
        ClusterGrains {
            local,
            coordinator,
            node,
            key: Arc::new(key),
            records,
        }
    }
}

/// How long placing a new grain by room may take (a placement read, the
/// node list, the placing transaction and the route): longer than a route
/// lookup, as it happens once per grain.
const PLACE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);

/// Where a new grain should run, as [`place_new`] decided.
enum Placed {
    /// Start it here: placed here already, chosen here, or its
    /// architecture unknown here (the start gate fetches the app and
    /// checks it).
    Here,
    /// Placed on another node; forward the connection there.
    There(Route),
}

/// A grain nobody placed yet goes to the live, undrained node with the
/// most room that runs its app's architecture, and is placed there. No
/// node can take it (all full, drained, down or of another
/// architecture): [`ClusterError::NoRoom`], rather than overfill this one.
/// Chosen here: left for the start gate to place, as `grain start` does.
async fn place_new(
    c: &Coordinator,
    records: &dyn Records,
    grain: &GrainId,
    me: &str,
) -> Result<Placed, ClusterError> {
    let Some(arches) = records.arches_of(grain).await.ok().flatten() else {
        return Ok(Placed::Here);
    };
    let chosen = c.choose(grain.as_ref(), &arches).await?;
    if chosen == me {
        return Ok(Placed::Here);
    }
    match c.place_on(grain.as_ref(), &chosen).await {
        Ok(p) => {
            tracing::info!(%grain, node = %p.node, epoch = p.epoch, "placed a new grain on the node with the most room")
        }
        // Another node placed it a moment ago: follow that placement.
        Err(ClusterError::AlreadyPlaced { .. }) => {}
        Err(e) => return Err(e),
    }
    Ok(match c.route(grain.as_ref(), me).await? {
        Some(route) => Placed::There(route),
        None => Placed::Here,
    })
}

/// Asks etcd where `grain` runs, within [`ROUTE_DEADLINE`]; `Err` when
/// etcd cannot say in time (logged).
async fn ask_route(c: &Coordinator, grain: &GrainId, me: &str) -> Result<Located, ()> {
    match tokio::time::timeout(ROUTE_DEADLINE, c.locate(grain.as_ref(), me)).await {
        Ok(Ok(located)) => Ok(located),
        Ok(Err(e)) => {
            tracing::warn!(%grain, error = %e, "cannot read the grain's placement; trying this node");
            Err(())
        }
        Err(_) => {
            tracing::warn!(%grain, "etcd did not say where the grain runs in time; trying this node");
            Err(())
        }
    }
}

/// Where `grain` runs when that is another node, a grain nobody placed
/// yet placed by room first (as at its first connection): `None` when it
/// is this node's to run (placed here, the placing failed, or etcd cannot
/// say: the start gate here decides, and follows a placement made
/// meanwhile); `Some(Err)` when no node has room for it.
async fn route_or_place(
    c: &Coordinator,
    records: &dyn Records,
    grain: &GrainId,
    me: &str,
) -> Option<Result<Route, ClusterError>> {
    match ask_route(c, grain, me).await {
        Ok(Located::There(route)) => Some(Ok(route)),
        Ok(Located::Unplaced) => {
            match tokio::time::timeout(PLACE_DEADLINE, place_new(c, records, grain, me)).await {
                Ok(Ok(Placed::There(route))) => Some(Ok(route)),
                Ok(Err(e @ ClusterError::NoRoom { .. })) => Some(Err(e)),
                _ => None,
            }
        }
        _ => None,
    }
}

/// The link to `route`'s node, or `Busy` while that node is down.
fn node_link(route: &Route, grain: &GrainId) -> Result<String, GrainError> {
    route.link.clone().ok_or_else(|| {
        GrainError::new(
            grain,
            Problem::Busy(format!("its node {} is down", route.node)),
        )
    })
}

/// An admin's `call` on `grain`, run by `route`'s node: its report.
async fn call_on(
    route: &Route,
    key: &SigningKey,
    grain: &GrainId,
    call: GrainCall,
) -> Result<String, GrainError> {
    let link = node_link(route, grain)?;
    let target = crate::moves::Target {
        address: &link,
        key: &route.key,
    };
    let job = crate::moves::Job::Grain {
        grain: grain.to_string(),
        call,
    };
    tracing::debug!(%grain, node = route.node, "asking the grain's node");
    crate::moves::run(&target, key, job, |_| {})
        .await
        .map_err(|e| GrainError::new(grain, Problem::Host(format!("node {}: {e}", route.node))))
}

/// Hands `size` bytes of `body` for `grain` to `route`'s node.
async fn deliver_on<B: tokio::io::AsyncRead + Unpin + Send>(
    route: &Route,
    key: &SigningKey,
    records: &dyn Records,
    grain: &GrainId,
    what: crate::link::Delivery,
    size: u64,
    body: B,
) -> Result<(), GrainError> {
    let link = node_link(route, grain)?;
    tracing::debug!(%grain, node = route.node, size, "handing a delivery to the grain's node");
    let seen = records.position();
    crate::link::deliver(&link, &route.key, key, grain, what, size, body, seen).await
}

/// Forwards a connection to the node `route` names.
async fn forward(
    route: Route,
    key: &SigningKey,
    records: &dyn Records,
    grain: &GrainId,
    service: &str,
    identity: Identity,
    peer: Peer,
) -> Result<Connection, GrainError> {
    let link = node_link(&route, grain)?;
    tracing::debug!(%grain, node = route.node, link, "forwarding a connection to the owner node");
    let seen = records.position();
    crate::link::connect(&link, &route.key, key, grain, service, identity, peer, seen).await
}

/// How a grain here reaches the object of grant `grant` when its provider
/// runs on another node: `None` when the provider is this node's to run
/// (placed here, or etcd cannot say in time: the start gate decides);
/// otherwise a link to the provider's node, which serves the object to
/// `holder` ([`Grains::serve_grant`]), or why there is none. A provider
/// nobody placed yet is placed by room, as at its first connection.
#[allow(clippy::too_many_arguments)] // one request's fields, and where to ask
pub async fn open_grant(
    c: &Coordinator,
    records: &dyn Records,
    me: &str,
    key: &SigningKey,
    grant: i64,
    holder: &GrainId,
    provider: &GrainId,
) -> Option<Result<Connection, String>> {
    let seen = records.position();
    let route = match route_or_place(c, records, provider, me).await? {
        Ok(route) => route,
        Err(e) => return Some(Err(e.to_string())),
    };
    let Some(link) = route.link else {
        return Some(Err(format!("its provider's node {} is down", route.node)));
    };
    tracing::debug!(grant, %holder, %provider, node = route.node, "asking the provider's node for a capability");
    let opened = crate::link::open_grant(&link, &route.key, key, grant, holder, seen).await;
    Some(opened.map_err(|e| format!("on node {}: {}", route.node, e.problem)))
}

/// A stanza one grain here sends `grain` when `grain` runs on another
/// node: handed to that node over a node link, as a stanza from another
/// server is ([`Grains::deliver_xmpp`]). A grain nobody placed yet is
/// placed by room, as at its first connection. `None` when `grain` is
/// this node's to run (placed here, or etcd cannot say: the start gate
/// decides).
pub async fn deliver_stanza(
    c: &Coordinator,
    records: &dyn Records,
    me: &str,
    key: &SigningKey,
    grain: &GrainId,
    stanza: XmppStanza,
) -> Option<Result<(), GrainError>> {
    let route = match route_or_place(c, records, grain, me).await? {
        Ok(route) => route,
        Err(e) => return Some(Err(GrainError::new(grain, Problem::Busy(e.to_string())))),
    };
    let XmppStanza { from, to, stanza } = stanza;
    let size = stanza.len() as u64;
    let what = crate::link::Delivery::Xmpp { from, to };
    let body = std::io::Cursor::new(stanza.into_bytes());
    Some(deliver_on(&route, key, records, grain, what, size, body).await)
}

/// Makes `jid` the contact of chat grain `grain`'s user (an invite of
/// theirs was redeemed on this node) when `grain` runs on another node:
/// that node does it. `None` when `grain` is this node's to run.
pub async fn befriend_elsewhere(
    c: &Coordinator,
    me: &str,
    key: &SigningKey,
    grain: &GrainId,
    jid: &str,
    name: &str,
) -> Option<Result<(), GrainError>> {
    let Ok(Located::There(route)) = ask_route(c, grain, me).await else {
        return None;
    };
    let call = GrainCall::XmppBefriend {
        jid: jid.to_owned(),
        name: name.to_owned(),
    };
    Some(call_on(&route, key, grain, call).await.map(|_| ()))
}

/// The most of a grain's log another node sends back: hex in one answer
/// line, which is at most 64 KiB.
const FORWARDED_LOG: u64 = 24 << 10;

impl ClusterGrains {
    /// The node that runs `grain` when that is another one, or `None` to
    /// act here (running here, placed here, not placed, or etcd cannot
    /// say: the start gate still refuses what this node may not run). The
    /// route has no link when that node is down.
    fn owner(
        &self,
        grain: &GrainId,
    ) -> impl std::future::Future<Output = Option<Route>> + Send + 'static {
        let (local, c, me) = (
            self.local.clone(),
            self.coordinator.clone(),
            self.node.clone(),
        );
        let grain = grain.clone();
        async move {
            if local
                .status(&grain)
                .await
                .is_ok_and(|s| s.state != "stopped")
            {
                return None;
            }
            match ask_route(&c, &grain, &me).await {
                Ok(Located::There(route)) => Some(route),
                _ => None,
            }
        }
    }

    /// An admin's call on `grain`, run by the node that owns it when that
    /// is another one: its report, or `None` to run it here.
    fn elsewhere(
        &self,
        grain: &GrainId,
        call: GrainCall,
    ) -> impl std::future::Future<Output = Result<Option<String>, GrainError>> + Send + 'static
    {
        let owner = self.owner(grain);
        let key = self.key.clone();
        let grain = grain.clone();
        async move {
            let Some(route) = owner.await else {
                return Ok(None);
            };
            // A node without a lease has stopped its grains itself.
            if route.link.is_none() && call == GrainCall::Stop {
                return Ok(Some("false".to_owned()));
            }
            call_on(&route, &key, &grain, call).await.map(Some)
        }
    }

    /// [`ClusterGrains::elsewhere`], its JSON report read as a `T`.
    fn elsewhere_as<T: serde::de::DeserializeOwned + Send + 'static>(
        &self,
        grain: &GrainId,
        call: GrainCall,
    ) -> impl std::future::Future<Output = Result<Option<T>, GrainError>> + Send + 'static {
        let elsewhere = self.elsewhere(grain, call);
        let grain = grain.clone();
        async move {
            let Some(report) = elsewhere.await? else {
                return Ok(None);
            };
            serde_json::from_str(&report).map(Some).map_err(|e| {
                GrainError::new(
                    &grain,
                    Problem::Host(format!("a bad answer from its node: {e}")),
                )
            })
        }
    }

    /// Hands `size` bytes of `body` to `grain`: on the node that runs it
    /// when that is another one, otherwise by `here`.
    fn deliver<B, F>(
        &self,
        grain: &GrainId,
        what: crate::link::Delivery,
        size: u64,
        body: B,
        here: F,
    ) -> GrainsFuture<()>
    where
        B: tokio::io::AsyncRead + Unpin + Send + 'static,
        F: FnOnce(B) -> GrainsFuture<()> + Send + 'static,
    {
        let owner = self.owner(grain);
        let (key, records, grain) = (self.key.clone(), self.records.clone(), grain.clone());
        Box::pin(async move {
            let Some(route) = owner.await else {
                return here(body).await;
            };
            // Busy while that node is down: kept and tried again (the
            // spool's, the sender's retry).
            deliver_on(&route, &key, &*records, &grain, what, size, body).await
        })
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
        let (local, c, me, key, records) = (
            self.local.clone(),
            self.coordinator.clone(),
            self.node.clone(),
            self.key.clone(),
            self.records.clone(),
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
            match ask_route(&c, &grain, &me).await {
                Ok(Located::There(route)) => {
                    return forward(route, &key, &*records, &grain, &service, identity, peer).await;
                }
                // etcd cannot say: try here; the start gate refuses a
                // grain this node does not hold.
                Ok(Located::Here) | Err(()) => {
                    return local.connect(&grain, &service, identity, peer).await;
                }
                Ok(Located::Unplaced) => {}
            }
            match tokio::time::timeout(PLACE_DEADLINE, place_new(&c, &*records, &grain, &me)).await
            {
                Ok(Ok(Placed::Here)) => {}
                Ok(Ok(Placed::There(route))) => {
                    return forward(route, &key, &*records, &grain, &service, identity, peer).await;
                }
                Ok(Err(e @ ClusterError::NoRoom { .. })) => {
                    return Err(GrainError::new(&grain, Problem::Busy(e.to_string())));
                }
                // It may have been placed before this gave up: the local
                // attempt below follows the placement if it was.
                Ok(Err(e)) => {
                    tracing::warn!(%grain, error = %e, "cannot place a new grain by room; trying this node")
                }
                Err(_) => {
                    tracing::warn!(%grain, "placing a new grain by room took too long; trying this node")
                }
            }
            let attempt = local
                .connect(&grain, &service, identity.clone(), peer.clone())
                .await;
            let Err(refused) = attempt else {
                return attempt;
            };
            // Another node may have placed it meanwhile (two first
            // connections through two nodes): follow that placement once.
            match ask_route(&c, &grain, &me).await {
                Ok(Located::There(route)) => {
                    forward(route, &key, &*records, &grain, &service, identity, peer).await
                }
                _ => Err(refused),
            }
        })
    }

    fn start(&self, grain: &GrainId, how: Start) -> GrainsFuture<()> {
        let call = GrainCall::Start {
            answering: matches!(how, Start::Answering),
        };
        let (local, g) = (self.local.clone(), grain.clone());
        let elsewhere = self.elsewhere(grain, call);
        Box::pin(async move {
            match elsewhere.await? {
                Some(_) => Ok(()),
                None => local.start(&g, how).await,
            }
        })
    }
    fn stop(&self, grain: &GrainId) -> GrainsFuture<bool> {
        let (local, g) = (self.local.clone(), grain.clone());
        let elsewhere = self.elsewhere(grain, GrainCall::Stop);
        Box::pin(async move {
            match elsewhere.await? {
                Some(report) => Ok(report == "true"),
                None => local.stop(&g).await,
            }
        })
    }
    fn status(&self, grain: &GrainId) -> GrainsFuture<GrainStatus> {
        let (local, g) = (self.local.clone(), grain.clone());
        let elsewhere = self.elsewhere(grain, GrainCall::Status);
        Box::pin(async move {
            match elsewhere.await? {
                Some(report) => serde_json::from_str(&report).map_err(|e| {
                    GrainError::new(
                        &g,
                        Problem::Host(format!("a bad status from its node: {e}")),
                    )
                }),
                None => local.status(&g).await,
            }
        })
    }
    fn list(&self) -> GrainsFuture<Vec<GrainStatus>> {
        self.local.list()
    }
    fn logs(&self, grain: &GrainId, max_bytes: u64) -> GrainsFuture<Vec<u8>> {
        let (local, g) = (self.local.clone(), grain.clone());
        // From another node, the end of the log fits one answer line.
        let elsewhere = self.elsewhere(
            grain,
            GrainCall::Logs {
                max_bytes: max_bytes.min(FORWARDED_LOG),
            },
        );
        Box::pin(async move {
            match elsewhere.await? {
                Some(report) => serde_json::from_str::<String>(&report)
                    .ok()
                    .and_then(|h| hex::decode(h).ok())
                    .ok_or_else(|| {
                        GrainError::new(&g, Problem::Host("a bad log from its node".into()))
                    }),
                None => local.logs(&g, max_bytes).await,
            }
        })
    }
    fn snapshot(&self, grain: &GrainId, label: &str) -> GrainsFuture<SnapshotTaken> {
        let call = GrainCall::Snapshot {
            label: label.to_owned(),
        };
        let (elsewhere, local) = (self.elsewhere_as(grain, call), self.local.clone());
        let (g, label) = (grain.clone(), label.to_owned());
        Box::pin(async move {
            match elsewhere.await? {
                Some(taken) => Ok(taken),
                None => local.snapshot(&g, &label).await,
            }
        })
    }
    fn snapshots(&self, grain: &GrainId) -> GrainsFuture<Vec<Snapshot>> {
        let elsewhere = self.elsewhere_as(grain, GrainCall::Snapshots);
        let (local, g) = (self.local.clone(), grain.clone());
        Box::pin(async move {
            match elsewhere.await? {
                Some(list) => Ok(list),
                None => local.snapshots(&g).await,
            }
        })
    }
    fn prune(&self, grain: &GrainId) -> GrainsFuture<Vec<String>> {
        let elsewhere = self.elsewhere_as(grain, GrainCall::Prune);
        let (local, g) = (self.local.clone(), grain.clone());
        Box::pin(async move {
            match elsewhere.await? {
                Some(pruned) => Ok(pruned),
                None => local.prune(&g).await,
            }
        })
    }
    fn rollback(&self, grain: &GrainId, snapshot: &str) -> GrainsFuture<bool> {
        let call = GrainCall::Rollback {
            snapshot: snapshot.to_owned(),
        };
        let (elsewhere, local) = (self.elsewhere_as(grain, call), self.local.clone());
        let (g, snapshot) = (grain.clone(), snapshot.to_owned());
        Box::pin(async move {
            match elsewhere.await? {
                Some(ran) => Ok(ran),
                None => local.rollback(&g, &snapshot).await,
            }
        })
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
    // Asked over a link by the holder's node: the provider is this one's.
    fn serve_grant(&self, grant: i64, holder: &GrainId) -> GrainsFuture<Connection> {
        self.local.serve_grant(grant, holder)
    }
    fn deliver_mail(&self, grain: &GrainId, mail: MailDelivery) -> GrainsFuture<()> {
        let MailDelivery {
            id,
            from,
            to,
            message,
            size,
        } = mail;
        let what = crate::link::Delivery::Mail {
            id: id.clone(),
            from: from.clone(),
            to: to.clone(),
        };
        let (local, g) = (self.local.clone(), grain.clone());
        let body = tokio::fs::File::from_std(message);
        self.deliver(grain, what, size, body, move |body| {
            Box::pin(async move {
                let message = body.into_std().await;
                let mail = MailDelivery {
                    id,
                    from,
                    to,
                    message,
                    size,
                };
                local.deliver_mail(&g, mail).await
            })
        })
    }
    fn mail_status(&self, grain: &GrainId) -> GrainsFuture<MailStatus> {
        let elsewhere = self.elsewhere_as(grain, GrainCall::MailStatus);
        let (local, g) = (self.local.clone(), grain.clone());
        Box::pin(async move {
            match elsewhere.await? {
                Some(status) => Ok(status),
                None => local.mail_status(&g).await,
            }
        })
    }
    fn xmpp_status(&self, grain: &GrainId) -> GrainsFuture<XmppStatus> {
        let elsewhere = self.elsewhere_as(grain, GrainCall::XmppStatus);
        let (local, g) = (self.local.clone(), grain.clone());
        Box::pin(async move {
            match elsewhere.await? {
                Some(status) => Ok(status),
                None => local.xmpp_status(&g).await,
            }
        })
    }
    fn xmpp_befriend(&self, grain: &GrainId, jid: &str, name: &str) -> GrainsFuture<()> {
        let call = GrainCall::XmppBefriend {
            jid: jid.to_owned(),
            name: name.to_owned(),
        };
        let elsewhere = self.elsewhere(grain, call);
        let (local, g, jid, name) = (
            self.local.clone(),
            grain.clone(),
            jid.to_owned(),
            name.to_owned(),
        );
        Box::pin(async move {
            match elsewhere.await? {
                Some(_) => Ok(()),
                None => local.xmpp_befriend(&g, &jid, &name).await,
            }
        })
    }
    fn xmpp_room_members(&self, grain: &GrainId) -> GrainsFuture<Vec<String>> {
        let elsewhere = self.elsewhere_as(grain, GrainCall::XmppRoomMembers);
        let (local, g) = (self.local.clone(), grain.clone());
        Box::pin(async move {
            match elsewhere.await? {
                Some(members) => Ok(members),
                None => local.xmpp_room_members(&g).await,
            }
        })
    }
    fn deliver_xmpp(&self, grain: &GrainId, stanza: XmppStanza) -> GrainsFuture<()> {
        let XmppStanza { from, to, stanza } = stanza;
        let what = crate::link::Delivery::Xmpp {
            from: from.clone(),
            to: to.clone(),
        };
        let size = stanza.len() as u64;
        let (local, g) = (self.local.clone(), grain.clone());
        let body = std::io::Cursor::new(stanza.into_bytes());
        self.deliver(grain, what, size, body, move |body| {
            Box::pin(async move {
                let stanza = String::from_utf8(body.into_inner()).unwrap_or_default();
                local
                    .deliver_xmpp(&g, XmppStanza { from, to, stanza })
                    .await
            })
        })
    }
}
