//! The admin pages' markup.

use maud::{Markup, html};

use super::admin::Said;
use super::pages::{Nav, page, size, when};

pub(super) struct Overview {
    pub(super) version: String,
    pub(super) healthy: bool,
    pub(super) uptime: u64,
    pub(super) domain: String,
    pub(super) storage: String,
    pub(super) sandbox: String,
    /// Users, app passwords, apps, grains, grants.
    pub(super) counts: [u64; 5],
    pub(super) refused: u64,
    pub(super) listeners: Vec<(String, String)>,
    /// Node, lease, grains whose copies lag.
    pub(super) cluster: Option<(String, String, Vec<String>)>,
    /// Every member of the cluster.
    pub(super) nodes: Vec<NodeLine>,
    pub(super) certificate: String,
    pub(super) certificate_error: Option<String>,
}

pub(super) struct NodeLine {
    pub(super) name: String,
    pub(super) state: String,
    /// Seconds; negative: no lease.
    pub(super) lease_age: i64,
    pub(super) grains: u32,
    pub(super) free: u64,
}

pub(super) struct UserLine {
    pub(super) name: String,
    pub(super) created: i64,
    pub(super) devices: u32,
    /// When they were disabled; 0 while enabled.
    pub(super) disabled: i64,
}

pub(super) struct GrainLine {
    pub(super) id: String,
    /// As the CLI names it: `alice/mail`, `alice/room/family`.
    pub(super) shown: String,
    pub(super) state: String,
    pub(super) reason: String,
    pub(super) starts: u64,
    pub(super) crashes: u64,
    pub(super) memory_limit: u64,
    /// Dataset bytes and quota where the storage says (0: unknown, none).
    pub(super) dataset: (u64, u64),
}

#[derive(Debug, Default, Clone)]
pub(super) struct Filter {
    pub(super) actor: String,
    pub(super) action: String,
    pub(super) subject: String,
    pub(super) before: i64,
}

pub(super) struct Event {
    pub(super) id: i64,
    pub(super) at: i64,
    pub(super) actor: String,
    pub(super) action: String,
    pub(super) subject: String,
    pub(super) detail: String,
}

/// The admin pages' own links, above each.
fn sections() -> Markup {
    html! {
        nav aria-label="Admin" {
            ul {
                li { a href="/admin" { "Overview" } }
                li { a href="/admin/users" { "Users" } }
                li { a href="/admin/grains" { "Grains" } }
                li { a href="/admin/apps" { "Apps" } }
                li { a href="/admin/backups" { "Backups" } }
                li { a href="/admin/audit" { "Audit log" } }
                li { a href="/admin/doctor" { "Checks" } }
            }
        }
    }
}

fn said(s: &Said) -> Markup {
    html! {
        @match s {
            Said::Nothing => {}
            Said::Done(m) => p.ok role="status" { (m) },
            Said::Failed(m) => p.error role="alert" { (m) },
            Said::Secret(user, password) => {
                p.ok role="status" { (user) " added. Their password, shown once (they can change it on their page):" }
                p.secret { (password) }
            }
        }
    }
}

fn duration(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s} seconds"),
        s if s < 7200 => format!("{} minutes", s / 60),
        s if s < 172_800 => format!("{} hours", s / 3600),
        s => format!("{} days", s / 86_400),
    }
}

pub(super) fn overview(nav: Nav<'_>, o: &Overview) -> String {
    let labels = ["users", "app passwords", "apps", "grains", "grants"];
    page(
        "Admin",
        Some(nav),
        html! {
            (sections())
            h2 { "This node" }
            @if o.healthy { p.ok { "Healthy." } } @else { p.error role="alert" { "Unhealthy: see the cluster below and the checks." } }
            div.table { table {
                tr { th scope="row" { "Version" } td { "Granary " (o.version) } }
                tr { th scope="row" { "Up for" } td { (duration(o.uptime)) } }
                tr { th scope="row" { "Domain" } td { (o.domain) } }
                tr { th scope="row" { "Storage" } td { (o.storage) } }
                tr { th scope="row" { "Isolation" } td { (o.sandbox) } }
                tr { th scope="row" { "Counts" } td {
                    @for (i, n) in o.counts.iter().enumerate() { (n) " " (labels[i]) @if i + 1 < labels.len() { ", " } }
                } }
                tr { th scope="row" { "Failed logins" } td { (o.refused) " sources refused now" } }
            } }
            h2 { "Certificate" }
            p { (o.certificate) }
            @if let Some(e) = &o.certificate_error { p.error role="alert" { "Ordering failed: " (e) } }
            @if let Some((node, lease, lagging)) = &o.cluster {
                h2 { "Cluster" }
                p { "Node " (node) ", lease " (lease) "." }
                @if lagging.is_empty() { p { "Every grain's copies are current." } }
                @else { p.error role="alert" { "Copies behind by over three intervals: " (lagging.join(", ")) } }
                @if o.nodes.is_empty() { p.error role="alert" { "etcd did not answer within 2 s: the other nodes' state is unknown." } }
                div.table { table {
                    thead { tr {
                        th scope="col" { "Node" } th scope="col" { "State" } th scope="col" { "Lease renewed" }
                        th scope="col" { "Grains" } th scope="col" { "Free" }
                    } }
                    tbody { @for n in &o.nodes { tr {
                        td { (n.name) }
                        td { @if n.state == "up" { (n.state) } @else { strong { (n.state) } } }
                        td { @if n.lease_age < 0 { "no lease" } @else { (n.lease_age) " s ago" } }
                        td { (n.grains) }
                        td { @if n.free == 0 { "-" } @else { (size(n.free)) } }
                    } } }
                } }
            }
            h2 { "Listeners" }
            div.table { table {
                thead { tr { th scope="col" { "Listener" } th scope="col" { "Address" } } }
                tbody { @for (n, a) in &o.listeners { tr { td { (n) } td { code { (a) } } } } }
            } }
        },
    )
}

pub(super) fn users(nav: Nav<'_>, list: &[UserLine], s: &Said) -> String {
    page(
        "Users",
        Some(nav),
        html! {
            (sections())
            (said(s))
            h2 { "Add a user" }
            form method="post" action="/admin/users" {
                input type="hidden" name="csrf" value=(nav.csrf);
                label for="name" { "User name (lowercase letters, digits and '-')" }
                input #name name="name" required autocapitalize="none" spellcheck="false";
                button type="submit" { "Add user" }
            }
            h2 { "Users" }
            div.table { table {
                thead { tr {
                    th scope="col" { "User" } th scope="col" { "Since" } th scope="col" { "Devices" }
                    th scope="col" { "State" } th scope="col" { span.note { "Remove" } }
                } }
                tbody { @for u in list { tr {
                    td { (u.name) } td { (when(u.created)) } td { (u.devices) }
                    td {
                        @let (action, label) = if u.disabled == 0 { ("disable", "Disable") } else { ("enable", "Enable") };
                        @if u.disabled != 0 { "Disabled since " (when(u.disabled)) " " } @else { "Active " }
                        form.inline method="post" action={ "/admin/users/" (u.name) "/" (action) } {
                            input type="hidden" name="csrf" value=(nav.csrf);
                            button.quiet type="submit" aria-label={ (label) " " (u.name) } { (label) }
                        }
                    }
                    td { form.inline method="post" action={ "/admin/users/" (u.name) "/remove" } {
                        input type="hidden" name="csrf" value=(nav.csrf);
                        button.quiet type="submit" aria-label={ "Remove " (u.name) } { "Remove" }
                    } }
                } } }
            } }
            p.note { "A disabled user cannot sign in anywhere (devices, SSH keys, this site) and their running grains stop; their data is kept and mail to them is still accepted. " }
            p.note { "A user whose grains still hold data is not removed: remove it with the CLI, granary user remove --purge, after a backup." }
        },
    )
}

pub(super) fn grains(nav: Nav<'_>, list: &[GrainLine], s: &Said) -> String {
    page(
        "Grains",
        Some(nav),
        html! {
            (sections())
            (said(s))
            div.table { table {
                thead { tr {
                    th scope="col" { "Grain" } th scope="col" { "State" } th scope="col" { "Starts" }
                    th scope="col" { "Crashes" } th scope="col" { "Memory limit" } th scope="col" { "Storage" } th scope="col" { span.note { "Action" } }
                } }
                tbody { @for g in list {
                    @let action = if matches!(g.state.as_str(), "running" | "starting") { "stop" } else { "start" };
                    tr {
                    td { (g.shown) }
                    td { (g.state) @if !g.reason.is_empty() { br; span.note { (g.reason) } } }
                    td { (g.starts) } td { (g.crashes) }
                    td { @if g.memory_limit == 0 { "none" } @else { (size(g.memory_limit)) } }
                    td {
                        @match g.dataset {
                            (0, 0) => { span.note { "not measured here" } }
                            (used, 0) => { (size(used)) " (no quota)" }
                            (used, quota) => { (size(used)) " of " (size(quota)) }
                        }
                        form method="post" action={ "/admin/grains/" (g.id) "/quota" } {
                            input type="hidden" name="csrf" value=(nav.csrf);
                            input name="size" required placeholder="2G" aria-label={ "New quota for " (g.shown) " (2G, 512M, none or default)" };
                            button.quiet type="submit" aria-label={ "Set the quota of " (g.shown) } { "Set quota" }
                        }
                    }
                    td { form.inline method="post" action={ "/admin/grains/" (g.id) "/" (action) } {
                        input type="hidden" name="csrf" value=(nav.csrf);
                        button.quiet type="submit" aria-label={ (if action == "stop" { "Stop " } else { "Start " }) (g.shown) } {
                            (if action == "stop" { "Stop" } else { "Start" })
                        }
                    } }
                } } }
            } }
            p.note { "Grains start by themselves when their user's traffic arrives." }
        },
    )
}

pub(super) fn apps(nav: Nav<'_>, list: &[[String; 4]], s: &Said) -> String {
    page(
        "Apps",
        Some(nav),
        html! {
            (sections())
            (said(s))
            div.table { table {
                thead { tr { th scope="col" { "App" } th scope="col" { "Version" } th scope="col" { "Installed" } th scope="col" { "Package" } } }
                tbody { @for a in list { tr { td { (a[0]) } td { (a[1]) } td { (a[2]) } td { (a[3]) } } } }
            } }
            h2 { "Install or upgrade" }
            form method="post" action="/admin/apps" {
                input type="hidden" name="csrf" value=(nav.csrf);
                label for="path" { "Package file on this server (full path to a .gpkg)" }
                input #path name="path" required autocapitalize="none" spellcheck="false" placeholder="/var/tmp/mail-0.2.0.gpkg";
                button type="submit" { "Install or upgrade" }
            }
            p.note { "The signature is checked first; an upgrade must come from the app's own signer, stops the app's running grains, and starts them on the new version; if one fails to start, everything goes back to the version before. The CLI does the same: granary app install FILE.gpkg, granary app upgrade FILE.gpkg." }
        },
    )
}

fn events_table(events: &[Event]) -> Markup {
    html! {
        div.table { table {
            thead { tr { th scope="col" { "When" } th scope="col" { "Who" } th scope="col" { "What" } th scope="col" { "Subject" } th scope="col" { "Detail" } } }
            tbody { @for e in events { tr {
                td { (when(e.at)) } td { (e.actor) } td { (e.action) } td { (e.subject) } td { code { (e.detail) } }
            } } }
        } }
    }
}

pub(super) fn backups(
    nav: Nav<'_>,
    targets: &[String],
    recipients: &[String],
    events: &[Event],
) -> String {
    page(
        "Backups",
        Some(nav),
        html! {
            (sections())
            h2 { "Targets" }
            @if targets.is_empty() { p { "No [[backup.targets]] configured: backups go only where granary backup export is told." } }
            @else { ul { @for t in targets { li { code { (t) } } } } }
            h2 { "Encrypted to" }
            @if recipients.is_empty() { p.error role="alert" { "No [backup] recipients: nothing can be backed up until one is set." } }
            @else { ul { @for r in recipients { li { code { (r) } } } } }
            h2 { "Recent results" }
            @if events.is_empty() { p { "No backup has run on this node yet." } }
            @else { (events_table(events)) }
        },
    )
}

pub(super) fn audit(nav: Nav<'_>, f: &Filter, events: &[Event], more: bool) -> String {
    let older = events.last().map(|e| {
        let q = |k: &str, v: &str| {
            format!(
                "{k}={}&",
                percent_encoding::utf8_percent_encode(v, percent_encoding::NON_ALPHANUMERIC)
            )
        };
        format!(
            "/admin/audit?{}{}{}before={}",
            q("actor", &f.actor),
            q("action", &f.action),
            q("subject", &f.subject),
            e.id
        )
    });
    page(
        "Audit log",
        Some(nav),
        html! {
            (sections())
            form method="get" action="/admin/audit" {
                label for="actor" { "Who (exactly: admin, daemon, ...)" }
                input #actor name="actor" value=(f.actor);
                label for="action" { "What (an action, or a group such as user)" }
                input #action name="action" value=(f.action);
                label for="subject" { "Subject contains" }
                input #subject name="subject" value=(f.subject);
                button type="submit" { "Filter" }
            }
            @if events.is_empty() { p { "No events match." } } @else { (events_table(events)) }
            @if let (true, Some(href)) = (more, older) { p { a href=(href) { "Older events" } } }
        },
    )
}

pub(super) fn doctor(nav: Nav<'_>, checks: &[[String; 5]]) -> String {
    page(
        "Checks",
        Some(nav),
        html! {
            (sections())
            p { "What granary doctor finds: DNS records, listeners, certificates, the clock and the storage, as the world sees them." }
            div.table { table {
                thead { tr { th scope="col" { "Result" } th scope="col" { "Area" } th scope="col" { "Check" } th scope="col" { "Detail" } } }
                tbody { @for c in checks { tr {
                    td { @if c[0] == "ok" { "ok" } @else { strong { (c[0]) } } }
                    td { (c[1]) } td { (c[2]) }
                    td { (c[3]) @if !c[4].is_empty() { br; span.note { "Fix: " (c[4]) } } }
                } } }
            } }
        },
    )
}
