//! The invite landing page, `https://<domain>/invite/<token>`, which the
//! gateway answers itself (it needs the state's word on the token, which
//! no grain has).
//!
//! The page says who invites, which app to install on each platform, and
//! shows the `xmpp:` URI (a link and a QR code the app scans) and a QR
//! code of the page itself for a phone. It needs no JavaScript, fits a
//! phone's screen and is readable with a screen reader (the QR codes are
//! labelled images, and the URI is also written out). A token that is
//! unknown, expired, used up or revoked gets one and the same page, so
//! the page never tells whether a token ever existed.

use hyper::{Method, Response, StatusCode, header};

use crate::proxy::Body;

/// Where invite links point, under the domain.
pub const PATH_PREFIX: &str = "/invite/";

/// The `xmpp:` URI of an invite (XEP-0401, XEP-0379): a contact invite
/// names the inviter (`?roster;preauth=…;ibr=y`: add them, registering
/// first if need be); an account invite the domain (`?register;preauth=…`).
pub fn xmpp_uri(domain: &str, inviter: Option<&str>, token: &str) -> String {
    match inviter {
        Some(jid) => format!("xmpp:{jid}?roster;preauth={token};ibr=y"),
        None => format!("xmpp:{domain}?register;preauth={token}"),
    }
}

/// The page's address for `token` on `host` (`example.org`, or with a
/// port when the https listener is not on 443).
pub fn link(host: &str, token: &str) -> String {
    format!("https://{host}{PATH_PREFIX}{token}")
}

/// The invite page, when `path` is one (on the domain `host` names).
pub async fn page(
    shared: &crate::Shared,
    method: &Method,
    host_header: &str,
    host: &str,
    path: &str,
) -> Option<Response<Body>> {
    let token = path.strip_prefix(PATH_PREFIX)?;
    if host != shared.domain {
        return None;
    }
    if method != Method::GET && method != Method::HEAD {
        let mut r = respond(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "Use GET.\n".to_owned(),
        );
        r.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return Some(r);
    }
    // 128 random bits: guessing is hopeless, so the page is not limited.
    let info = match token_shape(token) {
        true => match shared.directory.invite(token).await {
            Ok(info) => info,
            Err(crate::LookupFailed) => {
                let mut r = respond(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain; charset=utf-8",
                    "The invite cannot be checked right now. Try again in a minute.\n".to_owned(),
                );
                r.headers_mut()
                    .insert(header::RETRY_AFTER, header::HeaderValue::from_static("60"));
                return Some(r);
            }
        },
        false => None,
    };
    let domain = &shared.domain;
    Some(match info {
        Some(info) => {
            let uri = xmpp_uri(domain, info.inviter.as_deref(), token);
            // The port the browser used, if any (digits only: the header
            // is the client's to write).
            let port = host_header
                .rsplit_once(':')
                .map(|(_, p)| p)
                .filter(|p| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()));
            let here = match port {
                Some(p) if p != "443" => link(&format!("{domain}:{p}"), token),
                _ => link(domain, token),
            };
            respond(
                StatusCode::OK,
                "text/html; charset=utf-8",
                invite_html(
                    domain,
                    info.inviter.as_deref(),
                    info.room.as_deref(),
                    &uri,
                    &here,
                ),
            )
        }
        None => respond(
            StatusCode::NOT_FOUND,
            "text/html; charset=utf-8",
            not_valid_html(domain),
        ),
    })
}

/// A token as we make them: URL-safe base64 of at least 16 bytes. Anything
/// else is refused without asking the state (the page, registration).
pub(crate) fn token_shape(token: &str) -> bool {
    (22..=128).contains(&token.len())
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn escape(text: &str) -> String {
    granary_wire::stanza::escape(text)
}

/// A QR code of `data` as inline SVG, labelled for screen readers.
fn qr_svg(data: &str, label: &str) -> String {
    let Ok(code) = qrcode::QrCode::new(data.as_bytes()) else {
        return String::new();
    };
    let svg = code
        .render::<qrcode::render::svg::Color<'_>>()
        .min_dimensions(264, 264)
        .quiet_zone(true)
        .dark_color(qrcode::render::svg::Color("#000000"))
        .light_color(qrcode::render::svg::Color("#ffffff"))
        .build();
    // Inline: no XML declaration; a role and a name for assistive tech.
    let start = svg.find("<svg").unwrap_or(0);
    let body = &svg[start + "<svg".len()..];
    format!(
        "<svg role=\"img\" aria-label=\"{}\" class=\"qr\"{body}",
        escape(label)
    )
}

const STYLE: &str = "
:root{color-scheme:light}
body{font:1.05rem/1.55 system-ui,-apple-system,'Segoe UI',sans-serif;max-width:42rem;margin:0 auto;padding:1rem 1.25rem 3rem;color:#1b1b1b;background:#fff}
h1{font-size:1.6rem;line-height:1.25;margin:1.2rem 0 .6rem}
h2{font-size:1.2rem;margin:2rem 0 .5rem}
a{color:#0b4fa8}
a:focus,a:hover{outline:3px solid #f2b300;outline-offset:2px}
ul{padding-left:1.2rem}
li{margin:.35rem 0}
.button{display:inline-block;background:#0b4fa8;color:#fff;font-weight:600;text-decoration:none;padding:.75rem 1.1rem;border-radius:.4rem;margin:.5rem 0}
.qr{display:block;width:min(100%,17rem);height:auto;margin:.75rem 0;border:1px solid #6b6b6b}
code{background:#f1f1f1;padding:.1em .3em;word-break:break-all}
.note{color:#3d3d3d}
";

fn head(title: &str) -> String {
    format!(
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <meta name=\"robots\" content=\"noindex\">\n<title>{}</title>\n<style>{STYLE}</style>\n</head>\n",
        escape(title)
    )
}

fn invite_html(
    domain: &str,
    inviter: Option<&str>,
    room: Option<&str>,
    uri: &str,
    here: &str,
) -> String {
    let d = escape(domain);
    let (title, lead, after) = match (inviter, room) {
        (Some(jid), Some(room)) => {
            let (j, r) = (escape(jid), escape(room));
            let name = room.split('@').next().unwrap_or(room);
            (
                format!("{jid} invites you to the group chat {name}"),
                format!(
                    "<strong>{j}</strong> invites you to the group chat <strong>{}</strong> \
                     on <strong>{d}</strong>, a private chat server. Joining takes a minute.",
                    escape(name)
                ),
                format!(
                    "The app makes your account on {d}: you choose a name and a password \
                     there. You then find an invitation to the group <code>{r}</code> in the \
                     app, and its members in your contacts."
                ),
            )
        }
        (Some(jid), None) => {
            let j = escape(jid);
            (
                format!("{jid} invites you to chat"),
                format!(
                    "<strong>{j}</strong> invites you to chat with them on <strong>{d}</strong>, \
                     a private chat server. Joining takes a minute."
                ),
                format!(
                    "The app makes your account on {d}: you choose a name and a password \
                     there. {j} is then in your contacts, and you in theirs."
                ),
            )
        }
        (None, _) => (
            format!("You are invited to chat on {domain}"),
            format!(
                "You are invited to make an account on <strong>{d}</strong>, a private chat \
                 server. Joining takes a minute."
            ),
            format!("The app makes your account on {d}: you choose a name and a password there."),
        ),
    };
    let u = escape(uri);
    let app_qr = qr_svg(uri, "QR code of the invite, for your chat app to scan");
    let page_qr = qr_svg(here, "QR code of this page, to open it on your phone");
    format!(
        "{head}<body>\n<main>\n<h1>{t}</h1>\n<p>{lead}</p>\n\
<h2 id=\"install\">1. Install a chat app</h2>\n\
<p>Start on your phone: these apps take invites like this one.</p>\n<ul>\n\
<li>Android: <a href=\"https://f-droid.org/packages/eu.siacs.conversations/\">Conversations on F-Droid</a> \
or <a href=\"https://play.google.com/store/apps/details?id=eu.siacs.conversations\">Conversations on Google Play</a></li>\n\
<li>iPhone and iPad: <a href=\"https://apps.apple.com/app/monal-free-xmpp-chat/id317711500\">Monal on the App Store</a></li>\n\
</ul>\n\
<p>Then, to chat from a computer too, sign in there with the same address and password: \
<a href=\"https://gajim.org/download/\">Gajim</a> (Windows, Linux), \
<a href=\"https://dino.im/\">Dino</a> (Linux) or \
<a href=\"https://apps.apple.com/app/monal-free-xmpp-chat/id317711500\">Monal</a> (Mac).</p>\n\
<h2 id=\"open\">2. Open the invite in the app</h2>\n\
<p>On this device, once the app is installed:</p>\n\
<p><a class=\"button\" href=\"{u}\">Open the invite in your chat app</a></p>\n\
<p>Or scan this code from the app (in Conversations: the QR button when you add an account or a contact):</p>\n\
<figure>{app_qr}<figcaption class=\"note\">The invite: <code>{u}</code></figcaption></figure>\n\
<p>{after}</p>\n\
<h2 id=\"phone\">On a computer? Continue on your phone</h2>\n\
<p>Scan this code with your phone's camera to open this page there:</p>\n\
<figure>{page_qr}<figcaption class=\"note\">This page: <code>{h}</code></figcaption></figure>\n\
<p class=\"note\">This link is personal. It stops working once it has been used or when it expires; \
ask for a new one if it does.</p>\n</main>\n</body>\n</html>\n",
        head = head(&title),
        t = escape(&title),
        h = escape(here),
    )
}

fn not_valid_html(domain: &str) -> String {
    format!(
        "{}<body>\n<main>\n<h1>This invite link is not valid</h1>\n\
<p>It may have expired, or it has been used already. Ask the person who sent it to you \
for a new one.</p>\n<p class=\"note\">{}</p>\n</main>\n</body>\n</html>\n",
        head("Invite not valid"),
        escape(domain)
    )
}

fn respond(status: StatusCode, content_type: &str, body: String) -> Response<Body> {
    let mut r = crate::https::respond(status, content_type, body);
    let h = r.headers_mut();
    // The token is in the address: never sent on as a referrer, the page
    // never framed, nothing loaded from anywhere.
    for (name, value) in [
        ("referrer-policy", "no-referrer"),
        (
            "content-security-policy",
            "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'",
        ),
        ("x-content-type-options", "nosniff"),
        ("x-robots-tag", "noindex"),
    ] {
        h.insert(name, header::HeaderValue::from_static(value));
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_follow_the_invite_kinds() {
        assert_eq!(
            xmpp_uri("chat.test", Some("alice@chat.test"), "T"),
            "xmpp:alice@chat.test?roster;preauth=T;ibr=y"
        );
        assert_eq!(
            xmpp_uri("chat.test", None, "T"),
            "xmpp:chat.test?register;preauth=T"
        );
    }

    #[test]
    fn the_page_escapes_and_labels_its_codes() {
        let html = invite_html(
            "chat.test",
            Some("a<b@chat.test"),
            None,
            "xmpp:a@chat.test?roster;preauth=T;ibr=y",
            "https://chat.test/invite/T",
        );
        assert!(html.contains("a&lt;b@chat.test"));
        let group = invite_html(
            "chat.test",
            Some("alice@chat.test"),
            Some("fam<ily@rooms.chat.test"),
            "xmpp:alice@chat.test?roster;preauth=T;ibr=y",
            "https://chat.test/invite/T",
        );
        assert!(
            group.contains("group chat <strong>fam&lt;ily</strong>"),
            "{group}"
        );
        assert!(!group.contains("fam<ily"));
        assert!(!html.contains("a<b@"));
        assert_eq!(html.matches("<svg role=\"img\" aria-label=").count(), 2);
        assert!(!html.contains("<?xml"));
        assert!(!html.contains("<script"));
    }

    #[test]
    fn token_shapes() {
        assert!(token_shape("abcdefghijklmnopqrstuv"));
        assert!(!token_shape("short"));
        assert!(!token_shape("abcdefghijklmnopqrstu/"));
        assert!(!token_shape("abcdefghijklmnopqrstu%2F"));
    }
}
