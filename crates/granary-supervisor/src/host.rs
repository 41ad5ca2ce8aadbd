//! What the host serves each grain (`schema/host.capnp`): its bootstrap on
//! the grain's channel. Every call comes from exactly one grain, so the
//! grain's identity is this object's, never something a message claims.

use std::rc::{Rc, Weak};

use capnp::capability::Rc as CapRc;
use granary_schema::host_capnp::{LogLevel, host, wake_lock};

use crate::inner::{Inner, db};
use crate::slot::{Activity, Slot};

pub(crate) struct HostImpl {
    sup: Weak<Inner>,
    id: String,
    owner: String,
    kind: String,
    app_id: String,
    app_version: String,
    activity: Rc<Activity>,
    /// The host's handle on the grain's log stream (beside its stdout and
    /// stderr).
    log: std::os::fd::OwnedFd,
    /// The domain the grain was told is its own (`GRANARY_DOMAIN`): for
    /// chat, its owner's chat domain, read once at launch.
    domain: String,
}

impl HostImpl {
    pub(crate) fn new(
        sup: &Rc<Inner>,
        slot: &Slot,
        app: &granary_state::App,
        activity: Rc<Activity>,
        log: std::os::fd::OwnedFd,
        domain: String,
    ) -> HostImpl {
        HostImpl {
            sup: Rc::downgrade(sup),
            id: slot.id.clone(),
            owner: slot.user.clone(),
            kind: slot.kind.clone(),
            app_id: app.app_id.clone(),
            app_version: app.version.clone(),
            activity,
            log,
            domain,
        }
    }

    fn sup(&self) -> Result<Rc<Inner>, capnp::Error> {
        self.sup
            .upgrade()
            .ok_or_else(|| capnp::Error::disconnected("the host is shutting down".to_owned()))
    }
}

impl HostImpl {
    /// The capability a live grant of this grain's names (from `provider`
    /// when given), wrapped in its membrane.
    async fn granted(
        &self,
        sup: &Rc<Inner>,
        descriptor: String,
        provider: Option<String>,
    ) -> Result<capnp::capability::Client, capnp::Error> {
        granary_model::check_descriptor(&descriptor).map_err(failed)?;
        let (holder, d) = (self.id.clone(), descriptor.clone());
        let grant = db(&sup.params.store, move |s| match provider {
            Some(p) => s.find_grant_from(&holder, &p, &d),
            None => s.find_grant(&holder, &d),
        })
        .await
        .map_err(failed)?
        .ok_or_else(|| no_grant(&descriptor))?;
        sup.check_grant_live(grant.id)?;
        sup.obtain(&grant, "request").await
    }
}

fn failed(e: impl std::fmt::Display) -> capnp::Error {
    capnp::Error::failed(e.to_string())
}

fn no_grant(descriptor: &str) -> capnp::Error {
    capnp::Error::failed(format!(
        "no grant for {descriptor}: the owner has not granted this grain that capability"
    ))
}

impl host::Server for HostImpl {
    async fn info(
        self: CapRc<Self>,
        _: host::InfoParams,
        mut results: host::InfoResults,
    ) -> Result<(), capnp::Error> {
        let _call = self.sup()?.admit_call(&self.id)?;
        let mut g = results.get().init_grain();
        g.set_id(&self.id);
        g.set_owner(&self.owner);
        g.set_kind(&self.kind);
        g.set_app_id(&self.app_id);
        g.set_app_version(&self.app_version);
        Ok(())
    }

    async fn request(
        self: CapRc<Self>,
        params: host::RequestParams,
        mut results: host::RequestResults,
    ) -> Result<(), capnp::Error> {
        let sup = self.sup()?;
        let _call = sup.admit_call(&self.id)?;
        let descriptor = params.get()?.get_descriptor()?.to_str()?.to_owned();
        // A server route, not a grant: every chat grain routes stanzas
        // through its host (see `xmpp.rs`).
        let sender = match self.kind.as_str() {
            "xmpp" => Some(crate::xmpp::Sender::User {
                owner: self.owner.clone(),
            }),
            // A room speaks as its name, the grain's instance.
            "room" => granary_model::GrainId::parse(&self.id)
                .ok()
                .and_then(|g| g.instance().map(str::to_owned))
                .map(|name| crate::xmpp::Sender::Room { name }),
            _ => None,
        };
        if descriptor == crate::xmpp::XMPP_ROUTE
            && let Some(sender) = sender
        {
            let router: granary_schema::services_capnp::xmpp_router::Client =
                capnp_rpc::new_client(crate::xmpp::Router {
                    sup: self.sup.clone(),
                    id: self.id.clone(),
                    sender,
                    domain: self.domain.clone(),
                    order: tokio::sync::Mutex::new(()),
                });
            results
                .get()
                .init_cap()
                .set_as_capability(router.client.hook);
            return Ok(());
        }
        let cap = self.granted(&sup, descriptor, None).await?;
        results.get().init_cap().set_as_capability(cap.hook);
        Ok(())
    }

    async fn request_from(
        self: CapRc<Self>,
        params: host::RequestFromParams,
        mut results: host::RequestFromResults,
    ) -> Result<(), capnp::Error> {
        let sup = self.sup()?;
        let _call = sup.admit_call(&self.id)?;
        let p = params.get()?;
        let descriptor = p.get_descriptor()?.to_str()?.to_owned();
        let provider = p.get_provider()?.to_str()?.to_owned();
        let cap = self.granted(&sup, descriptor, Some(provider)).await?;
        results.get().init_cap().set_as_capability(cap.hook);
        Ok(())
    }

    async fn grants(
        self: CapRc<Self>,
        _: host::GrantsParams,
        mut results: host::GrantsResults,
    ) -> Result<(), capnp::Error> {
        let sup = self.sup()?;
        let _call = sup.admit_call(&self.id)?;
        let holder = self.id.clone();
        let held = db(&sup.params.store, move |s| s.grants_held(&holder))
            .await
            .map_err(failed)?;
        let held: Vec<_> = held
            .into_iter()
            .filter(|(g, _, _)| sup.check_grant_live(g.id).is_ok())
            .collect();
        let mut list = results.get().init_routes(held.len() as u32);
        for (i, (grant, owner, kind)) in held.iter().enumerate() {
            let mut r = list.reborrow().get(i as u32);
            r.set_descriptor(&grant.capability);
            r.set_provider_id(&grant.to_grain);
            r.set_provider_owner(owner);
            r.set_provider_kind(kind);
        }
        Ok(())
    }

    async fn save(
        self: CapRc<Self>,
        params: host::SaveParams,
        mut results: host::SaveResults,
    ) -> Result<(), capnp::Error> {
        let sup = self.sup()?;
        let _call = sup.admit_call(&self.id)?;
        let params = params.get()?;
        let label = params.get_label()?.to_str()?.to_owned();
        if label.len() > 200 {
            return Err(failed("label is longer than 200 bytes"));
        }
        let cap: capnp::capability::Client = params.get_cap().get_as_capability()?;
        let membrane = sup
            .membrane_of(cap)
            .await
            .filter(|m| m.holder == self.id)
            .ok_or_else(|| {
                failed("only a capability this grain obtained with request or restore can be saved")
            })?;
        sup.check_grant_live(membrane.grant_id)?;
        let token = granary_auth::generate_token().map_err(failed)?;
        let hash = granary_auth::token_hash(&token);
        let (holder, grant) = (self.id.clone(), membrane.grant_id);
        db(&sup.params.store, move |s| {
            s.retrying(|s| s.save_sturdy_ref(&hash, &holder, grant, &label))
        })
        .await
        .map_err(failed)?;
        results.get().set_token(&token);
        Ok(())
    }

    async fn restore(
        self: CapRc<Self>,
        params: host::RestoreParams,
        mut results: host::RestoreResults,
    ) -> Result<(), capnp::Error> {
        let sup = self.sup()?;
        let _call = sup.admit_call(&self.id)?;
        let hash = granary_auth::token_hash(params.get()?.get_token()?);
        let holder = self.id.clone();
        let grant = db(&sup.params.store, move |s| s.sturdy_ref(&hash, &holder))
            .await
            .map_err(failed)?
            .ok_or_else(|| failed("unknown or revoked token"))?;
        sup.check_grant_live(grant.id)?;
        let cap = sup.obtain(&grant, "restore").await?;
        let (id, holder) = (grant.id, self.id.clone());
        let _ = db(&sup.params.store, move |s| {
            s.record_event(&holder, "token.restore", &holder, &format!("grant={id}"))
        })
        .await;
        results.get().init_cap().set_as_capability(cap.hook);
        Ok(())
    }

    async fn drop(
        self: CapRc<Self>,
        params: host::DropParams,
        _: host::DropResults,
    ) -> Result<(), capnp::Error> {
        let sup = self.sup()?;
        let _call = sup.admit_call(&self.id)?;
        let hash = granary_auth::token_hash(params.get()?.get_token()?);
        let holder = self.id.clone();
        db(&sup.params.store, move |s| {
            s.retrying(|s| s.drop_sturdy_ref(&hash, &holder))
        })
        .await
        .map_err(failed)?;
        Ok(())
    }

    async fn stay_awake(
        self: CapRc<Self>,
        params: host::StayAwakeParams,
        mut results: host::StayAwakeResults,
    ) -> Result<(), capnp::Error> {
        let _call = self.sup()?.admit_call(&self.id)?;
        let reason = params.get()?.get_reason()?.to_str()?;
        let reason: String = reason.chars().take(200).collect();
        if self.activity.wake_locks.borrow().len() >= 64 {
            return Err(failed("more than 64 wake locks"));
        }
        tracing::info!(grain = %self.id, %reason, "wake lock taken");
        let id = self.activity.add_wake_lock(reason);
        let lock: wake_lock::Client = capnp_rpc::new_client(WakeLockImpl {
            activity: self.activity.clone(),
            id,
        });
        results.get().set_lock(lock);
        Ok(())
    }

    async fn log(
        self: CapRc<Self>,
        params: host::LogParams,
        _: host::LogResults,
    ) -> Result<(), capnp::Error> {
        // Not counted against the in-flight bound (it never waits on
        // anything): its own rate limit below bounds it, so a chatty app
        // loses lines rather than being cut off.
        let params = params.get()?;
        match self.activity.may_log() {
            Some(true) => {}
            Some(false) => {
                tracing::warn!(target: "grain", grain = %self.id, "grain logs too fast; dropping its lines for a while");
                return Ok(());
            }
            None => return Ok(()),
        }
        // Escaped, so a grain cannot forge lines of the host's log.
        let message: String = params
            .get_message()?
            .to_str()?
            .chars()
            .take(4096)
            .flat_map(char::escape_debug)
            .collect();
        let grain = &self.id;
        let level = params.get_level()?;
        match level {
            LogLevel::Error => tracing::error!(target: "grain", %grain, "{message}"),
            LogLevel::Warn => tracing::warn!(target: "grain", %grain, "{message}"),
            LogLevel::Info => tracing::info!(target: "grain", %grain, "{message}"),
            LogLevel::Debug => tracing::debug!(target: "grain", %grain, "{message}"),
        }
        // Into the grain's own log too (`granary grain logs`), never
        // waiting: a grain whose log drain is stuck loses lines, not time.
        let tag = match level {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
        };
        let line = format!("{tag}: {message}\n");
        let _ = nix::sys::socket::send(
            std::os::fd::AsRawFd::as_raw_fd(&self.log),
            line.as_bytes(),
            nix::sys::socket::MsgFlags::MSG_DONTWAIT | nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
        );
        Ok(())
    }
}

/// Released when the grain drops its last reference (or its channel dies).
struct WakeLockImpl {
    activity: Rc<Activity>,
    id: u64,
}

impl wake_lock::Server for WakeLockImpl {}

impl Drop for WakeLockImpl {
    fn drop(&mut self) {
        self.activity.release_wake_lock(self.id);
    }
}
