//! `granary xmpp`: the CLI side.

use std::process::ExitCode;

use granary_config::Config;
use granary_schema::admin_capnp::admin;
use serde::Serialize;

use super::client::print_json;
use super::connection::{remote, text, texts, with_admin};
use crate::cli::XmppCommand;

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
    }
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
