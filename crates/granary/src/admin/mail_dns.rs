//! `granary mail dkim` and `granary mail dns`: a mail domain's DKIM keys
//! and the DNS records it needs.

use std::process::ExitCode;

use granary_config::Config;
use granary_schema::admin_capnp::admin;
use serde::Serialize;

use super::client::print_json;
use super::connection::{remote, text, with_admin};
use super::table;
use crate::cli::MailDkimCommand;

#[derive(Serialize)]
struct DkimView {
    selector: String,
    algorithm: String,
    created_at: i64,
    signing: bool,
    pending: bool,
    record: String,
}

pub(super) fn dkim(config: &Config, cmd: &MailDkimCommand) -> anyhow::Result<ExitCode> {
    let (domain, rotate, activate, force, json) = match cmd {
        MailDkimCommand::List { domain, output } => (domain, false, false, false, output.json),
        MailDkimCommand::Rotate { domain, output } => (domain, true, false, false, output.json),
        MailDkimCommand::Activate {
            domain,
            force,
            output,
        } => (domain, false, true, *force, output.json),
        MailDkimCommand::Retire { domain, selector } => {
            let (d, s) = (domain.clone(), selector.clone());
            with_admin(config, |admin: admin::Client| async move {
                let mut req = super::mail(&admin).retire_dkim_request();
                req.get().set_domain(d.as_str());
                req.get().set_selector(s.as_str());
                req.send().promise.await.map_err(remote)?;
                Ok(())
            })?;
            println!("{selector} no longer exists; remove {selector}._domainkey.{domain} from DNS");
            return Ok(ExitCode::SUCCESS);
        }
    };
    let d = domain.clone();
    let keys = with_admin(config, |admin: admin::Client| async move {
        let mut req = super::mail(&admin).dkim_request();
        req.get().set_domain(d.as_str());
        req.get().set_rotate(rotate);
        req.get().set_activate(activate);
        req.get().set_force(force);
        let r = req.send().promise.await.map_err(remote)?;
        r.get()
            .map_err(remote)?
            .get_keys()
            .map_err(remote)?
            .iter()
            .map(|k| {
                Ok(DkimView {
                    selector: text(k.get_selector())?,
                    algorithm: text(k.get_algorithm())?,
                    created_at: k.get_created_at(),
                    signing: k.get_signing(),
                    pending: k.get_pending(),
                    record: text(k.get_record())?,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()
    })?;
    if json {
        print_json(&keys)?;
        return Ok(ExitCode::SUCCESS);
    }
    if rotate {
        println!(
            "new keys for {domain}, not signing yet: publish them (granary mail dns {domain}), then: granary mail dkim activate {domain}"
        );
    }
    if activate {
        println!("the new keys sign {domain}'s mail from now on");
    }
    let rows: Vec<Vec<String>> = keys
        .iter()
        .map(|k| {
            vec![
                format!("{}._domainkey.{domain}", k.selector),
                k.algorithm.clone(),
                table::time(k.created_at),
                if k.signing {
                    "yes"
                } else if k.pending {
                    "pending"
                } else {
                    "no"
                }
                .to_owned(),
            ]
        })
        .collect();
    table::print(&["SELECTOR", "ALGORITHM", "CREATED", "SIGNS"], &rows);
    Ok(ExitCode::SUCCESS)
}

#[derive(Serialize)]
struct DnsView {
    name: String,
    #[serde(rename = "type")]
    kind: String,
    value: String,
    purpose: String,
}

pub(super) fn dns(config: &Config, domain: &str, json: bool) -> anyhow::Result<ExitCode> {
    let d = domain.to_owned();
    let records = with_admin(config, |admin: admin::Client| async move {
        let mut req = super::mail(&admin).dns_records_request();
        req.get().set_domain(d.as_str());
        let r = req.send().promise.await.map_err(remote)?;
        r.get()
            .map_err(remote)?
            .get_records()
            .map_err(remote)?
            .iter()
            .map(|k| {
                Ok(DnsView {
                    name: text(k.get_name())?,
                    kind: text(k.get_kind())?,
                    value: text(k.get_value())?,
                    purpose: text(k.get_purpose())?,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()
    })?;
    if json {
        print_json(&records)?;
        return Ok(ExitCode::SUCCESS);
    }
    println!("; DNS records for mail at {domain}, as zone-file lines");
    for r in &records {
        let line = granary_gateway::smtp::records::DnsRecord {
            name: r.name.clone(),
            kind: match r.kind.as_str() {
                "MX" => "MX",
                "SRV" => "SRV",
                "CNAME" => "CNAME",
                _ => "TXT",
            },
            value: r.value.clone(),
            purpose: r.purpose.clone(),
        };
        println!("; {}", r.purpose);
        println!("{}", line.zone_line());
    }
    Ok(ExitCode::SUCCESS)
}
