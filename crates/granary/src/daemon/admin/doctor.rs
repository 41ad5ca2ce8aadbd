//! `doctor`: checks a deployment as the world sees it. Every mail domain's
//! DNS records are asked of the configured resolver (without a cache) and
//! compared with what `granary mail dns` says they should be; then the
//! listeners, the certificate, the clock and the storage. Each finding
//! says what to do about it.

use granary_gateway::smtp::Checker;
use granary_gateway::smtp::checks::DnsProblem;
use granary_gateway::smtp::records::{DnsRecord, records};

use super::{Ctx, blocking, fail, state_failure};

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Level {
    Ok,
    Warn,
    Fail,
}

impl Level {
    pub(super) fn as_str(&self) -> &'static str {
        match self {
            Level::Ok => "ok",
            Level::Warn => "warn",
            Level::Fail => "fail",
        }
    }
}

#[derive(Debug, Clone)]
pub(super) struct Finding {
    pub(super) area: &'static str,
    pub(super) name: String,
    pub(super) level: Level,
    pub(super) detail: String,
    pub(super) fix: String,
}

pub(super) fn ok(area: &'static str, name: String, detail: String) -> Finding {
    Finding {
        area,
        name,
        level: Level::Ok,
        detail,
        fix: String::new(),
    }
}

/// Case and the final dot do not matter in names; spaces around `;` do
/// not matter in tag lists.
fn normalise(value: &str) -> String {
    value
        .trim()
        .trim_end_matches('.')
        .to_ascii_lowercase()
        .split(';')
        .map(str::trim)
        .collect::<Vec<_>>()
        .join(";")
}

/// The `p=` tag of a DKIM record, without white space.
fn dkim_p(record: &str) -> Option<String> {
    record.split(';').find_map(|tag| {
        let (k, v) = tag.split_once('=')?;
        (k.trim() == "p").then(|| v.split_whitespace().collect())
    })
}

/// Whether `key`'s record is in DNS (its `p=` as published): `Err` says
/// what was found instead.
pub(super) async fn dkim_published(
    ctx: &Ctx,
    domain: &str,
    key: &granary_gateway::smtp::dkim::KeyInfo,
) -> Result<(), String> {
    let checker = Checker::new(&ctx.info.mail_hostname, ctx.info.mail_resolver)?;
    let name = format!("{}._domainkey.{domain}", key.selector);
    match checker.lookup(&name, "TXT").await {
        Ok(found)
            if found
                .iter()
                .any(|v| dkim_p(v).as_deref() == Some(&key.public_key)) =>
        {
            Ok(())
        }
        Ok(found) if found.is_empty() => Err("no record".to_owned()),
        Ok(found) => Err(format!("another key: {}", found.join(" | "))),
        Err(e) => Err(problem(&e)),
    }
}

pub(super) async fn run(ctx: &Ctx) -> Result<Vec<Finding>, capnp::Error> {
    let mut out = Vec::new();
    let dav = super::mail::dav_endpoint(ctx).await?;
    let info = &ctx.info;
    let (store, dkim) = (ctx.store.clone(), ctx.dkim.clone());
    let domains = blocking(move || {
        let domains = store.mail_domains().map_err(state_failure)?;
        domains
            .into_iter()
            .map(|d| {
                let keys = dkim.list(&d.domain).map_err(fail)?;
                Ok((d.domain, keys))
            })
            .collect::<Result<Vec<_>, capnp::Error>>()
    })
    .await?;
    let ports = info.mail_ports();
    // A resolver of its own: nothing cached from earlier runs.
    let checker = Checker::new(&info.mail_hostname, info.mail_resolver).map_err(fail)?;
    if domains.is_empty() {
        out.push(Finding {
            area: "dns",
            name: "mail domains".to_owned(),
            level: Level::Warn,
            detail: "no mail domains".to_owned(),
            fix: "granary mail domain add DOMAIN".to_owned(),
        });
    }
    match checker.host_addresses(&info.mail_hostname).await {
        Ok(ips) => out.push(ok(
            "dns",
            format!("{} A/AAAA", info.mail_hostname),
            ips.iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(", "),
        )),
        Err(e) => out.push(Finding {
            area: "dns",
            name: format!("{} A/AAAA", info.mail_hostname),
            level: Level::Fail,
            detail: format!("the mail host name does not resolve ({})", problem(&e)),
            fix: format!(
                "add A (and AAAA) records for {} with this host's public addresses",
                info.mail_hostname
            ),
        }),
    }
    let store = ctx.store.clone();
    let installed: Vec<String> = blocking(move || {
        Ok(store
            .list_apps()
            .map_err(state_failure)?
            .into_iter()
            .map(|a| a.kind)
            .collect())
    })
    .await?;
    out.extend(super::doctor_hosts::service_hosts(info, &checker, &installed).await);
    out.extend(certificate_names(ctx, &domains).await);
    for (domain, keys) in &domains {
        let expected = records(
            domain,
            &info.mail_hostname,
            &info.mta_sts_mode,
            keys,
            ports,
            dav.as_ref().map(|(h, p)| (h.as_str(), *p)),
        );
        for record in &expected {
            out.push(check_record(&checker, domain, record).await);
        }
    }
    // Chat: every chat domain's SRV records, for clients and servers.
    let store = ctx.store.clone();
    let mut chat = blocking(move || store.xmpp_domain_names().map_err(state_failure)).await?;
    chat.push(info.domain.clone());
    chat.sort();
    chat.dedup();
    // A listener on loopback is not offered to the world.
    let port = |name: &str| {
        info.listener(name)
            .filter(|a| !a.ip().is_loopback())
            .map(|a| a.port())
    };
    for domain in &chat {
        let expected = granary_gateway::smtp::records::xmpp_records(
            domain,
            &info.mail_hostname,
            port("xmpp"),
            port("xmpps"),
            port("xmpp-s2s"),
        );
        for record in &expected {
            let mut found = check_record(&checker, domain, record).await;
            // Without SRV records, clients and servers try the domain's
            // own address on the standard ports: worth fixing, not broken.
            if found.level == Level::Fail {
                found.level = Level::Warn;
            }
            out.push(found);
        }
    }
    out.extend(local_checks(ctx));
    if let Some(member) = &info.cluster {
        out.extend(super::doctor_hosts::peer_clocks(member).await);
    }
    out.extend(
        super::health::pool_health(
            info.zfs_pool.as_deref(),
            info.storage_backend,
            &info.data_dir,
        )
        .await,
    );
    Ok(out)
}

pub(super) fn problem(p: &DnsProblem) -> String {
    match p {
        DnsProblem::NoSuchDomain => "no such name".to_owned(),
        DnsProblem::NoRecords => "no records of that type".to_owned(),
        DnsProblem::Failed(e) => format!("the lookup failed: {e}"),
    }
}

/// What a record is called in findings: its purpose's first words and
/// where it lives.
fn label(domain: &str, r: &DnsRecord) -> String {
    let what = if r.name.contains("._domainkey.") {
        "DKIM"
    } else if r.name.starts_with("_dmarc.") {
        "DMARC"
    } else if r.name.starts_with("_mta-sts.") || r.name.starts_with("mta-sts.") {
        "MTA-STS"
    } else if r.name.starts_with("_smtp._tls.") {
        "TLS-RPT"
    } else if r.kind == "SRV" {
        "SRV"
    } else if r.kind == "TXT" && r.name == format!("{domain}.") {
        "SPF"
    } else {
        r.kind
    };
    format!("{what} {} {}", r.name, r.kind)
}

async fn check_record(checker: &Checker, domain: &str, r: &DnsRecord) -> Finding {
    let name = label(domain, r);
    let fix = format!("publish: {}", r.zone_line());
    // Calendar and contacts clients also find the server through
    // /.well-known/caldav: their records help, they are not required.
    let optional = r.name.starts_with("_caldav") || r.name.starts_with("_carddav");
    let missing = |detail: String| Finding {
        area: "dns",
        name: name.clone(),
        level: if optional { Level::Warn } else { Level::Fail },
        detail,
        fix: fix.clone(),
    };
    // mta-sts.DOMAIN may be a CNAME or have addresses of its own.
    if r.kind == "CNAME" {
        return match checker.lookup(&r.name, "CNAME").await {
            Ok(v) if v.iter().any(|t| normalise(t) == normalise(&r.value)) => {
                ok("dns", name, format!("points at {}", r.value))
            }
            _ => match checker.host_addresses(r.name.trim_end_matches('.')).await {
                Ok(_) => ok("dns", name, "has addresses of its own".to_owned()),
                Err(e) => missing(format!("missing ({})", problem(&e))),
            },
        };
    }
    let live = match checker.lookup(&r.name, r.kind).await {
        Ok(v) => v,
        Err(e) => return missing(format!("missing ({})", problem(&e))),
    };
    let want = normalise(&r.value);
    if live.iter().any(|v| normalise(v) == want) {
        return ok("dns", name, r.value.clone());
    }
    // Receivers match a DKIM key by its p= (other tags may differ), and an
    // MX by its host (whatever the preference).
    if r.name.contains("._domainkey.")
        && let Some(p) = dkim_p(&r.value)
        && live
            .iter()
            .any(|v| dkim_p(v).as_deref() == Some(p.as_str()))
    {
        return ok("dns", name, "the published key".to_owned());
    }
    if r.kind == "MX" {
        let host = |v: &str| v.split_whitespace().last().map(normalise);
        if live.iter().any(|v| host(v) == host(&r.value)) {
            return ok("dns", name, live.join(" | "));
        }
    }
    let prefix = |p: &str| {
        live.iter()
            .filter(|v| v.to_ascii_lowercase().starts_with(p))
            .cloned()
            .collect::<Vec<_>>()
    };
    let found = if live.is_empty() {
        "nothing".to_owned()
    } else {
        live.join(" | ")
    };
    match label(domain, r).split(' ').next().unwrap_or("") {
        "SPF" => {
            let spf = prefix("v=spf1");
            match spf.as_slice() {
                [] => missing("no SPF record (v=spf1)".to_owned()),
                [one] if one.contains(" mx") || one.contains(" a") => Finding {
                    area: "dns",
                    name,
                    level: Level::Warn,
                    detail: format!(
                        "{one:?} is not the suggested record; check it lets this host send"
                    ),
                    fix,
                },
                [one] => Finding {
                    area: "dns",
                    name,
                    level: Level::Warn,
                    detail: format!(
                        "{one:?} does not name the MX; make sure it covers this host's addresses"
                    ),
                    fix,
                },
                _ => missing(format!(
                    "{} SPF records; receivers treat more than one as an error (RFC 7208 §4.5)",
                    spf.len()
                )),
            }
        }
        "MX" => missing(format!("the MX hosts are {found}, not {}", r.value)),
        "DMARC" if !prefix("v=dmarc1").is_empty() => ok("dns", name, prefix("v=dmarc1").join(" ")),
        "TLS-RPT" if !prefix("v=tlsrptv1").is_empty() => {
            ok("dns", name, prefix("v=tlsrptv1").join(" "))
        }
        "MTA-STS" if !prefix("v=stsv1").is_empty() => Finding {
            area: "dns",
            name,
            level: Level::Warn,
            detail: format!(
                "{found}: the id is not the current policy's, so senders keep an older policy"
            ),
            fix,
        },
        "DKIM" => missing(format!(
            "found {found}; without the right key receivers fail this selector's signatures"
        )),
        _ => missing(format!("found {found}")),
    }
}

/// Each name clients use, asked of the `https` listener (SNI) as a
/// client would: the certificate served must verify for it.
async fn certificate_names(
    ctx: &Ctx,
    domains: &[(String, Vec<granary_gateway::smtp::dkim::KeyInfo>)],
) -> Vec<Finding> {
    let info = &ctx.info;
    let Some(https) = info.listener("https") else {
        return Vec::new();
    };
    // Loopback: the listener may be bound to any address.
    let addr = if https.ip().is_unspecified() {
        std::net::SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), https.port())
    } else {
        https
    };
    let mut names = vec![info.domain.clone(), info.mail_hostname.clone()];
    for (d, _) in domains {
        for n in [
            format!("mta-sts.{d}"),
            format!("autoconfig.{d}"),
            format!("mail.{d}"),
        ] {
            names.push(n);
        }
    }
    names.sort();
    names.dedup();
    let mut out = Vec::new();
    for name in names {
        match granary_gateway::tls::check_served(addr, &name, info.ca_file.as_deref()).await {
            Ok(Some(not_after)) => out.push(expiry(&name, not_after, crate::daemon::unix_now())),
            Ok(None) => out.push(ok(
                "certificate",
                name.clone(),
                "the certificate served verifies for it".to_owned(),
            )),
            Err(why) => out.push(Finding {
                area: "certificate",
                name: name.clone(),
                level: Level::Fail,
                detail: format!("clients asking for {name} get a certificate that does not verify: {why}"),
                fix: format!(
                    "set [tls] cert and key to a certificate naming {name}, or put one in DATA_DIR/tls/domains/{name}/ (cert.pem, key.pem)"
                ),
            }),
        }
    }
    out
}

/// Certificates are renewed well before this many days are left; fewer is
/// a warning.
const EXPIRY_WARN_DAYS: i64 = 14;

/// A certificate that verifies, judged by how long it has left.
fn expiry(name: &str, not_after: i64, now: i64) -> Finding {
    let days = (not_after - now).div_euclid(86_400);
    let detail = format!("the certificate served verifies for it; it expires in {days} days");
    if days < EXPIRY_WARN_DAYS {
        Finding {
            area: "certificate",
            name: name.to_owned(),
            level: Level::Warn,
            detail,
            fix:
                "renew it now: put the new certificate in place (it is picked up without a restart)"
                    .to_owned(),
        }
    } else {
        ok("certificate", name.to_owned(), detail)
    }
}

/// How ordering certificates from the ACME CA goes.
fn acme_finding(a: &granary_gateway::acme::CertificateStatus) -> Finding {
    let name = format!("ACME certificate ({})", a.challenge);
    let port = if a.challenge == "http-01" { 80 } else { 443 };
    match (&a.error, a.not_after) {
        (None, Some(_)) => ok(
            "certificate",
            name,
            format!("from {} for {} names", a.directory, a.names.len()),
        ),
        (error, not_after) => Finding {
            area: "certificate",
            name,
            level: Level::Warn,
            detail: match (error, not_after) {
                (Some(e), Some(_)) => format!(
                    "renewing fails ({} time(s) in a row), the current certificate serves meanwhile: {e}",
                    a.failures
                ),
                (Some(e), None) => format!("no certificate from {} yet: {e}", a.directory),
                (None, _) => format!(
                    "no certificate from {} yet: the first order is under way",
                    a.directory
                ),
            },
            fix: format!(
                "the CA must reach this host on port {port} for every name; then: granary certificates renew"
            ),
        },
    }
}

/// The checks that need no DNS: listeners, certificate, clock, storage.
fn local_checks(ctx: &Ctx) -> Vec<Finding> {
    let info = &ctx.info;
    let mut out = Vec::new();
    for (name, addr) in &info.listeners {
        let port = addr
            .parse::<std::net::SocketAddr>()
            .map(|a| a.port())
            .unwrap_or(0);
        let standard = match name.as_str() {
            "smtp" => Some(25),
            "submission" => Some(587),
            "submissions" => Some(465),
            "imap" => Some(143),
            "imaps" => Some(993),
            "https" => Some(443),
            "http" => Some(80),
            _ => None,
        };
        match standard {
            Some(p) if p != port => out.push(Finding {
                area: "listeners",
                name: format!("listen.{name}"),
                level: Level::Warn,
                detail: format!("on {addr}, not the standard port {p}"),
                fix: if name == "smtp" {
                    "other mail servers deliver only to port 25: listen.smtp = \"0.0.0.0:25\""
                        .to_owned()
                } else {
                    format!("clients expect port {p}; set listen.{name}, or forward {p} to {port}")
                },
            }),
            _ => out.push(ok("listeners", format!("listen.{name}"), addr.clone())),
        }
    }
    match (&info.ca_file, info.acme.as_ref().and_then(|a| a.status())) {
        (_, Some(acme)) => out.push(acme_finding(&acme)),
        (Some(ca), None) => out.push(Finding {
            area: "certificate",
            name: "TLS certificate".to_owned(),
            level: Level::Warn,
            detail: format!("issued by this host's own CA ({})", ca.display()),
            fix: "clients must trust that file; for the world (and MTA-STS enforce), set [tls] cert and key to a public certificate".to_owned(),
        }),
        (None, None) => out.push(ok(
            "certificate",
            "TLS certificate".to_owned(),
            "the configured [tls] certificate".to_owned(),
        )),
    }
    match granary_jail::clock_synchronized() {
        Some(true) => out.push(ok(
            "clock",
            "system clock".to_owned(),
            "kept in step by NTP".to_owned(),
        )),
        Some(false) => out.push(Finding {
            area: "clock",
            name: "system clock".to_owned(),
            level: Level::Warn,
            detail: "the kernel says the clock is not synchronised".to_owned(),
            fix:
                "run an NTP client (apt install chrony): DKIM, TLS and backups need the right time"
                    .to_owned(),
        }),
        None => out.push(Finding {
            area: "clock",
            name: "system clock".to_owned(),
            level: Level::Warn,
            detail: "cannot ask the kernel whether the clock is synchronised".to_owned(),
            fix: "make sure an NTP client runs".to_owned(),
        }),
    }
    match crate::daemon::disk_space(&info.data_dir) {
        Ok((free, total)) => {
            let total = total.max(1);
            let pct = free * 100 / total;
            let detail = format!(
                "{} MiB free of {} MiB ({pct}%) under {} ({} backend)",
                free >> 20,
                total >> 20,
                info.data_dir.display(),
                info.storage_backend
            );
            let level = if free < (256 << 20) || pct < 2 {
                Level::Fail
            } else if pct < 10 {
                Level::Warn
            } else {
                Level::Ok
            };
            out.push(Finding {
                area: "storage",
                name: "data directory".to_owned(),
                fix: if level == Level::Ok {
                    String::new()
                } else {
                    "free space: mail and backups stop when the disk is full".to_owned()
                },
                level,
                detail,
            });
        }
        Err(e) => out.push(Finding {
            area: "storage",
            name: "data directory".to_owned(),
            level: Level::Fail,
            detail: format!("cannot stat {}: {e}", info.data_dir.display()),
            fix: String::new(),
        }),
    }
    out
}
