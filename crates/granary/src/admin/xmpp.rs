//! `granary xmpp`: the CLI side.

use std::process::ExitCode;

use granary_config::Config;
use granary_schema::admin_capnp::admin;
use serde::Serialize;

use super::client::print_json;
use super::connection::{remote, text, texts, with_admin};
use crate::cli::{XmppCommand, XmppDomainCommand};

#[derive(Debug, Serialize)]
struct StatusView {
    user: String,
    address: String,
    sessions: Vec<String>,
    contacts: u64,
    archived: u64,
    offline: u64,
}

pub(crate) fn run(config: &Config, cmd: &XmppCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        XmppCommand::Status { user, output } => status(config, user, output.json),
        XmppCommand::Domain(XmppDomainCommand::Add { domain, users }) => {
            add_domain(config, domain, users)
        }
        XmppCommand::Domain(XmppDomainCommand::List { output }) => domains(config, output.json),
    }
}

fn add_domain(config: &Config, domain: &str, users: &[String]) -> anyhow::Result<ExitCode> {
    let (d, us) = (domain.to_owned(), users.to_vec());
    let added = with_admin(config, |admin: admin::Client| async move {
        let mut req = super::xmpp(&admin).add_domain_request();
        req.get().set_domain(d.as_str());
        let mut list = req.get().init_users(us.len() as u32);
        for (i, u) in us.iter().enumerate() {
            list.set(i as u32, u.as_str());
        }
        let r = req.send().promise.await.map_err(remote)?;
        Ok(r.get().map_err(remote)?.get_added())
    })?;
    // As the daemon keeps it: lowercase, without a final dot.
    let lower = domain.to_ascii_lowercase();
    let domain = lower.strip_suffix('.').unwrap_or(&lower);
    if domain == config.domain {
        println!("{domain} is Granary's own domain: every user not moved elsewhere is there.");
    } else if added {
        println!("{domain} is now a chat domain of this host.");
    } else if users.is_empty() {
        println!("{domain} was already a chat domain of this host.");
    }
    for u in users {
        println!("{u}'s chat address is now {u}@{domain} (their chat grain restarts).");
    }
    if added {
        let certs = config.tls_dir().join("domains").join(domain);
        println!(
            "Publish its SRV records (granary xmpp domain list shows them) and put its \
             certificate in {}/cert.pem and key.pem.",
            certs.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Serialize)]
struct DomainView {
    domain: String,
    /// Granary's own domain: every user not moved elsewhere.
    primary: bool,
    /// The users moved into it (empty for the primary domain).
    users: Vec<String>,
    /// Where a certificate for an added domain is looked for, and whether
    /// one is there (`None` for the primary domain: its certificate is
    /// [tls]'s or the local CA's).
    certificate: Option<String>,
    has_certificate: Option<bool>,
    /// The SRV records that point clients and servers here, with the
    /// listeners' ports (none for a listener that is off).
    records: Vec<String>,
}

fn domains(config: &Config, json: bool) -> anyhow::Result<ExitCode> {
    let (primary, added, ports) = with_admin(config, |admin: admin::Client| async move {
        let r = super::xmpp(&admin)
            .domains_request()
            .send()
            .promise
            .await
            .map_err(remote)?;
        let r = r.get().map_err(remote)?;
        let mut added = Vec::new();
        for d in r.get_domains().map_err(remote)? {
            added.push((text(d.get_domain())?, texts(d.get_users())?));
        }
        let ports = (r.get_client_port(), r.get_tls_port(), r.get_server_port());
        Ok((text(r.get_primary())?, added, ports))
    })?;
    let records = |d: &str| {
        let mut out = Vec::new();
        for (service, port) in [
            ("_xmpp-client", ports.0),
            ("_xmpps-client", ports.1),
            ("_xmpp-server", ports.2),
        ] {
            if port != 0 {
                out.push(format!(
                    "{service}._tcp.{d}. IN SRV 0 5 {port} <this host>."
                ));
            }
        }
        out
    };
    let mut views = vec![DomainView {
        domain: primary.clone(),
        primary: true,
        users: Vec::new(),
        certificate: None,
        has_certificate: None,
        records: records(&primary),
    }];
    for (domain, users) in added {
        let dir = config.tls_dir().join("domains").join(&domain);
        views.push(DomainView {
            has_certificate: Some(dir.join("cert.pem").exists() && dir.join("key.pem").exists()),
            certificate: Some(dir.display().to_string()),
            records: records(&domain),
            domain,
            primary: false,
            users,
        });
    }
    if json {
        print_json(&views)?;
        return Ok(ExitCode::SUCCESS);
    }
    for v in &views {
        if v.primary {
            println!(
                "{}  (Granary's domain: every user not moved elsewhere)",
                v.domain
            );
        } else {
            let users = if v.users.is_empty() {
                "no users yet (granary xmpp domain add DOMAIN --user USER)".to_owned()
            } else {
                v.users.join(", ")
            };
            println!("{}  users: {users}", v.domain);
            match (&v.certificate, v.has_certificate) {
                (Some(dir), Some(true)) => println!("  certificate: {dir}/cert.pem"),
                (Some(dir), _) => {
                    println!("  certificate: MISSING: put cert.pem and key.pem in {dir}")
                }
                _ => {}
            }
        }
        for r in &v.records {
            println!("  {r}");
        }
        if ports.2 == 0 {
            println!("  (no _xmpp-server record: listen.xmpp-s2s is off, so no federation)");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn status(config: &Config, user: &str, json: bool) -> anyhow::Result<ExitCode> {
    let u = user.to_owned();
    let status = with_admin(config, |admin: admin::Client| async move {
        let mut req = super::xmpp(&admin).status_request();
        req.get().set_user(u.as_str());
        let r = req.send().promise.await.map_err(remote)?;
        let s = r.get().map_err(remote)?.get_status().map_err(remote)?;
        Ok(StatusView {
            user: text(s.get_user())?,
            address: text(s.get_address())?,
            sessions: texts(s.get_resources())?,
            contacts: s.get_contacts(),
            archived: s.get_archived(),
            offline: s.get_offline(),
        })
    })?;
    if json {
        print_json(&status)?;
        return Ok(ExitCode::SUCCESS);
    }
    println!("user:      {}", status.user);
    println!("address:   {}", status.address);
    if status.sessions.is_empty() {
        println!("sessions:  none");
    } else {
        println!(
            "sessions:  {} ({})",
            status.sessions.len(),
            status.sessions.join(", ")
        );
    }
    println!("contacts:  {}", status.contacts);
    println!("archived:  {} messages", status.archived);
    println!("offline:   {} messages waiting", status.offline);
    Ok(ExitCode::SUCCESS)
}
