//! The account's live state: its sessions (one per resource), where
//! stanzas for the account go (RFC 6121 §8.5), what leaves for other
//! users (through the host's `xmpp.route`), carbons and the archive.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashSet, VecDeque};
use std::rc::Rc;

use granary_sdk::services_capnp::xmpp_router;
use granary_wire::stanza::{Element, parse_element};
use tokio::sync::mpsc;

use crate::jid::Jid;
use crate::ns;
use crate::store::Store;

/// What a session's writer task sends to its client.
#[derive(Debug)]
pub enum Out {
    Xml(String),
    /// Write this (a stream error or close) and end the connection.
    Close(String),
}

/// XEP-0198 state of a session that enabled it.
#[derive(Debug, Default)]
pub struct Sm {
    pub id: String,
    pub resumable: bool,
    /// Stanzas received from the client.
    pub handled_in: u32,
    /// Stanzas sent to the client, and those not yet acknowledged (the
    /// oldest is number `sent - unacked.len() + 1`).
    pub sent: u32,
    pub unacked: VecDeque<Element>,
    /// Their size as sent, in the same order, and the total.
    pub unacked_sizes: VecDeque<usize>,
    pub unacked_bytes: usize,
}

impl Sm {
    /// Forgets the oldest `n` unacknowledged stanzas.
    pub fn drop_acked(&mut self, n: usize) {
        self.unacked.drain(..n);
        for size in self.unacked_sizes.drain(..n) {
            self.unacked_bytes -= size;
        }
    }

    fn full(&self) -> bool {
        self.unacked.len() >= MAX_UNACKED || self.unacked_bytes >= MAX_QUEUED
    }
}

/// Where a session puts messages it can no longer take: the account's
/// offline store.
pub struct Spill {
    pub store: Rc<Store>,
    pub domain: String,
}

#[derive(Debug, Default)]
pub struct SessionState {
    /// Where stanzas for the client go; `None` while a resumable session
    /// is detached.
    pub out: Option<mpsc::UnboundedSender<Out>>,
    /// The last available presence it broadcast; `None` until initial
    /// presence (and after unavailable).
    pub presence: Option<Element>,
    pub priority: i32,
    /// It asked for the roster: it gets pushes and subscription requests.
    pub interested: bool,
    pub carbons: bool,
    pub blocklist_pushes: bool,
    /// XEP-0352: presence is held (the latest per sender) until active.
    pub inactive: bool,
    pub held: Vec<Element>,
    pub sm: Option<Sm>,
    /// Full addresses it sent directed presence to.
    pub directed: HashSet<String>,
    /// Full addresses it just sent unavailable to: a room answers that
    /// with its own unavailable (XEP-0045 §7.14), which is let through once.
    pub leaving: HashSet<String>,
    /// Bytes queued for the connection's writer and not written yet.
    pub queued: Rc<std::cell::Cell<usize>>,
    /// The connection is being closed (it fell too far behind): nothing
    /// more is queued for it.
    pub closing: bool,
    /// Wakes the connection's reader to end it (see `closing`).
    pub closer: Rc<tokio::sync::Notify>,
    /// How many times it was detached: a resumption timer ends only the
    /// detachment it was started for.
    pub detached: u64,
}

/// Offline messages kept for a user, at most (then senders are told
/// `resource-constraint`).
pub const MAX_OFFLINE: u64 = 10_000;
pub const MAX_OFFLINE_BYTES: u64 = 64 << 20;

/// Stanzas on their way through the host at once, per grain (under the
/// host's own bound on a grain's calls).
pub const MAX_IN_FLIGHT: usize = 64;

/// [`MAX_IN_FLIGHT`], or half the host's bound on a grain's calls when
/// that is lower (`GRANARY_MAX_IN_FLIGHT`).
fn max_in_flight() -> usize {
    std::env::var("GRANARY_MAX_IN_FLIGHT")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .map_or(MAX_IN_FLIGHT, |host| (host / 2).clamp(1, MAX_IN_FLIGHT))
}
/// Stanzas waiting for the host before sessions stop reading.
pub const MAX_OUTBOX: usize = 1024;

/// Every this many unacknowledged stanzas the server asks for an ack.
pub const ACK_EVERY: usize = 10;
/// Unacknowledged stanzas kept for one session, at most.
pub const MAX_UNACKED: usize = 10_000;

/// How much may wait for a client that does not read before its stream
/// is closed.
pub const MAX_QUEUED: usize = 16 << 20;

pub struct Session {
    pub resource: String,
    pub full: Jid,
    pub state: RefCell<SessionState>,
    /// `None` only outside a grain (tests): then such messages are dropped.
    pub spill: Option<Spill>,
}

fn is_presence_update(el: &Element) -> bool {
    el.name == "presence" && matches!(el.attr("type"), None | Some("unavailable"))
}

impl Session {
    /// Sends a stanza to the client (or keeps it for a detached
    /// stream-managed session).
    pub fn send(&self, el: Element) {
        let mut st = self.state.borrow_mut();
        if st.inactive && is_presence_update(&el) {
            let from = el.attr("from").map(str::to_owned);
            st.held
                .retain(|h| h.attr("from").map(str::to_owned) != from);
            st.held.push(el);
            return;
        }
        let mut batch = std::mem::take(&mut st.held);
        batch.push(el);
        for el in batch {
            // A session that is ending, or detached with all it may keep,
            // takes nothing more: a message for the user is kept offline
            // instead, anything else is dropped.
            let full = st.sm.as_ref().is_some_and(Sm::full);
            if st.closing || (st.out.is_none() && full) {
                if let Some(spill) = &self.spill {
                    keep_offline(&spill.store, &spill.domain, &el);
                }
                continue;
            }
            let xml = el.to_xml(ns::CLIENT);
            let len = xml.len();
            let mut ask = false;
            if let Some(sm) = st.sm.as_mut() {
                sm.sent = sm.sent.wrapping_add(1);
                sm.unacked.push_back(el);
                sm.unacked_sizes.push_back(len);
                sm.unacked_bytes += len;
                // Ask for an acknowledgement now and then, so what the
                // client has is dropped here; a client that never answers
                // loses its stream before the queue grows without end.
                ask = sm.unacked.len() % ACK_EVERY == 0;
                if sm.full() && st.out.is_some() {
                    st.closing = true;
                    st.closer.notify_one();
                    continue;
                }
            }
            if let Some(out) = st.out.clone() {
                let queued = st.queued.get() + len;
                st.queued.set(queued);
                if queued > MAX_QUEUED {
                    // It does not read: the connection ends now (a
                    // resumable session keeps what was not acknowledged;
                    // the writer is stuck behind the unread bytes, so no
                    // goodbye can reach it).
                    st.closing = true;
                    st.closer.notify_one();
                    continue;
                }
                let _ = out.send(Out::Xml(xml));
                if ask {
                    let _ = out.send(Out::Xml(format!("<r xmlns='{}'/>", ns::SM)));
                }
            }
        }
    }

    /// Sends what was held while inactive.
    pub fn flush_held(&self) {
        let held = std::mem::take(&mut self.state.borrow_mut().held);
        for el in held {
            self.send(el);
        }
    }

    pub fn available(&self) -> bool {
        self.state.borrow().presence.is_some()
    }
}

/// The account.
pub struct Server {
    pub store: Rc<Store>,
    pub domain: String,
    pub bare: Jid,
    pub sessions: RefCell<BTreeMap<String, Rc<Session>>>,
    /// Detached, resumable sessions by their XEP-0198 id.
    pub resumable: RefCell<BTreeMap<String, Rc<Session>>>,
    /// The host's route to other users; set once at start.
    pub router: RefCell<Option<xmpp_router::Client>>,
    /// Stanzas for other users waiting to be handed to the host, and how
    /// many the host has not answered yet.
    outbox: RefCell<VecDeque<(Jid, Jid, Element)>>,
    in_flight: std::cell::Cell<usize>,
    max_in_flight: usize,
    /// Woken when the outbox is empty.
    drained: tokio::sync::Notify,
    /// Messages to archive, written together once the session that
    /// produced them has nothing more to read right now.
    to_archive: RefCell<(Vec<crate::store::Archived>, Vec<String>)>,
    archive_flush: std::cell::Cell<bool>,
    pub limits: crate::session::Limits,
    /// The app servers push notifications may go to (XEP-0357).
    pub push_servers: Vec<String>,
    /// When each push registration was last notified.
    pub push_sent: RefCell<std::collections::HashMap<String, std::time::Instant>>,
    /// File sharing (XEP-0363).
    pub upload: crate::upload::Settings,
    /// Slots being uploaded to right now.
    pub uploading: RefCell<HashSet<String>>,
}

pub use granary_wire::stanza::{error_kind, error_reply};

/// The refusal of a stanza to an address the user blocked (XEP-0191).
pub fn blocked_error(el: &Element) -> Element {
    let mut e = error_reply(
        el,
        "cancel",
        "not-acceptable",
        Some("you blocked this address"),
    );
    if let Some(granary_wire::stanza::Node::Element(err)) = e.children.last_mut() {
        err.push(Element::new("blocked", ns::BLOCKING_ERRORS));
    }
    e
}

/// Milliseconds since the epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A random id (archive ids, stream ids).
pub fn random_id() -> String {
    use base64::Engine;
    let mut b = [0u8; 12];
    let _ = getrandom::fill(&mut b);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// Whether a message is worth keeping offline and archiving (XEP-0313
/// §5.1.1, XEP-0334 hints): it has a body (or is encrypted), or asks to
/// be stored, and does not say `no-store`. (`no-permanent-store` keeps it
/// out of the archive only: [`permanent`].)
pub fn archivable(el: &Element) -> bool {
    if el.child("no-store", ns::HINTS).is_some() {
        return false;
    }
    matches!(el.attr("type"), None | Some("chat") | Some("normal"))
        && (el.child("body", ns::CLIENT).is_some()
            || el.child("store", ns::HINTS).is_some()
            || el.child_ns("eu.siacs.conversations.axolotl").is_some()
            || el.child_ns("urn:xmpp:omemo:2").is_some())
}

/// Keeps a message for the user's next login, stamped with when (XEP-0203),
/// if it is one worth keeping and the offline store has room; whether it
/// was kept.
pub fn keep_offline(store: &Store, domain: &str, el: &Element) -> bool {
    if el.name != "message" || !archivable(el) {
        return false;
    }
    let (count, bytes) = store.offline_size().unwrap_or((0, 0));
    if count >= MAX_OFFLINE || bytes >= MAX_OFFLINE_BYTES {
        return false;
    }
    let mut kept = el.clone();
    if kept.child("delay", ns::DELAY).is_none() {
        kept.push(
            Element::new("delay", ns::DELAY)
                .with_attr("from", domain.to_owned())
                .with_attr("stamp", crate::account::stamp(now_ms())),
        );
    }
    store.push_offline(&kept.to_xml(ns::CLIENT)).is_ok()
}

/// Whether a message may go into the archive (not `no-permanent-store`).
pub fn permanent(el: &Element) -> bool {
    el.child("no-permanent-store", ns::HINTS).is_none()
}

impl Server {
    pub fn new(
        store: Rc<Store>,
        owner: &str,
        domain: &str,
    ) -> Result<Server, crate::jid::JidError> {
        Ok(Server {
            upload: crate::upload::Settings::from_env(&store.dir),
            store,
            domain: domain.to_owned(),
            bare: Jid::parse(&format!("{owner}@{domain}"))?,
            sessions: RefCell::default(),
            resumable: RefCell::default(),
            router: RefCell::default(),
            outbox: RefCell::default(),
            in_flight: std::cell::Cell::new(0),
            max_in_flight: max_in_flight(),
            drained: tokio::sync::Notify::new(),
            to_archive: RefCell::default(),
            archive_flush: std::cell::Cell::new(false),
            limits: crate::session::Limits::from_env(),
            push_servers: crate::push::servers_from_env(),
            push_sent: RefCell::default(),
            uploading: RefCell::default(),
        })
    }

    /// Whether the user blocked this address (full, bare, or its domain).
    pub fn blocks(&self, who: &Jid) -> bool {
        self.store
            .is_blocked(&who.to_string(), &who.bare_text(), &who.domain)
            .unwrap_or(false)
    }

    pub fn session(&self, resource: &str) -> Option<Rc<Session>> {
        self.sessions.borrow().get(resource).cloned()
    }

    pub fn all_sessions(&self) -> Vec<Rc<Session>> {
        self.sessions.borrow().values().cloned().collect()
    }

    /// Archives a message (with `with`, the other party's bare address):
    /// queued and written in one transaction with the others of the same
    /// burst; a MAM query, a snapshot and shutdown write the queue first.
    pub fn archive(self: &Rc<Self>, id: &str, with: &str, stanza: String) {
        {
            let mut q = self.to_archive.borrow_mut();
            q.0.push(crate::store::Archived {
                id: id.to_owned(),
                ts: now_ms(),
                stanza,
            });
            q.1.push(with.to_owned());
        }
        // Outside the grain's runtime (tests, fuzzing): written at once.
        if tokio::runtime::Handle::try_current().is_err() {
            self.flush_archive();
            return;
        }
        if !self.archive_flush.replace(true) {
            let me = self.clone();
            tokio::task::spawn_local(async move {
                tokio::task::yield_now().await;
                me.flush_archive();
            });
        }
    }

    /// Writes the queued archive entries.
    pub fn flush_archive(&self) {
        self.archive_flush.set(false);
        let (items, with) = std::mem::take(&mut *self.to_archive.borrow_mut());
        if !items.is_empty() && self.store.archive_many(&items, &with).is_err() {
            // One bad entry must not cost the others theirs.
            for (item, w) in items.iter().zip(&with) {
                if let Err(e) = self
                    .store
                    .archive_many(std::slice::from_ref(item), std::slice::from_ref(w))
                {
                    granary_sdk::log::error(&format!("archiving a message: {e}"));
                }
            }
        }
    }

    pub fn has_message_targets(&self) -> bool {
        !self.message_targets().is_empty()
    }

    /// Available sessions with non-negative priority: where a message to
    /// the bare address goes (RFC 6121 §8.5.2.1.1).
    fn message_targets(&self) -> Vec<Rc<Session>> {
        self.all_sessions()
            .into_iter()
            .filter(|s| {
                let st = s.state.borrow();
                st.presence.is_some() && st.priority >= 0 && !st.closing
            })
            .collect()
    }

    /// A stanza for this account, from `from` (already stamped by the host
    /// or ours): RFC 6121 §8.5 delivery. Blocking, subscriptions and
    /// offline storage are decided here.
    pub fn deliver(self: &Rc<Self>, from: &Jid, to: &Jid, mut el: Element) {
        el.set_attr("from", from.to_string());
        el.set_attr("to", to.to_string());
        let from_self = from.bare() == self.bare;
        if !from_self && self.blocks(from) {
            if el.name == "iq" && matches!(el.attr("type"), Some("get") | Some("set")) {
                let reply = error_reply(&el, "cancel", "service-unavailable", None);
                self.route_from_account(reply);
            }
            return;
        }
        match el.name.as_str() {
            "presence" => crate::presence::inbound(self, from, to, el),
            "iq" => self.deliver_iq(from, to, el),
            "message" => self.deliver_message(from, to, el),
            _ => {}
        }
    }

    fn deliver_iq(self: &Rc<Self>, from: &Jid, to: &Jid, el: Element) {
        let kind = el.attr("type").unwrap_or("");
        if to.is_bare() {
            if matches!(kind, "get" | "set") {
                crate::account::handle_iq(self, from, None, el);
            } else {
                crate::push::refused(self, from, &el);
            }
            return;
        }
        match self.session(to.resource.as_deref().unwrap_or("")) {
            Some(s) => s.send(el),
            None if matches!(kind, "get" | "set") => {
                let reply = error_reply(&el, "cancel", "service-unavailable", None);
                self.route_from_account(reply);
            }
            None => {}
        }
    }

    fn deliver_message(self: &Rc<Self>, from: &Jid, to: &Jid, mut el: Element) {
        let kind = el.attr("type").unwrap_or("normal").to_owned();
        if kind == "error" && to.is_bare() {
            return;
        }
        // A stanza-id claiming to be ours is a forgery (XEP-0359 §5).
        let ours = self.bare.to_string();
        el.retain_children(|c| {
            !(c.is("stanza-id", ns::SID) && c.attr("by") == Some(ours.as_str()))
        });
        let keep = archivable(&el) && from.bare() != self.bare;
        if keep && permanent(&el) {
            let id = random_id();
            self.archive(&id, &from.bare_text(), el.to_xml(ns::CLIENT));
            el.push(
                Element::new("stanza-id", ns::SID)
                    .with_attr("by", self.bare.to_string())
                    .with_attr("id", id),
            );
        }
        // A full address that is online gets it alone (RFC 6121 §8.5.3.1).
        if let Some(s) = to.resource.as_deref().and_then(|r| self.session(r)) {
            let resource = s.resource.clone();
            s.send(el.clone());
            if kind == "chat" {
                self.carbon("received", &el, Some(&resource));
            }
            return;
        }
        match kind.as_str() {
            // Group chat messages only ever go to an occupant's full
            // address (RFC 6121 §8.5.2.1.1, §8.5.3.2.1).
            "groupchat" => {
                let reply = error_reply(&el, "cancel", "service-unavailable", None);
                self.route_from_account(reply);
                return;
            }
            "headline" | "error" if to.resource.is_some() => return,
            _ => {}
        }
        let targets = self.message_targets();
        if targets.is_empty() {
            if matches!(kind.as_str(), "chat" | "normal") && keep {
                if keep_offline(&self.store, &self.domain, &el) {
                    crate::push::notify(self);
                } else {
                    let reply = error_reply(
                        &el,
                        "wait",
                        "resource-constraint",
                        Some("their offline storage is full"),
                    );
                    self.route_from_account(reply);
                }
            }
            return;
        }
        // Every session that takes it is detached (a phone asleep): wake
        // the app through its push service.
        if keep && targets.iter().all(|s| s.state.borrow().out.is_none()) {
            crate::push::notify(self);
        }
        let carbons = kind == "chat"
            && el.child("private", ns::CARBONS).is_none()
            && el.child("no-copy", ns::HINTS).is_none();
        for s in &targets {
            s.send(el.clone());
        }
        if carbons {
            // Sessions that got it directly need no carbon.
            let got: HashSet<&str> = targets.iter().map(|s| s.resource.as_str()).collect();
            for s in self.all_sessions() {
                if !got.contains(s.resource.as_str()) && s.state.borrow().carbons {
                    s.send(self.wrap_carbon("received", &el, &s.full));
                }
            }
        }
    }

    /// A carbon of `el` for every other session that enabled carbons
    /// (XEP-0280): `sent` for what a resource sent, `received` for what
    /// one resource alone received.
    pub fn carbon(&self, direction: &str, el: &Element, except: Option<&str>) {
        if el.attr("type") != Some("chat")
            || el.child("private", ns::CARBONS).is_some()
            || el.child("no-copy", ns::HINTS).is_some()
        {
            return;
        }
        for s in self.all_sessions() {
            if Some(s.resource.as_str()) != except && s.state.borrow().carbons {
                s.send(self.wrap_carbon(direction, el, &s.full));
            }
        }
    }

    fn wrap_carbon(&self, direction: &str, el: &Element, to: &Jid) -> Element {
        Element::new("message", ns::CLIENT)
            .with_attr("from", self.bare.to_string())
            .with_attr("to", to.to_string())
            .with_attr("type", "chat")
            .with_child(
                Element::new(direction, ns::CARBONS)
                    .with_child(Element::new("forwarded", ns::FORWARD).with_child(el.clone())),
            )
    }

    /// A stanza the account itself sends (an error, an automatic
    /// presence reply), from the bare address.
    pub fn route_from_account(self: &Rc<Self>, el: Element) {
        let Some(to) = el.attr("to").and_then(|t| Jid::parse(t).ok()) else {
            return;
        };
        let from = self.bare.clone();
        self.route(&from, &to, el);
    }

    /// Sends a stanza from this account (`from` is the bare address or one
    /// of its resources) to `to`: delivered here when it is this account,
    /// else through the host. A message or iq the host cannot deliver
    /// comes back to the sender as an error.
    pub fn route(self: &Rc<Self>, from: &Jid, to: &Jid, el: Element) {
        if to.bare() == self.bare {
            self.deliver(from, to, el);
            return;
        }
        // Nothing leaves for an address the user blocked (XEP-0191 §3.3):
        // presence and events are dropped, a request or message refused.
        if self.blocks(to) {
            if granary_wire::stanza::wants_error_reply(&el)
                && let Some(s) = from.resource.as_deref().and_then(|r| self.session(r))
            {
                let mut original = el.clone();
                original.set_attr("to", to.to_string());
                s.send(blocked_error(&original));
            }
            return;
        }
        self.send_out(from, to, el);
    }

    /// Queues a stanza for the host as it is: the caller has checked that
    /// it is for another user and not blocked ([`Server::route`] does).
    pub fn send_out(self: &Rc<Self>, from: &Jid, to: &Jid, el: Element) {
        self.outbox
            .borrow_mut()
            .push_back((from.clone(), to.clone(), el));
        self.pump();
    }

    /// Sends queued stanzas to the host while fewer than
    /// [`MAX_IN_FLIGHT`] are on their way (in the order queued).
    fn pump(self: &Rc<Self>) {
        loop {
            if self.in_flight.get() >= self.max_in_flight {
                return;
            }
            let Some((from, to, el)) = self.outbox.borrow_mut().pop_front() else {
                self.drained.notify_waiters();
                return;
            };
            // Sessions waiting for room read again at half the bound.
            if self.outbox.borrow().len() == MAX_OUTBOX / 2 {
                self.drained.notify_waiters();
            }
            let Some(router) = self.router.borrow().clone() else {
                self.bounce(&from, &to, &el, "service-unavailable");
                continue;
            };
            let mut request = router.route_request();
            {
                let mut r = request.get();
                r.set_from(from.to_string());
                r.set_to(to.to_string());
                r.set_stanza(el.to_xml(ns::CLIENT));
            }
            let sent = request.send().promise;
            self.in_flight.set(self.in_flight.get() + 1);
            let me = self.clone();
            tokio::task::spawn_local(async move {
                let result = sent.await;
                me.in_flight.set(me.in_flight.get() - 1);
                if let Err(e) = result {
                    let text = granary_sdk::message(&e);
                    let condition = text
                        .split_once(':')
                        .map(|(c, _)| c.trim())
                        .filter(|c| {
                            !c.is_empty() && c.bytes().all(|b| b.is_ascii_lowercase() || b == b'-')
                        })
                        .unwrap_or("service-unavailable")
                        .to_owned();
                    me.bounce(&from, &to, &el, &condition);
                }
                me.pump();
            });
        }
    }

    /// Waits while more than [`MAX_OUTBOX`] stanzas wait for the host (until
    /// half of them have gone): a
    /// session reads its client's next stanza only then, so a fast sender
    /// is slowed by TCP instead of filling memory.
    pub async fn room_in_outbox(&self) {
        if self.outbox.borrow().len() <= MAX_OUTBOX {
            return;
        }
        while self.outbox.borrow().len() > MAX_OUTBOX / 2 {
            self.drained.notified().await;
        }
    }

    /// Tells the sender a message or request could not be delivered.
    fn bounce(self: &Rc<Self>, from: &Jid, to: &Jid, el: &Element, condition: &str) {
        if !granary_wire::stanza::wants_error_reply(el) {
            return;
        }
        let mut original = el.clone();
        original.set_attr("from", from.to_string());
        original.set_attr("to", to.to_string());
        let reply = error_reply(&original, error_kind(condition), condition, None);
        if let Some(s) = from.resource.as_deref().and_then(|r| self.session(r)) {
            s.send(reply);
        }
    }

    /// Parses a stanza another grain sent through the host: the host's
    /// `from` and `to` replace whatever it says.
    pub fn deliver_routed(
        self: &Rc<Self>,
        from: &str,
        to: &str,
        stanza: &str,
    ) -> Result<(), String> {
        if stanza.len() > self.limits.max_stanza {
            return Err("policy-violation: the stanza is too large".to_owned());
        }
        let from = Jid::parse(from).map_err(|e| format!("jid-malformed: {e}"))?;
        let to = Jid::parse(to).map_err(|e| format!("jid-malformed: {e}"))?;
        if to.bare() != self.bare {
            return Err("item-not-found: not this account".to_owned());
        }
        let el = parse_element(stanza.as_bytes(), ns::CLIENT)
            .map_err(|e| format!("not-acceptable: {e}"))?;
        if el.ns != ns::CLIENT || !matches!(el.name.as_str(), "message" | "presence" | "iq") {
            return Err("bad-request: not a stanza".to_owned());
        }
        // A room's stanza for a client that is not connected: the room is
        // told at once and takes the client out (XEP-0045's ghosts).
        let from_room = from.local.is_some() && from.domain.starts_with("rooms.");
        let for_occupant = (el.name == "message" && el.attr("type") == Some("groupchat"))
            || (el.name == "presence" && el.child("x", crate::room::MUC_USER).is_some());
        if from_room
            && for_occupant
            && to
                .resource
                .as_deref()
                .is_some_and(|r| self.session(r).is_none())
        {
            return Err("item-not-found: that client is not connected".to_owned());
        }
        self.deliver(&from, &to, el);
        Ok(())
    }
}

/// `xmpp.deliver`: what the host calls with stanzas from other users.
pub struct Deliver {
    pub server: Rc<Server>,
}

impl xmpp_router::Server for Deliver {
    async fn route(
        self: capnp::capability::Rc<Self>,
        params: xmpp_router::RouteParams,
        _: xmpp_router::RouteResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        self.server
            .deliver_routed(
                p.get_from()?.to_str()?,
                p.get_to()?.to_str()?,
                p.get_stanza()?.to_str()?,
            )
            .map_err(capnp::Error::failed)
    }

    async fn status(
        self: capnp::capability::Rc<Self>,
        _: xmpp_router::StatusParams,
        mut results: xmpp_router::StatusResults,
    ) -> Result<(), capnp::Error> {
        let failed = |e: crate::store::StoreError| capnp::Error::failed(e.to_string());
        self.server.flush_archive();
        let (contacts, archived) = self.server.store.sizes().map_err(failed)?;
        let offline = self.server.store.offline_count().map_err(failed)?;
        let resources: Vec<String> = self.server.sessions.borrow().keys().cloned().collect();
        let mut r = results.get();
        let mut list = r.reborrow().init_resources(resources.len() as u32);
        for (i, res) in resources.iter().enumerate() {
            list.set(i as u32, res);
        }
        r.set_contacts(contacts);
        r.set_archived(archived);
        r.set_offline(offline);
        Ok(())
    }

    async fn befriend(
        self: capnp::capability::Rc<Self>,
        params: xmpp_router::BefriendParams,
        _: xmpp_router::BefriendResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let jid = Jid::parse(p.get_jid()?.to_str()?)
            .map_err(|e| capnp::Error::failed(format!("jid-malformed: {e}")))?;
        if jid.local.is_none() {
            return Err(capnp::Error::failed(
                "jid-malformed: a contact is a user's address".to_owned(),
            ));
        }
        crate::presence::befriend(&self.server, &jid, p.get_name()?.to_str()?)
            .map_err(capnp::Error::failed)
    }
}
