//! `granary app`: the CLI side.

use std::process::ExitCode;

use anyhow::Context;
use granary_config::Config;
use granary_schema::admin_capnp::{self, admin};
use serde::Serialize;

use super::client::print_json;
use super::connection::{remote, text, texts, with_admin};
use super::table;
use crate::cli::AppCommand;

#[derive(Debug, Serialize)]
struct AppView {
    kind: String,
    app_id: String,
    version: String,
    dev_mode: bool,
    installed_at: i64,
    services: Vec<String>,
    offers: Vec<String>,
    title: String,
    requests: Vec<String>,
    migrate: Vec<String>,
    idle_timeout_seconds: Option<u64>,
}

fn app_view(a: admin_capnp::app::Reader<'_>) -> anyhow::Result<AppView> {
    let m = a.get_manifest().map_err(remote)?;
    Ok(AppView {
        title: text(m.get_title())?,
        requests: texts(m.get_requests())?,
        migrate: texts(m.get_migrate())?,
        idle_timeout_seconds: Some(m.get_idle_timeout_seconds()).filter(|s| *s != 0),
        kind: text(a.get_kind())?,
        app_id: text(a.get_app_id())?,
        version: text(a.get_version())?,
        dev_mode: a.get_dev_mode(),
        installed_at: a.get_installed_at(),
        services: texts(a.get_services())?,
        offers: texts(a.get_offers())?,
    })
}

pub(crate) fn app(config: &Config, cmd: &AppCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        AppCommand::Install {
            path,
            replace,
            output,
        } => {
            let path = std::path::absolute(path)
                .with_context(|| format!("cannot resolve {}", path.display()))?;
            let (app, made) = with_admin(config, |admin: admin::Client| async move {
                let mut req = super::apps(&admin).install_request();
                req.get().set_path(path.to_string_lossy().as_ref());
                req.get().set_replace(*replace);
                let response = req.send().promise.await.map_err(remote)?;
                let r = response.get().map_err(remote)?;
                Ok((
                    app_view(r.get_app().map_err(remote)?)?,
                    r.get_grains_created(),
                ))
            })?;
            if output.json {
                print_json(&app)?;
            } else {
                if app.dev_mode {
                    eprintln!(
                        "warning: {} is UNSIGNED and was installed in development mode",
                        app.app_id
                    );
                }
                println!(
                    "installed {} {} as kind {} ({made} grain record(s) created)",
                    app.app_id, app.version, app.kind
                );
            }
        }
        AppCommand::List { output } => {
            let apps = with_admin(config, |admin: admin::Client| async move {
                let response = super::apps(&admin)
                    .list_request()
                    .send()
                    .promise
                    .await
                    .map_err(remote)?;
                let list = response.get().map_err(remote)?.get_apps().map_err(remote)?;
                list.iter()
                    .map(app_view)
                    .collect::<anyhow::Result<Vec<_>>>()
            })?;
            if output.json {
                print_json(&apps)?;
            } else {
                let rows: Vec<Vec<String>> = apps
                    .iter()
                    .map(|a| {
                        vec![
                            a.kind.clone(),
                            a.app_id.clone(),
                            a.version.clone(),
                            if a.dev_mode {
                                "unsigned (dev)"
                            } else {
                                "signed"
                            }
                            .to_owned(),
                            a.services.join(","),
                            a.offers.join(","),
                        ]
                    })
                    .collect();
                table::print(
                    &["KIND", "APP", "VERSION", "SOURCE", "SERVICES", "OFFERS"],
                    &rows,
                );
            }
        }
        AppCommand::Upgrade { file } => {
            let file = std::path::absolute(file)
                .with_context(|| format!("cannot resolve {}", file.display()))?;
            let (app, previous, restarted, error) =
                with_admin(config, |admin: admin::Client| async move {
                    let mut req = super::apps(&admin).upgrade_request();
                    req.get().set_path(file.to_string_lossy().as_ref());
                    let response = req.send().promise.await.map_err(remote)?;
                    let r = response.get().map_err(remote)?;
                    let error = r
                        .get_rolled_back()
                        .then(|| text(r.get_error()))
                        .transpose()?;
                    Ok((
                        app_view(r.get_app().map_err(remote)?)?,
                        text(r.get_previous_version())?,
                        r.get_restarted(),
                        error,
                    ))
                })?;
            if let Some(error) = error {
                eprintln!(
                    "error: the new version failed to start: {error}\nrolled back to {} {} ({restarted} grain(s) restarted)",
                    app.kind, app.version
                );
                return Ok(ExitCode::FAILURE);
            }
            println!(
                "upgraded {} from {previous} to {} ({restarted} grain(s) restarted)",
                app.kind, app.version
            );
        }
        AppCommand::Remove { kind, purge } => {
            with_admin(config, |admin: admin::Client| async move {
                let mut req = super::apps(&admin).remove_request();
                req.get().set_kind(kind.as_str());
                req.get().set_purge(*purge);
                req.send().promise.await.map_err(remote)?;
                Ok(())
            })?;
            println!("removed app {kind}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
