//! The membrane around every capability one grain obtains from another.
//!
//! A [`Membrane`] stands between the holder grain and the providing grain's
//! object. Every call checks that the owner's grant is still live (so
//! revoking cuts a capability already in use at once), is bounded by the
//! holder's in-flight limit, keeps the provider awake while it runs, and is
//! counted for the audit log. When the provider was stopped (idle) or
//! restarted since, the membrane starts it again and asks it for the object
//! afresh before forwarding, so the holder never notices.
//!
//! Calls are forwarded untyped: the membrane does not need to know the
//! interface. Capabilities passed in parameters travel through as they are
//! (the holder lends its own objects); capabilities in results are passed
//! back unwrapped too, so revoking cuts the granted object but not objects it
//! returned earlier (none of `services.capnp` returns a long-lived one).
//!
//! On a cluster, the provider may run on another node. The holder's
//! membrane then forwards to the object that node serves over a node link
//! (its own membrane for that holder, `for_remote`), and links again after
//! the link ends. Both ends check the grant: a revoke seen by either node
//! cuts the capability at once.

use std::cell::{Cell, RefCell};
use std::rc::{Rc, Weak};

use capnp::any_pointer;
use capnp::capability::{DispatchCallResult, Params, Promise, Results};

use crate::inner::Inner;

/// One granted capability as one holder sees it.
pub(crate) struct Membrane {
    pub(crate) sup: Weak<Inner>,
    pub(crate) grant_id: i64,
    pub(crate) holder: String,
    pub(crate) provider: String,
    pub(crate) descriptor: String,
    /// Serves a holder on another node: that node counts the holder's
    /// calls, and the provider is always this node's.
    pub(crate) for_remote: bool,
    pub(crate) target: RefCell<Option<Target>>,
    /// Set once its grant is revoked: it never forwards again, even if a
    /// later grant is given the same id.
    pub(crate) revoked: Cell<bool>,
    /// One link to the provider's node at a time: calls that find none
    /// wait for the first to make it rather than replace each other's.
    pub(crate) linking: tokio::sync::Mutex<()>,
    /// For a membrane serving another node: dropped to end the RPC
    /// connection it is served on, so that node links again (and follows
    /// the provider wherever it now runs).
    pub(crate) serving: RefCell<Option<tokio::sync::oneshot::Sender<()>>>,
}

/// Where a membrane's calls go.
pub(crate) enum Target {
    /// The provider runs here: its object, and the provider generation it
    /// came from.
    Local(u64, capnp::capability::Client),
    /// The provider runs on another node: the object that node serves.
    Remote(RemoteLink),
}

/// An RPC connection over a node link to a provider's node. Dropping it
/// (a revoke, the membrane dropped) closes the link.
pub(crate) struct RemoteLink {
    pub(crate) client: capnp::capability::Client,
    /// Set once the connection ended.
    pub(crate) ended: Rc<Cell<bool>>,
    pub(crate) _close: tokio::sync::oneshot::Sender<()>,
}

/// The client type of a membrane (so `capnp-rpc` can make it a capability
/// and find it again when the holder passes it back to `Host.save`).
pub(crate) struct MembraneCap {
    pub(crate) client: capnp::capability::Client,
}

impl capnp::capability::FromClientHook for MembraneCap {
    fn new(hook: Box<dyn capnp::private::capability::ClientHook>) -> Self {
        MembraneCap {
            client: capnp::capability::Client::new(hook),
        }
    }
    fn into_client_hook(self) -> Box<dyn capnp::private::capability::ClientHook> {
        self.client.hook
    }
    fn as_client_hook(&self) -> &dyn capnp::private::capability::ClientHook {
        self.client.hook.as_ref()
    }
}

#[derive(Clone)]
pub(crate) struct Dispatch(Rc<Membrane>);

impl std::ops::Deref for Dispatch {
    type Target = Membrane;
    fn deref(&self) -> &Membrane {
        &self.0
    }
}

impl capnp::capability::FromServer<Membrane> for MembraneCap {
    type Dispatch = Dispatch;
    fn from_server(s: Rc<Membrane>) -> Dispatch {
        Dispatch(s)
    }
}

impl capnp::capability::Server for Dispatch {
    fn dispatch_call(
        self,
        interface_id: u64,
        method_id: u16,
        params: Params<any_pointer::Owned>,
        results: Results<any_pointer::Owned>,
    ) -> DispatchCallResult {
        DispatchCallResult::new(
            Promise::from_future(forward(self.0, interface_id, method_id, params, results)),
            false,
        )
    }

    fn as_ptr(&self) -> usize {
        Rc::as_ptr(&self.0) as usize
    }
}

async fn forward(
    m: Rc<Membrane>,
    interface_id: u64,
    method_id: u16,
    params: Params<any_pointer::Owned>,
    mut results: Results<any_pointer::Owned>,
) -> Result<(), capnp::Error> {
    let sup = m
        .sup
        .upgrade()
        .ok_or_else(|| capnp::Error::disconnected("the host is shutting down".to_owned()))?;
    m.check_live(&sup)?;
    let _outbound = match m.for_remote {
        true => None,
        false => Some(sup.admit_call(&m.holder)?),
    };
    let (target, _busy) = m.target(&sup).await?;
    m.check_live(&sup)?;
    let mut request =
        target.new_call::<any_pointer::Owned, any_pointer::Owned>(interface_id, method_id, None);
    request.get().set_as(params.get()?)?;
    let response = tokio::time::timeout(sup.params.config.call_timeout, request.send().promise)
        .await
        .map_err(|_| {
            capnp::Error::failed(format!(
                "{}: the provider did not answer in time",
                m.descriptor
            ))
        })
        .and_then(|answer| answer);
    // A call cut short by a revoke says so, not how the link ended.
    let response = response.map_err(|e| m.check_live(&sup).err().unwrap_or(e))?;
    results.get().set_as(response.get()?)?;
    // Counted once, by the holder's node.
    if !m.for_remote {
        sup.count_call(m.grant_id);
    }
    Ok(())
}

impl Membrane {
    /// The provider's object: the one held, or obtained again if the
    /// provider restarted since, moved, or the link to its node ended; and
    /// a guard keeping a provider of this node awake.
    pub(crate) async fn target(
        &self,
        sup: &Rc<Inner>,
    ) -> Result<(capnp::capability::Client, Option<crate::slot::Busy>), capnp::Error> {
        let fail = |e: String| capnp::Error::failed(format!("{}: {e}", self.descriptor));
        let held_local = match &*self.target.borrow() {
            Some(Target::Remote(link)) if !link.ended.get() => {
                return Ok((link.client.clone(), None));
            }
            Some(Target::Local(..)) => true,
            _ => false,
        };
        if !held_local && let Some(client) = self.remote(sup).await? {
            return Ok((client, None));
        }
        let running = match sup.ensure_running(&self.provider).await {
            Ok(running) => running,
            Err(e) => {
                // Its provider ran here and has moved to another node, or
                // another node placed it meanwhile.
                if let Some(client) = self.remote(sup).await? {
                    return Ok((client, None));
                }
                return Err(fail(e.to_string()));
            }
        };
        let busy = running.activity.busy();
        if let Some(Target::Local(generation, client)) = &*self.target.borrow()
            && *generation == running.generation
        {
            return Ok((client.clone(), Some(busy)));
        }
        let client = sup
            .offer(&running, &self.descriptor, &self.holder)
            .await
            .map_err(|e| fail(e.to_string()))?;
        *self.target.borrow_mut() = Some(Target::Local(running.generation, client.clone()));
        Ok((client, Some(busy)))
    }

    /// Refuses a call on a revoked grant.
    pub(crate) fn check_live(&self, sup: &Inner) -> Result<(), capnp::Error> {
        if self.revoked.get() {
            return Err(capnp::Error::failed(
                "capability revoked by its owner".to_owned(),
            ));
        }
        sup.check_grant_live(self.grant_id)
    }

    /// The object the provider's node serves, when the provider runs on
    /// another node; `None` when it is this node's.
    async fn remote(
        &self,
        sup: &Rc<Inner>,
    ) -> Result<Option<capnp::capability::Client>, capnp::Error> {
        let Some(remote) = sup
            .params
            .remote_grants
            .clone()
            .filter(|_| !self.for_remote)
        else {
            return Ok(None);
        };
        let _one = self.linking.lock().await;
        // Another call made a link while this one waited.
        if let Some(Target::Remote(link)) = &*self.target.borrow()
            && !link.ended.get()
        {
            return Ok(Some(link.client.clone()));
        }
        let opened = remote
            .open(self.grant_id, self.holder.clone(), self.provider.clone())
            .await;
        let Some(opened) = opened else {
            return Ok(None);
        };
        let conn = opened.map_err(|e| capnp::Error::failed(format!("{}: {e}", self.descriptor)))?;
        let link = sup
            .link_rpc(conn)
            .map_err(|e| capnp::Error::failed(format!("{}: {e}", self.descriptor)))?;
        // Revoked while the link was made: dropping it closes it.
        self.check_live(sup)?;
        let client = link.client.clone();
        *self.target.borrow_mut() = Some(Target::Remote(link));
        Ok(Some(client))
    }

    /// Drops the provider's object, so it is released at once, and ends
    /// the connection a membrane serving another node is served on. The
    /// next call obtains the object again (a provider held stopped
    /// refuses it until released).
    pub(crate) fn cut(&self) {
        self.target.borrow_mut().take();
        self.serving.borrow_mut().take();
    }

    /// Cuts it for good: its grant is revoked.
    pub(crate) fn revoke(&self) {
        self.revoked.set(true);
        self.cut();
    }
}
