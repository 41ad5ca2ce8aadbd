//! `granary grant`: the CLI side.

use std::process::ExitCode;

use granary_config::Config;
use granary_schema::admin_capnp::{self, admin};
use serde::Serialize;

use super::client::print_json;
use super::connection::{remote, text, with_admin};
use super::{shown, table};
use crate::cli::GrantCommand;

#[derive(Debug, Serialize)]
struct GrantView {
    id: i64,
    from: String,
    to: String,
    capability: String,
    created_at: i64,
}

fn grant_view(g: admin_capnp::grant::Reader<'_>) -> anyhow::Result<GrantView> {
    Ok(GrantView {
        id: g.get_id(),
        from: text(g.get_from())?,
        to: text(g.get_to())?,
        capability: text(g.get_capability())?,
        created_at: g.get_created_at(),
    })
}

pub(crate) fn grant(config: &Config, cmd: &GrantCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        GrantCommand::Add {
            from,
            to,
            cap,
            output,
        } => {
            let g = with_admin(config, |admin: admin::Client| async move {
                let mut req = super::grants(&admin).add_request();
                req.get().set_from(from.as_str());
                req.get().set_to(to.as_str());
                req.get().set_capability(cap.as_str());
                let response = req.send().promise.await.map_err(remote)?;
                grant_view(
                    response
                        .get()
                        .map_err(remote)?
                        .get_grant()
                        .map_err(remote)?,
                )
            })?;
            if output.json {
                print_json(&g)?;
            } else {
                println!(
                    "grant {}: {} may use {} of {}",
                    g.id,
                    shown(&g.from),
                    g.capability,
                    shown(&g.to)
                );
            }
        }
        GrantCommand::List { output } => {
            let grants = with_admin(config, |admin: admin::Client| async move {
                let response = super::grants(&admin)
                    .list_request()
                    .send()
                    .promise
                    .await
                    .map_err(remote)?;
                let list = response
                    .get()
                    .map_err(remote)?
                    .get_grants()
                    .map_err(remote)?;
                list.iter()
                    .map(grant_view)
                    .collect::<anyhow::Result<Vec<_>>>()
            })?;
            if output.json {
                print_json(&grants)?;
            } else {
                let rows: Vec<Vec<String>> = grants
                    .iter()
                    .map(|g| {
                        vec![
                            g.id.to_string(),
                            shown(&g.from),
                            g.capability.clone(),
                            shown(&g.to),
                            table::time(g.created_at),
                        ]
                    })
                    .collect();
                table::print(&["ID", "FROM", "CAPABILITY", "TO", "CREATED (UTC)"], &rows);
            }
        }
        GrantCommand::Revoke { id } => {
            with_admin(config, |admin: admin::Client| async move {
                let mut req = super::grants(&admin).revoke_request();
                req.get().set_id(*id);
                req.send().promise.await.map_err(remote)?;
                Ok(())
            })?;
            println!("revoked grant {id}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
