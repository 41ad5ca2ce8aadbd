//! The host's route between users' chat grains (`xmpp.route`,
//! `services.capnp`'s `XmppRouter`).
//!
//! Every grain of kind `xmpp` may ask its host for `xmpp.route` without a
//! grant: the route exists because the admin installed the chat app, as
//! `mail.deliver` exists because the mail app is installed. What it may do
//! with it is narrow. The host writes the sender's address itself, from
//! the grain's owner and Granary's domain (only the resource is taken from
//! the grain), so no grain can send as anyone else; it finds the
//! recipient's chat grain by the localpart of `to`, starts it if it is
//! stopped, and hands the stanza to that grain's `xmpp.deliver`, which
//! only the host can obtain. The recipient grain applies its owner's
//! blocking and subscription rules: the host does not read stanzas, with
//! one exception: a subscription request carrying the token of a contact
//! invite the recipient made (XEP-0379). The host checks the token with
//! the state and, when it is good, makes the two each other's contacts
//! (both grains' `befriend`) instead of passing the request on.

use std::rc::Weak;

use capnp::capability::{FromClientHook, Rc as CapRc};
use granary_schema::services_capnp::xmpp_router;

use crate::inner::{Inner, db};
use crate::{Supervisor, error};
use granary_grains::{GrainError, Problem};

/// What a chat grain asks its host for.
pub(crate) const XMPP_ROUTE: &str = "xmpp.route";
/// What the host asks the recipient's chat grain for.
pub(crate) const XMPP_DELIVER: &str = "xmpp.deliver";

/// Who a grain on the route sends as.
pub(crate) enum Sender {
    /// A user's chat grain: `<owner>@<domain>/<resource>`.
    User { owner: String },
    /// A group chat's grain: `<name>@rooms.<domain>/<nick>`. It speaks
    /// only to users of this server.
    Room { name: String },
}

/// One chat grain's end of the route: the sender is always the grain's
/// own address.
pub(crate) struct Router {
    pub(crate) sup: Weak<Inner>,
    /// The sending grain: its calls count against its in-flight bound.
    pub(crate) id: String,
    pub(crate) sender: Sender,
    /// The owner's chat domain (a change restarts the grain).
    pub(crate) domain: String,
    /// Held from a call's arrival until its stanza is sent on, so stanzas
    /// leave in the order the grain sent them even while the recipient
    /// is starting.
    pub(crate) order: tokio::sync::Mutex<()>,
}

/// A running chat grain's `xmpp.deliver`, asked for once per run.
async fn deliver_end(
    sup: &Inner,
    running: &std::rc::Rc<crate::slot::Running>,
) -> Result<xmpp_router::Client, Problem> {
    let cached = running.xmpp_deliver.borrow().clone();
    let cap = match cached {
        Some(c) => c,
        None => {
            let c = sup.offer(running, XMPP_DELIVER, "").await?;
            *running.xmpp_deliver.borrow_mut() = Some(c.clone());
            c
        }
    };
    Ok(xmpp_router::Client::new(cap.hook))
}

/// The errors the sending grain turns into stanza errors: the condition
/// comes first (`item-not-found: ...`).
fn refused(condition: &str, why: impl std::fmt::Display) -> capnp::Error {
    capnp::Error::failed(format!("{condition}: {why}"))
}

/// A resource as RFC 7622 allows it, roughly: not empty, at most 1023
/// bytes, no control characters, nothing XML cannot carry.
fn valid_resource(r: &str) -> bool {
    !r.is_empty()
        && r.len() <= 1023
        && !r
            .chars()
            .any(|c| c.is_control() || c == '\u{FFFE}' || c == '\u{FFFF}')
}

impl xmpp_router::Server for Router {
    async fn route(
        self: CapRc<Self>,
        params: xmpp_router::RouteParams,
        _: xmpp_router::RouteResults,
    ) -> Result<(), capnp::Error> {
        let sup = self
            .sup
            .upgrade()
            .ok_or_else(|| capnp::Error::disconnected("the host is shutting down".to_owned()))?;
        // Bounded like every call a grain makes through its host (the
        // grain keeps itself under it; a flood is cut off).
        let _call = sup.admit_call(&self.id)?;
        let order = self.order.lock().await;
        let p = params.get()?;
        let domain = self.domain.clone();
        let bare = match &self.sender {
            Sender::User { owner } => format!("{owner}@{domain}"),
            Sender::Room { name } => format!("{name}@rooms.{domain}"),
        };
        // Only the resource is the grain's to say.
        let claimed = p.get_from()?.to_str()?;
        let from = match claimed.split_once('/') {
            Some((_, r)) if valid_resource(r) => format!("{bare}/{r}"),
            Some(_) => return Err(refused("jid-malformed", "a bad resource")),
            None => bare,
        };
        // Parsed as the recipient's grain and other servers will parse it.
        let to = granary_wire::jid::Jid::parse(p.get_to()?.to_str()?)
            .map_err(|e| refused("jid-malformed", e))?;
        let (local, to_domain) = (to.local.clone(), to.domain.clone());
        let to = to.to_string();
        let stanza = p.get_stanza()?.to_str()?.to_owned();
        // A group chat here: rooms.<a chat domain served here>.
        if let Some(service) = to_domain.strip_prefix("rooms.")
            && sup
                .serves_chat_domain(service)
                .await
                .map_err(|e| refused("internal-server-error", e))?
        {
            let Sender::User { owner } = &self.sender else {
                return Err(refused("not-allowed", "rooms do not talk to rooms"));
            };
            let grain = sup
                .room_for(owner, &domain, local.as_deref(), service, &to, &stanza)
                .await?;
            return sup
                .xmpp_deliver(&grain, &from, &to, &stanza, Some(order), true)
                .await;
        }
        let owner = match &self.sender {
            Sender::User { owner } => owner.clone(),
            // A room's occupants are this server's users; other servers
            // would need the room's own federation (not built).
            Sender::Room { .. } => {
                if !sup
                    .serves_chat_domain(&to_domain)
                    .await
                    .map_err(|e| refused("internal-server-error", e))?
                {
                    return Err(refused(
                        "remote-server-not-found",
                        "rooms here have occupants of this server only",
                    ));
                }
                String::new()
            }
        };
        let ours = sup
            .serves_chat_domain(&to_domain)
            .await
            .map_err(|e| refused("internal-server-error", e))?;
        if !ours {
            // Another server's: the gateway's federation takes it from
            // here, and tells the sender's grain if it cannot deliver.
            let Some(out) = &sup.params.config.xmpp_outbound else {
                return Err(refused(
                    "remote-server-not-found",
                    "this server does not federate (the xmpp-s2s listener is off)",
                ));
            };
            let sent = out.try_send(granary_grains::mail::XmppStanza { from, to, stanza });
            drop(order);
            return match sent {
                Ok(()) => Ok(()),
                Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => Err(refused(
                    "resource-constraint",
                    "too many stanzas wait for other servers",
                )),
                Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => {
                    Err(refused("remote-server-not-found", "federation has stopped"))
                }
            };
        }
        let Some(local) = local else {
            return Err(refused(
                "service-unavailable",
                "stanzas to this server are not routed",
            ));
        };
        let Ok(grain) = granary_model::GrainId::for_user(&local.to_lowercase(), "xmpp") else {
            return Err(refused("item-not-found", "no such user"));
        };
        let grain = grain.to_string();
        // Only at the inviter's own address (a request to the wrong one
        // goes on, and their grain refuses it as usual).
        let mut preauth = match self.sender {
            Sender::User { .. } => preauth_token(&stanza),
            Sender::Room { .. } => None,
        };
        if preauth.is_some()
            && !sup
                .grain_domain(&local.to_lowercase(), "xmpp")
                .await
                .is_ok_and(|d| d.eq_ignore_ascii_case(&to_domain))
        {
            preauth = None;
        }
        if let Some(token) = preauth {
            let inviter = local.to_lowercase();
            let hash = granary_auth::token_hash(token.as_bytes());
            let who = owner.clone();
            let accepted = db(&sup.params.store, move |s| {
                s.retrying(|s| s.accept_contact_invite(&hash, &inviter, &who, "xmpp"))
            })
            .await
            .unwrap_or(false);
            if accepted {
                drop(order);
                let me = format!("{owner}@{domain}");
                let them = granary_wire::jid::Jid::parse(&to)
                    .map(|j| j.bare_text())
                    .unwrap_or_else(|_| to.clone());
                // The inviter's grain may run on another node.
                sup.befriend_anywhere(&grain, &me, &owner)
                    .await
                    .map_err(|p| refused("service-unavailable", p))?;
                sup.befriend(&self.id, &them, &local.to_lowercase())
                    .await
                    .map_err(|p| refused("service-unavailable", p))?;
                return Ok(());
            }
        }
        sup.xmpp_deliver(&grain, &from, &to, &stanza, Some(order), true)
            .await
    }
}

/// The token of a pre-authenticated subscription request (XEP-0379):
/// `<presence type='subscribe'><preauth xmlns='urn:xmpp:pars:0'
/// token='…'/></presence>`. Anything else (almost every stanza, told by a
/// substring before anything is parsed) is `None`.
fn preauth_token(stanza: &str) -> Option<String> {
    if !stanza.starts_with("<presence") || !stanza.contains("urn:xmpp:pars:0") {
        return None;
    }
    let el = granary_wire::stanza::parse_element(stanza.as_bytes(), "jabber:client").ok()?;
    if el.name != "presence" || el.attr("type") != Some("subscribe") {
        return None;
    }
    let token = el.child("preauth", "urn:xmpp:pars:0")?.attr("token")?;
    (16..=128).contains(&token.len()).then(|| token.to_owned())
}

/// Whether a stanza joins a room: available presence to `room/nick`.
fn is_join(stanza: &str, to: &str) -> bool {
    if !stanza.starts_with("<presence")
        || to.split_once('/').is_none_or(|(_, nick)| nick.is_empty())
    {
        return false;
    }
    granary_wire::stanza::parse_element(stanza.as_bytes(), "jabber:client")
        .is_ok_and(|el| el.name == "presence" && el.attr("type").is_none())
}

impl Inner {
    /// The grain of the room `name@rooms.<service>`, for a stanza from
    /// `owner` (whose chat domain is `domain`). A room nobody has made is
    /// made when one of this server's users joins it at their own chat
    /// domain: they are its owner, up to `rooms_per_user` rooms each.
    pub(crate) async fn room_for(
        self: &std::rc::Rc<Self>,
        owner: &str,
        domain: &str,
        name: Option<&str>,
        service: &str,
        to: &str,
        stanza: &str,
    ) -> Result<String, capnp::Error> {
        let no_room = || refused("item-not-found", "no such room");
        let Some(name) = name else {
            return Err(refused(
                "service-unavailable",
                "the room service itself answers nothing; join a room as name@rooms.<domain>/nick",
            ));
        };
        if !granary_model::valid_instance(name) {
            return Err(refused(
                "item-not-found",
                "a room's name is 1 to 32 of a-z, 0-9 and single dashes inside",
            ));
        }
        let room = name.to_owned();
        let found = db(&self.params.store, move |s| s.instance_grain("room", &room))
            .await
            .map_err(|e| refused("internal-server-error", e))?;
        if let Some(g) = found {
            // A room belongs to its owner's chat domain.
            let home = self
                .grain_domain(&g.user, "room")
                .await
                .map_err(|e| refused("internal-server-error", e))?;
            return if home.eq_ignore_ascii_case(service) {
                Ok(g.id)
            } else {
                Err(no_room())
            };
        }
        if !is_join(stanza, to) || !service.eq_ignore_ascii_case(domain) {
            return Err(no_room());
        }
        if granary_model::GrainId::parse(&format!("{owner}-room--{name}")).is_err() {
            return Err(refused(
                "not-acceptable",
                "that room name is too long for you: with its owner's name, a room's grain id is at most 64 characters",
            ));
        }
        let (user, room, uids, most) = (
            owner.to_owned(),
            name.to_owned(),
            granary_state::HostUid::FirstFreeIn(self.params.jail.uid_range),
            self.params.config.rooms_per_user,
        );
        let made = db(&self.params.store, move |s| {
            if s.app("room")?.is_none() {
                return Ok(Err(
                    "group chats are not installed here (the room app)".to_owned()
                ));
            }
            let user = granary_model::UserName::existing(&user)
                .map_err(|e| granary_state::StateError::Invalid(e.to_string()))?;
            match s.retrying(|s| s.create_instance_grain(&user, "room", &room, uids, most, "xmpp"))
            {
                Ok(g) => Ok(Ok(g.id)),
                // Made a moment ago by someone else's join: that room.
                Err(granary_state::StateError::Conflict(why)) => {
                    match s.instance_grain("room", &room)? {
                        Some(g) => Ok(Ok(g.id)),
                        None => Ok(Err(format!("{why} exists already"))),
                    }
                }
                // Past the user's allowance of rooms.
                Err(granary_state::StateError::Invalid(why)) => Ok(Err(why)),
                Err(e) => Err(e),
            }
        })
        .await
        .map_err(|e| refused("internal-server-error", e))?;
        match made {
            Ok(id) => {
                tracing::info!(grain = %id, owner, "a group chat was made");
                Ok(id)
            }
            Err(why) => Err(refused("not-allowed", why)),
        }
    }

    /// The domain a user's grain of `kind` is told is its own: for chat
    /// and its rooms, the user's chat domain.
    pub(crate) async fn grain_domain(&self, user: &str, kind: &str) -> Result<String, Problem> {
        if kind == "xmpp" || kind == "room" {
            let user = user.to_owned();
            if let Some(d) = db(&self.params.store, move |s| s.xmpp_domain_of(&user)).await? {
                return Ok(d);
            }
        }
        Ok(self.params.config.domain.clone())
    }

    /// Whether chat for `domain` is served here: Granary's domain or an
    /// added one (remembered once seen; other names are asked of the state
    /// each time, so a domain added a moment ago is served).
    pub(crate) async fn serves_chat_domain(&self, domain: &str) -> Result<bool, Problem> {
        let d = domain.to_ascii_lowercase();
        if d == self.params.config.domain || self.chat_domains.borrow().contains(&d) {
            return Ok(true);
        }
        let names = db(&self.params.store, |s| s.xmpp_domain_names()).await?;
        let hit = names.contains(&d);
        self.chat_domains.borrow_mut().extend(names);
        Ok(hit)
    }

    /// Makes `jid` the contact of `grain`'s user, both ways, starting the
    /// grain if it is stopped.
    pub(crate) async fn befriend(
        self: &std::rc::Rc<Self>,
        grain: &str,
        jid: &str,
        name: &str,
    ) -> Result<(), Problem> {
        self.ask_deliver(
            grain,
            "befriend",
            |deliver| {
                let mut request = deliver.befriend_request();
                request.get().set_jid(jid);
                request.get().set_name(name);
                request.send().promise
            },
            |_| Ok(()),
        )
        .await
    }

    /// [`Inner::befriend`], done by the node that runs `grain` when that
    /// is another one (on a cluster, for a grain not running here).
    async fn befriend_anywhere(
        self: &std::rc::Rc<Self>,
        grain: &str,
        jid: &str,
        name: &str,
    ) -> Result<(), Problem> {
        let remote = self.params.remote_grants.clone();
        if let Some(remote) = remote.filter(|_| !self.is_up(grain)) {
            let asked = remote.befriend(grain.to_owned(), jid.to_owned(), name.to_owned());
            match tokio::time::timeout(self.params.config.call_timeout, asked).await {
                Ok(None) => {}
                Ok(Some(done)) => return done.map_err(|e| e.problem),
                Err(_) => {
                    return Err(Problem::Grain(
                        "befriend: the grain's node did not answer".to_owned(),
                    ));
                }
            }
        }
        self.befriend(grain, jid, name).await
    }

    /// One question to `grain`'s `xmpp.deliver` (starting the grain if it
    /// is stopped), answered within the call timeout: `ask` sends it on
    /// the capability, `read` takes the answer apart. Errors name `what`.
    async fn ask_deliver<R: capnp::traits::Owned, T>(
        self: &std::rc::Rc<Self>,
        grain: &str,
        what: &str,
        ask: impl FnOnce(
            &xmpp_router::Client,
        )
            -> capnp::capability::Promise<capnp::capability::Response<R>, capnp::Error>,
        read: impl FnOnce(capnp::capability::Response<R>) -> Result<T, capnp::Error>,
    ) -> Result<T, Problem> {
        let running = self.ensure_running(grain).await?;
        let _busy = running.activity.busy();
        let deliver = deliver_end(self, &running).await?;
        let failed = |e: String| Problem::Grain(format!("{what}: {e}"));
        let answer = tokio::time::timeout(self.params.config.call_timeout, ask(&deliver))
            .await
            .map_err(|_| failed("timed out".to_owned()))?
            .map_err(|e| failed(e.to_string()))?;
        read(answer).map_err(|e| failed(e.to_string()))
    }

    /// Hands one stanza to `grain`'s `xmpp.deliver`, starting the grain if
    /// it is stopped. `order` is released once the stanza is on its way
    /// (once the grain's node has it, when that is another one). A stanza
    /// a grain here routes (`across`) to a grain not running here goes,
    /// on a cluster, to the node that runs it; one that came from another
    /// node or server goes no further.
    pub(crate) async fn xmpp_deliver(
        self: &std::rc::Rc<Self>,
        grain: &str,
        from: &str,
        to: &str,
        stanza: &str,
        order: Option<tokio::sync::MutexGuard<'_, ()>>,
        across: bool,
    ) -> Result<(), capnp::Error> {
        // Asked first for a grain not running here: starting it here would
        // only be refused by the start gate.
        let remote = self.params.remote_grants.clone();
        if let Some(remote) = remote.filter(|_| across && !self.is_up(grain)) {
            let stanza = granary_grains::mail::XmppStanza {
                from: from.to_owned(),
                to: to.to_owned(),
                stanza: stanza.to_owned(),
            };
            let handed = remote.deliver_xmpp(grain.to_owned(), stanza);
            match tokio::time::timeout(self.params.config.call_timeout, handed).await {
                // This node's to run after all: below.
                Ok(None) => {}
                Ok(Some(Ok(()))) => return Ok(()),
                // The recipient's own refusal stands, as here.
                Ok(Some(Err(GrainError {
                    problem: Problem::Grain(extra),
                    ..
                }))) => return Err(capnp::Error::failed(extra)),
                Ok(Some(Err(other))) => {
                    return Err(refused("service-unavailable", other.problem));
                }
                Err(_) => {
                    return Err(refused(
                        "remote-server-timeout",
                        "the recipient's node did not answer",
                    ));
                }
            }
        }
        let running = match self.ensure_running(grain).await {
            Ok(r) => r,
            Err(Problem::NoSuchGrain) => return Err(refused("item-not-found", "no such user")),
            Err(e) => return Err(refused("service-unavailable", e)),
        };
        let _busy = running.activity.busy();
        let deliver = deliver_end(self, &running)
            .await
            .map_err(|e| refused("service-unavailable", e))?;
        let mut request = deliver.route_request();
        {
            let mut r = request.get();
            r.set_from(from);
            r.set_to(to);
            r.set_stanza(stanza);
        }
        let sent = request.send().promise;
        drop(order);
        let answer = tokio::time::timeout(self.params.config.call_timeout, sent).await;
        match answer {
            Ok(Ok(_)) => Ok(()),
            // The recipient's own refusal (blocked, not subscribed) stands.
            Ok(Err(e)) => Err(e),
            Err(_) => Err(refused(
                "remote-server-timeout",
                "the recipient did not answer",
            )),
        }
    }
}

impl Supervisor {
    /// A stanza from another server for `grain` (the gateway's federation
    /// has checked both addresses).
    pub async fn deliver_xmpp(
        &self,
        grain: &str,
        stanza: granary_grains::mail::XmppStanza,
    ) -> Result<(), granary_grains::GrainError> {
        self.inner
            .xmpp_deliver(grain, &stanza.from, &stanza.to, &stanza.stanza, None, false)
            .await
            .map_err(|e| error(grain, Problem::Grain(e.extra)))
    }

    /// Makes `jid` the contact of `grain`'s user, both ways (an invite of
    /// theirs was redeemed), through its `xmpp.deliver`.
    pub async fn xmpp_befriend(
        &self,
        grain: &str,
        jid: &str,
        name: &str,
    ) -> Result<(), granary_grains::GrainError> {
        self.inner
            .befriend(grain, jid, name)
            .await
            .map_err(|p| error(grain, p))
    }

    /// A room grain's owner, admins and members, asked of its
    /// `xmpp.deliver`.
    pub async fn xmpp_room_members(
        &self,
        grain: &str,
    ) -> Result<Vec<String>, granary_grains::GrainError> {
        self.inner
            .ask_deliver(
                grain,
                "members",
                |deliver| deliver.members_request().send().promise,
                |answer| {
                    let mut out = Vec::new();
                    for j in answer.get()?.get_jids()? {
                        out.push(j?.to_string()?);
                    }
                    Ok(out)
                },
            )
            .await
            .map_err(|p| error(grain, p))
    }

    /// A chat grain's sessions and sizes, asked of its `xmpp.deliver`.
    pub async fn xmpp_status(
        &self,
        grain: &str,
    ) -> Result<granary_grains::mail::XmppStatus, granary_grains::GrainError> {
        self.inner
            .ask_deliver(
                grain,
                "status",
                |deliver| deliver.status_request().send().promise,
                |answer| {
                    let r = answer.get()?;
                    let mut resources = Vec::new();
                    for t in r.get_resources()? {
                        resources.push(t?.to_string()?);
                    }
                    Ok(granary_grains::mail::XmppStatus {
                        resources,
                        contacts: r.get_contacts(),
                        archived: r.get_archived(),
                        offline: r.get_offline(),
                    })
                },
            )
            .await
            .map_err(|p| error(grain, p))
    }
}
