//! `granary mail`: the CLI side.

use std::process::ExitCode;

use granary_config::Config;
use granary_schema::admin_capnp::{self, admin};
use serde::Serialize;

use super::client::print_json;
use super::connection::{remote, text, texts, with_admin};
use super::table;
use crate::cli::{MailAliasCommand, MailCommand, MailDomainCommand, MailSpoolCommand};

#[derive(Debug, Serialize)]
struct DomainView {
    domain: String,
    catch_all: Option<String>,
    aliases: u32,
    created_at: i64,
}

#[derive(Debug, Serialize)]
struct AliasView {
    address: String,
    user: String,
    created_at: i64,
}

#[derive(Debug, Serialize)]
struct MailboxView {
    name: String,
    special_use: String,
    messages: u32,
    unseen: u32,
    bytes: u64,
}

#[derive(Debug, Serialize)]
struct StatusView {
    user: String,
    addresses: Vec<String>,
    mailboxes: Vec<MailboxView>,
    last_delivery: Option<i64>,
    deliveries: u64,
    waiting_in_spool: u32,
}

#[derive(Debug, Serialize)]
struct RecipientView {
    address: String,
    user: String,
    state: String,
}

#[derive(Debug, Serialize)]
struct SpooledView {
    id: String,
    from: String,
    recipients: Vec<RecipientView>,
    size: u64,
    received_at: i64,
    client: String,
    attempts: u32,
    next_attempt: i64,
    last_error: Option<String>,
    held: bool,
}

fn alias_view(a: admin_capnp::mail_alias::Reader<'_>) -> anyhow::Result<AliasView> {
    Ok(AliasView {
        address: text(a.get_address())?,
        user: text(a.get_user())?,
        created_at: a.get_created_at(),
    })
}

/// `1.2 MiB`-style sizes for tables.
fn size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

pub(crate) fn run(config: &Config, cmd: &MailCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        MailCommand::Domain(c) => domain(config, c),
        MailCommand::Alias(c) => alias(config, c),
        MailCommand::CatchAll { domain, user, none } => {
            let user = if *none {
                String::new()
            } else {
                user.clone().unwrap_or_default()
            };
            let (d, u) = (domain.clone(), user.clone());
            with_admin(config, |admin: admin::Client| async move {
                let mut req = super::mail(&admin).set_catch_all_request();
                req.get().set_domain(d.as_str());
                req.get().set_user(u.as_str());
                req.send().promise.await.map_err(remote)?;
                Ok(())
            })?;
            if user.is_empty() {
                println!("mail to unknown addresses of {domain} is refused");
            } else {
                println!("mail to unknown addresses of {domain} goes to {user}");
            }
            Ok(ExitCode::SUCCESS)
        }
        MailCommand::Status { user, output } => status(config, user, output.json),
        MailCommand::Spool(c) => spool(config, c, false),
        MailCommand::Queue(c) => spool(config, c, true),
        MailCommand::Dkim(c) => super::mail_dns::dkim(config, c),
        MailCommand::Dns { domain, output } => super::mail_dns::dns(config, domain, output.json),
    }
}

fn domain(config: &Config, cmd: &MailDomainCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        MailDomainCommand::Add { domain, output } => {
            let d = domain.clone();
            let created = with_admin(config, |admin: admin::Client| async move {
                let mut req = super::mail(&admin).add_domain_request();
                req.get().set_domain(d.as_str());
                let r = req.send().promise.await.map_err(remote)?;
                Ok(r.get().map_err(remote)?.get_created())
            })?;
            let domain = domain.trim_end_matches('.').to_ascii_lowercase();
            if output.json {
                print_json(&serde_json::json!({ "domain": domain, "created": created }))?;
            } else if created {
                println!("{domain} is a mail domain: every user gets USER@{domain}");
                println!("point its MX record at this host (port 25: [listen] smtp)");
            } else {
                println!("{domain} was already a mail domain");
            }
        }
        MailDomainCommand::Remove { domain } => {
            let d = domain.clone();
            with_admin(config, |admin: admin::Client| async move {
                let mut req = super::mail(&admin).remove_domain_request();
                req.get().set_domain(d.as_str());
                req.send().promise.await.map_err(remote)?;
                Ok(())
            })?;
            println!("{domain} is no longer a mail domain");
        }
        MailDomainCommand::List { output } => {
            let domains = with_admin(config, |admin: admin::Client| async move {
                let r = super::mail(&admin)
                    .domains_request()
                    .send()
                    .promise
                    .await
                    .map_err(remote)?;
                let list = r.get().map_err(remote)?.get_domains().map_err(remote)?;
                list.iter()
                    .map(|d| {
                        let catch_all = text(d.get_catch_all())?;
                        Ok(DomainView {
                            domain: text(d.get_domain())?,
                            catch_all: (!catch_all.is_empty()).then_some(catch_all),
                            aliases: d.get_aliases(),
                            created_at: d.get_created_at(),
                        })
                    })
                    .collect::<anyhow::Result<Vec<_>>>()
            })?;
            if output.json {
                print_json(&domains)?;
            } else {
                let rows: Vec<Vec<String>> = domains
                    .iter()
                    .map(|d| {
                        vec![
                            d.domain.clone(),
                            d.catch_all.clone().unwrap_or_else(|| "-".to_owned()),
                            d.aliases.to_string(),
                            table::time(d.created_at),
                        ]
                    })
                    .collect();
                table::print(&["DOMAIN", "CATCH-ALL", "ALIASES", "ADDED"], &rows);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn alias(config: &Config, cmd: &MailAliasCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        MailAliasCommand::Add {
            address,
            user,
            output,
        } => {
            let (a, u) = (address.clone(), user.clone());
            let alias = with_admin(config, |admin: admin::Client| async move {
                let mut req = super::mail(&admin).add_alias_request();
                req.get().set_address(a.as_str());
                req.get().set_user(u.as_str());
                let r = req.send().promise.await.map_err(remote)?;
                alias_view(r.get().map_err(remote)?.get_alias().map_err(remote)?)
            })?;
            if output.json {
                print_json(&alias)?;
            } else {
                println!("mail to {} now goes to {}", alias.address, alias.user);
            }
        }
        MailAliasCommand::Remove { address } => {
            let a = address.clone();
            with_admin(config, |admin: admin::Client| async move {
                let mut req = super::mail(&admin).remove_alias_request();
                req.get().set_address(a.as_str());
                req.send().promise.await.map_err(remote)?;
                Ok(())
            })?;
            println!("{address} is no longer an alias");
        }
        MailAliasCommand::List { user, output } => {
            let u = user.clone().unwrap_or_default();
            let aliases = with_admin(config, |admin: admin::Client| async move {
                let mut req = super::mail(&admin).aliases_request();
                req.get().set_user(u.as_str());
                let r = req.send().promise.await.map_err(remote)?;
                let list = r.get().map_err(remote)?.get_aliases().map_err(remote)?;
                list.iter()
                    .map(alias_view)
                    .collect::<anyhow::Result<Vec<_>>>()
            })?;
            if output.json {
                print_json(&aliases)?;
            } else {
                let rows: Vec<Vec<String>> = aliases
                    .iter()
                    .map(|a| vec![a.address.clone(), a.user.clone(), table::time(a.created_at)])
                    .collect();
                table::print(&["ADDRESS", "USER", "ADDED"], &rows);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn status(config: &Config, user: &str, json: bool) -> anyhow::Result<ExitCode> {
    let u = user.to_owned();
    let status = with_admin(config, |admin: admin::Client| async move {
        let mut req = super::mail(&admin).status_request();
        req.get().set_user(u.as_str());
        let r = req.send().promise.await.map_err(remote)?;
        let s = r.get().map_err(remote)?.get_status().map_err(remote)?;
        let mailboxes = s
            .get_mailboxes()
            .map_err(remote)?
            .iter()
            .map(|m| {
                Ok(MailboxView {
                    name: text(m.get_name())?,
                    special_use: text(m.get_special_use())?,
                    messages: m.get_messages(),
                    unseen: m.get_unseen(),
                    bytes: m.get_bytes(),
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(StatusView {
            user: text(s.get_user())?,
            addresses: texts(s.get_addresses())?,
            mailboxes,
            last_delivery: Some(s.get_last_delivery()).filter(|t| *t > 0),
            deliveries: s.get_deliveries(),
            waiting_in_spool: s.get_waiting(),
        })
    })?;
    if json {
        print_json(&status)?;
        return Ok(ExitCode::SUCCESS);
    }
    println!("user:          {}", status.user);
    if status.addresses.is_empty() {
        println!("addresses:     none yet (granary mail domain add DOMAIN)");
    } else {
        println!("addresses:     {}", status.addresses.join(", "));
    }
    println!(
        "last delivery: {}",
        table::time(status.last_delivery.unwrap_or(0))
    );
    println!("deliveries:    {}", status.deliveries);
    println!("in the spool:  {}", status.waiting_in_spool);
    println!();
    let rows: Vec<Vec<String>> = status
        .mailboxes
        .iter()
        .map(|m| {
            vec![
                m.name.clone(),
                if m.special_use.is_empty() {
                    "-".to_owned()
                } else {
                    m.special_use.clone()
                },
                m.messages.to_string(),
                m.unseen.to_string(),
                size(m.bytes),
            ]
        })
        .collect();
    table::print(&["MAILBOX", "ROLE", "MESSAGES", "UNSEEN", "SIZE"], &rows);
    Ok(ExitCode::SUCCESS)
}

fn spool(config: &Config, cmd: &MailSpoolCommand, outbound: bool) -> anyhow::Result<ExitCode> {
    let what = if outbound { "queue" } else { "spool" };
    match cmd {
        MailSpoolCommand::List { output } => {
            let messages = with_admin(config, |admin: admin::Client| async move {
                let mut req = super::mail(&admin).spool_request();
                req.get().set_outbound(outbound);
                let r = req.send().promise.await.map_err(remote)?;
                let list = r.get().map_err(remote)?.get_messages().map_err(remote)?;
                list.iter()
                    .map(|m| {
                        let recipients = m
                            .get_recipients()
                            .map_err(remote)?
                            .iter()
                            .map(|r| {
                                Ok(RecipientView {
                                    address: text(r.get_address())?,
                                    user: text(r.get_user())?,
                                    state: text(r.get_state())?,
                                })
                            })
                            .collect::<anyhow::Result<Vec<_>>>()?;
                        let last_error = text(m.get_last_error())?;
                        Ok(SpooledView {
                            id: text(m.get_id())?,
                            from: text(m.get_from())?,
                            recipients,
                            size: m.get_size(),
                            received_at: m.get_received_at(),
                            client: text(m.get_client())?,
                            attempts: m.get_attempts(),
                            next_attempt: m.get_next_attempt(),
                            last_error: (!last_error.is_empty()).then_some(last_error),
                            held: m.get_held(),
                        })
                    })
                    .collect::<anyhow::Result<Vec<_>>>()
            })?;
            if output.json {
                print_json(&messages)?;
            } else if messages.is_empty() {
                if outbound {
                    println!("the queue is empty: every sent message was delivered or bounced");
                } else {
                    println!(
                        "the spool is empty: every accepted message is in its recipients' grains"
                    );
                }
            } else {
                let rows: Vec<Vec<String>> = messages
                    .iter()
                    .map(|m| {
                        let waiting: Vec<String> = m
                            .recipients
                            .iter()
                            .filter(|r| r.state == "waiting")
                            .map(|r| r.address.clone())
                            .collect();
                        vec![
                            m.id.clone(),
                            table::time(m.received_at),
                            if m.from.is_empty() {
                                "<>".to_owned()
                            } else {
                                m.from.clone()
                            },
                            waiting.join(","),
                            size(m.size),
                            m.attempts.to_string(),
                            if m.held {
                                "held".to_owned()
                            } else {
                                table::time(m.next_attempt)
                            },
                            m.last_error.clone().unwrap_or_else(|| "-".to_owned()),
                        ]
                    })
                    .collect();
                table::print(
                    &[
                        "ID",
                        "RECEIVED",
                        "FROM",
                        "WAITING",
                        "SIZE",
                        "TRIES",
                        "NEXT",
                        "LAST ERROR",
                    ],
                    &rows,
                );
            }
        }
        MailSpoolCommand::Retry { id } => {
            let i = id.clone().unwrap_or_default();
            let n = with_admin(config, |admin: admin::Client| async move {
                let mut req = super::mail(&admin).retry_request();
                req.get().set_id(i.as_str());
                req.get().set_outbound(outbound);
                let r = req.send().promise.await.map_err(remote)?;
                Ok(r.get().map_err(remote)?.get_count())
            })?;
            println!("{n} message(s) will be delivered again now");
        }
        MailSpoolCommand::Delete { id } => {
            let i = id.clone();
            with_admin(config, |admin: admin::Client| async move {
                let mut req = super::mail(&admin).delete_spooled_request();
                req.get().set_id(i.as_str());
                req.get().set_outbound(outbound);
                req.send().promise.await.map_err(remote)?;
                Ok(())
            })?;
            println!("{id} removed from the {what}; it will not be delivered");
        }
        MailSpoolCommand::Hold { id } | MailSpoolCommand::Release { id } => {
            let hold = matches!(cmd, MailSpoolCommand::Hold { .. });
            let i = id.clone();
            with_admin(config, |admin: admin::Client| async move {
                let mut req = super::mail(&admin).hold_request();
                req.get().set_id(i.as_str());
                req.get().set_outbound(outbound);
                req.get().set_hold(hold);
                req.send().promise.await.map_err(remote)?;
                Ok(())
            })?;
            if hold {
                println!("{id} is held: it will not be delivered until released");
            } else {
                println!("{id} is released and will be delivered now");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
