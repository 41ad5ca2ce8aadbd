//! A group chat (XEP-0045) as a grain of its own: `name@rooms.<domain>`,
//! owned by the user who first joined it, its settings, affiliations and
//! history in its own dataset (so it is snapshotted, backed up and moved
//! like any grain), reached only through the host, which stamps every
//! sender's address.
//!
//! The room is non-anonymous (everyone sees who is who: what families and
//! friends expect, and what OMEMO in groups needs), persistent, and by
//! default open to every user who knows its name; the owner can make it
//! members-only and moderated. Its history is its archive (XEP-0313 on the
//! room); joining sends the last messages and the subject. An occupant can
//! ask whether it is still joined by pinging its own occupant address
//! (XEP-0410). Not built: voice requests, room destruction from a client
//! (an admin deletes the grain), iq forwarding between occupants,
//! registration of nicknames.

pub mod iq;
pub mod store;

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;

use granary_sdk::services_capnp::xmpp_router;
use granary_wire::jid::Jid;
use granary_wire::stanza::{Element, error_reply, parse_element};

use crate::account::stamp;
use crate::ns;
use crate::server::{now_ms, random_id};
use store::{Kept, RoomStore};

pub const MUC: &str = "http://jabber.org/protocol/muc";
pub const MUC_USER: &str = "http://jabber.org/protocol/muc#user";
pub const MUC_ADMIN: &str = "http://jabber.org/protocol/muc#admin";
pub const MUC_OWNER: &str = "http://jabber.org/protocol/muc#owner";

/// The most people in one room at once.
pub const MAX_OCCUPANTS: usize = 200;
/// Clients of one user under one nick, and nicks of one user.
const MAX_SESSIONS_PER_NICK: usize = 8;
const MAX_NICKS_PER_USER: usize = 3;
/// The largest presence a client may have in a room (it is kept, and sent
/// to everyone at every change).
const MAX_PRESENCE: usize = 16 * 1024;
/// The largest group message.
const MAX_MESSAGE: usize = 64 * 1024;
/// The history sent on joining, unless the client asks for less.
const JOIN_HISTORY: usize = 20;
/// The largest stanza the room takes.
const MAX_STANZA: usize = 256 * 1024;
/// Stanzas, and their bytes, waiting for the host beyond which the room
/// refuses more.
const MAX_OUTBOX: usize = 20_000;
const MAX_OUTBOX_BYTES: usize = 16 << 20;
/// Past this much waiting, the room takes its next stanza only once half
/// of it has gone: the senders' grains wait, and so do their clients (TCP),
/// instead of being refused.
const OUTBOX_HIGH: usize = 4_000;
const OUTBOX_HIGH_BYTES: usize = 4 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Affiliation {
    Outcast,
    None,
    Member,
    Admin,
    Owner,
}

impl Affiliation {
    pub fn as_str(self) -> &'static str {
        match self {
            Affiliation::Outcast => "outcast",
            Affiliation::None => "none",
            Affiliation::Member => "member",
            Affiliation::Admin => "admin",
            Affiliation::Owner => "owner",
        }
    }

    pub fn parse(s: &str) -> Option<Affiliation> {
        Some(match s {
            "outcast" => Affiliation::Outcast,
            "none" => Affiliation::None,
            "member" => Affiliation::Member,
            "admin" => Affiliation::Admin,
            "owner" => Affiliation::Owner,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    None,
    Visitor,
    Participant,
    Moderator,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::None => "none",
            Role::Visitor => "visitor",
            Role::Participant => "participant",
            Role::Moderator => "moderator",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        Some(match s {
            "none" => Role::None,
            "visitor" => Role::Visitor,
            "participant" => Role::Participant,
            "moderator" => Role::Moderator,
            _ => return None,
        })
    }
}

/// One nick in the room: a user, with one or more of their clients.
#[derive(Debug, Clone)]
pub struct Occupant {
    pub bare: String,
    pub role: Role,
    /// Each client's full address and the presence it last sent.
    pub sessions: Vec<(String, Element)>,
}

/// The room's settings (`muc#roomconfig`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub name: String,
    pub description: String,
    pub members_only: bool,
    pub moderated: bool,
    /// Participants, not only moderators, may change the subject.
    pub change_subject: bool,
    /// Members may invite (in a members-only room an invite makes the
    /// invitee a member).
    pub allow_invites: bool,
}

pub struct Room {
    pub store: RoomStore,
    /// `name@rooms.<domain>`.
    pub bare: Jid,
    /// The grain's owner: always an owner of the room.
    pub owner: String,
    pub occupants: RefCell<BTreeMap<String, Occupant>>,
    pub settings: RefCell<Settings>,
    pub router: RefCell<Option<xmpp_router::Client>>,
    outbox: RefCell<VecDeque<(String, String, String)>>,
    outbox_bytes: Cell<usize>,
    /// Told when the outbox has fallen to half its high mark.
    drained: tokio::sync::Notify,
    in_flight: Cell<usize>,
    max_in_flight: usize,
}

fn flag(store: &RoomStore, key: &str, default: bool) -> Result<bool, store::StoreError> {
    Ok(store.setting(key)?.map(|v| v == "1").unwrap_or(default))
}

impl Room {
    pub fn new(store: RoomStore, name: &str, owner: &str, domain: &str) -> Result<Room, String> {
        let bare = Jid::parse(&format!("{name}@rooms.{domain}")).map_err(|e| e.to_string())?;
        let owner = Jid::parse(&format!("{owner}@{domain}"))
            .map_err(|e| e.to_string())?
            .bare_text();
        let e = |e: store::StoreError| e.to_string();
        let settings = Settings {
            name: store.setting("name").map_err(e)?.unwrap_or_default(),
            description: store.setting("description").map_err(e)?.unwrap_or_default(),
            members_only: flag(&store, "members_only", false).map_err(e)?,
            moderated: flag(&store, "moderated", false).map_err(e)?,
            change_subject: flag(&store, "change_subject", true).map_err(e)?,
            allow_invites: flag(&store, "allow_invites", false).map_err(e)?,
        };
        let mut occupants: BTreeMap<String, Occupant> = BTreeMap::new();
        for (full, nick, role) in store.occupants().map_err(e)? {
            let Ok(j) = Jid::parse(&full) else { continue };
            let o = occupants.entry(nick).or_insert_with(|| Occupant {
                bare: j.bare_text(),
                role,
                sessions: Vec::new(),
            });
            o.sessions
                .push((full, Element::new("presence", ns::CLIENT)));
        }
        let max_in_flight = std::env::var("GRANARY_MAX_IN_FLIGHT")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .map(|n| n.saturating_sub(4).max(1))
            .unwrap_or(28);
        Ok(Room {
            store,
            bare,
            owner,
            occupants: RefCell::new(occupants),
            settings: RefCell::new(settings),
            router: RefCell::new(None),
            outbox: RefCell::new(VecDeque::new()),
            outbox_bytes: Cell::new(0),
            drained: tokio::sync::Notify::new(),
            in_flight: Cell::new(0),
            max_in_flight,
        })
    }

    pub fn save_settings(&self, s: &Settings) -> Result<(), store::StoreError> {
        let b = |v: bool| if v { "1" } else { "0" };
        self.store.set_settings(&[
            ("name", s.name.as_str()),
            ("description", s.description.as_str()),
            ("members_only", b(s.members_only)),
            ("moderated", b(s.moderated)),
            ("change_subject", b(s.change_subject)),
            ("allow_invites", b(s.allow_invites)),
        ])?;
        *self.settings.borrow_mut() = s.clone();
        Ok(())
    }

    /// The affiliation, or the store's error when it cannot say.
    pub fn checked_affiliation(&self, bare: &str) -> Result<Affiliation, store::StoreError> {
        if bare == self.owner {
            return Ok(Affiliation::Owner);
        }
        self.store.affiliation(bare).inspect_err(|e| {
            granary_sdk::log::error(&format!("reading an affiliation: {e}"));
        })
    }

    pub fn affiliation(&self, bare: &str) -> Affiliation {
        if bare == self.owner {
            return Affiliation::Owner;
        }
        // Fails closed: if the store cannot say, the answer is the one
        // that lets nobody in (bans hold; the owner is known above).
        self.store.affiliation(bare).unwrap_or_else(|e| {
            granary_sdk::log::error(&format!("reading an affiliation: {e}"));
            Affiliation::Outcast
        })
    }

    /// The role a user of `a` gets on joining.
    pub fn default_role(&self, a: Affiliation) -> Role {
        match a {
            Affiliation::Owner | Affiliation::Admin => Role::Moderator,
            Affiliation::Member => Role::Participant,
            Affiliation::None if self.settings.borrow().moderated => Role::Visitor,
            Affiliation::None => Role::Participant,
            Affiliation::Outcast => Role::None,
        }
    }

    fn occupant_address(&self, nick: &str) -> String {
        format!("{}/{nick}", self.bare)
    }

    /// The nick a client (full address) is in the room under.
    pub fn nick_of(&self, full: &str) -> Option<String> {
        self.occupants
            .borrow()
            .iter()
            .find(|(_, o)| o.sessions.iter().any(|(f, _)| f == full))
            .map(|(n, _)| n.clone())
    }

    /// Sends `el` from `from` (the room, or one of its occupants' nick
    /// addresses) to `to` through the host, in order.
    pub fn send(self: &Rc<Self>, from: String, to: String, el: Element) {
        let xml = el.to_xml(ns::CLIENT);
        if self.outbox_bytes.get() + xml.len() > MAX_OUTBOX_BYTES {
            granary_sdk::log::warn("too much waits for the host; a stanza is dropped");
            return;
        }
        self.outbox_bytes.set(self.outbox_bytes.get() + xml.len());
        self.outbox.borrow_mut().push_back((from, to, xml));
        self.pump();
    }

    /// Sends what waits while fewer than the bound are on their way;
    /// nothing before the route to the occupants exists (the grain calls
    /// this again once it has it).
    pub fn pump(self: &Rc<Self>) {
        while self.in_flight.get() < self.max_in_flight {
            let Some(router) = self.router.borrow().clone() else {
                return;
            };
            let Some((from, to, xml)) = self.outbox.borrow_mut().pop_front() else {
                return;
            };
            self.outbox_bytes
                .set(self.outbox_bytes.get().saturating_sub(xml.len()));
            if self.outbox.borrow().len() <= OUTBOX_HIGH / 2
                && self.outbox_bytes.get() <= OUTBOX_HIGH_BYTES / 2
            {
                self.drained.notify_waiters();
            }
            let mut request = router.route_request();
            {
                let mut r = request.get();
                r.set_from(&from);
                r.set_to(&to);
                r.set_stanza(&xml);
            }
            let sent = request.send().promise;
            self.in_flight.set(self.in_flight.get() + 1);
            let me = self.clone();
            tokio::task::spawn_local(async move {
                let result = sent.await;
                me.in_flight.set(me.in_flight.get() - 1);
                // A client that cannot be reached any more is a ghost:
                // it leaves the room.
                if let Err(e) = result {
                    let text = granary_sdk::message(&e);
                    if text.starts_with("item-not-found") && me.nick_of(&to).is_some() {
                        me.leave(&to, None, &[]);
                    }
                }
                me.pump();
            });
        }
    }

    /// Waits while more than the high mark waits for the host (until half
    /// of it has gone).
    pub async fn room_in_outbox(&self) {
        loop {
            // Made before the check, so a wakeup in between is not lost.
            let drained = self.drained.notified();
            let over = self.outbox.borrow().len() > OUTBOX_HIGH
                || self.outbox_bytes.get() > OUTBOX_HIGH_BYTES;
            if !over {
                return;
            }
            drained.await;
        }
    }

    /// A stanza the host routed here.
    pub fn deliver_routed(
        self: &Rc<Self>,
        from: &str,
        to: &str,
        stanza: &str,
    ) -> Result<(), String> {
        if stanza.len() > MAX_STANZA {
            return Err("policy-violation: the stanza is too large".to_owned());
        }
        if self.outbox.borrow().len() > MAX_OUTBOX || self.outbox_bytes.get() > MAX_OUTBOX_BYTES / 2
        {
            return Err("resource-constraint: the room is busy".to_owned());
        }
        let from = Jid::parse(from).map_err(|e| format!("jid-malformed: {e}"))?;
        let to = Jid::parse(to).map_err(|e| format!("jid-malformed: {e}"))?;
        if to.bare() != self.bare {
            return Err("item-not-found: not this room".to_owned());
        }
        let mut el = parse_element(stanza.as_bytes(), ns::CLIENT)
            .map_err(|e| format!("not-acceptable: {e}"))?;
        if el.ns != ns::CLIENT || !matches!(el.name.as_str(), "message" | "presence" | "iq") {
            return Err("bad-request: not a stanza".to_owned());
        }
        // Every user speaks from a client: the room answers full addresses.
        if from.resource.is_none() && el.attr("type") != Some("error") {
            return Err("not-acceptable: send from a client's full address".to_owned());
        }
        el.set_attr("from", from.to_string());
        el.set_attr("to", to.to_string());
        match el.name.as_str() {
            "presence" => self.presence(&from, &to, el),
            "message" => self.message(&from, &to, el),
            _ => iq::handle(self, &from, &to, el),
        }
        Ok(())
    }

    /// Answers `el` with an error from the address it was sent to.
    pub fn refuse(self: &Rc<Self>, el: &Element, condition: &str, text: &str) {
        if el.attr("type") == Some("error") {
            return;
        }
        let mut reply = error_reply(
            el,
            granary_wire::stanza::error_kind(condition),
            condition,
            Some(text),
        );
        // A refused join says it is about the room (XEP-0045 §7.2.6):
        // clients match the error to their join by it.
        if reply.name == "presence" {
            reply.push(Element::new("x", MUC));
        }
        let (Some(from), Some(to)) = (el.attr("to"), el.attr("from")) else {
            return;
        };
        self.send(from.to_owned(), to.to_owned(), reply);
    }

    fn presence(self: &Rc<Self>, from: &Jid, to: &Jid, el: Element) {
        let full = from.to_string();
        match el.attr("type") {
            None => {
                let Some(nick) = to.resource.clone() else {
                    return self.refuse(&el, "jid-malformed", "Join the room as room@domain/nick.");
                };
                self.join(from, &nick, el);
            }
            // Leaving, or a client that bounced what the room sent (gone).
            Some("unavailable" | "error") => self.leave(&full, None, &[]),
            _ => {}
        }
    }

    /// The presence of `nick` as one occupant sees it.
    fn occupant_presence(&self, nick: &str, o: &Occupant, codes: &[&str]) -> Element {
        let mut p = o
            .sessions
            .last()
            .map(|(_, p)| p.clone())
            .unwrap_or_else(|| Element::new("presence", ns::CLIENT));
        p.remove_attr("to");
        p.remove_attr("type");
        p.set_attr("from", self.occupant_address(nick));
        let mut x = Element::new("x", MUC_USER).with_child(
            Element::new("item", MUC_USER)
                .with_attr("affiliation", self.affiliation(&o.bare).as_str())
                .with_attr("role", o.role.as_str())
                .with_attr(
                    "jid",
                    o.sessions
                        .last()
                        .map(|(f, _)| f.clone())
                        .unwrap_or_default(),
                ),
        );
        for c in codes {
            x.push(Element::new("status", MUC_USER).with_attr("code", *c));
        }
        p.push(x);
        p
    }

    /// Sends `nick`'s presence to everyone in the room; its own clients
    /// get `self_codes` (110 and what else applies).
    pub fn broadcast_presence(self: &Rc<Self>, nick: &str, self_codes: &[&str]) {
        let (plain, own, targets) = {
            let occupants = self.occupants.borrow();
            let Some(o) = occupants.get(nick) else { return };
            let targets: Vec<(String, bool)> = occupants
                .iter()
                .flat_map(|(n, other)| {
                    other
                        .sessions
                        .iter()
                        .map(move |(f, _)| (f.clone(), n == nick))
                })
                .collect();
            (
                self.occupant_presence(nick, o, &[]),
                self.occupant_presence(nick, o, self_codes),
                targets,
            )
        };
        let from = self.occupant_address(nick);
        for (f, mine) in targets {
            let p = if mine { own.clone() } else { plain.clone() };
            self.send(from.clone(), f, p);
        }
    }

    fn join(self: &Rc<Self>, from: &Jid, nick: &str, mut el: Element) {
        let full = from.to_string();
        let bare = from.bare_text();
        let mut refusal = el_with(&full, nick, self, "presence");
        if let Some(id) = el.attr("id") {
            refusal.set_attr("id", id);
        }
        if nick.is_empty() || nick.len() > 64 || nick.chars().any(char::is_control) {
            return self.refuse(&refusal, "jid-malformed", "That nick cannot be used.");
        }
        // What is kept of a presence is sent to everyone at every change:
        // it stays small.
        if el.to_xml(ns::CLIENT).len() > MAX_PRESENCE {
            return self.refuse(&refusal, "policy-violation", "That presence is too large.");
        }
        // `<x xmlns='…muc'/>` marks a join (a client that rejoins after
        // losing track, as after its server restarted, gets everything a
        // join gets); without it, a change of presence or of nick.
        let muc = el.child("x", MUC).cloned();
        let history = muc.as_ref().and_then(|x| x.child("history", MUC).cloned());
        el.retain_children(|c| c.ns != MUC && c.ns != MUC_USER);
        el.remove_attr("to");
        el.remove_attr("from");
        match self.nick_of(&full) {
            Some(current) if current == nick => {
                if let Some(o) = self.occupants.borrow_mut().get_mut(nick)
                    && let Some(s) = o.sessions.iter_mut().find(|(f, _)| *f == full)
                {
                    s.1 = el;
                }
                if muc.is_some() {
                    return self.welcome(&full, nick, history.as_ref());
                }
                return self.broadcast_presence(nick, &["110"]);
            }
            Some(current) => {
                // A join under another nick from a client the room knows
                // (it lost track): the nick changes, and it gets a join.
                if self.change_nick(&full, &current, nick, el, refusal) && muc.is_some() {
                    self.welcome(&full, nick, history.as_ref());
                }
                return;
            }
            None => {}
        }
        let Ok(affiliation) = self.checked_affiliation(&bare) else {
            return self.refuse(
                &refusal,
                "internal-server-error",
                "The room cannot check that now; try again.",
            );
        };
        if affiliation == Affiliation::Outcast {
            return self.refuse(&refusal, "forbidden", "You are banned from this room.");
        }
        if self.settings.borrow().members_only && affiliation < Affiliation::Member {
            return self.refuse(
                &refusal,
                "registration-required",
                "This room is for its members only.",
            );
        }
        if let Some(why) = self.no_room_for(&bare, nick, None) {
            return self.refuse(&refusal, why.0, why.1);
        }
        let role = self
            .occupants
            .borrow()
            .get(nick)
            .map(|o| o.role)
            .unwrap_or_else(|| self.default_role(affiliation));
        if let Err(e) = self.store.put_occupant(&full, nick, role) {
            granary_sdk::log::error(&format!("recording an occupant: {e}"));
            return self.refuse(
                &refusal,
                "internal-server-error",
                "The room cannot take you now.",
            );
        }
        self.occupants
            .borrow_mut()
            .entry(nick.to_owned())
            .or_insert_with(|| Occupant {
                bare: bare.clone(),
                role,
                sessions: Vec::new(),
            })
            .sessions
            .push((full.clone(), el));
        self.welcome(&full, nick, history.as_ref());
    }

    /// Why `bare` may not take `nick` now: someone else's, too many
    /// clients under it, too many nicks of theirs, or a full room.
    /// `moving_from`: the nick this client leaves for it (which goes if
    /// this was its only client).
    fn no_room_for(
        &self,
        bare: &str,
        nick: &str,
        moving_from: Option<&str>,
    ) -> Option<(&'static str, &'static str)> {
        let occupants = self.occupants.borrow();
        let freed = usize::from(
            moving_from.is_some_and(|c| occupants.get(c).is_some_and(|o| o.sessions.len() == 1)),
        );
        match occupants.get(nick) {
            Some(o) if o.bare != bare => Some(("conflict", "That nick is taken.")),
            Some(o) if o.sessions.len() >= MAX_SESSIONS_PER_NICK => Some((
                "service-unavailable",
                "Too many of your clients are in this room under that nick.",
            )),
            Some(_) => None,
            None if occupants.values().filter(|o| o.bare == bare).count() - freed
                >= MAX_NICKS_PER_USER =>
            {
                Some(("not-allowed", "You are in this room under too many nicks."))
            }
            None if occupants.len() - freed >= MAX_OCCUPANTS => {
                Some(("service-unavailable", "The room is full."))
            }
            None => None,
        }
    }

    /// What a joining client is sent (XEP-0045 §7.2): who is here, itself
    /// (to everyone), the history it asked for, and the subject last.
    fn welcome(self: &Rc<Self>, full: &str, nick: &str, history: Option<&Element>) {
        let others: Vec<Element> = self
            .occupants
            .borrow()
            .iter()
            .filter(|(n, _)| n.as_str() != nick)
            .map(|(n, o)| self.occupant_presence(n, o, &[]))
            .collect();
        for p in others {
            let from = p.attr("from").unwrap_or_default().to_owned();
            self.send(from, full.to_owned(), p);
        }
        // 100: everyone sees real addresses; 170: the room is archived.
        self.broadcast_presence(nick, &["110", "100", "170"]);
        self.send_history(full, history);
        let (subject, by) = (
            self.store
                .setting("subject")
                .ok()
                .flatten()
                .unwrap_or_default(),
            self.store.setting("subject_by").ok().flatten(),
        );
        let subject_from = match by {
            Some(n) if !n.is_empty() => self.occupant_address(&n),
            _ => self.bare.to_string(),
        };
        let m = Element::new("message", ns::CLIENT)
            .with_attr("type", "groupchat")
            .with_attr("id", random_id())
            .with_child(Element::new("subject", ns::CLIENT).with_text(subject));
        self.send(subject_from, full.to_owned(), m);
    }

    /// One client of `current` goes by `nick` now (XEP-0045 §7.6): an
    /// unavailable presence with 303 under the old nick, then the new one;
    /// the role goes with it.
    /// Whether it changed.
    fn change_nick(
        self: &Rc<Self>,
        full: &str,
        current: &str,
        nick: &str,
        el: Element,
        refusal: Element,
    ) -> bool {
        let bare = Jid::parse(full).map(|j| j.bare_text()).unwrap_or_default();
        if let Some(why) = self.no_room_for(&bare, nick, Some(current)) {
            self.refuse(&refusal, why.0, why.1);
            return false;
        }
        // Into a nick of theirs that is here: its role; else the old one's.
        let role = {
            let occupants = self.occupants.borrow();
            occupants
                .get(nick)
                .or_else(|| occupants.get(current))
                .map(|o| o.role)
                .unwrap_or(Role::Participant)
        };
        if let Err(e) = self.store.put_occupant(full, nick, role) {
            granary_sdk::log::error(&format!("recording a nick change: {e}"));
            self.refuse(
                &refusal,
                "internal-server-error",
                "The room cannot change your nick now.",
            );
            return false;
        }
        // Under the old nick: gone, saying where to (the store already
        // has the new one).
        self.leave_in_memory(full, Some(nick), &["303"]);
        self.occupants
            .borrow_mut()
            .entry(nick.to_owned())
            .or_insert_with(|| Occupant {
                bare,
                role,
                sessions: Vec::new(),
            })
            .sessions
            .push((full.to_owned(), el));
        self.broadcast_presence(nick, &["110"]);
        true
    }

    /// The history a joining client asked for (XEP-0045 §7.2.14).
    fn send_history(self: &Rc<Self>, full: &str, asked: Option<&Element>) {
        let mut n = JOIN_HISTORY;
        let mut since = None;
        if let Some(h) = asked {
            if let Some(m) = h.attr("maxstanzas").and_then(|v| v.parse::<usize>().ok()) {
                n = n.min(m);
            }
            if h.attr("maxchars") == Some("0") {
                n = 0;
            }
            if let Some(s) = h.attr("seconds").and_then(|v| v.parse::<i64>().ok()) {
                since = Some(now_ms().saturating_sub(s.clamp(0, 100 * 365 * 86_400) * 1000));
            }
            if let Some(t) = h.attr("since").and_then(crate::account::parse_stamp) {
                since = Some(since.map_or(t, |s: i64| s.max(t)));
            }
        }
        if n == 0 {
            return;
        }
        let Ok(kept) = self.store.recent(n, since) else {
            return;
        };
        for k in kept {
            let Ok(mut m) = parse_element(k.stanza.as_bytes(), ns::CLIENT) else {
                continue;
            };
            let from = m.attr("from").unwrap_or_default().to_owned();
            m.push(
                Element::new("delay", ns::DELAY)
                    .with_attr("stamp", stamp(k.ts))
                    .with_attr("from", self.bare.to_string()),
            );
            self.send(from, full.to_owned(), m);
        }
    }

    /// `full` leaves (its last client gone, the nick goes too); `new_nick`
    /// and `codes` say why (303 a nick change, 307 kicked, 301 banned, 321
    /// no longer a member).
    pub fn leave(self: &Rc<Self>, full: &str, new_nick: Option<&str>, codes: &[&str]) {
        if self.nick_of(full).is_none() {
            return;
        }
        if let Err(e) = self.store.drop_occupant(full) {
            // Gone now; back as a ghost after a restart, until a message
            // to it bounces.
            granary_sdk::log::error(&format!("forgetting an occupant: {e}"));
        }
        self.leave_in_memory(full, new_nick, codes);
    }

    /// [`Room::leave`] without the store (a nick change keeps the row).
    fn leave_in_memory(self: &Rc<Self>, full: &str, new_nick: Option<&str>, codes: &[&str]) {
        let Some(nick) = self.nick_of(full) else {
            return;
        };
        let snapshot = {
            let mut occupants = self.occupants.borrow_mut();
            let Some(o) = occupants.get_mut(&nick) else {
                return;
            };
            o.sessions.retain(|(f, _)| f != full);
            let mut gone = o.clone();
            gone.sessions = vec![(full.to_owned(), Element::new("presence", ns::CLIENT))];
            if o.sessions.is_empty() {
                occupants.remove(&nick);
            }
            gone
        };
        let mut p = self.occupant_presence(&nick, &snapshot, &[]);
        p.set_attr("type", "unavailable");
        if let Some(x) = p.children.iter_mut().find_map(|c| match c {
            granary_wire::stanza::Node::Element(e) if e.is("x", MUC_USER) => Some(e),
            _ => None,
        }) {
            if let Some(granary_wire::stanza::Node::Element(item)) = x.children.first_mut() {
                // A nick change keeps the role (XEP-0045 §7.6).
                match new_nick {
                    Some(n) => item.set_attr("nick", n),
                    None => item.set_attr("role", "none"),
                }
            }
            for c in codes {
                x.push(Element::new("status", MUC_USER).with_attr("code", *c));
            }
        }
        let mut own = p.clone();
        if let Some(granary_wire::stanza::Node::Element(x)) =
            own.children.iter_mut().rev().find(
                |c| matches!(c, granary_wire::stanza::Node::Element(e) if e.is("x", MUC_USER)),
            )
        {
            x.push(Element::new("status", MUC_USER).with_attr("code", "110"));
        }
        let from = self.occupant_address(&nick);
        self.send(from.clone(), full.to_owned(), own);
        let still_here = self.occupants.borrow().contains_key(&nick);
        if !still_here {
            let everyone: Vec<String> = self
                .occupants
                .borrow()
                .values()
                .flat_map(|o| o.sessions.iter().map(|(f, _)| f.clone()))
                .collect();
            for f in everyone {
                self.send(from.clone(), f, p.clone());
            }
        }
    }

    fn message(self: &Rc<Self>, from: &Jid, to: &Jid, el: Element) {
        let full = from.to_string();
        let kind = el.attr("type").unwrap_or("normal").to_owned();
        if kind == "error" {
            // What the room sent could not be delivered: that client left
            // (XEP-0045 §18.1.2). Errors that say something else (a bad
            // request, forbidden) change nothing.
            if gone(&el) {
                self.leave(&full, None, &[]);
            }
            return;
        }
        match (&to.resource, kind.as_str()) {
            (None, "groupchat") => self.groupchat(&full, el),
            (None, _) => match el
                .child("x", MUC_USER)
                .and_then(|x| x.child("invite", MUC_USER))
            {
                Some(invite) => {
                    let invite = invite.clone();
                    self.invite(from, &invite, &el)
                }
                None => self.refuse(&el, "bad-request", "Send group messages as type groupchat."),
            },
            (Some(nick), "chat" | "normal") => self.private(&full, nick, el),
            _ => self.refuse(&el, "bad-request", "Nothing goes to an occupant that way."),
        }
    }

    fn groupchat(self: &Rc<Self>, full: &str, mut el: Element) {
        let Some(nick) = self.nick_of(full) else {
            return self.refuse(&el, "not-acceptable", "You are not in this room.");
        };
        if el.to_xml(ns::CLIENT).len() > MAX_MESSAGE {
            return self.refuse(&el, "policy-violation", "That message is too large.");
        }
        let role = self
            .occupants
            .borrow()
            .get(&nick)
            .map(|o| o.role)
            .unwrap_or(Role::None);
        if role < Role::Participant {
            return self.refuse(
                &el,
                "forbidden",
                "Visitors may not speak in a moderated room.",
            );
        }
        let may_set_subject = role >= Role::Moderator || self.settings.borrow().change_subject;
        let subject = el.child("subject", ns::CLIENT).map(|s| s.text());
        match subject {
            Some(subject) if el.child("body", ns::CLIENT).is_none() => {
                if !may_set_subject {
                    return self.refuse(
                        &el,
                        "forbidden",
                        "Only moderators may change the subject.",
                    );
                }
                let saved = self
                    .store
                    .set_settings(&[("subject", subject.as_str()), ("subject_by", nick.as_str())]);
                if saved.is_err() {
                    return self.refuse(&el, "internal-server-error", "The subject was not saved.");
                }
            }
            // With a body, a subject is one only for those who may set it.
            Some(_) if !may_set_subject => el.retain_children(|c| !c.is("subject", ns::CLIENT)),
            _ => {}
        }
        // What only the room may say: its stanza-ids (XEP-0359 §5), delays
        // (history) and muc#user payloads.
        let room = self.bare.to_string();
        let forged = |c: &Element| {
            (c.is("stanza-id", ns::SID) && c.attr("by") == Some(room.as_str()))
                || c.is("delay", ns::DELAY)
                || c.ns == MUC_USER
        };
        el.retain_children(|c| !forged(c));
        // Room for every copy before anything is kept: a message is sent
        // to everyone or refused, never kept and half sent.
        let copies = self
            .occupants
            .borrow()
            .values()
            .map(|o| o.sessions.len())
            .sum::<usize>();
        let size = el.to_xml(ns::CLIENT).len() + 256;
        if self.outbox_bytes.get() + size * copies > MAX_OUTBOX_BYTES {
            return self.refuse(
                &el,
                "resource-constraint",
                "The room is busy; send it again in a moment.",
            );
        }
        el.remove_attr("to");
        el.set_attr("from", self.occupant_address(&nick));
        // Subject changes are not history: a joining client gets the
        // subject last anyway.
        let keep = el.child("body", ns::CLIENT).is_some()
            || el.child("store", ns::HINTS).is_some()
            || KEPT_PAYLOADS.iter().any(|n| el.child_ns(n).is_some());
        if keep && el.child("no-store", ns::HINTS).is_none() {
            let id = random_id();
            el.push(
                Element::new("stanza-id", ns::SID)
                    .with_attr("by", room)
                    .with_attr("id", id.clone()),
            );
            // The kept copy names who wrote it (the room is not anonymous):
            // a nick may change hands, and encrypted history needs the
            // sender's address to find their keys.
            let bare = Jid::parse(full).map(|j| j.bare_text()).unwrap_or_default();
            let mut kept = el.clone();
            kept.push(
                Element::new("x", MUC_USER)
                    .with_child(Element::new("item", MUC_USER).with_attr("jid", bare)),
            );
            let k = Kept {
                id,
                ts: now_ms(),
                stanza: kept.to_xml(ns::CLIENT),
            };
            // Kept before anyone sees it.
            if let Err(e) = self.store.keep(&k) {
                granary_sdk::log::error(&format!("keeping a message: {e}"));
                let mut original = el.clone();
                original.set_attr("from", full);
                original.set_attr("to", room_address(self));
                return self.refuse(
                    &original,
                    "internal-server-error",
                    "The message was not kept.",
                );
            }
        }
        let from = self.occupant_address(&nick);
        let everyone: Vec<String> = self
            .occupants
            .borrow()
            .values()
            .flat_map(|o| o.sessions.iter().map(|(f, _)| f.clone()))
            .collect();
        for f in everyone {
            self.send(from.clone(), f, el.clone());
        }
    }

    /// A private message between two occupants, through the room.
    fn private(self: &Rc<Self>, full: &str, to_nick: &str, mut el: Element) {
        let Some(nick) = self.nick_of(full) else {
            return self.refuse(&el, "not-acceptable", "You are not in this room.");
        };
        let targets: Vec<String> = match self.occupants.borrow().get(to_nick) {
            Some(o) => o.sessions.iter().map(|(f, _)| f.clone()).collect(),
            None => Vec::new(),
        };
        if targets.is_empty() {
            return self.refuse(&el, "item-not-found", "Nobody has that nick here.");
        }
        el.retain_children(|c| !c.is("x", MUC_USER));
        el.push(Element::new("x", MUC_USER));
        el.remove_attr("to");
        for t in targets {
            self.send(self.occupant_address(&nick), t, el.clone());
        }
    }

    /// A mediated invitation (XEP-0045 §7.8.2): the room passes it on,
    /// and in a members-only room makes the invitee a member.
    fn invite(self: &Rc<Self>, from: &Jid, invite: &Element, el: &Element) {
        let bare = from.bare_text();
        let a = self.affiliation(&bare);
        let in_room = self.nick_of(&from.to_string()).is_some();
        let may = a >= Affiliation::Admin
            || (self.settings.borrow().allow_invites && (a == Affiliation::Member || in_room));
        if !may || a == Affiliation::Outcast {
            return self.refuse(el, "forbidden", "You may not invite people to this room.");
        }
        let Some(to) = invite.attr("to").and_then(|t| Jid::parse(t).ok()) else {
            return self.refuse(el, "jid-malformed", "Whom to invite?");
        };
        let invitee = to.bare_text();
        let becomes_member =
            self.settings.borrow().members_only && self.affiliation(&invitee) == Affiliation::None;
        if becomes_member && let Err(e) = self.store.set_affiliation(&invitee, Affiliation::Member)
        {
            granary_sdk::log::error(&format!("making a member: {e}"));
            return self.refuse(el, "internal-server-error", "The invitation was not saved.");
        }
        self.send_invitation(
            &invitee,
            Some(&bare),
            invite.child("reason", MUC_USER).map(|r| r.text()),
        );
    }

    /// Tells `to` about the room (XEP-0045 §7.8.2, and XEP-0249's direct
    /// form, which more clients show).
    pub fn send_invitation(self: &Rc<Self>, to: &str, by: Option<&str>, reason: Option<String>) {
        let mut inv = Element::new("invite", MUC_USER);
        if let Some(b) = by {
            inv.set_attr("from", b);
        }
        if let Some(r) = &reason {
            inv.push(Element::new("reason", MUC_USER).with_text(r.clone()));
        }
        let mut direct =
            Element::new("x", "jabber:x:conference").with_attr("jid", self.bare.to_string());
        if let Some(r) = reason {
            direct.set_attr("reason", r);
        }
        // A body too: a client that is offline finds it later (only
        // messages with one are kept), and one that knows neither form
        // still shows the address.
        let body = format!(
            "{} invites you to the group chat {}: xmpp:{}?join",
            by.unwrap_or("Someone"),
            self.bare.local.as_deref().unwrap_or(""),
            self.bare
        );
        let m = Element::new("message", ns::CLIENT)
            .with_attr("id", random_id())
            .with_attr("type", "normal")
            .with_child(Element::new("body", ns::CLIENT).with_text(body))
            .with_child(Element::new("x", MUC_USER).with_child(inv))
            .with_child(direct);
        self.send(self.bare.to_string(), to.to_owned(), m);
    }

    /// Makes `bare` a member (a group invite was redeemed) and invites it.
    pub fn add_member(self: &Rc<Self>, bare: &str) -> Result<(), String> {
        // An invite never lifts a ban (a name can be given again).
        if self.affiliation(bare) == Affiliation::Outcast {
            return Err(format!("not-allowed: {bare} is banned from this room"));
        }
        if self.affiliation(bare) < Affiliation::Member {
            self.store
                .set_affiliation(bare, Affiliation::Member)
                .map_err(|e| format!("internal-server-error: {e}"))?;
        }
        self.send_invitation(bare, Some(&self.owner.clone()), None);
        Ok(())
    }

    /// Everyone with an affiliation, the owner first.
    pub fn members(&self) -> Vec<String> {
        let mut out = vec![self.owner.clone()];
        for a in [Affiliation::Owner, Affiliation::Admin, Affiliation::Member] {
            out.extend(self.store.with_affiliation(a).unwrap_or_default());
        }
        out.dedup();
        out
    }

    /// Forgets what waits for the host (for the fuzz target, which has no
    /// host).
    #[doc(hidden)]
    pub fn discard_outbox(&self) {
        self.outbox.borrow_mut().clear();
        self.outbox_bytes.set(0);
    }

    pub fn flush(&self) -> Result<String, String> {
        self.store.checkpoint().map_err(|e| e.to_string())
    }
}

/// Payloads without a body that are history all the same: encrypted
/// messages, reactions, retractions, corrections.
const KEPT_PAYLOADS: &[&str] = &[
    "eu.siacs.conversations.axolotl",
    "urn:xmpp:omemo:2",
    "urn:xmpp:reactions:0",
    "urn:xmpp:message-retract:1",
    "urn:xmpp:message-correct:0",
];

/// Whether an error says its recipient is not there any more (not that it
/// refused something).
fn gone(el: &Element) -> bool {
    el.child("error", ns::CLIENT).is_some_and(|e| {
        e.elements().any(|c| {
            c.ns == ns::STANZAS
                && matches!(
                    c.name.as_str(),
                    "item-not-found"
                        | "recipient-unavailable"
                        | "service-unavailable"
                        | "remote-server-not-found"
                        | "remote-server-timeout"
                        | "gone"
                )
        })
    })
}

fn room_address(room: &Room) -> String {
    room.bare.to_string()
}

/// A stanza from `full` to `nick`'s occupant address, for an error
/// reply to a presence that carried none of its own addressing.
fn el_with(full: &str, nick: &str, room: &Room, name: &str) -> Element {
    Element::new(name, ns::CLIENT)
        .with_attr("from", full)
        .with_attr("to", room.occupant_address(nick))
}

/// The group chat service's address for users of `domain`.
pub fn service_jid(domain: &str) -> String {
    format!("rooms.{domain}")
}

/// What a user's grain answers for `rooms.<domain>` itself (the rooms are
/// grains; the service has no grain of its own): disco, so clients find
/// where to make group chats.
pub fn service_iq(
    server: &Rc<crate::server::Server>,
    session: &Rc<crate::server::Session>,
    el: Element,
) {
    let q = el.elements().next();
    let reply = match (el.attr("type"), q.map(|q| (q.ns.as_str(), q.name.as_str()))) {
        (Some("get"), Some((ns::DISCO_INFO, "query"))) => {
            let mut query = Element::new("query", ns::DISCO_INFO).with_child(
                Element::new("identity", ns::DISCO_INFO)
                    .with_attr("category", "conference")
                    .with_attr("type", "text")
                    .with_attr("name", "Group chats"),
            );
            for f in [ns::DISCO_INFO, MUC] {
                query.push(Element::new("feature", ns::DISCO_INFO).with_attr("var", f));
            }
            crate::account::result_for(&el).with_child(query)
        }
        (Some("get"), Some((ns::DISCO_ITEMS, "query"))) => {
            crate::account::result_for(&el).with_child(Element::new("query", ns::DISCO_ITEMS))
        }
        (Some("get" | "set"), _) => error_reply(&el, "cancel", "service-unavailable", None),
        _ => return,
    };
    let mut reply = reply;
    reply.set_attr("from", service_jid(&server.domain));
    reply.set_attr("to", session.full.to_string());
    session.send(reply);
}

/// `xmpp.deliver` of a room grain: stanzas from users, which the host
/// routes here; `befriend` makes a member (a group invite redeemed).
pub struct Deliver {
    pub room: Rc<Room>,
}

impl xmpp_router::Server for Deliver {
    async fn route(
        self: capnp::capability::Rc<Self>,
        params: xmpp_router::RouteParams,
        _: xmpp_router::RouteResults,
    ) -> Result<(), capnp::Error> {
        // Slow senders down rather than refuse them.
        self.room.room_in_outbox().await;
        let p = params.get()?;
        self.room
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
        let nicks: Vec<String> = self.room.occupants.borrow().keys().cloned().collect();
        let mut r = results.get();
        let mut list = r.reborrow().init_resources(nicks.len() as u32);
        for (i, n) in nicks.iter().enumerate() {
            list.set(i as u32, n);
        }
        r.set_contacts(self.room.members().len() as u64);
        r.set_archived(self.room.store.history_len().unwrap_or(0));
        Ok(())
    }

    async fn members(
        self: capnp::capability::Rc<Self>,
        _: xmpp_router::MembersParams,
        mut results: xmpp_router::MembersResults,
    ) -> Result<(), capnp::Error> {
        let members = self.room.members();
        let mut list = results.get().init_jids(members.len() as u32);
        for (i, m) in members.iter().enumerate() {
            list.set(i as u32, m);
        }
        Ok(())
    }

    async fn befriend(
        self: capnp::capability::Rc<Self>,
        params: xmpp_router::BefriendParams,
        _: xmpp_router::BefriendResults,
    ) -> Result<(), capnp::Error> {
        let jid = Jid::parse(params.get()?.get_jid()?.to_str()?)
            .map_err(|e| capnp::Error::failed(format!("jid-malformed: {e}")))?;
        if jid.local.is_none() {
            return Err(capnp::Error::failed(
                "jid-malformed: a member is a user's address".to_owned(),
            ));
        }
        self.room
            .add_member(&jid.bare_text())
            .map_err(capnp::Error::failed)
    }
}
