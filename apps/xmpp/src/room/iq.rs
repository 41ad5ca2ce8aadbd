//! What a room answers: service discovery, its archive (XEP-0313), the
//! admin's lists and changes (affiliations, roles: `muc#admin`), the
//! owner's settings (`muc#owner`), and self-pings (XEP-0410).

use std::rc::Rc;

use granary_wire::jid::Jid;
use granary_wire::stanza::Element;

use super::{Affiliation, MUC, MUC_ADMIN, MUC_OWNER, Role, Room, Settings};
use crate::account::{parse_stamp, result_for, stamp};
use crate::ns;
use crate::room::store::HistoryQuery;

const ROOMCONFIG: &str = "http://jabber.org/protocol/muc#roomconfig";
const ROOMINFO: &str = "http://jabber.org/protocol/muc#roominfo";
/// Room messages can be 64 KiB each: a page stays a few MiB.
const MAX_PAGE: usize = 100;
const DEFAULT_PAGE: usize = 50;

pub fn handle(room: &Rc<Room>, from: &Jid, to: &Jid, el: Element) {
    let kind = el.attr("type").unwrap_or("").to_owned();
    if !matches!(kind.as_str(), "get" | "set") {
        return;
    }
    let full = from.to_string();
    if let Some(nick) = &to.resource {
        // XEP-0410: a client asks whether it is still in the room by
        // pinging its own occupant address.
        let mine = room.nick_of(&full);
        if mine.is_none() {
            return room.refuse(&el, "not-acceptable", "You are not in this room.");
        }
        if el.child("ping", ns::PING).is_some() && mine.as_deref() == Some(nick.as_str()) {
            return answer(room, result_for(&el));
        }
        return room.refuse(
            &el,
            "feature-not-implemented",
            "Requests are not passed on to occupants.",
        );
    }
    let Some(q) = el.elements().next().cloned() else {
        return room.refuse(&el, "bad-request", "An empty request.");
    };
    let reply = match (kind.as_str(), q.name.as_str(), q.ns.as_str()) {
        ("get", "query", ns::DISCO_INFO) => disco_info(room, from, &el),
        ("get", "query", ns::DISCO_ITEMS) => {
            result_for(&el).with_child(Element::new("query", ns::DISCO_ITEMS))
        }
        ("get", "ping", ns::PING) => result_for(&el),
        ("get", "vCard", ns::VCARD) => result_for(&el).with_child(Element::new("vCard", ns::VCARD)),
        (_, "query", ns::MAM) => match mam(room, from, &el, &q) {
            Ok(r) => r,
            Err((c, t)) => return room.refuse(&el, c, t),
        },
        ("get", "query", MUC_ADMIN) => match admin_list(room, from, &el, &q) {
            Ok(r) => r,
            Err((c, t)) => return room.refuse(&el, c, t),
        },
        ("set", "query", MUC_ADMIN) => match admin_change(room, from, &q) {
            Ok(()) => result_for(&el),
            Err((c, t)) => return room.refuse(&el, c, t),
        },
        (k, "query", MUC_OWNER) => match owner(room, from, k, &el, &q) {
            Ok(r) => r,
            Err((c, t)) => return room.refuse(&el, c, t),
        },
        _ => {
            return room.refuse(&el, "service-unavailable", "The room does not answer that.");
        }
    };
    answer(room, reply);
}

type Refusal = (&'static str, &'static str);

fn answer(room: &Rc<Room>, reply: Element) {
    let (Some(from), Some(to)) = (reply.attr("from"), reply.attr("to")) else {
        return;
    };
    let (from, to) = (from.to_owned(), to.to_owned());
    room.send(from, to, reply);
}

fn feature(var: &str) -> Element {
    Element::new("feature", ns::DISCO_INFO).with_attr("var", var)
}

fn field(var: &str, kind: &str, label: &str, value: &str) -> Element {
    let mut f = Element::new("field", ns::DATA)
        .with_attr("var", var)
        .with_attr("type", kind);
    if !label.is_empty() {
        f.set_attr("label", label);
    }
    f.with_child(Element::new("value", ns::DATA).with_text(value))
}

fn bit(b: bool) -> &'static str {
    if b { "1" } else { "0" }
}

fn disco_info(room: &Rc<Room>, from: &Jid, el: &Element) -> Element {
    let s = room.settings.borrow().clone();
    let name = if s.name.is_empty() {
        room.bare.local.clone().unwrap_or_default()
    } else {
        s.name.clone()
    };
    let mut q = Element::new("query", ns::DISCO_INFO).with_child(
        Element::new("identity", ns::DISCO_INFO)
            .with_attr("category", "conference")
            .with_attr("type", "text")
            .with_attr("name", name),
    );
    for f in [
        MUC,
        ns::DISCO_INFO,
        ns::MAM,
        ns::SID,
        ns::PING,
        "muc_persistent",
        "muc_hidden",
        "muc_nonanonymous",
        "muc_unsecured",
        if s.members_only {
            "muc_membersonly"
        } else {
            "muc_open"
        },
        if s.moderated {
            "muc_moderated"
        } else {
            "muc_unmoderated"
        },
    ] {
        q.push(feature(f));
    }
    // A members-only room tells others only that it exists.
    if s.members_only && room.affiliation(&from.bare_text()) < Affiliation::Member {
        return result_for(el).with_child(q);
    }
    let occupants = room.occupants.borrow().len();
    q.push(
        Element::new("x", ns::DATA)
            .with_attr("type", "result")
            .with_child(field("FORM_TYPE", "hidden", "", ROOMINFO))
            .with_child(field(
                "muc#roominfo_description",
                "text-single",
                "Description",
                &s.description,
            ))
            .with_child(field(
                "muc#roominfo_occupants",
                "text-single",
                "Occupants",
                &occupants.to_string(),
            ))
            .with_child(field(
                "muc#roominfo_subject",
                "text-single",
                "Subject",
                &room
                    .store
                    .setting("subject")
                    .ok()
                    .flatten()
                    .unwrap_or_default(),
            )),
    );
    result_for(el).with_child(q)
}

/// The room's archive, for the people who may read it: everyone in the
/// room, and its members when it is members-only.
fn mam(room: &Rc<Room>, from: &Jid, el: &Element, q: &Element) -> Result<Element, Refusal> {
    let a = room.affiliation(&from.bare_text());
    let in_room = room.nick_of(&from.to_string()).is_some();
    let may = if room.settings.borrow().members_only {
        a >= Affiliation::Member
    } else {
        a != Affiliation::Outcast
    };
    if !may && !in_room {
        return Err(("forbidden", "Only members may read this room's archive."));
    }
    if el.attr("type") == Some("get") {
        let form = Element::new("x", ns::DATA)
            .with_attr("type", "form")
            .with_child(field("FORM_TYPE", "hidden", "", ns::MAM))
            .with_child(
                Element::new("field", ns::DATA)
                    .with_attr("var", "start")
                    .with_attr("type", "text-single"),
            )
            .with_child(
                Element::new("field", ns::DATA)
                    .with_attr("var", "end")
                    .with_attr("type", "text-single"),
            );
        return Ok(result_for(el).with_child(Element::new("query", ns::MAM).with_child(form)));
    }
    let mut query = HistoryQuery {
        max: DEFAULT_PAGE,
        ..Default::default()
    };
    if let Some(form) = q.child("x", ns::DATA) {
        for f in form.elements().filter(|f| f.name == "field") {
            let value = f
                .child("value", ns::DATA)
                .map(|v| v.text())
                .unwrap_or_default();
            let bad = ("bad-request", "A search field has a bad value.");
            match f.attr("var").unwrap_or("") {
                "start" => query.start = Some(parse_stamp(&value).ok_or(bad)?),
                "end" => query.end = Some(parse_stamp(&value).ok_or(bad)?),
                "after-id" => query.after = Some(value),
                "before-id" => query.before = Some(value),
                "FORM_TYPE" => {}
                // The room's archive is one conversation: `with` filters
                // nothing a client could mean here.
                _ => return Err(("bad-request", "An unknown search field.")),
            }
        }
    }
    if let Some(set) = q.child("set", ns::RSM) {
        if let Some(m) = set.child("max", ns::RSM) {
            query.max = m.text().trim().parse().unwrap_or(DEFAULT_PAGE);
        }
        if let Some(a) = set.child("after", ns::RSM) {
            query.after = Some(a.text());
        }
        if let Some(b) = set.child("before", ns::RSM) {
            match b.text() {
                t if t.is_empty() => query.last_page = true,
                t => query.before = Some(t),
            }
        }
    }
    query.max = query.max.min(MAX_PAGE);
    let page = match room.store.query(&query) {
        Ok(Some(p)) => p,
        Ok(None) => return Err(("item-not-found", "No such archive id.")),
        Err(_) => return Err(("internal-server-error", "The archive cannot be read now.")),
    };
    let queryid = q.attr("queryid");
    for item in &page.items {
        let Ok(original) = granary_wire::stanza::parse_element(item.stanza.as_bytes(), ns::CLIENT)
        else {
            continue;
        };
        let mut result = Element::new("result", ns::MAM).with_attr("id", item.id.clone());
        if let Some(qid) = queryid {
            result.set_attr("queryid", qid);
        }
        result.push(
            Element::new("forwarded", ns::FORWARD)
                .with_child(Element::new("delay", ns::DELAY).with_attr("stamp", stamp(item.ts)))
                .with_child(original),
        );
        room.send(
            room.bare.to_string(),
            from.to_string(),
            Element::new("message", ns::CLIENT).with_child(result),
        );
    }
    let mut set = Element::new("set", ns::RSM);
    if let (Some(first), Some(last)) = (page.items.first(), page.items.last()) {
        set.push(Element::new("first", ns::RSM).with_text(first.id.clone()));
        set.push(Element::new("last", ns::RSM).with_text(last.id.clone()));
    }
    set.push(Element::new("count", ns::RSM).with_text(page.count.to_string()));
    let mut fin = Element::new("fin", ns::MAM).with_child(set);
    if page.complete {
        fin.set_attr("complete", "true");
    }
    if let Some(qid) = queryid {
        fin.set_attr("queryid", qid);
    }
    Ok(result_for(el).with_child(fin))
}

/// Who has an affiliation, or a role (XEP-0045 §9.5, §8.5).
fn admin_list(room: &Rc<Room>, from: &Jid, el: &Element, q: &Element) -> Result<Element, Refusal> {
    let actor = room.affiliation(&from.bare_text());
    let Some(item) = q.child("item", MUC_ADMIN) else {
        return Err(("bad-request", "Ask for an affiliation or a role."));
    };
    let mut out = Element::new("query", MUC_ADMIN);
    if let Some(a) = item.attr("affiliation").and_then(Affiliation::parse) {
        // Members see who else is one (clients encrypting to a group
        // need it); the ban list is the admins'.
        let needed = if a == Affiliation::Outcast {
            Affiliation::Admin
        } else {
            Affiliation::Member
        };
        if actor < needed {
            return Err(("forbidden", "You may not see that list."));
        }
        let jids = if a == Affiliation::Owner {
            let mut v = vec![room.owner.clone()];
            v.extend(room.store.with_affiliation(a).unwrap_or_default());
            v
        } else {
            room.store.with_affiliation(a).unwrap_or_default()
        };
        for j in jids {
            out.push(
                Element::new("item", MUC_ADMIN)
                    .with_attr("affiliation", a.as_str())
                    .with_attr("jid", j),
            );
        }
    } else if let Some(r) = item.attr("role").and_then(Role::parse) {
        let me = room.nick_of(&from.to_string());
        let is_moderator = me.and_then(|n| room.occupants.borrow().get(&n).map(|o| o.role))
            == Some(Role::Moderator);
        if !is_moderator {
            return Err(("forbidden", "Only moderators may see that list."));
        }
        for (nick, o) in room.occupants.borrow().iter().filter(|(_, o)| o.role == r) {
            out.push(
                Element::new("item", MUC_ADMIN)
                    .with_attr("role", r.as_str())
                    .with_attr("nick", nick.clone())
                    .with_attr("affiliation", room.affiliation(&o.bare).as_str())
                    .with_attr("jid", o.bare.clone()),
            );
        }
    } else {
        return Err(("bad-request", "Ask for an affiliation or a role."));
    }
    Ok(result_for(el).with_child(out))
}

enum Change {
    Affiliation(String, Affiliation),
    Role(String, Role),
}

/// Changes affiliations (by address) and roles (by nick); all of them
/// are checked before any is made.
fn admin_change(room: &Rc<Room>, from: &Jid, q: &Element) -> Result<(), Refusal> {
    let actor_bare = from.bare_text();
    let actor = room.affiliation(&actor_bare);
    let actor_role = room
        .nick_of(&from.to_string())
        .and_then(|n| room.occupants.borrow().get(&n).map(|o| o.role))
        .unwrap_or(Role::None);
    let mut changes = Vec::new();
    for item in q.elements().filter(|i| i.is("item", MUC_ADMIN)) {
        if let Some(a) = item.attr("affiliation") {
            let a = Affiliation::parse(a).ok_or(("bad-request", "No such affiliation."))?;
            let target = match (item.attr("jid"), item.attr("nick")) {
                (Some(j), _) => Jid::parse(j)
                    .map_err(|_| ("jid-malformed", "A bad address."))?
                    .bare_text(),
                (None, Some(n)) => room
                    .occupants
                    .borrow()
                    .get(n)
                    .map(|o| o.bare.clone())
                    .ok_or(("item-not-found", "Nobody has that nick here."))?,
                _ => return Err(("bad-request", "Name whom to change.")),
            };
            if target == room.owner {
                return Err(("not-allowed", "The room's creator stays its owner."));
            }
            let current = room.affiliation(&target);
            let allowed = match actor {
                Affiliation::Owner => true,
                Affiliation::Admin => current < Affiliation::Admin && a < Affiliation::Admin,
                _ => false,
            };
            if !allowed {
                return Err(("forbidden", "You may not change that affiliation."));
            }
            changes.push(Change::Affiliation(target, a));
        } else if let Some(r) = item.attr("role") {
            let r = Role::parse(r).ok_or(("bad-request", "No such role."))?;
            let nick = item.attr("nick").ok_or(("bad-request", "Name the nick."))?;
            let target = room
                .occupants
                .borrow()
                .get(nick)
                .map(|o| o.bare.clone())
                .ok_or(("item-not-found", "Nobody has that nick here."))?;
            let their = room.affiliation(&target);
            let allowed = actor_role == Role::Moderator
                && (their < Affiliation::Admin || actor == Affiliation::Owner)
                && their != Affiliation::Owner
                && (r != Role::Moderator || actor >= Affiliation::Admin);
            if !allowed {
                return Err(("not-allowed", "You may not change that occupant's role."));
            }
            changes.push(Change::Role(nick.to_owned(), r));
        } else {
            return Err(("bad-request", "An item changes an affiliation or a role."));
        }
    }
    let affiliations: Vec<(String, Affiliation)> = changes
        .iter()
        .filter_map(|c| match c {
            Change::Affiliation(jid, a) => Some((jid.clone(), *a)),
            Change::Role(..) => None,
        })
        .collect();
    room.store
        .set_affiliations(&affiliations)
        .map_err(|_| ("internal-server-error", "The change was not saved."))?;
    for c in changes {
        match c {
            Change::Affiliation(jid, a) => apply_affiliation(room, &jid, a),
            Change::Role(nick, r) => set_role(room, &nick, r, &["307"]),
        }
    }
    Ok(())
}

/// What an occupant's new affiliation does to it in the room now.
fn apply_affiliation(room: &Rc<Room>, bare: &str, a: Affiliation) {
    let nicks: Vec<String> = room
        .occupants
        .borrow()
        .iter()
        .filter(|(_, o)| o.bare == bare)
        .map(|(n, _)| n.clone())
        .collect();
    for nick in nicks {
        if a == Affiliation::Outcast {
            set_role(room, &nick, Role::None, &["301"]);
        } else if room.settings.borrow().members_only && a < Affiliation::Member {
            set_role(room, &nick, Role::None, &["321"]);
        } else {
            set_role(room, &nick, room.default_role(a), &[]);
        }
    }
}

/// Gives `nick` role `r`; `none` removes it from the room, with `codes`
/// saying why.
fn set_role(room: &Rc<Room>, nick: &str, r: Role, codes: &[&str]) {
    if r == Role::None {
        let fulls: Vec<String> = room
            .occupants
            .borrow()
            .get(nick)
            .map(|o| o.sessions.iter().map(|(f, _)| f.clone()).collect())
            .unwrap_or_default();
        for f in fulls {
            room.leave(&f, None, codes);
        }
        return;
    }
    let fulls = {
        let mut occupants = room.occupants.borrow_mut();
        let Some(o) = occupants.get_mut(nick) else {
            return;
        };
        o.role = r;
        o.sessions
            .iter()
            .map(|(f, _)| f.clone())
            .collect::<Vec<_>>()
    };
    for f in fulls {
        let _ = room.store.put_occupant(&f, nick, r);
    }
    room.broadcast_presence(nick, &["110"]);
}

/// The owner's settings form (XEP-0045 §10.2).
fn owner(
    room: &Rc<Room>,
    from: &Jid,
    kind: &str,
    el: &Element,
    q: &Element,
) -> Result<Element, Refusal> {
    if room.affiliation(&from.bare_text()) != Affiliation::Owner {
        return Err(("forbidden", "Only the room's owners may configure it."));
    }
    if q.child("destroy", MUC_OWNER).is_some() {
        return Err((
            "not-allowed",
            "A room is a grain: the admin removes it (granary grain delete).",
        ));
    }
    let s = room.settings.borrow().clone();
    if kind == "get" {
        let form = Element::new("x", ns::DATA)
            .with_attr("type", "form")
            .with_child(Element::new("title", ns::DATA).with_text("Room settings"))
            .with_child(field("FORM_TYPE", "hidden", "", ROOMCONFIG))
            .with_child(field(
                "muc#roomconfig_roomname",
                "text-single",
                "Name",
                &s.name,
            ))
            .with_child(field(
                "muc#roomconfig_roomdesc",
                "text-single",
                "Description",
                &s.description,
            ))
            .with_child(field(
                "muc#roomconfig_persistentroom",
                "boolean",
                "Persistent",
                "1",
            ))
            .with_child(field(
                "muc#roomconfig_membersonly",
                "boolean",
                "Members only",
                bit(s.members_only),
            ))
            .with_child(field(
                "muc#roomconfig_moderatedroom",
                "boolean",
                "Moderated (visitors may not speak)",
                bit(s.moderated),
            ))
            .with_child(field(
                "muc#roomconfig_changesubject",
                "boolean",
                "Participants may change the subject",
                bit(s.change_subject),
            ))
            .with_child(field(
                "muc#roomconfig_allowinvites",
                "boolean",
                "Members may invite",
                bit(s.allow_invites),
            ))
            .with_child(field(
                "muc#roomconfig_whois",
                "list-single",
                "Who sees real addresses",
                "anyone",
            ))
            .with_child(field("mam", "boolean", "Archive messages", "1"));
        return Ok(result_for(el).with_child(Element::new("query", MUC_OWNER).with_child(form)));
    }
    let Some(form) = q.child("x", ns::DATA) else {
        return Err(("bad-request", "Send the settings form."));
    };
    if form.attr("type") == Some("cancel") {
        return Ok(result_for(el));
    }
    let mut new: Settings = s.clone();
    for f in form.elements().filter(|f| f.name == "field") {
        let value = f
            .child("value", ns::DATA)
            .map(|v| v.text())
            .unwrap_or_default();
        let truth = matches!(value.trim(), "1" | "true");
        match f.attr("var").unwrap_or("") {
            "muc#roomconfig_roomname" => new.name = value.chars().take(100).collect(),
            "muc#roomconfig_roomdesc" => new.description = value.chars().take(1000).collect(),
            "muc#roomconfig_membersonly" => new.members_only = truth,
            "muc#roomconfig_moderatedroom" => new.moderated = truth,
            "muc#roomconfig_changesubject" => new.change_subject = truth,
            "muc#roomconfig_allowinvites" => new.allow_invites = truth,
            "muc#roomconfig_persistentroom" if !truth => {
                return Err(("not-acceptable", "Rooms here are always persistent."));
            }
            "muc#roomconfig_whois" if value.trim() != "anyone" => {
                return Err(("not-acceptable", "Everyone in a room here sees who is who."));
            }
            // Fields this room has no such setting for are left alone
            // (XEP-0045 §10.2: a service ignores what it does not know).
            _ => {}
        }
    }
    room.save_settings(&new)
        .map_err(|_| ("internal-server-error", "The settings were not saved."))?;
    // People who may no longer be here, or whose voice changed.
    let occupants: Vec<(String, String)> = room
        .occupants
        .borrow()
        .iter()
        .map(|(n, o)| (n.clone(), o.bare.clone()))
        .collect();
    for (nick, bare) in occupants {
        let a = room.affiliation(&bare);
        if new.members_only && !s.members_only && a < Affiliation::Member {
            set_role(room, &nick, Role::None, &["322"]);
        } else if new.moderated != s.moderated && a == Affiliation::None {
            set_role(room, &nick, room.default_role(a), &[]);
        }
    }
    Ok(result_for(el))
}
