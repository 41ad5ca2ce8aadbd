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

use std::cell::RefCell;
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
    /// The provider's object and the provider generation it came from.
    pub(crate) target: RefCell<Option<(u64, capnp::capability::Client)>>,
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
    sup.check_grant_live(m.grant_id)?;
    let _outbound = sup.admit_call(&m.holder)?;
    let (target, _busy) = m.target(&sup).await?;
    sup.check_grant_live(m.grant_id)?;
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
        })??;
    results.get().set_as(response.get()?)?;
    sup.count_call(m.grant_id);
    Ok(())
}

impl Membrane {
    /// The provider's object, (re)obtained if the provider is not running
    /// the generation it came from; and a guard keeping the provider awake.
    async fn target(
        &self,
        sup: &Rc<Inner>,
    ) -> Result<(capnp::capability::Client, crate::slot::Busy), capnp::Error> {
        let running = sup
            .ensure_running(&self.provider)
            .await
            .map_err(|e| capnp::Error::failed(format!("{}: {e}", self.descriptor)))?;
        let busy = running.activity.busy();
        if let Some((generation, client)) = &*self.target.borrow()
            && *generation == running.generation
        {
            return Ok((client.clone(), busy));
        }
        let client = sup
            .offer(&running, &self.descriptor, &self.holder)
            .await
            .map_err(|e| capnp::Error::failed(format!("{}: {e}", self.descriptor)))?;
        *self.target.borrow_mut() = Some((running.generation, client.clone()));
        Ok((client, busy))
    }

    /// Drops the provider's object (on revoke), so it is released at once.
    pub(crate) fn cut(&self) {
        self.target.borrow_mut().take();
    }
}
