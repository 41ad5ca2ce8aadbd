//! Grants at run time: a provider's object obtained through its `offer`,
//! wrapped for the holder in a membrane that checks the grant on every
//! call, and recognised again when the holder saves it.

use std::cell::RefCell;
use std::rc::Rc;

use granary_grains::Problem;

use crate::inner::{Inner, db};
use crate::membrane::{Membrane, MembraneCap};
use crate::slot::Running;

impl Inner {
    /// A new membrane of `grant` (its object not obtained yet), recorded
    /// so a revoke finds it. `for_remote`: it serves a holder on another
    /// node.
    pub(crate) fn membrane(
        self: &Rc<Self>,
        grant: &granary_state::Grant,
        for_remote: bool,
    ) -> Rc<Membrane> {
        let membrane = Rc::new(Membrane {
            sup: Rc::downgrade(self),
            grant_id: grant.id,
            holder: grant.from_grain.clone(),
            provider: grant.to_grain.clone(),
            descriptor: grant.capability.clone(),
            for_remote,
            target: RefCell::new(None),
            revoked: std::cell::Cell::new(false),
            linking: tokio::sync::Mutex::new(()),
            serving: RefCell::new(None),
        });
        let mut by_grant = self.by_grant.borrow_mut();
        let list = by_grant.entry(grant.id).or_default();
        list.retain(|w| w.strong_count() > 0);
        list.push(Rc::downgrade(&membrane));
        membrane
    }

    /// The capability a holder is handed for a membrane.
    fn client_of(&self, membrane: Rc<Membrane>) -> capnp::capability::Client {
        let mut set = self.membranes.borrow_mut();
        set.gc();
        set.new_client_from_rc(membrane).client
    }

    /// The membrane behind a capability a grain passed back, if it is one.
    pub(crate) async fn membrane_of(&self, cap: capnp::capability::Client) -> Option<Rc<Membrane>> {
        let resolved: MembraneCap =
            capnp::capability::get_resolved_cap(MembraneCap { client: cap }).await;
        self.membranes
            .borrow()
            .get_local_server_of_resolved(&resolved)
    }

    /// Obtains `grant`'s object from its provider (starting it, here or
    /// on the node that runs it) and wraps it for the holder; logs the
    /// first use of a grant.
    pub(crate) async fn obtain(
        self: &Rc<Self>,
        grant: &granary_state::Grant,
        how: &'static str,
    ) -> Result<capnp::capability::Client, capnp::Error> {
        let membrane = self.membrane(grant, false);
        membrane.target(self).await?;
        // Revoked while the object was obtained.
        membrane.check_live(self)?;
        self.first_use(grant, how).await;
        Ok(self.client_of(membrane))
    }

    /// Logs the first use of a grant since the daemon started.
    async fn first_use(&self, grant: &granary_state::Grant, how: &'static str) {
        if self.used.borrow_mut().insert(grant.id) {
            let (id, holder, detail) = (
                grant.id,
                grant.from_grain.clone(),
                format!("grant={} cap={} via={how}", grant.id, grant.capability),
            );
            let _ = db(&self.params.store, move |s| {
                s.record_event(&holder, "grant.first-use", &id.to_string(), &detail)
            })
            .await;
        }
    }

    /// Serves grant `grant_id`'s object to `holder` on another node: a
    /// membrane of this node's (checking the grant and keeping the
    /// provider up), as the bootstrap of an RPC connection on one end of a
    /// socket pair; the other end is returned, for the node link.
    pub(crate) async fn serve_grant(
        self: &Rc<Self>,
        grant_id: i64,
        holder: &str,
    ) -> Result<granary_grains::Connection, Problem> {
        let refused = |why: &str| Problem::Host(format!("grant {grant_id}: {why}"));
        let grant = match db(&self.params.store, move |s| s.grant(grant_id)).await? {
            Some((grant, true)) if grant.from_grain == holder => grant,
            Some((_, true)) => return Err(refused("held by another grain")),
            Some((_, false)) => return Err(refused("capability revoked by its owner")),
            None => return Err(refused("no such grant")),
        };
        if self.check_grant_live(grant_id).is_err() {
            return Err(refused("capability revoked by its owner"));
        }
        let membrane = self.membrane(&grant, true);
        membrane
            .target(self)
            .await
            .map_err(|e| Problem::Grain(e.extra))?;
        if membrane.check_live(self).is_err() {
            return Err(refused("capability revoked by its owner"));
        }
        self.first_use(&grant, "node").await;
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()
            .map_err(|e| Problem::Host(format!("a socket pair: {e}")))?;
        let serve = || -> std::io::Result<()> {
            ours.set_nonblocking(true)?;
            let ours = tokio::net::UnixStream::from_std(ours)?;
            let (close, closed) = tokio::sync::oneshot::channel::<()>();
            *membrane.serving.borrow_mut() = Some(close);
            let bootstrap = self.client_of(membrane);
            let system = crate::rpc::system(
                ours,
                capnp_rpc::rpc_twoparty_capnp::Side::Server,
                Some(bootstrap),
                self.params.config.max_message_bytes,
            );
            tokio::task::spawn_local(async move {
                run_until_closed(system, closed).await;
                tracing::debug!(
                    grant = grant_id,
                    "a capability served to another node ended"
                );
            });
            Ok(())
        };
        serve().map_err(|e| Problem::Host(format!("serving the capability: {e}")))?;
        Ok(granary_grains::Connection {
            stream: theirs,
            keep: Box::new(()),
        })
    }

    /// An RPC connection over a stream to the node that serves a grant's
    /// object: that object, until the connection ends or the link is
    /// dropped.
    pub(crate) fn link_rpc(
        &self,
        conn: granary_grains::Connection,
    ) -> std::io::Result<crate::membrane::RemoteLink> {
        conn.stream.set_nonblocking(true)?;
        let stream = tokio::net::UnixStream::from_std(conn.stream)?;
        let mut system = crate::rpc::system(
            stream,
            capnp_rpc::rpc_twoparty_capnp::Side::Client,
            None,
            self.params.config.max_message_bytes,
        );
        let client: capnp::capability::Client =
            system.bootstrap(capnp_rpc::rpc_twoparty_capnp::Side::Server);
        let ended = Rc::new(std::cell::Cell::new(false));
        let (close, closed) = tokio::sync::oneshot::channel::<()>();
        let (flag, keep) = (ended.clone(), conn.keep);
        tokio::task::spawn_local(async move {
            run_until_closed(system, closed).await;
            flag.set(true);
            drop(keep);
        });
        Ok(crate::membrane::RemoteLink {
            client,
            ended,
            _close: close,
        })
    }

    /// Asks a running provider for the object a descriptor names.
    pub(crate) async fn offer(
        &self,
        provider: &Rc<Running>,
        descriptor: &str,
        requester: &str,
    ) -> Result<capnp::capability::Client, Problem> {
        // A holder on another node has no slot here: its id says the same.
        let requester = granary_model::GrainId::parse(requester).ok();
        let mut request = provider.grain.offer_request();
        request.get().set_descriptor(descriptor);
        if let Some(r) = requester {
            let mut g = request.get().init_requester();
            g.set_id(r.as_ref());
            g.set_owner(r.user());
            g.set_kind(r.kind());
        }
        let answer = tokio::time::timeout(self.params.config.call_timeout, request.send().promise)
            .await
            .map_err(|_| Problem::Grain(format!("offer {descriptor} timed out")))?
            .map_err(|e| Problem::Grain(format!("offer {descriptor}: {e}")))?;
        answer
            .get()
            .and_then(|r| r.get_cap().get_as_capability())
            .map_err(|e| Problem::Grain(format!("offer {descriptor}: {e}")))
    }
}

/// Runs an RPC connection until it ends or `closed` fires; then
/// disconnects it, so calls in flight fail at once rather than wait for
/// their timeout (bounded: a far end that does not answer is dropped).
async fn run_until_closed(
    mut system: capnp_rpc::RpcSystem<capnp_rpc::rpc_twoparty_capnp::Side>,
    closed: tokio::sync::oneshot::Receiver<()>,
) {
    tokio::select! {
        _ = &mut system => return,
        _ = closed => {}
    }
    let disconnect = system.get_disconnector();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        futures::future::join(disconnect, system),
    )
    .await;
}
