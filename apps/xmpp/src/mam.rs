//! The message archive (XEP-0313 v2) with paging (XEP-0059): the user's
//! own clients query it; results go to the asking session only.

use std::rc::Rc;

use granary_wire::stanza::Element;

use crate::account::{parse_stamp, result_for, stamp};
use crate::ns;
use crate::server::{Server, Session, error_reply};
use crate::store::ArchiveQuery;

/// The most results one page carries.
const MAX_PAGE: usize = 250;
const DEFAULT_PAGE: usize = 50;

fn field(var: &str, kind: Option<&str>) -> Element {
    let mut f = Element::new("field", ns::DATA).with_attr("var", var);
    if let Some(k) = kind {
        f.set_attr("type", k);
    }
    f
}

/// Answers a MAM iq; results are sent to `session` before the answer.
pub fn query(
    server: &Rc<Server>,
    session: Option<&Rc<Session>>,
    el: &Element,
    q: &Element,
) -> Option<Element> {
    match (el.attr("type"), q.name.as_str()) {
        (Some("get"), "query") => {
            // The search form.
            let form = Element::new("x", ns::DATA)
                .with_attr("type", "form")
                .with_child(
                    field("FORM_TYPE", Some("hidden"))
                        .with_child(Element::new("value", ns::DATA).with_text(ns::MAM)),
                )
                .with_child(field("with", Some("jid-single")))
                .with_child(field("start", Some("text-single")))
                .with_child(field("end", Some("text-single")))
                .with_child(field("after-id", Some("text-single")))
                .with_child(field("before-id", Some("text-single")));
            Some(result_for(el).with_child(Element::new("query", ns::MAM).with_child(form)))
        }
        (Some("set"), "query") => Some(search(server, session?, el, q)),
        _ => Some(error_reply(el, "cancel", "feature-not-implemented", None)),
    }
}

fn search(server: &Rc<Server>, session: &Rc<Session>, el: &Element, q: &Element) -> Element {
    let mut query = ArchiveQuery {
        max: DEFAULT_PAGE,
        ..Default::default()
    };
    if let Some(form) = q.child("x", ns::DATA) {
        for f in form.elements().filter(|f| f.name == "field") {
            let value = f
                .child("value", ns::DATA)
                .map(|v| v.text())
                .unwrap_or_default();
            let bad = || {
                error_reply(
                    el,
                    "modify",
                    "bad-request",
                    Some("a search field has a bad value"),
                )
            };
            match f.attr("var").unwrap_or("") {
                "with" => match crate::jid::Jid::parse(value.trim()) {
                    Ok(j) => query.with = Some(j.bare_text()),
                    Err(_) => return bad(),
                },
                "start" => match parse_stamp(&value) {
                    Some(t) => query.start = Some(t),
                    None => return bad(),
                },
                "end" => match parse_stamp(&value) {
                    Some(t) => query.end = Some(t),
                    None => return bad(),
                },
                "after-id" => query.after = Some(value),
                "before-id" => query.before = Some(value),
                "FORM_TYPE" => {}
                _ => return error_reply(el, "modify", "bad-request", Some("unknown search field")),
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
    // What was just archived is part of the answer.
    server.flush_archive();
    let page = match server.store.query(&query) {
        Ok(Some(p)) => p,
        Ok(None) => return error_reply(el, "cancel", "item-not-found", Some("no such archive id")),
        Err(_) => return error_reply(el, "wait", "internal-server-error", None),
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
        session.send(
            Element::new("message", ns::CLIENT)
                .with_attr("from", server.bare.to_string())
                .with_attr("to", session.full.to_string())
                .with_child(result),
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
    result_for(el).with_child(fin)
}
