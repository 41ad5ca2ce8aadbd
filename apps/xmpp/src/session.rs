//! One client connection, from the stream restart after SASL (the gateway
//! did TLS and SASL): resource binding or XEP-0198 resumption, then
//! stanzas both ways until the stream ends. A session that enabled
//! resumption and drops without closing is kept detached for
//! [`RESUME_TIMEOUT`], collecting what arrives for it.

use std::cell::Cell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use granary_sdk::Accepted;
use granary_wire::stanza::{Element, Frame, escape, next_frame};
use granary_wire::xmpp::{Unit, XmppError, stream_error};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::jid::Jid;
use crate::ns;
use crate::server::{Out, Server, Session, SessionState, Sm, error_reply, random_id};

/// How long a dropped stream-managed session waits to be resumed.
pub const RESUME_TIMEOUT: Duration = Duration::from_secs(300);

/// What one session may send (`[xmpp]` in the host's configuration,
/// passed as the grain's environment).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The largest stanza (256 KiB by default, as Prosody's).
    pub max_stanza: usize,
    /// Stanzas per second after the first `burst`.
    pub rate: f64,
    pub burst: f64,
}

impl Limits {
    pub fn from_env() -> Limits {
        let get = |name: &str, default: f64| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse::<f64>().ok())
                .filter(|v| *v > 0.0)
                .unwrap_or(default)
        };
        Limits {
            max_stanza: get("GRANARY_XMPP_MAX_STANZA", (256 << 10) as f64) as usize,
            rate: get("GRANARY_XMPP_STANZA_RATE", 50_000.0),
            burst: get("GRANARY_XMPP_STANZA_BURST", 100_000.0),
        }
    }
}
/// How long a client may take to bind once the stream restarted.
const BIND_TIMEOUT: Duration = Duration::from_secs(60);

fn wire_error(e: &XmppError) -> String {
    match e {
        XmppError::TooLarge => stream_error("policy-violation", "a stanza over the size limit"),
        XmppError::Dtd => stream_error("restricted-xml", "no document type declarations"),
        other => stream_error("not-well-formed", &other.to_string()),
    }
}

/// A token bucket on stanzas.
struct Budget {
    tokens: f64,
    at: Instant,
    limits: Limits,
}

impl Budget {
    fn take(&mut self) -> bool {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * self.limits.rate)
            .min(self.limits.burst);
        self.at = now;
        self.tokens -= 1.0;
        self.tokens >= 0.0
    }
}

struct Reader {
    read: tokio::net::unix::OwnedReadHalf,
    buf: Vec<u8>,
    max_stanza: usize,
}

impl Reader {
    /// The next frame; `Err(Some(error))` to end the stream with it.
    async fn frame(&mut self) -> Result<Frame, Option<String>> {
        loop {
            // Whitespace between stanzas (keepalives) is dropped as it comes.
            let ws = self
                .buf
                .iter()
                .take_while(|b| b.is_ascii_whitespace())
                .count();
            self.buf.drain(..ws);
            match next_frame(&self.buf, self.max_stanza, ns::CLIENT) {
                Ok(Some((frame, n))) => {
                    self.buf.drain(..n);
                    return Ok(frame);
                }
                Ok(None) => {}
                Err(e) => return Err(Some(wire_error(&e))),
            }
            // An idle session holds little: the buffer starts small, and
            // one that grew for a large stanza is given back once empty.
            if self.buf.is_empty() && self.buf.capacity() > 64 << 10 {
                self.buf = Vec::new();
            }
            let before = self.buf.len();
            self.buf.reserve(2 << 10);
            match self.read.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return Err(None),
                Ok(_) if self.buf.len() > before => {}
                Ok(_) => return Err(None),
            }
        }
    }
}

/// Writes what the session queues, many stanzas per write when they pile up.
async fn writer(
    mut write: tokio::net::unix::OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<Out>,
    queued: Rc<Cell<usize>>,
) {
    let mut batch = String::new();
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        let mut close = false;
        while let Some(o) = next.take() {
            match o {
                Out::Xml(x) => batch.push_str(&x),
                Out::Close(x) => {
                    batch.push_str(&x);
                    close = true;
                    break;
                }
            }
            if batch.len() < (256 << 10) {
                next = rx.try_recv().ok();
            }
        }
        if write.write_all(batch.as_bytes()).await.is_err() {
            return;
        }
        queued.set(queued.get().saturating_sub(batch.len()));
        batch.clear();
        if batch.capacity() > 8 << 10 {
            batch = String::new();
        }
        if close {
            let _ = write.shutdown().await;
            return;
        }
    }
}

/// Serves one client connection.
pub async fn serve(conn: Accepted, server: Rc<Server>) {
    let (read, write) = conn.stream.into_split();
    let (tx, rx) = mpsc::unbounded_channel();
    let queued = Rc::new(Cell::new(0));
    let writer_task = tokio::task::spawn_local(writer(write, rx, queued.clone()));
    let limits = server.limits;
    let mut reader = Reader {
        read,
        buf: Vec::new(),
        max_stanza: limits.max_stanza,
    };
    let session =
        match tokio::time::timeout(BIND_TIMEOUT, open(&server, &mut reader, &tx, &queued)).await {
            Ok(Some(s)) => s,
            Ok(None) => {
                drop(tx);
                let _ = writer_task.await;
                return;
            }
            Err(_) => {
                let _ = tx.send(Out::Close(stream_error(
                    "connection-timeout",
                    "bind in time",
                )));
                drop(tx);
                let _ = writer_task.await;
                return;
            }
        };
    let clean = run(&server, &session, &mut reader, &tx).await;
    // Cut off (its writer is stuck behind unread bytes), or taken over by
    // a resumed stream: the writer is not waited for.
    let stuck = {
        let st = session.state.borrow();
        st.closing || !st.out.as_ref().is_some_and(|o| o.same_channel(&tx))
    };
    end(&server, &session, clean, &tx);
    drop(tx);
    if stuck {
        writer_task.abort();
    }
    let _ = writer_task.await;
}

fn features(bound: bool) -> String {
    if bound {
        return String::new();
    }
    format!(
        "<stream:features><bind xmlns='{}'/><session xmlns='{}'><optional/></session>\
         <sm xmlns='{}'/><csi xmlns='{}'/><ver xmlns='{}'/>\
         <c xmlns='{}' hash='sha-1' node='https://granary.invalid/' ver='{}'/></stream:features>",
        ns::BIND,
        ns::SESSION,
        ns::SM,
        ns::CSI,
        ns::ROSTER_VER,
        ns::CAPS,
        crate::account::server_caps()
    )
}

/// The restarted stream's header, then bind or resume; the session.
async fn open(
    server: &Rc<Server>,
    reader: &mut Reader,
    tx: &mpsc::UnboundedSender<Out>,
    queued: &Rc<Cell<usize>>,
) -> Option<Rc<Session>> {
    let header = granary_wire::xmpp::stream_header(&server.domain, &random_id());
    match reader.frame().await {
        Ok(Frame::Header(Unit::StreamHeader { to, .. }))
            if to
                .as_deref()
                .is_some_and(|t| t.eq_ignore_ascii_case(&server.domain)) =>
        {
            let _ = tx.send(Out::Xml(format!("{header}{}", features(false))));
        }
        Ok(Frame::Header(_)) => {
            // The password was right, but this account's address is in
            // another of our domains.
            let text = format!("this account's address is {}", server.bare);
            let _ = tx.send(Out::Close(format!(
                "{header}{}",
                stream_error("host-unknown", &text)
            )));
            return None;
        }
        Ok(_) => {
            let _ = tx.send(Out::Close(format!(
                "{header}{}",
                stream_error("not-well-formed", "the stream restarts first")
            )));
            return None;
        }
        Err(e) => {
            if let Some(e) = e {
                let _ = tx.send(Out::Close(format!("{header}{e}")));
            }
            return None;
        }
    }
    loop {
        let el = match reader.frame().await {
            Ok(Frame::Stanza(el)) => el,
            Ok(Frame::End) => {
                let _ = tx.send(Out::Close("</stream:stream>".to_owned()));
                return None;
            }
            Ok(Frame::Header(_)) => {
                let _ = tx.send(Out::Close(stream_error(
                    "not-well-formed",
                    "the stream is open already",
                )));
                return None;
            }
            Err(e) => {
                if let Some(e) = e {
                    let _ = tx.send(Out::Close(e));
                }
                return None;
            }
        };
        if el.is("resume", ns::SM) {
            match resume(server, &el, tx, queued) {
                Some(s) => return Some(s),
                None => continue,
            }
        }
        let bind = el.child("bind", ns::BIND);
        if !el.is("iq", ns::CLIENT) || el.attr("type") != Some("set") || bind.is_none() {
            let reply = match el.is("iq", ns::CLIENT) {
                true => error_reply(&el, "cancel", "not-allowed", Some("bind a resource first")),
                false => {
                    let _ = tx.send(Out::Close(stream_error(
                        "not-authorized",
                        "bind a resource first",
                    )));
                    return None;
                }
            };
            let _ = tx.send(Out::Xml(reply.to_xml(ns::CLIENT)));
            continue;
        }
        let asked = bind
            .and_then(|b| b.child("resource", ns::BIND))
            .map(|r| r.text())
            .filter(|r| !r.is_empty() && r.len() <= 1023 && !r.chars().any(char::is_control));
        let resource = {
            let sessions = server.sessions.borrow();
            match asked {
                Some(r) if !sessions.contains_key(&r) => r,
                Some(r) => format!("{r}.{}", &random_id()[..6]),
                None => format!("granary.{}", &random_id()[..8]),
            }
        };
        let full = server.bare.with_resource(&resource);
        let session = Rc::new(Session {
            resource: resource.clone(),
            full: full.clone(),
            state: std::cell::RefCell::new(SessionState {
                out: Some(tx.clone()),
                queued: queued.clone(),
                ..Default::default()
            }),
            spill: Some(crate::server::Spill {
                store: server.store.clone(),
                domain: server.domain.clone(),
            }),
        });
        server
            .sessions
            .borrow_mut()
            .insert(resource, session.clone());
        let reply = crate::account::result_for(&el).with_child(
            Element::new("bind", ns::BIND)
                .with_child(Element::new("jid", ns::BIND).with_text(full.to_string())),
        );
        let _ = tx.send(Out::Xml(reply.to_xml(ns::CLIENT)));
        return Some(session);
    }
}

/// XEP-0198 §5: a detached session taken over by this connection.
fn resume(
    server: &Rc<Server>,
    el: &Element,
    tx: &mpsc::UnboundedSender<Out>,
    queued: &Rc<Cell<usize>>,
) -> Option<Rc<Session>> {
    let failed = |why: &str| {
        let _ = tx.send(Out::Xml(format!(
            "<failed xmlns='{}'><item-not-found xmlns='{}'/><text xmlns='{}'>{}</text></failed>",
            ns::SM,
            ns::STANZAS,
            ns::STANZAS,
            escape(why)
        )));
        None
    };
    let previd = el.attr("previd").unwrap_or("");
    let Some(h) = el.attr("h").and_then(|h| h.parse::<u32>().ok()) else {
        return failed("h is missing");
    };
    // Detached, or still attached to a connection that has not noticed
    // it is gone: this connection takes it over.
    let detached = server.resumable.borrow_mut().remove(previd);
    let was_detached = detached.is_some();
    let attached = || {
        server.all_sessions().into_iter().find(|s| {
            s.state
                .borrow()
                .sm
                .as_ref()
                .is_some_and(|sm| sm.resumable && sm.id == previd)
        })
    };
    let Some(session) = detached.or_else(attached) else {
        return failed("no such session, or it expired");
    };
    let (handled, resend) = {
        let mut st = session.state.borrow_mut();
        let sm = st.sm.as_mut().expect("resumable sessions have SM state");
        // Checked before anything changes: a bad resume leaves the
        // session as it was.
        if acknowledge(sm, h).is_err() {
            let sent = sm.sent;
            drop(st);
            if was_detached {
                server
                    .resumable
                    .borrow_mut()
                    .insert(previd.to_owned(), session);
            }
            let _ = tx.send(Out::Xml(format!(
                "<failed xmlns='{}' h='{sent}'><undefined-condition xmlns='{}'/><handled-count-too-high xmlns='{}' h='{h}' send-count='{sent}'/></failed>",
                ns::SM,
                ns::STANZAS,
                ns::SM
            )));
            return None;
        }
        let (handled, resend) = (
            sm.handled_in,
            sm.unacked
                .iter()
                .map(|e| e.to_xml(ns::CLIENT))
                .collect::<Vec<_>>(),
        );
        // A connection that still holds it is told, and its reader ends.
        if let Some(old) = st.out.take() {
            let _ = old.send(Out::Close(stream_error(
                "conflict",
                "the session was resumed elsewhere",
            )));
        }
        st.closer.notify_one();
        st.out = Some(tx.clone());
        queued.set(resend.iter().map(String::len).sum());
        st.queued = queued.clone();
        st.closing = false;
        st.closer = Rc::default();
        (handled, resend)
    };
    let _ = tx.send(Out::Xml(format!(
        "<resumed xmlns='{}' previd='{}' h='{handled}'/>",
        ns::SM,
        escape(previd)
    )));
    for xml in resend {
        let _ = tx.send(Out::Xml(xml));
    }
    granary_sdk::log::info(&format!("resumed {}", session.resource));
    Some(session)
}

/// Drops what the client acknowledged (`h` counts from the start, modulo
/// 2^32). An `h` older than the last is nothing new; one beyond what was
/// sent is an error (`Err`).
fn acknowledge(sm: &mut Sm, h: u32) -> Result<(), ()> {
    let outstanding = sm.unacked.len() as u32;
    let first = sm.sent.wrapping_sub(outstanding);
    let acked = h.wrapping_sub(first);
    if acked <= outstanding {
        sm.drop_acked(acked as usize);
        Ok(())
    } else if h.wrapping_sub(sm.sent) < 1 << 31 {
        Err(())
    } else {
        Ok(())
    }
}

fn too_high(h: u32, sent: u32) -> String {
    format!(
        "<stream:error><undefined-condition xmlns='{}'/><handled-count-too-high xmlns='{}' h='{h}' send-count='{sent}'/></stream:error></stream:stream>",
        ns::STREAM_ERRORS,
        ns::SM
    )
}

/// Stanzas until the stream ends; whether it ended cleanly.
async fn run(
    server: &Rc<Server>,
    session: &Rc<Session>,
    reader: &mut Reader,
    tx: &mpsc::UnboundedSender<Out>,
) -> bool {
    let mut budget = Budget {
        tokens: server.limits.burst,
        at: Instant::now(),
        limits: server.limits,
    };
    loop {
        server.room_in_outbox().await;
        let closer = session.state.borrow().closer.clone();
        let frame = tokio::select! {
            f = reader.frame() => f,
            () = closer.notified() => return false,
        };
        // Taken over by a resumed stream on another connection.
        if !session
            .state
            .borrow()
            .out
            .as_ref()
            .is_some_and(|o| o.same_channel(tx))
        {
            return true;
        }
        let el = match frame {
            Ok(Frame::Stanza(el)) => el,
            Ok(Frame::End) => {
                let _ = tx.send(Out::Close("</stream:stream>".to_owned()));
                return true;
            }
            Ok(Frame::Header(_)) => {
                let _ = tx.send(Out::Close(stream_error(
                    "not-well-formed",
                    "the stream is open already",
                )));
                return true;
            }
            Err(None) => return false,
            Err(Some(e)) => {
                let _ = tx.send(Out::Close(e));
                return true;
            }
        };
        if !budget.take() {
            let _ = tx.send(Out::Close(stream_error(
                "policy-violation",
                "too many stanzas too fast",
            )));
            return true;
        }
        if el.ns == ns::SM {
            if stream_management(session, &el, tx) {
                return true;
            }
            continue;
        }
        if el.ns == ns::CSI {
            session.state.borrow_mut().inactive = el.name == "inactive";
            if el.name == "active" {
                session.flush_held();
            }
            continue;
        }
        if el.ns != ns::CLIENT || !matches!(el.name.as_str(), "message" | "presence" | "iq") {
            let _ = tx.send(Out::Close(stream_error(
                "unsupported-stanza-type",
                "not a stanza",
            )));
            return true;
        }
        if let Some(sm) = session.state.borrow_mut().sm.as_mut() {
            sm.handled_in = sm.handled_in.wrapping_add(1);
        }
        if let Err(e) = stanza(server, session, el) {
            let _ = tx.send(Out::Close(e));
            return true;
        }
    }
}

/// XEP-0198 elements; `true` when the stream must end (the error is queued).
fn stream_management(session: &Rc<Session>, el: &Element, tx: &mpsc::UnboundedSender<Out>) -> bool {
    let mut st = session.state.borrow_mut();
    match el.name.as_str() {
        "enable" if st.sm.is_none() => {
            let resumable = matches!(el.attr("resume"), Some("true" | "1"));
            let id = random_id();
            let answer = match resumable {
                true => format!(
                    "<enabled xmlns='{}' id='{id}' resume='true' max='{}'/>",
                    ns::SM,
                    RESUME_TIMEOUT.as_secs()
                ),
                false => format!("<enabled xmlns='{}' id='{id}'/>", ns::SM),
            };
            st.sm = Some(Sm {
                id,
                resumable,
                ..Default::default()
            });
            let _ = tx.send(Out::Xml(answer));
        }
        "r" => {
            if let Some(sm) = &st.sm {
                let _ = tx.send(Out::Xml(format!(
                    "<a xmlns='{}' h='{}'/>",
                    ns::SM,
                    sm.handled_in
                )));
            }
        }
        "a" => {
            let h = el.attr("h").and_then(|h| h.parse::<u32>().ok());
            if let (Some(sm), Some(h)) = (st.sm.as_mut(), h)
                && acknowledge(sm, h).is_err()
            {
                let _ = tx.send(Out::Close(too_high(h, sm.sent)));
                // Not resumable after a protocol error.
                sm.resumable = false;
                return true;
            }
        }
        _ => {
            let _ = tx.send(Out::Xml(format!(
                "<failed xmlns='{}'><unexpected-request xmlns='{}'/></failed>",
                ns::SM,
                ns::STANZAS
            )));
        }
    }
    false
}

/// One stanza from the client; `Err` with a stream error to end it.
pub fn stanza(server: &Rc<Server>, session: &Rc<Session>, mut el: Element) -> Result<(), String> {
    // The client's address is the session's, whatever it wrote.
    el.set_attr("from", session.full.to_string());
    let to = match el.attr("to") {
        None => None,
        Some(t) => match Jid::parse(t) {
            Ok(j) => Some(j),
            Err(_) => {
                session.send(error_reply(&el, "modify", "jid-malformed", None));
                return Ok(());
            }
        },
    };
    match el.name.as_str() {
        "presence" => crate::presence::outbound(server, session, el),
        "iq" => match &to {
            None => crate::account::handle_iq(server, &session.full, Some(session), el),
            Some(t) if t.local.is_none() && t.domain == server.domain && t.resource.is_none() => {
                crate::account::handle_iq(server, &session.full, Some(session), el)
            }
            Some(t) if t.is_bare() && t.bare() == server.bare => {
                crate::account::handle_iq(server, &session.full, Some(session), el)
            }
            // The account's own upload service (XEP-0363).
            Some(t)
                if server.upload.enabled()
                    && t.local.is_none()
                    && t.resource.is_none()
                    && t.domain == crate::upload::service_jid(&server.domain) =>
            {
                crate::upload::handle_iq(server, session, el)
            }
            // The group chat service itself (its rooms are grains).
            Some(t)
                if t.local.is_none()
                    && t.resource.is_none()
                    && t.domain == crate::room::service_jid(&server.domain) =>
            {
                crate::room::service_iq(server, session, el)
            }
            Some(t) => {
                let t = t.clone();
                server.route(&session.full, &t, el);
            }
        },
        _ => {
            let to = to.unwrap_or_else(|| server.bare.clone());
            if to.local.is_none() {
                if el.attr("type") != Some("error") {
                    session.send(error_reply(&el, "cancel", "service-unavailable", None));
                }
                return Ok(());
            }
            if to.bare() == server.bare {
                el.remove_attr("to");
                server.route(&session.full, &to, el);
                return Ok(());
            }
            // Refused before it is archived or copied anywhere.
            if server.blocks(&to) {
                session.send(crate::server::blocked_error(&el));
                return Ok(());
            }
            // As the archive and the user's other sessions see it.
            let mut addressed = el.clone();
            addressed.set_attr("to", to.to_string());
            if crate::server::archivable(&el) && crate::server::permanent(&el) {
                server.archive(&random_id(), &to.bare_text(), addressed.to_xml(ns::CLIENT));
            }
            server.carbon("sent", &addressed, Some(&session.resource));
            el.remove_attr("to");
            // Checked for blocking above: straight to the host.
            server.send_out(&session.full, &to, el);
        }
    }
    Ok(())
}

/// The connection is gone: a resumable session waits detached, any other
/// leaves (unavailable to those who saw it, unacknowledged messages
/// delivered again or kept offline).
fn end(server: &Rc<Server>, session: &Rc<Session>, clean: bool, tx: &mpsc::UnboundedSender<Out>) {
    let resumable = {
        let mut st = session.state.borrow_mut();
        // Resumed on another connection meanwhile: that one has it now.
        if !st.out.as_ref().is_some_and(|o| o.same_channel(tx)) {
            return;
        }
        st.out = None;
        st.sm
            .as_ref()
            .filter(|sm| sm.resumable && !clean)
            .map(|sm| sm.id.clone())
    };
    if let Some(id) = resumable {
        let epoch = {
            let mut st = session.state.borrow_mut();
            st.detached += 1;
            st.detached
        };
        server
            .resumable
            .borrow_mut()
            .insert(id.clone(), session.clone());
        let (server, session) = (server.clone(), session.clone());
        tokio::task::spawn_local(async move {
            tokio::time::sleep(RESUME_TIMEOUT).await;
            // Still the detachment this timer was started for?
            let current = {
                let st = session.state.borrow();
                st.detached == epoch && st.out.is_none()
            };
            if current && server.resumable.borrow_mut().remove(&id).is_some() {
                leave(&server, &session);
            }
        });
        return;
    }
    leave(server, session);
}

fn leave(server: &Rc<Server>, session: &Rc<Session>) {
    if session.available() {
        crate::presence::outbound(
            server,
            session,
            Element::new("presence", ns::CLIENT).with_attr("type", "unavailable"),
        );
    }
    server.sessions.borrow_mut().remove(&session.resource);
    let unacked: Vec<Element> = session
        .state
        .borrow_mut()
        .sm
        .as_mut()
        .map(|sm| {
            sm.unacked_sizes.clear();
            sm.unacked_bytes = 0;
            sm.unacked.drain(..).collect()
        })
        .unwrap_or_default();
    for el in unacked {
        // Only messages that were for the user, not copies or results.
        if el.name != "message" || !crate::server::archivable(&el) {
            continue;
        }
        let Some(from) = el.attr("from").and_then(|f| Jid::parse(f).ok()) else {
            continue;
        };
        if from.bare() == server.bare {
            continue;
        }
        let mut again = el.clone();
        again.retain_children(|c| !c.is("stanza-id", ns::SID));
        // Delivered to the account again: other resources, or offline.
        let to = server.bare.clone();
        deliver_again(server, &from, &to, again);
    }
}

fn deliver_again(server: &Rc<Server>, from: &Jid, to: &Jid, el: Element) {
    if server.has_message_targets() {
        // Not archived twice: it is in the archive already.
        let mut el = el;
        el.push(Element::new("no-permanent-store", ns::HINTS));
        server.deliver(from, to, el);
        return;
    }
    crate::server::keep_offline(&server.store, &server.domain, &el);
}
