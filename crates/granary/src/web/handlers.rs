//! What each request to the web home does: routing, the sign-in steps,
//! and the signed-in user's actions, each through their `Home`.

use std::collections::HashMap;

use granary_gateway::home::HomeRequest;
use granary_schema::admin_capnp::{home, web_gate};
use hyper::body::Bytes;
use hyper::{Method, Response, StatusCode, header};

use super::session::{self, PENDING, PRE, SESSION, Sessions, cookie, same, set_cookie};
use super::{Setup, pages, views};

pub(super) struct Web {
    pub(super) gate: web_gate::Client,
    pub(super) setup: Setup,
    pub(super) sessions: Sessions,
}

/// A request's form fields (`application/x-www-form-urlencoded`); a
/// field sent twice keeps its first value.
fn form(body: &[u8]) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for (k, v) in granary_wire::form::fields(body) {
        out.entry(k).or_insert(v);
    }
    out
}

pub(super) fn html(status: StatusCode, body: String, cookies: &[String]) -> Response<Bytes> {
    let mut r = Response::new(Bytes::from(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/html; charset=utf-8"),
    );
    for c in cookies {
        if let Ok(v) = header::HeaderValue::from_str(c) {
            r.headers_mut().append(header::SET_COOKIE, v);
        }
    }
    r
}

pub(super) fn see_other(location: &str, cookies: &[String]) -> Response<Bytes> {
    let mut r = html(StatusCode::SEE_OTHER, String::new(), cookies);
    if let Ok(v) = header::HeaderValue::from_str(location) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

pub(super) fn not_found(nav: Option<pages::Nav<'_>>) -> Response<Bytes> {
    html(
        StatusCode::NOT_FOUND,
        pages::message("Not found", "There is nothing here.", nav),
        &[],
    )
}

/// What a failed call says, for the page: the daemon's own message (the
/// RPC layer's "remote exception: " prefixes taken off) for a refusal,
/// a plain apology for anything else (whose details go to the log).
pub(super) fn why(e: &capnp::Error) -> String {
    let mut m = e.extra.as_str();
    while let Some(rest) = m.strip_prefix("remote exception: ") {
        m = rest;
    }
    if e.kind == capnp::ErrorKind::Failed && !m.is_empty() && !m.starts_with("internal error") {
        m.to_owned()
    } else {
        tracing::warn!(error = %e, "web home call failed");
        "that did not work; try again in a moment".to_owned()
    }
}

/// Whether a failed call was a wrong password or code (what the limiter
/// counts), not a failure of ours.
pub(super) fn wrong_secret(e: &capnp::Error) -> bool {
    let m = why(e);
    m == "wrong user name or password"
        || m == "wrong password"
        || m == "wrong code"
        || m.starts_with("too many wrong codes")
}

/// The signed-in user, as a request found them.
pub(super) struct Me {
    pub(super) token: String,
    pub(super) user: String,
    pub(super) home: home::Client,
    pub(super) csrf: String,
    /// One of `web.admins`.
    pub(super) admin: bool,
}

impl Me {
    pub(super) fn nav(&self) -> pages::Nav<'_> {
        pages::Nav {
            user: &self.user,
            csrf: &self.csrf,
            admin: self.admin,
        }
    }
}

impl Web {
    pub(super) async fn answer(&self, req: HomeRequest) -> Response<Bytes> {
        if req.method == Method::GET && req.path == "/style.css" {
            let mut r = Response::new(Bytes::from_static(pages::STYLE.as_bytes()));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/css; charset=utf-8"),
            );
            return r;
        }
        if req.method != Method::GET && req.method != Method::POST {
            return html(
                StatusCode::METHOD_NOT_ALLOWED,
                pages::message("Not allowed", "This page takes GET and POST only.", None),
                &[],
            );
        }
        let post = req.method == Method::POST;
        if post && !session::same_origin(&req.headers, &req.authority) {
            tracing::info!(peer = %req.peer, "web home: a form from another site refused");
            return html(
                StatusCode::FORBIDDEN,
                pages::message("Refused", "That form did not come from this site.", None),
                &[],
            );
        }
        let me = cookie(&req.headers, SESSION).and_then(|token| {
            self.sessions
                .with(&token, |s| {
                    (s.user.clone(), s.home.clone(), s.csrf.clone(), s.admin)
                })
                .map(|(user, home, csrf, admin)| Me {
                    token,
                    user,
                    home,
                    csrf,
                    admin,
                })
        });
        let Some(me) = me else {
            return self.signed_out(&req, post).await;
        };
        let fields = if post {
            form(&req.body)
        } else {
            HashMap::new()
        };
        if post && !same(fields.get("csrf").map_or("", String::as_str), &me.csrf) {
            return html(
                StatusCode::FORBIDDEN,
                pages::message(
                    "Refused",
                    "That form has expired; open the page again.",
                    Some(me.nav()),
                ),
                &[],
            );
        }
        self.signed_in(&req, &me, post, &fields).await
    }

    /// Pages before sign-in: the form, its two steps, and nothing else.
    async fn signed_out(&self, req: &HomeRequest, post: bool) -> Response<Bytes> {
        let domain = &self.setup.domain;
        match (post, req.path.as_str()) {
            (false, "/") => {
                let (pre, set) = match cookie(&req.headers, PRE) {
                    Some(p) if p.len() == 43 => (p, Vec::new()),
                    _ => {
                        let p = session::token();
                        let set = vec![set_cookie(PRE, Some(&p), session::LIFETIME)];
                        (p, set)
                    }
                };
                let csrf = self.sessions.pre_csrf("signin", &pre);
                html(StatusCode::OK, pages::sign_in(domain, &csrf, None), &set)
            }
            (true, "/signin") => self.sign_in(req).await,
            (false, "/signin/code") => match cookie(&req.headers, PENDING) {
                Some(p) if self.sessions.pending(&p).is_some() => {
                    let csrf = self.sessions.pre_csrf("code", &p);
                    html(StatusCode::OK, pages::code(&csrf, None), &[])
                }
                _ => see_other("/", &[]),
            },
            (true, "/signin/code") => self.sign_in_code(req).await,
            (false, "/devices" | "/grants" | "/keys" | "/invites" | "/security") => {
                see_other("/", &[])
            }
            (true, _) => html(
                StatusCode::FORBIDDEN,
                pages::message("Signed out", "Your session has ended; sign in again.", None),
                &[],
            ),
            _ => not_found(None),
        }
    }

    async fn sign_in(&self, req: &HomeRequest) -> Response<Bytes> {
        let fields = form(&req.body);
        let pre = cookie(&req.headers, PRE).unwrap_or_default();
        let csrf = self.sessions.pre_csrf("signin", &pre);
        let domain = &self.setup.domain;
        if pre.is_empty() || !same(fields.get("csrf").map_or("", String::as_str), &csrf) {
            return html(
                StatusCode::FORBIDDEN,
                pages::message(
                    "Refused",
                    "That form has expired; open the page again.",
                    None,
                ),
                &[],
            );
        }
        let ip = req.peer;
        if self.setup.limiter.refused(ip) {
            return html(
                StatusCode::TOO_MANY_REQUESTS,
                pages::sign_in(
                    domain,
                    &csrf,
                    Some("Too many failed sign-ins from here; try again in a few minutes."),
                ),
                &[],
            );
        }
        let user = fields
            .get("user")
            .map_or("", |u| u.trim())
            .to_ascii_lowercase();
        let mut call = self.gate.sign_in_request();
        call.get().set_user(&user);
        call.get()
            .set_password(fields.get("password").map_or("", String::as_str));
        let answer = match call.send().promise.await {
            Ok(a) => a,
            Err(e) => {
                if wrong_secret(&e) {
                    self.setup.limiter.failed(ip);
                }
                tracing::info!(user, peer = %ip, "web sign-in failed");
                return html(
                    StatusCode::UNAUTHORIZED,
                    pages::sign_in(domain, &csrf, Some(&capitalise(&why(&e)))),
                    &[],
                );
            }
        };
        let Ok(a) = answer.get() else {
            return html(
                StatusCode::INTERNAL_SERVER_ERROR,
                pages::message("Failed", "Sign-in failed.", None),
                &[],
            );
        };
        if a.has_second() {
            let Ok(second) = a.get_second() else {
                return not_found(None);
            };
            let token = self.sessions.wait_for_code(second);
            return see_other(
                "/signin/code",
                &[set_cookie(PENDING, Some(&token), session::PENDING_FOR)],
            );
        }
        match a.get_home() {
            Ok(home) => self.begin(user, home).await,
            Err(_) => html(
                StatusCode::INTERNAL_SERVER_ERROR,
                pages::message("Failed", "Sign-in failed.", None),
                &[],
            ),
        }
    }

    /// A new session (never one the browser brought: fixation).
    async fn begin(&self, user: String, home: home::Client) -> Response<Bytes> {
        let admin = match home.whoami_request().send().promise.await {
            Ok(w) => w.get().is_ok_and(|w| w.get_admin()),
            Err(_) => return see_other("/", &[]),
        };
        let token = self.sessions.start(user, home, admin);
        see_other(
            "/",
            &[
                set_cookie(SESSION, Some(&token), session::LIFETIME),
                set_cookie(PENDING, None, session::PENDING_FOR),
            ],
        )
    }

    async fn sign_in_code(&self, req: &HomeRequest) -> Response<Bytes> {
        let fields = form(&req.body);
        let Some((token, second)) =
            cookie(&req.headers, PENDING).and_then(|t| self.sessions.pending(&t).map(|s| (t, s)))
        else {
            return see_other("/", &[]);
        };
        let csrf = self.sessions.pre_csrf("code", &token);
        if !same(fields.get("csrf").map_or("", String::as_str), &csrf) {
            return html(
                StatusCode::FORBIDDEN,
                pages::message("Refused", "That form has expired; sign in again.", None),
                &[],
            );
        }
        let ip = req.peer;
        if self.setup.limiter.refused(ip) {
            return html(
                StatusCode::TOO_MANY_REQUESTS,
                pages::code(
                    &csrf,
                    Some("Too many failed sign-ins from here; try again in a few minutes."),
                ),
                &[],
            );
        }
        let mut call = second.code_request();
        call.get()
            .set_code(fields.get("code").map_or("", String::as_str));
        match call.send().promise.await {
            Ok(a) => {
                self.sessions.end_pending(&token);
                let home = match a.get().and_then(|a| a.get_home()) {
                    Ok(h) => h,
                    Err(_) => return see_other("/", &[]),
                };
                let user = match home.whoami_request().send().promise.await {
                    Ok(w) => w
                        .get()
                        .ok()
                        .and_then(|w| w.get_user().ok())
                        .and_then(|u| u.to_string().ok())
                        .unwrap_or_default(),
                    Err(_) => return see_other("/", &[]),
                };
                self.begin(user, home).await
            }
            Err(e) => {
                if wrong_secret(&e) {
                    self.setup.limiter.failed(ip);
                }
                html(
                    StatusCode::UNAUTHORIZED,
                    pages::code(&csrf, Some(&capitalise(&why(&e)))),
                    &[],
                )
            }
        }
    }

    async fn signed_in(
        &self,
        req: &HomeRequest,
        me: &Me,
        post: bool,
        f: &HashMap<String, String>,
    ) -> Response<Bytes> {
        // The account may have changed under the session (a password set
        // by the admin, the user removed): then it is over.
        if me.home.whoami_request().send().promise.await.is_err() {
            self.sessions.end(&me.token);
            return see_other("/", &[set_cookie(SESSION, None, session::LIFETIME)]);
        }
        let path = req.path.as_str();
        let ip = req.peer;
        // Asked only where a password is checked (each ask of a refused
        // source counts as a refusal).
        let limited = || self.setup.limiter.refused(ip);
        let field = |k: &str| f.get(k).map_or("", String::as_str).to_owned();
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        match (post, segments.as_slice()) {
            (false, [""]) => self.home_page(me).await,
            (_, ["admin", rest @ ..]) => self.admin(req, me, post, rest, f).await,
            (true, ["signout"]) => {
                self.sessions.end(&me.token);
                see_other("/", &[set_cookie(SESSION, None, session::LIFETIME)])
            }
            (false, ["devices"]) => self.devices(me, None, None).await,
            (true, ["devices"]) => self.add_device(me, &field("kind"), &field("label")).await,
            (true, ["devices", "download"]) => self.download(me, &field("what"), &field("client")),
            (true, ["devices", "tasks", id, "revoke"]) => {
                let Ok(id) = id.parse::<i64>() else {
                    return not_found(Some(me.nav()));
                };
                let mut call = me.home.revoke_task_list_request();
                call.get().set_id(id);
                match call
                    .send()
                    .promise
                    .await
                    .map(|r| r.get().map(|r| r.get_found()))
                {
                    Ok(Ok(true)) => {
                        let done = "Task list revoked: its client id no longer syncs.";
                        self.devices(me, None, Some(done)).await
                    }
                    Ok(_) => not_found(Some(me.nav())),
                    Err(e) => self.devices(me, Some(&why(&e)), None).await,
                }
            }
            (true, ["devices", id, "revoke"]) => {
                let Ok(id) = id.parse::<i64>() else {
                    return not_found(Some(me.nav()));
                };
                let mut call = me.home.revoke_device_request();
                call.get().set_id(id);
                match call
                    .send()
                    .promise
                    .await
                    .map(|r| r.get().map(|r| r.get_found()))
                {
                    Ok(Ok(true)) => {
                        self.devices(
                            me,
                            None,
                            Some("Device revoked: its password no longer works."),
                        )
                        .await
                    }
                    Ok(_) => not_found(Some(me.nav())),
                    Err(e) => self.devices(me, Some(&why(&e)), None).await,
                }
            }
            (false, ["grants"]) => self.grants(me, None).await,
            (true, ["grants", id, "revoke"]) => {
                let Ok(id) = id.parse::<i64>() else {
                    return not_found(Some(me.nav()));
                };
                let mut call = me.home.revoke_grant_request();
                call.get().set_id(id);
                match call
                    .send()
                    .promise
                    .await
                    .map(|r| r.get().map(|r| r.get_found()))
                {
                    Ok(Ok(true)) => self.grants(me, Some("Grant revoked.")).await,
                    _ => not_found(Some(me.nav())),
                }
            }
            (false, ["keys"]) => self.keys(me, None, None).await,
            (true, ["keys"]) => {
                let mut call = me.home.add_ssh_key_request();
                call.get().set_key(field("key").trim());
                call.get().set_label(field("label").trim());
                match call.send().promise.await {
                    Ok(_) => self.keys(me, None, Some("Key added.")).await,
                    Err(e) => self.keys(me, Some(&capitalise(&why(&e))), None).await,
                }
            }
            (true, ["keys", id, "remove"]) => {
                let Ok(id) = id.parse::<i64>() else {
                    return not_found(Some(me.nav()));
                };
                let mut call = me.home.remove_ssh_key_request();
                call.get().set_id(id);
                match call
                    .send()
                    .promise
                    .await
                    .map(|r| r.get().map(|r| r.get_found()))
                {
                    Ok(Ok(true)) => self.keys(me, None, Some("Key removed.")).await,
                    _ => not_found(Some(me.nav())),
                }
            }
            (false, ["invites"]) => html(StatusCode::OK, views::invites(me.nav(), None, None), &[]),
            (true, ["invites"]) => {
                let mut call = me.home.invite_request();
                call.get().set_expires_secs(7 * 86_400);
                match call.send().promise.await {
                    Ok(r) => {
                        let r = r.get();
                        let text = |t: Option<capnp::text::Reader<'_>>| {
                            t.and_then(|t| t.to_string().ok()).unwrap_or_default()
                        };
                        let link = text(r.as_ref().ok().and_then(|r| r.get_link().ok()));
                        let uri = text(r.as_ref().ok().and_then(|r| r.get_uri().ok()));
                        html(
                            StatusCode::OK,
                            views::invites(me.nav(), Some((&link, &uri)), None),
                            &[],
                        )
                    }
                    Err(e) => html(
                        StatusCode::OK,
                        views::invites(me.nav(), None, Some(&capitalise(&why(&e)))),
                        &[],
                    ),
                }
            }
            (false, ["security"]) => self.security(me, None, None, None).await,
            (true, ["security", "totp"]) => self.totp_begin(me).await,
            (true, ["security", "totp", "enable"]) => self.totp_enable(me, &field("code")).await,
            (true, ["security", "totp", "disable"]) if limited() => {
                self.security(me, Some(TOO_MANY), None, None).await
            }
            (true, ["security", "totp", "disable"]) => {
                let mut call = me.home.totp_disable_request();
                call.get().set_password(field("password").as_str());
                match call.send().promise.await {
                    Ok(_) => {
                        self.security(me, None, Some("Two-step sign-in is off."), None)
                            .await
                    }
                    Err(e) => {
                        if wrong_secret(&e) {
                            self.setup.limiter.failed(ip);
                        }
                        self.security(me, Some(&capitalise(&why(&e))), None, None)
                            .await
                    }
                }
            }
            (true, ["password"]) if limited() => {
                self.security(me, None, None, Some(Err(TOO_MANY.to_owned())))
                    .await
            }
            (true, ["password"]) => {
                let (new, repeat) = (field("new"), field("repeat"));
                if new != repeat {
                    return self
                        .security(
                            me,
                            None,
                            None,
                            Some(Err("The new passwords differ.".to_owned())),
                        )
                        .await;
                }
                let mut call = me.home.change_password_request();
                call.get().set_old(field("old").as_str());
                call.get().set_new(new.as_str());
                match call.send().promise.await {
                    Ok(_) => {
                        // Everywhere else signed in with the old one is signed out.
                        self.sessions.end_others(&me.user, &me.token);
                        self.security(me, None, None, Some(Ok(()))).await
                    }
                    Err(e) => {
                        if wrong_secret(&e) {
                            self.setup.limiter.failed(ip);
                        }
                        self.security(me, None, None, Some(Err(capitalise(&why(&e)))))
                            .await
                    }
                }
            }
            _ => not_found(Some(me.nav())),
        }
    }
}

const TOO_MANY: &str = "Too many wrong passwords from here; try again in a few minutes.";

/// "wrong code" → "Wrong code."
pub(super) fn capitalise(text: &str) -> String {
    let mut c = text.chars();
    let mut out: String = match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => return String::new(),
    };
    if !out.ends_with('.') {
        out.push('.');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_field_sent_twice_keeps_its_first_value() {
        let f = form(b"csrf=a&csrf=b&user=alice");
        assert_eq!((f["csrf"].as_str(), f["user"].as_str()), ("a", "alice"));
        assert_eq!(capitalise("wrong code"), "Wrong code.");
    }
}
