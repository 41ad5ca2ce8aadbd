//! `granary snapshot`: the CLI side.

use std::process::ExitCode;

use granary_config::Config;
use granary_schema::admin_capnp::admin;
use serde::Serialize;

use super::client::print_json;
use super::connection::{remote, text, texts, with_admin};
use super::table;
use crate::cli::SnapshotCommand;

pub(crate) fn snapshot(config: &Config, cmd: &SnapshotCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        SnapshotCommand::List { grain, output } => {
            #[derive(Serialize)]
            struct SnapshotView {
                name: String,
                created_at: i64,
            }
            let snaps = with_admin(config, |admin: admin::Client| async move {
                let mut req = super::snapshots(&admin).list_request();
                req.get().set_grain(grain.as_str());
                let response = req.send().promise.await.map_err(remote)?;
                let list = response
                    .get()
                    .map_err(remote)?
                    .get_snapshots()
                    .map_err(remote)?;
                list.iter()
                    .map(|s| {
                        Ok(SnapshotView {
                            name: text(s.get_name())?,
                            created_at: s.get_created_at(),
                        })
                    })
                    .collect::<anyhow::Result<Vec<_>>>()
            })?;
            if output.json {
                print_json(&snaps)?;
            } else {
                let rows: Vec<Vec<String>> = snaps
                    .iter()
                    .map(|s| vec![s.name.clone(), table::time(s.created_at)])
                    .collect();
                table::print(&["SNAPSHOT", "CREATED (UTC)"], &rows);
            }
        }
        SnapshotCommand::Create { grain, label } => {
            let (name, report, frozen) = with_admin(config, |admin: admin::Client| async move {
                let mut req = super::snapshots(&admin).create_request();
                req.get().set_grain(grain.as_str());
                req.get().set_label(label.as_deref().unwrap_or(""));
                let response = req.send().promise.await.map_err(remote)?;
                let r = response.get().map_err(remote)?;
                Ok((
                    text(r.get_name())?,
                    text(r.get_report())?,
                    r.get_frozen_micros(),
                ))
            })?;
            println!("snapshot {name}");
            if !report.is_empty() {
                println!("  checkpoint: {report}");
            }
            if frozen > 0 {
                println!("  grain frozen for {:.1} ms", frozen as f64 / 1000.0);
            }
        }
        SnapshotCommand::Rollback { grain, snapshot } => {
            let restarted = with_admin(config, |admin: admin::Client| async move {
                let mut req = super::snapshots(&admin).rollback_request();
                req.get().set_grain(grain.as_str());
                req.get().set_name(snapshot.as_str());
                let response = req.send().promise.await.map_err(remote)?;
                Ok(response.get().map_err(remote)?.get_restarted())
            })?;
            println!(
                "rolled {grain} back to {snapshot}{}",
                if restarted {
                    "; it is running again"
                } else {
                    ""
                }
            );
        }
        SnapshotCommand::Prune { grain } => {
            let deleted = with_admin(config, |admin: admin::Client| async move {
                let mut req = super::snapshots(&admin).prune_request();
                req.get().set_grain(grain.as_str());
                let response = req.send().promise.await.map_err(remote)?;
                texts(response.get().map_err(remote)?.get_deleted())
            })?;
            println!("pruned {} snapshot(s) of {grain}", deleted.len());
            for d in deleted {
                println!("  {d}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
