//! `granary doctor`: what the daemon found checking this deployment.

use std::process::ExitCode;

use granary_config::Config;
use granary_schema::admin_capnp::admin;
use serde::Serialize;

use super::client::print_json;
use super::connection::{remote, text, with_admin};
use crate::cli::Output;

#[derive(Serialize)]
struct CheckView {
    area: String,
    name: String,
    level: String,
    detail: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    fix: String,
}

/// Exit status: 0 when nothing failed (warnings allowed), 1 otherwise.
pub(crate) fn run(config: &Config, output: Output) -> anyhow::Result<ExitCode> {
    let checks = with_admin(config, |admin: admin::Client| async move {
        let r = admin
            .doctor_request()
            .send()
            .promise
            .await
            .map_err(remote)?;
        r.get()
            .map_err(remote)?
            .get_checks()
            .map_err(remote)?
            .iter()
            .map(|c| {
                Ok(CheckView {
                    area: text(c.get_area())?,
                    name: text(c.get_name())?,
                    level: text(c.get_level())?,
                    detail: text(c.get_detail())?,
                    fix: text(c.get_fix())?,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()
    })?;
    let failed = checks.iter().filter(|c| c.level == "fail").count();
    let warned = checks.iter().filter(|c| c.level == "warn").count();
    if output.json {
        print_json(&checks)?;
    } else {
        let mut area = "";
        for c in &checks {
            if c.area != area {
                area = &c.area;
                println!("{area}:");
            }
            let mark = match c.level.as_str() {
                "ok" => "  ok  ",
                "warn" => "  WARN",
                _ => "  FAIL",
            };
            println!("{mark} {}: {}", c.name, c.detail);
            if !c.fix.is_empty() {
                println!("         fix: {}", c.fix);
            }
        }
        println!(
            "\n{} checks: {} failed, {} warnings",
            checks.len(),
            failed,
            warned
        );
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
