//! The signed-in user's pages.

use maud::{Markup, html};

use super::pages::{page, qr, size, when};

/// Services a device can be added for: (kind, what it is called).
pub(super) const SERVICES: [(&str, &str); 5] = [
    ("mail", "Mail (IMAP and SMTP)"),
    ("dav", "Calendars and contacts (CalDAV, CardDAV)"),
    ("xmpp", "Chat (XMPP)"),
    ("git", "Git"),
    ("tasks", "Tasks (Taskwarrior 3 sync)"),
];

pub(super) fn service_name(kind: &str) -> &str {
    const OTHERS: [(&str, &str); 2] = [("blog", "Blog"), ("hello", "Hello (example)")];
    SERVICES
        .iter()
        .chain(OTHERS.iter())
        .find(|(k, _)| *k == kind)
        .map_or(kind, |(_, n)| n)
}

pub(super) struct Device {
    pub(super) id: i64,
    pub(super) kind: String,
    pub(super) label: String,
    pub(super) created: i64,
    pub(super) last_used: i64,
}

pub(super) struct GrainRow {
    pub(super) kind: String,
    pub(super) state: String,
    pub(super) used: u64,
    pub(super) quota: u64,
    pub(super) last_snapshot: i64,
    pub(super) last_backup: i64,
}

pub(super) struct GrantRow {
    pub(super) id: i64,
    pub(super) from: String,
    pub(super) to: String,
    pub(super) capability: String,
    pub(super) created: i64,
}

pub(super) struct KeyRow {
    pub(super) id: i64,
    pub(super) label: String,
    pub(super) fingerprint: String,
    pub(super) created: i64,
}

pub(super) use super::pages::Nav;

fn csrf_field(csrf: &str) -> Markup {
    html! { input type="hidden" name="csrf" value=(csrf); }
}

fn notice(ok: Option<&str>, error: Option<&str>) -> Markup {
    html! {
        @if let Some(m) = ok { p.ok role="status" { (m) } }
        @if let Some(e) = error { p.error role="alert" { (e) } }
    }
}

pub(super) fn home(nav: Nav<'_>, grains: &[GrainRow]) -> String {
    page(
        "Your grains",
        Some(nav),
        html! {
            p.note { "Each of your services runs in a grain of its own, with its own storage." }
            div.table {
                table {
                    thead { tr { th scope="col" { "Service" } th scope="col" { "State" } th scope="col" { "Storage" } th scope="col" { "Last snapshot" } th scope="col" { "Last backup" } } }
                    tbody {
                        @for g in grains {
                            tr {
                                td { (service_name(&g.kind)) }
                                td { (g.state) }
                                td {
                                    (size(g.used))
                                    @if g.quota > 0 { " of " (size(g.quota)) } @else { span.note { " (no quota)" } }
                                }
                                td { (when(g.last_snapshot)) }
                                td { (when(g.last_backup)) }
                            }
                        }
                    }
                }
            }
        },
    )
}

pub(super) fn devices(
    nav: Nav<'_>,
    list: &[Device],
    task_lists: &[Device],
    error: Option<&str>,
    ok: Option<&str>,
) -> String {
    page(
        "Devices",
        Some(nav),
        html! {
            p.note { "Each phone, laptop or app gets a password of its own for one service. Revoke it when the device is gone; your other devices keep working." }
            (notice(ok, error))
            h2 { "Add a device" }
            form method="post" action="/devices" {
                (csrf_field(nav.csrf))
                label for="kind" { "Service" }
                select #kind name="kind" {
                    @for (k, n) in SERVICES { option value=(k) { (n) } }
                }
                label for="label" { "Device name" }
                input #label name="label" required maxlength="100" placeholder="Phone";
                button type="submit" { "Add device" }
            }
            h2 { "Your devices" }
            @if list.is_empty() { p { "No devices yet." } } @else {
                div.table { table {
                    thead { tr { th scope="col" { "Device" } th scope="col" { "Service" } th scope="col" { "Added" } th scope="col" { "Last used" } th scope="col" { span.note { "Action" } } } }
                    tbody { @for d in list {
                        tr {
                            td { (d.label) }
                            td { (service_name(&d.kind)) }
                            td { (when(d.created)) }
                            td { (when(d.last_used)) }
                            td {
                                form.inline method="post" action={ "/devices/" (d.id) "/revoke" } {
                                    (csrf_field(nav.csrf))
                                    button.quiet type="submit" aria-label={ "Revoke " (d.label) } { "Revoke" }
                                }
                            }
                        }
                    } }
                } }
            }
            @if !task_lists.is_empty() {
                h2 { "Your task lists (Taskwarrior 3)" }
                div.table { table {
                    thead { tr { th scope="col" { "Task list" } th scope="col" { "Added" } th scope="col" { "Last synced" } th scope="col" { span.note { "Action" } } } }
                    tbody { @for d in task_lists {
                        tr {
                            td { (d.label) }
                            td { (when(d.created)) }
                            td { (when(d.last_used)) }
                            td {
                                form.inline method="post" action={ "/devices/tasks/" (d.id) "/revoke" } {
                                    (csrf_field(nav.csrf))
                                    button.quiet type="submit" aria-label={ "Revoke task list " (d.label) } { "Revoke" }
                                }
                            }
                        }
                    } }
                } }
            }
        },
    )
}

/// What a new device is shown once: its password, its settings, a QR
/// code, and the downloads its kind has.
pub(super) struct NewDevice<'a> {
    pub(super) kind: &'a str,
    pub(super) label: &'a str,
    pub(super) password: &'a str,
    /// Settings as `(name, value)` lines.
    pub(super) settings: Vec<(&'static str, String)>,
    /// What the QR code carries, and what it is for.
    pub(super) qr: Option<(String, &'static str)>,
    /// Configuration lines to paste (the `.taskrc` lines).
    pub(super) lines: Option<String>,
    /// Downloads: (what, button text, the task list's client id to put in
    /// it).
    pub(super) downloads: Vec<(&'static str, &'static str, Option<String>)>,
}

pub(super) fn device_added(nav: Nav<'_>, d: &NewDevice<'_>) -> String {
    page(
        "Your new device",
        Some(nav),
        html! {
            @if d.kind == "tasks" {
                p { "The client id for " strong { (d.label) } " (" (service_name(d.kind)) "). It is shown only now: it is this task list's password." }
                p.secret #password aria-label="The task list's client id" { (d.password) }
            } @else {
                p { "The password for " strong { (d.label) } " (" (service_name(d.kind)) "). It is shown only now: copy it into the device." }
                p.secret #password aria-label="The device's password" { (d.password) }
            }
            h2 { "Settings" }
            div.table { table { tbody {
                @for (k, v) in &d.settings { tr { th scope="row" { (k) } td { code { (v) } } } }
            } } }
            @if let Some(lines) = &d.lines {
                h2 { "For Taskwarrior" }
                p { "Add these lines to your " code { ".taskrc" } " (or run each as " code { "task config NAME VALUE" } "), then choose an encryption secret of your own, the same on every computer that shares this task list; the server never sees it or your tasks:" }
                pre #taskrc { (lines) }
                pre { "task config sync.encryption_secret \"$(openssl rand -hex 32)\"\ntask sync" }
            }
            @if let Some((data, caption)) = &d.qr {
                figure {
                    (qr(data, caption))
                    figcaption.note { (caption) }
                }
            }
            @for (what, text, client) in &d.downloads {
                form method="post" action="/devices/download" {
                    (csrf_field(nav.csrf))
                    input type="hidden" name="what" value=(what);
                    input type="hidden" name="kind" value=(d.kind);
                    @if let Some(c) = client { input type="hidden" name="client" value=(c); }
                    button type="submit" { (text) }
                }
            }
            p { a href="/devices" { "Back to your devices" } }
        },
    )
}

pub(super) fn grants(nav: Nav<'_>, list: &[GrantRow], ok: Option<&str>) -> String {
    page(
        "Grants",
        Some(nav),
        html! {
            p.note { "Grants are the only ways your grains reach each other (or others' grains reach yours). Revoke one and that route closes at once." }
            (notice(ok, None))
            @if list.is_empty() { p { "No grants." } } @else {
                div.table { table {
                    thead { tr { th scope="col" { "From" } th scope="col" { "To" } th scope="col" { "May use" } th scope="col" { "Since" } th scope="col" { span.note { "Action" } } } }
                    tbody { @for g in list {
                        tr {
                            td { (g.from) } td { (g.to) } td { code { (g.capability) } } td { (when(g.created)) }
                            td {
                                form.inline method="post" action={ "/grants/" (g.id) "/revoke" } {
                                    (csrf_field(nav.csrf))
                                    button.quiet type="submit" aria-label={ "Revoke the grant from " (g.from) " to " (g.to) } { "Revoke" }
                                }
                            }
                        }
                    } }
                } }
            }
        },
    )
}

pub(super) fn keys(nav: Nav<'_>, list: &[KeyRow], error: Option<&str>, ok: Option<&str>) -> String {
    page(
        "SSH keys",
        Some(nav),
        html! {
            p.note { "Keys that may push and pull your git repositories over SSH." }
            (notice(ok, error))
            form method="post" action="/keys" {
                (csrf_field(nav.csrf))
                label for="key" { "Public key (one line, as in ~/.ssh/id_ed25519.pub)" }
                textarea #key name="key" required spellcheck="false" {}
                label for="klabel" { "Name (optional)" }
                input #klabel name="label" maxlength="100";
                button type="submit" { "Add key" }
            }
            @if !list.is_empty() {
                div.table { table {
                    thead { tr { th scope="col" { "Name" } th scope="col" { "Fingerprint" } th scope="col" { "Added" } th scope="col" { span.note { "Action" } } } }
                    tbody { @for k in list {
                        tr {
                            td { (k.label) } td { code { (k.fingerprint) } } td { (when(k.created)) }
                            td {
                                form.inline method="post" action={ "/keys/" (k.id) "/remove" } {
                                    (csrf_field(nav.csrf))
                                    button.quiet type="submit" aria-label={ "Remove the key " (k.label) } { "Remove" }
                                }
                            }
                        }
                    } }
                } }
            }
        },
    )
}

pub(super) fn password(nav: Nav<'_>, error: Option<&str>, ok: Option<&str>) -> Markup {
    html! {
        h2 { "Change your password" }
        (notice(ok, error))
        form method="post" action="/password" {
            (csrf_field(nav.csrf))
            label for="old" { "Current password" }
            input #old name="old" type="password" autocomplete="current-password" required;
            label for="new" { "New password (at least 12 characters)" }
            input #new name="new" type="password" autocomplete="new-password" required minlength="12";
            label for="repeat" { "New password again" }
            input #repeat name="repeat" type="password" autocomplete="new-password" required minlength="12";
            button type="submit" { "Change password" }
        }
    }
}

/// The second factor's state and forms.
pub(super) struct Security<'a> {
    pub(super) totp: bool,
    pub(super) recovery_left: u32,
    /// Being set up: (secret in base32, otpauth URI).
    pub(super) setup: Option<(&'a str, &'a str)>,
    /// Just turned on: the recovery codes, shown once.
    pub(super) recovery: Option<&'a [String]>,
}

pub(super) fn security(
    nav: Nav<'_>,
    s: &Security<'_>,
    error: Option<&str>,
    ok: Option<&str>,
    pw: Markup,
) -> String {
    page(
        "Security",
        Some(nav),
        html! {
            h2 { "Two-step sign-in" }
            (notice(ok, error))
            @if let Some(codes) = s.recovery {
                p { "Two-step sign-in is on. Keep these recovery codes somewhere safe: each works once if you lose your phone. They are shown only now." }
                ul #recovery { @for c in codes { li { code { (c) } } } }
            } @else if let Some((secret, uri)) = s.setup {
                p { "Scan this code with an authenticator app (or type the key), then enter the code it shows." }
                figure { (qr(uri, "QR code of the two-step sign-in key, for your authenticator app")) figcaption.note { "Key: " code #totp-secret { (secret) } } }
                form method="post" action="/security/totp/enable" {
                    (csrf_field(nav.csrf))
                    label for="code" { "Code from the app" }
                    input #code name="code" autocomplete="one-time-code" inputmode="numeric" required;
                    button type="submit" { "Turn on" }
                }
            } @else if s.totp {
                p { "On. Recovery codes left: " (s.recovery_left) "." }
                form method="post" action="/security/totp/disable" {
                    (csrf_field(nav.csrf))
                    label for="offpw" { "Your password, to turn it off" }
                    input #offpw name="password" type="password" autocomplete="current-password" required;
                    button type="submit" { "Turn off" }
                }
            } @else {
                p { "Off. With it on, signing in here also asks for a code from your phone." }
                form method="post" action="/security/totp" {
                    (csrf_field(nav.csrf))
                    button type="submit" { "Set up two-step sign-in" }
                }
            }
            (pw)
        },
    )
}

pub(super) fn invites(nav: Nav<'_>, made: Option<(&str, &str)>, error: Option<&str>) -> String {
    page(
        "Invite a friend to chat",
        Some(nav),
        html! {
            p.note { "An invite link lets one friend make a chat account here; you become each other's contacts." }
            (notice(None, error))
            @if let Some((link, uri)) = made {
                p { "Send your friend this link (it works once, for a week):" }
                p.secret #invite-link { (link) }
                figure { (qr(link, "QR code of the invite link")) figcaption.note { "Or let them scan it. In a chat app: " code { (uri) } } }
            }
            form method="post" action="/invites" {
                (csrf_field(nav.csrf))
                button type="submit" { "Make an invite link" }
            }
        },
    )
}
