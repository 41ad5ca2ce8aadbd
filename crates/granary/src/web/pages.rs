//! The web home's pages: server-rendered HTML (maud escapes everything it
//! is given), plain forms that work with JavaScript off, one small style
//! sheet. Every input has a label, every page one `h1`, and the colours
//! meet WCAG AA contrast.

use maud::{DOCTYPE, Markup, PreEscaped, html};

/// The style sheet, served at `/style.css` (the CSP allows no inline
/// style).
pub(super) const STYLE: &str = "\
:root{color-scheme:light;--fg:#1a1a1a;--muted:#4a4a4a;--line:#8a8a8a;--accent:#0b5394;--bad:#a4161a}\n\
*{box-sizing:border-box}\n\
body{margin:0;font:1rem/1.5 system-ui,-apple-system,'Segoe UI',sans-serif;color:var(--fg);background:#fff}\n\
header{display:flex;flex-wrap:wrap;gap:.5rem 1rem;align-items:center;padding:.75rem 1rem;border-bottom:1px solid var(--line)}\n\
header .site{font-weight:700;margin-right:auto}\n\
nav ul{display:flex;flex-wrap:wrap;gap:.25rem 1rem;list-style:none;margin:0;padding:0}\n\
main{max-width:48rem;margin:0 auto;padding:1rem;overflow-wrap:anywhere}\n\
code{overflow-wrap:anywhere}\n\
a{color:var(--accent)}\n\
a:focus,button:focus,input:focus,select:focus,textarea:focus{outline:3px solid #e69500;outline-offset:2px}\n\
label{display:block;font-weight:600;margin-top:.75rem}\n\
input,select,textarea{font:inherit;width:100%;max-width:28rem;padding:.45rem;border:1px solid var(--line);border-radius:.25rem}\n\
textarea{max-width:100%;min-height:6rem}\n\
button{font:inherit;margin-top:.75rem;padding:.45rem 1rem;border:0;border-radius:.25rem;background:var(--accent);color:#fff;cursor:pointer}\n\
button.quiet{background:#fff;color:var(--accent);border:1px solid var(--accent);margin:0}\n\
form.inline{display:inline}\n\
table{border-collapse:collapse;width:100%;margin:.5rem 0}\n\
th,td{text-align:left;padding:.35rem .5rem;border-bottom:1px solid var(--line);vertical-align:top}\n\
.table{overflow-x:auto}\n\
.error{color:var(--bad);font-weight:600}\n\
.ok{color:#14532d;font-weight:600}\n\
.note{color:var(--muted)}\n\
.secret{font:1.2rem/1.4 ui-monospace,monospace;word-break:break-all;background:#f3f3f3;padding:.5rem;border:1px solid var(--line)}\n\
pre{white-space:pre-wrap;word-break:break-all;background:#f3f3f3;padding:.5rem;border:1px solid var(--line)}\n\
.qr{display:block;width:min(100%,16rem);height:auto;margin:.75rem 0;border:1px solid var(--line)}\n";

/// Who is signed in, for the layout.
#[derive(Debug, Clone, Copy)]
pub(super) struct Nav<'a> {
    pub(super) user: &'a str,
    /// The CSRF token of the sign-out form.
    pub(super) csrf: &'a str,
    /// Whether the admin pages are linked.
    pub(super) admin: bool,
}

/// One page: the layout around `body`; `nav` when signed in.
pub(super) fn page(title: &str, nav: Option<Nav<'_>>, body: Markup) -> String {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta name="robots" content="noindex";
                title { (title) }
                link rel="stylesheet" href="/style.css";
            }
            body {
                header {
                    span.site { "Granary" }
                    @if let Some(Nav { user, csrf, admin }) = nav {
                        nav aria-label="Main" {
                            ul {
                                li { a href="/" { "Home" } }
                                li { a href="/devices" { "Devices" } }
                                li { a href="/grants" { "Grants" } }
                                li { a href="/keys" { "SSH keys" } }
                                li { a href="/invites" { "Invites" } }
                                li { a href="/security" { "Security" } }
                                @if admin { li { a href="/admin" { "Admin" } } }
                            }
                        }
                        form.inline method="post" action="/signout" {
                            input type="hidden" name="csrf" value=(csrf);
                            button.quiet type="submit" { "Sign out " (user) }
                        }
                    }
                }
                main { h1 { (title) } (body) }
            }
        }
    }
    .into_string()
}

/// The sign-in form.
pub(super) fn sign_in(domain: &str, csrf: &str, error: Option<&str>) -> String {
    page(
        &format!("Sign in to Granary on {domain}"),
        None,
        html! {
            p { "This server hosts its users' own mail, calendars, chat, git, tasks and blogs, each in a grain of its own, isolated from everyone else's." }
            @if let Some(e) = error { p.error role="alert" { (e) } }
            form method="post" action="/signin" {
                input type="hidden" name="csrf" value=(csrf);
                label for="user" { "User name" }
                input #user name="user" autocomplete="username" required autocapitalize="none" spellcheck="false";
                label for="password" { "Password" }
                input #password name="password" type="password" autocomplete="current-password" required;
                button type="submit" { "Sign in" }
            }
            h2 { "Where things are" }
            ul {
                li { "Git: " code { "https://git." (domain) "/USER/REPOSITORY.git" } }
                li { "Calendars and contacts: " code { "https://dav." (domain) "/" } }
                li { "A user's blog: " code { "https://USER." (domain) "/" } }
                li { "Mail and chat: your address is " code { "USER@" (domain) } }
            }
        },
    )
}

/// The second step of a sign-in with a second factor.
pub(super) fn code(csrf: &str, error: Option<&str>) -> String {
    page(
        "Enter your code",
        None,
        html! {
            p { "Open your authenticator app and enter the six-digit code for this server, or one of your recovery codes." }
            @if let Some(e) = error { p.error role="alert" { (e) } }
            form method="post" action="/signin/code" {
                input type="hidden" name="csrf" value=(csrf);
                label for="code" { "Code" }
                input #code name="code" autocomplete="one-time-code" inputmode="numeric" required;
                button type="submit" { "Continue" }
            }
        },
    )
}

/// A short page saying one thing (errors, 404, 429).
pub(super) fn message(title: &str, text: &str, nav: Option<Nav<'_>>) -> String {
    page(
        title,
        nav,
        html! { p { (text) } p { a href="/" { "Back to the start" } } },
    )
}

/// A QR code as inline SVG, labelled for screen readers.
pub(super) fn qr(data: &str, label: &str) -> Markup {
    let Ok(code) = qrcode::QrCode::new(data.as_bytes()) else {
        return html! {};
    };
    let svg = code
        .render::<qrcode::render::svg::Color<'_>>()
        .min_dimensions(200, 200)
        .quiet_zone(true)
        .dark_color(qrcode::render::svg::Color("#000000"))
        .light_color(qrcode::render::svg::Color("#ffffff"))
        .build();
    // The renderer's output starts with an XML declaration and `<svg`;
    // keep the element and give it a role, a label and our class.
    let body = svg.find("<svg").map_or("", |i| &svg[i + 4..]);
    let label = maud::html! { (label) }.into_string();
    html! { (PreEscaped(format!("<svg role=\"img\" aria-label=\"{label}\" class=\"qr\"{body}"))) }
}

/// Seconds since the epoch as a UTC date and time; "never" for 0.
pub(super) fn when(unix: i64) -> String {
    if unix <= 0 {
        return "never".to_owned();
    }
    format!("{} UTC", crate::admin::table::time(unix))
}

/// Bytes for people: "1.5 MB".
pub(super) fn size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["bytes", "KB", "MB", "GB", "TB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1000.0 && unit < UNITS.len() - 1 {
        v /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} bytes")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_sizes_read_well() {
        assert_eq!(when(0), "never");
        assert_eq!(when(1_234_567_890), "2009-02-13 23:31 UTC");
        assert_eq!(when(951_782_400), "2000-02-29 00:00 UTC");
        assert_eq!(size(999), "999 bytes");
        assert_eq!(size(1_500_000), "1.5 MB");
    }

    #[test]
    fn pages_escape_what_they_show() {
        let p = sign_in("<x>", "c\"srf", Some("<b>bad</b>"));
        assert!(p.contains("&lt;x&gt;") && !p.contains("<x>"));
        assert!(p.contains("&lt;b&gt;bad"));
        assert!(p.contains("value=\"c&quot;srf\""));
        assert!(p.contains("<html lang=\"en\">"));
        let q = qr("xmpp:a@b?x", "the <code>").into_string();
        assert!(
            q.starts_with("<svg role=\"img\" aria-label=\"the &lt;code&gt;\" class=\"qr\""),
            "{q}"
        );
    }
}
