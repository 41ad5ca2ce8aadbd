//! In-band registration with an invite (XEP-0077 with XEP-0445's token,
//! as XEP-0401 clients such as Conversations use it), before login:
//!
//! 1. `<iq type='set'><preauth xmlns='urn:xmpp:pars:0' token='…'/></iq>`:
//!    the token is checked (and remembered for this stream), not spent;
//! 2. `<iq type='get'><query xmlns='jabber:iq:register'/></iq>`: the form
//!    (a name and a password);
//! 3. `<iq type='set'><query …><username/><password/></query></iq>`: the
//!    invite is spent and the account made in one transaction; the
//!    password becomes the user's first `xmpp` app password. For a contact
//!    invite the new user and the inviter become each other's contacts.
//!
//! Then the client logs in on the same stream as usual. There is no
//! registration without an invite. An unknown, expired, used up or revoked
//! token gets the same answer, and counts against the address in the
//! login limiter; one connection makes at most one account.

use granary_grains::GrainId;
use granary_wire::stanza::{Element, error_reply};
use granary_wire::xmpp::{NS_CLIENT, stream_error};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::{Client, MAX_FAILURES, Step};
use crate::RedeemRefused;
use crate::Shared;
use std::sync::Arc;

/// Members of a group chat a group invite makes the newcomer's contacts.
const MAX_GROUP_CONTACTS: usize = 100;

const NS_REGISTER: &str = "jabber:iq:register";
const NS_PARS: &str = "urn:xmpp:pars:0";

/// The stream features that say registration with an invite is offered.
pub(super) const FEATURES: &str = "<register xmlns='urn:xmpp:invite'/>\
     <register xmlns='urn:xmpp:ibr-token:0'/>\
     <register xmlns='http://jabber.org/features/iq-register'/>";

/// What every bad token is told, whatever was wrong with it.
const NOT_VALID: &str = "The provided token is invalid or expired";

/// An empty result for `el`.
fn result_of(el: &Element) -> Element {
    let mut r = Element::new("iq", NS_CLIENT).with_attr("type", "result");
    if let Some(id) = el.attr("id") {
        r.set_attr("id", id);
    }
    r
}

fn result(el: &Element) -> String {
    result_of(el).to_xml(NS_CLIENT)
}

fn error(el: &Element, kind: &str, condition: &str, text: &str) -> String {
    let mut el = el.clone();
    el.remove_attr("from");
    error_reply(&el, kind, condition, Some(text)).to_xml(NS_CLIENT)
}

impl Client {
    /// Answers an `<iq/>` before login; `Close` (after a stream error) for
    /// anything but registration.
    pub(super) async fn iq<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        stream: &mut S,
        el: Element,
    ) -> Step {
        let Some(answer) = self.answer(&el).await else {
            let e = stream_error("not-authorized", "log in first");
            let _ = stream.write_all(e.as_bytes()).await;
            return Step::Close;
        };
        if stream.write_all(answer.as_bytes()).await.is_err() {
            return Step::Close;
        }
        if self.failures >= MAX_FAILURES {
            let e = stream_error("policy-violation", "too many failed attempts");
            let _ = stream.write_all(e.as_bytes()).await;
            return Step::Close;
        }
        Step::Next
    }

    async fn answer(&mut self, el: &Element) -> Option<String> {
        let kind = el.attr("type").unwrap_or("");
        if let Some(preauth) = el.child("preauth", NS_PARS) {
            if kind != "set" {
                return Some(error(el, "modify", "bad-request", "a token is set"));
            }
            let token = preauth.attr("token").unwrap_or("").to_owned();
            return Some(self.preauth(el, &token).await);
        }
        let query = el.child("query", NS_REGISTER)?;
        Some(match kind {
            "get" => {
                let mut r = result_of(el);
                r.push(
                    Element::new("query", NS_REGISTER)
                        .with_child(Element::new("instructions", NS_REGISTER).with_text(
                            "Choose a name and a password for your new account. \
                             Accounts are made with an invite only.",
                        ))
                        .with_child(Element::new("username", NS_REGISTER))
                        .with_child(Element::new("password", NS_REGISTER)),
                );
                r.to_xml(NS_CLIENT)
            }
            "set" => self.register(el, query).await,
            _ => error(el, "modify", "bad-request", "get or set"),
        })
    }

    /// A failed token: counted, and told like any other.
    fn bad_token(&mut self, el: &Element) -> String {
        self.failures += 1;
        self.shared.login_failed(self.peer.ip());
        tracing::info!("registration refused: the invite is not valid");
        error(el, "cancel", "item-not-found", NOT_VALID)
    }

    fn limited_answer(&self, el: &Element) -> Option<String> {
        self.shared.source_refused(self.peer.ip()).then(|| {
            error(
                el,
                "wait",
                "resource-constraint",
                "too many failed attempts; try again in a few minutes",
            )
        })
    }

    async fn preauth(&mut self, el: &Element, token: &str) -> String {
        if let Some(limited) = self.limited_answer(el) {
            return limited;
        }
        if !crate::invite::token_shape(token) {
            return self.bad_token(el);
        }
        match self.shared.directory.invite(token).await {
            Ok(Some(_)) => {
                self.invite = Some(token.to_owned());
                result(el)
            }
            Ok(None) => self.bad_token(el),
            // Not the client's fault: not counted, and said so.
            Err(crate::LookupFailed) => error(
                el,
                "wait",
                "internal-server-error",
                "the invite cannot be checked right now; try again",
            ),
        }
    }

    async fn register(&mut self, el: &Element, query: &Element) -> String {
        if query.child("remove", NS_REGISTER).is_some() {
            return error(el, "cancel", "not-allowed", "log in first");
        }
        if self.registered {
            return error(
                el,
                "cancel",
                "not-allowed",
                "one account per connection; log in with it",
            );
        }
        // The token from the preauth step, or one given with the form.
        let token = match (&self.invite, query.child("preauth", NS_PARS)) {
            (Some(t), _) => t.clone(),
            (None, Some(p)) => p.attr("token").unwrap_or("").to_owned(),
            (None, None) => {
                return error(
                    el,
                    "cancel",
                    "not-allowed",
                    "accounts are made with an invite link only",
                );
            }
        };
        if let Some(limited) = self.limited_answer(el) {
            return limited;
        }
        if !crate::invite::token_shape(&token) {
            return self.bad_token(el);
        }
        let domain = self
            .domain
            .clone()
            .unwrap_or_else(|| self.shared.domain.clone());
        let name = query
            .child("username", NS_REGISTER)
            .map(|u| u.text())
            .unwrap_or_default();
        // A bare address of this domain names the same account.
        let name = match name.trim().rsplit_once('@') {
            Some((local, d)) if d.eq_ignore_ascii_case(&domain) => local.to_owned(),
            Some(_) => {
                return error(
                    el,
                    "modify",
                    "not-acceptable",
                    &format!("accounts here are in {domain}"),
                );
            }
            None => name.trim().to_owned(),
        }
        .to_lowercase();
        let password = query
            .child("password", NS_REGISTER)
            .map(|p| p.text())
            .unwrap_or_default();
        if name.is_empty() || password.is_empty() {
            return error(
                el,
                "modify",
                "not-acceptable",
                "a name and a password are needed",
            );
        }
        let redeemed = self
            .shared
            .directory
            .redeem_invite(&token, &name, &password, &domain)
            .await;
        match redeemed {
            Ok(r) => {
                self.registered = true;
                self.invite = None;
                tracing::info!(user = %name, credential = r.credential, "account made with an invite");
                if let Some(inviter) = &r.inviter {
                    // Before the answer: the app's next step may be a
                    // subscription request to the inviter, who must know
                    // them by then.
                    self.befriend(&name, &domain, inviter).await;
                    if let Some(room) = r.room.clone() {
                        tokio::spawn(join_group(
                            self.shared.clone(),
                            name.clone(),
                            domain.clone(),
                            inviter.clone(),
                            room,
                        ));
                    }
                }
                result(el)
            }
            Err(RedeemRefused::NotValid) => {
                self.invite = None;
                self.bad_token(el)
            }
            // Counted on this connection: a token holder may not try
            // every name to learn which exist.
            Err(RedeemRefused::NameTaken) => {
                self.failures += 1;
                error(
                    el,
                    "cancel",
                    "conflict",
                    "that name is taken; choose another",
                )
            }
            Err(RedeemRefused::Unacceptable(why)) => error(el, "modify", "not-acceptable", &why),
            Err(RedeemRefused::TryLater) => error(
                el,
                "wait",
                "internal-server-error",
                "the account could not be made; try again",
            ),
        }
    }

    /// The new user and the inviter become each other's contacts. The
    /// account exists whatever happens here; a grain that cannot be
    /// reached is logged (the two can still add each other by hand).
    async fn befriend(&self, user: &str, domain: &str, inviter: &str) {
        let jid = format!("{user}@{domain}");
        let Some((inviter_user, _)) = inviter.split_once('@') else {
            return;
        };
        let pairs = [
            (user, inviter, inviter_user),
            (inviter_user, jid.as_str(), user),
        ];
        for (owner, contact, name) in pairs {
            let done = match GrainId::for_user(owner, "xmpp") {
                Ok(grain) => self
                    .shared
                    .grains
                    .xmpp_befriend(&grain, contact, name)
                    .await
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            if let Err(e) = done {
                tracing::warn!(owner, contact, error = %e, "could not add the inviter as a contact");
            }
        }
    }
}

/// A group invite: the new user becomes a member of the inviter's room
/// (which sends them an invitation, kept until they log in), and the
/// contact of its members at the room's own chat domain, both ways: the
/// owner chose them, and the admin made the invite. Runs after the
/// registration was answered (a room of many members is many calls); the
/// account exists whatever happens here, and failures are logged.
async fn join_group(
    shared: Arc<Shared>,
    user: String,
    domain: String,
    inviter: String,
    room: String,
) {
    let (user, room) = (user.as_str(), room.as_str());
    let Some((owner, home)) = inviter.split_once('@') else {
        return;
    };
    let Ok(grain) = GrainId::parse(&format!("{owner}-room--{room}")) else {
        return;
    };
    let jid = format!("{user}@{domain}");
    let grains = &shared.grains;
    if let Err(e) = grains.xmpp_befriend(&grain, &jid, user).await {
        tracing::warn!(room, user, error = %e, "could not make the new user a member of the group chat");
        return;
    }
    let members = match grains.xmpp_room_members(&grain).await {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(room, error = %e, "could not read the group chat's members");
            return;
        }
    };
    // Members here only (an affiliation may name anyone's address;
    // another server's `bob` is not this server's), and a bounded number
    // of them.
    let here = members.iter().filter(|m| {
        m.split_once('@')
            .is_some_and(|(_, d)| d.eq_ignore_ascii_case(home))
            && **m != inviter
            && **m != jid
    });
    for member in here.take(MAX_GROUP_CONTACTS) {
        let Some((m_user, _)) = member.split_once('@') else {
            continue;
        };
        for (owner, contact, name) in [
            (user, member.as_str(), m_user),
            (m_user, jid.as_str(), user),
        ] {
            let done = match GrainId::for_user(owner, "xmpp") {
                Ok(g) => grains
                    .xmpp_befriend(&g, contact, name)
                    .await
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            if let Err(e) = done {
                tracing::warn!(owner, contact, error = %e, "could not add a group member as a contact");
            }
        }
    }
}
