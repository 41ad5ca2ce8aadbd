//! `granary invite`: the CLI side.

use std::process::ExitCode;

use granary_config::Config;
use granary_schema::admin_capnp::{admin, invite};
use serde::Serialize;

use super::client::print_json;
use super::connection::{remote, text, with_admin};
use super::table;
use crate::cli::InviteCommand;

#[derive(Debug, Serialize)]
struct InviteView {
    id: i64,
    kind: String,
    inviter: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    group: Option<String>,
    status: String,
    max_uses: u32,
    uses: u32,
    used_by: Vec<String>,
    created_at: i64,
    expires_at: i64,
    revoked_at: Option<i64>,
}

fn view(i: invite::Reader<'_>) -> anyhow::Result<InviteView> {
    let mut used_by = Vec::new();
    for u in i.get_used_by().map_err(remote)? {
        used_by.push(text(u)?);
    }
    Ok(InviteView {
        id: i.get_id(),
        kind: text(i.get_kind())?,
        inviter: Some(text(i.get_inviter())?).filter(|s| !s.is_empty()),
        group: Some(text(i.get_group())?).filter(|s| !s.is_empty()),
        status: text(i.get_status())?,
        max_uses: i.get_max_uses(),
        uses: i.get_uses(),
        used_by,
        created_at: i.get_created_at(),
        expires_at: i.get_expires_at(),
        revoked_at: Some(i.get_revoked_at()).filter(|t| *t != 0),
    })
}

pub(crate) fn run(config: &Config, cmd: &InviteCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        InviteCommand::Create {
            inviter,
            group,
            expires,
            uses,
        } => create(
            config,
            inviter.as_deref(),
            group.as_deref(),
            *expires,
            *uses,
        ),
        InviteCommand::List { output } => list(config, output.json),
        InviteCommand::Revoke { id } => {
            let id = *id;
            with_admin(config, |admin: admin::Client| async move {
                let mut req = super::invites(&admin).revoke_request();
                req.get().set_id(id);
                req.send().promise.await.map_err(remote)?;
                Ok(())
            })?;
            println!("Invite {id} is revoked: its link no longer works.");
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn create(
    config: &Config,
    inviter: Option<&str>,
    group: Option<&str>,
    expires: u64,
    uses: u32,
) -> anyhow::Result<ExitCode> {
    let who = inviter.unwrap_or("").to_owned();
    let room = group.unwrap_or("").to_owned();
    let (v, link, uri) = with_admin(config, |admin: admin::Client| async move {
        let mut req = super::invites(&admin).create_request();
        req.get().set_inviter(who.as_str());
        req.get().set_expires_secs(expires as i64);
        req.get().set_uses(uses);
        req.get().set_group(room.as_str());
        let r = req.send().promise.await.map_err(remote)?;
        let r = r.get().map_err(remote)?;
        Ok((
            view(r.get_invite().map_err(remote)?)?,
            text(r.get_link())?,
            text(r.get_uri())?,
        ))
    })?;
    match (&v.inviter, &v.group) {
        (Some(u), Some(g)) => println!(
            "Invite {} to {u}'s group chat {g}: whoever opens it gets an account, becomes a \
             member of {g} and the contact of its members.",
            v.id
        ),
        (Some(u), None) => println!(
            "Invite {} from {u}: whoever opens it gets an account and {u} as a contact.",
            v.id
        ),
        (None, _) => println!("Invite {}: whoever opens it gets an account.", v.id),
    }
    println!("Send this link (shown once; only its hash is kept):\n");
    println!("    {link}\n");
    println!(
        "It works {} until {} (UTC). The page shows the apps to install and a QR code of:\n",
        match v.max_uses {
            1 => "once".to_owned(),
            n => format!("{n} times"),
        },
        table::time(v.expires_at)
    );
    println!("    {uri}");
    Ok(ExitCode::SUCCESS)
}

fn list(config: &Config, json: bool) -> anyhow::Result<ExitCode> {
    let list = with_admin(config, |admin: admin::Client| async move {
        let r = super::invites(&admin)
            .list_request()
            .send()
            .promise
            .await
            .map_err(remote)?;
        let mut out = Vec::new();
        for i in r.get().map_err(remote)?.get_invites().map_err(remote)? {
            out.push(view(i)?);
        }
        Ok(out)
    })?;
    if json {
        print_json(&list)?;
        return Ok(ExitCode::SUCCESS);
    }
    table::print(
        &[
            "ID", "KIND", "FROM", "STATUS", "USES", "USED BY", "EXPIRES", "CREATED",
        ],
        &list
            .iter()
            .map(|i| {
                vec![
                    i.id.to_string(),
                    match &i.group {
                        Some(g) => format!("{} ({g})", i.kind),
                        None => i.kind.clone(),
                    },
                    i.inviter.clone().unwrap_or_else(|| "-".to_owned()),
                    i.status.clone(),
                    format!("{}/{}", i.uses, i.max_uses),
                    match i.used_by.is_empty() {
                        true => "-".to_owned(),
                        false => i.used_by.join(" "),
                    },
                    table::time(i.expires_at),
                    table::time(i.created_at),
                ]
            })
            .collect::<Vec<_>>(),
    );
    Ok(ExitCode::SUCCESS)
}
