//! The admin commands: each makes one call on the daemon and prints the
//! answer.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::process::ExitCode;

use anyhow::{Context, bail};
use granary_config::Config;
use granary_schema::admin_capnp::admin;
use serde::Serialize;

use super::connection::{NotRunning, remote, text, with_admin};
use super::table;
use crate::cli::{AppPasswordCommand, Output, UserCommand};

/// Exit status of `granary status` when no daemon runs (as LSB init scripts do).
const EXIT_NOT_RUNNING: u8 = 3;

#[derive(Debug, Serialize)]
struct StatusView {
    healthy: bool,
    version: String,
    schema_version: u32,
    pid: u32,
    uptime_seconds: u64,
    data_dir: String,
    domain: String,
    storage_backend: String,
    sandbox: String,
    ca_file: Option<String>,
    listeners: BTreeMap<String, String>,
    counts: CountsView,
    logins: LoginsView,
    /// The ACME certificate; absent without `tls.acme`.
    #[serde(skip_serializing_if = "Option::is_none")]
    acme: Option<super::certificates::AcmeView>,
    /// This node's place in a cluster; absent on a node on its own.
    #[serde(skip_serializing_if = "Option::is_none")]
    cluster: Option<ClusterView>,
}

#[derive(Debug, Serialize)]
struct ClusterView {
    node: String,
    lease: String,
    lease_ttl_secs: u32,
    since_renewal_ms: u64,
    etcd: Vec<String>,
    replicate_interval_secs: u32,
    /// Grains whose newest copy elsewhere is over 3 intervals old.
    replication_lagging: Vec<String>,
    nodes: Vec<NodeHealthView>,
}

#[derive(Debug, Serialize)]
struct NodeHealthView {
    name: String,
    state: String,
    lease_age_secs: Option<i64>,
    grains: u32,
    free_bytes: u64,
}

/// The gateway's failed-login limiter.
#[derive(Debug, Serialize)]
struct LoginsView {
    /// Addresses and ranges with recent failures, or refused in the last
    /// day.
    sources: u64,
    /// How many are refused now; `refused` lists the longest 100.
    refused_count: u64,
    refused: Vec<RefusedView>,
}

#[derive(Debug, Serialize)]
struct RefusedView {
    source: String,
    for_secs: u64,
    strikes: u32,
}

#[derive(Debug, Serialize)]
struct CountsView {
    users: u64,
    app_passwords: u64,
    apps: u64,
    grains: u64,
    grants: u64,
}

#[derive(Debug, Serialize)]
struct UserView {
    name: String,
    created_at: i64,
    app_passwords: u32,
    /// Unix seconds; absent while enabled.
    #[serde(skip_serializing_if = "Option::is_none")]
    disabled_at: Option<i64>,
}

#[derive(Debug, Serialize)]
struct AppPasswordView {
    id: i64,
    user: String,
    kind: String,
    label: String,
    created_at: i64,
    last_used_at: Option<i64>,
}

fn user_view(u: granary_schema::admin_capnp::user::Reader<'_>) -> anyhow::Result<UserView> {
    Ok(UserView {
        name: text(u.get_name())?,
        created_at: u.get_created_at(),
        app_passwords: u.get_app_passwords(),
        disabled_at: Some(u.get_disabled_at()).filter(|&t| t != 0),
    })
}

fn app_password_view(
    p: granary_schema::admin_capnp::app_password::Reader<'_>,
) -> anyhow::Result<AppPasswordView> {
    Ok(AppPasswordView {
        id: p.get_id(),
        user: text(p.get_user())?,
        kind: text(p.get_kind())?,
        label: text(p.get_label())?,
        created_at: p.get_created_at(),
        last_used_at: Some(p.get_last_used_at()).filter(|t| *t != 0),
    })
}

pub(crate) fn print_json(value: &impl Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

pub(crate) fn status(config: &Config, output: Output) -> anyhow::Result<ExitCode> {
    let result = with_admin(config, |admin: admin::Client| async move {
        let response = admin
            .status_request()
            .send()
            .promise
            .await
            .map_err(remote)?;
        let s = response
            .get()
            .map_err(remote)?
            .get_status()
            .map_err(remote)?;
        let mut listeners = BTreeMap::new();
        for l in s.get_listeners().map_err(remote)? {
            listeners.insert(text(l.get_name())?, text(l.get_address())?);
        }
        let mut refused = Vec::new();
        for r in s.get_refused_sources().map_err(remote)? {
            refused.push(RefusedView {
                source: text(r.get_source())?,
                for_secs: r.get_for_secs(),
                strikes: r.get_strikes(),
            });
        }
        let cluster = match s.has_cluster() {
            true => {
                let c = s.get_cluster().map_err(remote)?;
                let mut etcd = Vec::new();
                for e in c.get_etcd().map_err(remote)? {
                    etcd.push(text(e)?);
                }
                let mut replication_lagging = Vec::new();
                for l in c.get_replication_lagging().map_err(remote)? {
                    replication_lagging.push(text(l)?);
                }
                let mut nodes = Vec::new();
                for n in c.get_nodes().map_err(remote)? {
                    nodes.push(NodeHealthView {
                        name: text(n.get_name())?,
                        state: text(n.get_state())?,
                        lease_age_secs: Some(n.get_lease_age_secs()).filter(|&a| a >= 0),
                        grains: n.get_grains(),
                        free_bytes: n.get_free_bytes(),
                    });
                }
                Some(ClusterView {
                    node: text(c.get_node())?,
                    lease: text(c.get_lease())?,
                    lease_ttl_secs: c.get_lease_ttl_secs(),
                    since_renewal_ms: c.get_since_renewal_ms(),
                    etcd,
                    replicate_interval_secs: c.get_replicate_interval_secs(),
                    replication_lagging,
                    nodes,
                })
            }
            false => None,
        };
        let acme = super::certificates::acme(&admin).await?;
        Ok(StatusView {
            acme,
            cluster,
            healthy: s.get_healthy(),
            version: text(s.get_version())?,
            schema_version: s.get_schema_version(),
            pid: s.get_pid(),
            uptime_seconds: s.get_uptime_seconds(),
            data_dir: text(s.get_data_dir())?,
            domain: text(s.get_domain())?,
            storage_backend: text(s.get_storage_backend())?,
            sandbox: text(s.get_sandbox())?,
            ca_file: Some(text(s.get_ca_file())?).filter(|f| !f.is_empty()),
            listeners,
            counts: CountsView {
                users: s.get_users(),
                app_passwords: s.get_app_passwords(),
                apps: s.get_apps(),
                grains: s.get_grains(),
                grants: s.get_grants(),
            },
            logins: LoginsView {
                sources: s.get_login_sources(),
                refused_count: s.get_refused_count(),
                refused,
            },
        })
    });
    let view = match result {
        Ok(view) => view,
        Err(e) if e.downcast_ref::<NotRunning>().is_some() => {
            if output.json {
                println!("{{\"healthy\": false, \"running\": false}}");
            }
            eprintln!("granary: {e}");
            return Ok(ExitCode::from(EXIT_NOT_RUNNING));
        }
        Err(e) => return Err(e),
    };
    if output.json {
        print_json(&view)?;
    } else {
        let health = if view.healthy { "healthy" } else { "UNHEALTHY" };
        println!("granary {} is running: {health}", view.version);
        println!("  pid            {}", view.pid);
        println!("  uptime         {}s", view.uptime_seconds);
        println!("  data dir       {}", view.data_dir);
        println!("  domain         {}", view.domain);
        println!("  storage        {}", view.storage_backend);
        println!("  sandbox        {}", view.sandbox);
        println!("  state schema   v{}", view.schema_version);
        if let Some(ca) = &view.ca_file {
            println!("  CA certificate {ca}");
        }
        if let Some(a) = &view.acme {
            super::certificates::print_summary(a);
        }
        for (name, address) in &view.listeners {
            println!("  listen {name:<7} {address}");
        }
        if let Some(c) = &view.cluster {
            println!(
                "  cluster        node {}, lease {} (renewed {:.1}s ago, TTL {}s), etcd {}",
                c.node,
                c.lease,
                c.since_renewal_ms as f64 / 1000.0,
                c.lease_ttl_secs,
                c.etcd.join(" ")
            );
            let nodes: Vec<String> = c
                .nodes
                .iter()
                .map(|n| format!("{} {}", n.name, n.state))
                .collect();
            match nodes.is_empty() {
                true => println!("  nodes          etcd did not answer within 2 s"),
                false => println!("  nodes          {}", nodes.join(", ")),
            }
            if !c.replication_lagging.is_empty() {
                println!(
                    "  REPLICATION    behind by over 3 intervals ({}s): {}",
                    3 * c.replicate_interval_secs,
                    c.replication_lagging.join(", ")
                );
            }
        }
        let c = &view.counts;
        println!(
            "  counts         {} users, {} app passwords, {} apps, {} grains, {} grants",
            c.users, c.app_passwords, c.apps, c.grains, c.grants
        );
        let l = &view.logins;
        match l.refused_count {
            0 => println!(
                "  logins         no source refused ({} remembered for recent failures)",
                l.sources
            ),
            n => {
                println!(
                    "  logins         {n} source(s) refused for failed logins ({} remembered):",
                    l.sources
                );
                for r in l.refused.iter().take(10) {
                    println!(
                        "                   {} for {}s more (refused {} time(s) in a row)",
                        r.source, r.for_secs, r.strikes
                    );
                }
                if n > 10 {
                    println!(
                        "                   ... and {} more (granary status --json lists 100)",
                        n - 10
                    );
                }
            }
        }
    }
    Ok(if view.healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Reads one line from standard input (a password), without its line end.
pub(crate) fn read_secret_line() -> anyhow::Result<String> {
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .context("cannot read the password from standard input")?;
    let line = line.trim_end_matches(['\n', '\r']).to_owned();
    if line.is_empty() {
        bail!("no password on standard input");
    }
    Ok(line)
}

/// A generated secret on a line of its own on standard output (what a
/// script reads), the note about it first, on standard error, so the two
/// never run together on a terminal.
fn print_generated(password: &str) {
    if !password.is_empty() {
        eprintln!("The password below is shown once: Granary keeps only its hash.");
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "password: {password}");
        let _ = out.flush();
    }
}

pub(crate) fn user(config: &Config, cmd: &UserCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        UserCommand::Add {
            name,
            password_stdin,
            output,
        } => {
            let password = if *password_stdin {
                read_secret_line()?
            } else {
                String::new()
            };
            let (user, generated) = with_admin(config, |admin: admin::Client| async move {
                let mut req = super::users(&admin).add_request();
                req.get().set_name(name.as_str());
                req.get().set_password(password.as_str());
                let response = req.send().promise.await.map_err(remote)?;
                let r = response.get().map_err(remote)?;
                Ok((
                    user_view(r.get_user().map_err(remote)?)?,
                    text(r.get_generated_password())?,
                ))
            })?;
            if output.json {
                #[derive(Serialize)]
                struct Added<'a> {
                    user: &'a UserView,
                    password: Option<&'a str>,
                }
                print_json(&Added {
                    user: &user,
                    password: Some(generated.as_str()).filter(|p| !p.is_empty()),
                })?;
            } else {
                println!("added user {}", user.name);
                print_generated(&generated);
            }
        }
        UserCommand::List { output } => {
            let users = with_admin(config, |admin: admin::Client| async move {
                let response = super::users(&admin)
                    .list_request()
                    .send()
                    .promise
                    .await
                    .map_err(remote)?;
                let list = response
                    .get()
                    .map_err(remote)?
                    .get_users()
                    .map_err(remote)?;
                list.iter()
                    .map(user_view)
                    .collect::<anyhow::Result<Vec<_>>>()
            })?;
            if output.json {
                print_json(&users)?;
            } else {
                let rows: Vec<Vec<String>> = users
                    .iter()
                    .map(|u| {
                        vec![
                            u.name.clone(),
                            table::time(u.created_at),
                            u.app_passwords.to_string(),
                            u.disabled_at
                                .map(|t| format!("disabled {}", table::time(t)))
                                .unwrap_or_else(|| "enabled".to_owned()),
                        ]
                    })
                    .collect();
                table::print(&["NAME", "CREATED (UTC)", "APP PASSWORDS", "STATE"], &rows);
            }
        }
        UserCommand::Remove { name, purge } => {
            with_admin(config, |admin: admin::Client| async move {
                let mut req = super::users(&admin).remove_request();
                req.get().set_name(name.as_str());
                req.get().set_purge(*purge);
                req.send().promise.await.map_err(remote)?;
                Ok(())
            })?;
            println!("removed user {name}");
        }
        UserCommand::Disable { name } | UserCommand::Enable { name } => {
            let disable = matches!(cmd, UserCommand::Disable { .. });
            let (changed, stopped) = with_admin(config, |admin: admin::Client| async move {
                let mut req = super::users(&admin).set_disabled_request();
                req.get().set_name(name.as_str());
                req.get().set_disabled(disable);
                let response = req.send().promise.await.map_err(remote)?;
                let r = response.get().map_err(remote)?;
                Ok((r.get_changed(), r.get_stopped_grains()))
            })?;
            let state = if disable { "disabled" } else { "enabled" };
            if !changed {
                println!("{name} was already {state}");
            } else if stopped > 0 {
                println!("{state} {name}; stopped their {stopped} running grain(s)");
            } else {
                println!("{state} {name}");
            }
        }
        UserCommand::Passwd {
            name,
            password_stdin,
        } => {
            let password = if *password_stdin {
                read_secret_line()?
            } else {
                String::new()
            };
            let generated = with_admin(config, |admin: admin::Client| async move {
                let mut req = super::users(&admin).set_password_request();
                req.get().set_name(name.as_str());
                req.get().set_password(password.as_str());
                let response = req.send().promise.await.map_err(remote)?;
                text(response.get().map_err(remote)?.get_generated_password())
            })?;
            println!("changed the password of {name}");
            print_generated(&generated);
        }
        UserCommand::CheckPassword { name, kind } => {
            let password = read_secret_line()?;
            let valid = with_admin(config, |admin: admin::Client| async move {
                let mut req = super::users(&admin).check_password_request();
                req.get().set_name(name.as_str());
                req.get().set_kind(kind.as_deref().unwrap_or(""));
                req.get().set_password(password.as_str());
                let response = req.send().promise.await.map_err(remote)?;
                Ok(response.get().map_err(remote)?.get_valid())
            })?;
            println!("{}", if valid { "valid" } else { "not valid" });
            return Ok(if valid {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn app_password(config: &Config, cmd: &AppPasswordCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        AppPasswordCommand::Add {
            user,
            kind,
            label,
            output,
        } => {
            let (record, password) = with_admin(config, |admin: admin::Client| async move {
                let mut req = super::users(&admin).add_app_password_request();
                req.get().set_user(user.as_str());
                req.get().set_kind(kind.as_str());
                req.get().set_label(label.as_str());
                let response = req.send().promise.await.map_err(remote)?;
                let r = response.get().map_err(remote)?;
                Ok((
                    app_password_view(r.get_app_password().map_err(remote)?)?,
                    text(r.get_password())?,
                ))
            })?;
            if output.json {
                #[derive(Serialize)]
                struct Added<'a> {
                    app_password: &'a AppPasswordView,
                    password: &'a str,
                }
                print_json(&Added {
                    app_password: &record,
                    password: &password,
                })?;
            } else {
                println!(
                    "app password {} for {} ({}){}",
                    record.id,
                    record.user,
                    record.kind,
                    if record.label.is_empty() {
                        String::new()
                    } else {
                        format!(" \"{}\"", record.label)
                    }
                );
                print_generated(&password);
            }
        }
        AppPasswordCommand::List { user, kind, output } => {
            let list = with_admin(config, |admin: admin::Client| async move {
                let mut req = super::users(&admin).list_app_passwords_request();
                req.get().set_user(user.as_str());
                req.get().set_kind(kind.as_deref().unwrap_or(""));
                let response = req.send().promise.await.map_err(remote)?;
                let list = response
                    .get()
                    .map_err(remote)?
                    .get_app_passwords()
                    .map_err(remote)?;
                list.iter()
                    .map(app_password_view)
                    .collect::<anyhow::Result<Vec<_>>>()
            })?;
            if output.json {
                print_json(&list)?;
            } else {
                let rows: Vec<Vec<String>> = list
                    .iter()
                    .map(|p| {
                        vec![
                            p.id.to_string(),
                            p.kind.clone(),
                            table::time(p.created_at),
                            table::time(p.last_used_at.unwrap_or(0)),
                            p.label.clone(),
                        ]
                    })
                    .collect();
                table::print(
                    &["ID", "KIND", "CREATED (UTC)", "LAST USED", "LABEL"],
                    &rows,
                );
            }
        }
        AppPasswordCommand::Revoke { user, id, kind } => {
            let revoked = with_admin(config, |admin: admin::Client| async move {
                let mut req = super::users(&admin).revoke_app_passwords_request();
                req.get().set_user(user.as_str());
                let mut selector = req.get().init_selector();
                match (id, kind) {
                    (Some(id), _) => selector.set_id(*id),
                    (None, Some(kind)) => selector.set_kind(kind.as_str()),
                    (None, None) => unreachable!("clap requires --id or --kind"),
                }
                let response = req.send().promise.await.map_err(remote)?;
                Ok(response.get().map_err(remote)?.get_revoked())
            })?;
            println!("revoked {revoked} app password(s) of {user}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
