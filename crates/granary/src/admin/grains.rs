//! `granary app`, `granary grain` and `granary grant`: the CLI side.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use granary_config::Config;
use granary_schema::admin_capnp::{self, admin};
use granary_schema::stream_capnp::byte_stream;
use serde::Serialize;

use super::client::print_json;
use super::connection::{remote, text, with_admin};
use super::table;
use crate::cli::{
    AppCommand, BlogCommand, BlogDomainCommand, GitCommand, GrainCommand, GrantCommand,
    SnapshotCommand, SshKeyCommand,
};

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

fn texts(l: capnp::Result<capnp::text_list::Reader<'_>>) -> anyhow::Result<Vec<String>> {
    let l = l.map_err(remote)?;
    l.iter().map(text).collect()
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

#[derive(Debug, Serialize)]
struct GrainView {
    id: String,
    user: String,
    kind: String,
    host_uid: u32,
    state: String,
    reason: Option<String>,
    pid: Option<u32>,
    starts: u64,
    crashes: u64,
    last_exit: Option<String>,
    running_seconds: Option<u64>,
    connections: u32,
    calls_in_flight: u32,
    wake_locks: Vec<String>,
}

fn non_empty(s: String) -> Option<String> {
    Some(s).filter(|s| !s.is_empty())
}

fn grain_view(g: admin_capnp::grain_status::Reader<'_>) -> anyhow::Result<GrainView> {
    let running = g.get_pid() != 0;
    Ok(GrainView {
        id: text(g.get_id())?,
        user: text(g.get_user())?,
        kind: text(g.get_kind())?,
        host_uid: g.get_host_uid(),
        state: text(g.get_state())?,
        reason: non_empty(text(g.get_reason())?),
        pid: Some(g.get_pid()).filter(|p| *p != 0),
        starts: g.get_starts(),
        crashes: g.get_crashes(),
        last_exit: non_empty(text(g.get_last_exit())?),
        running_seconds: running.then_some(g.get_running_seconds()),
        connections: g.get_connections(),
        calls_in_flight: g.get_calls_in_flight(),
        wake_locks: texts(g.get_wake_locks())?,
    })
}

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

/// Grain ids are `<user>-<kind>`; show them as `user/kind`.
fn shown(id: &str) -> String {
    match id.rsplit_once('-') {
        Some((user, kind)) => format!("{user}/{kind}"),
        None => id.to_owned(),
    }
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
                let mut req = admin.install_app_request();
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
                let response = admin
                    .list_apps_request()
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
                    let mut req = admin.upgrade_app_request();
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
                let mut req = admin.remove_app_request();
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

fn print_status(g: &GrainView) {
    println!("{} ({})", shown(&g.id), g.id);
    println!("  state        {}", g.state);
    if let Some(r) = &g.reason {
        println!("  reason       {r}");
    }
    if let Some(pid) = g.pid {
        println!("  pid          {pid} (launcher)");
    }
    println!("  host uid     {}", g.host_uid);
    if let Some(s) = g.running_seconds {
        println!("  running for  {s} s");
    }
    println!("  starts       {}", g.starts);
    println!("  crashes      {}", g.crashes);
    if let Some(e) = &g.last_exit {
        println!("  last exit    {e}");
    }
    println!("  connections  {}", g.connections);
    println!("  calls        {} in flight", g.calls_in_flight);
    if g.wake_locks.is_empty() {
        println!("  wake locks   none");
    } else {
        println!("  wake locks   {}", g.wake_locks.join("; "));
    }
}

pub(crate) fn grain(config: &Config, cmd: &GrainCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        GrainCommand::List { output } => {
            let grains = with_admin(config, |admin: admin::Client| async move {
                let response = admin
                    .list_grains_request()
                    .send()
                    .promise
                    .await
                    .map_err(remote)?;
                let list = response
                    .get()
                    .map_err(remote)?
                    .get_grains()
                    .map_err(remote)?;
                list.iter()
                    .map(grain_view)
                    .collect::<anyhow::Result<Vec<_>>>()
            })?;
            if output.json {
                print_json(&grains)?;
            } else {
                let rows: Vec<Vec<String>> = grains
                    .iter()
                    .map(|g| {
                        vec![
                            shown(&g.id),
                            g.state.clone(),
                            g.pid.map_or_else(|| "-".to_owned(), |p| p.to_string()),
                            g.host_uid.to_string(),
                            g.starts.to_string(),
                            g.crashes.to_string(),
                            g.reason.clone().unwrap_or_default(),
                        ]
                    })
                    .collect();
                table::print(
                    &[
                        "GRAIN", "STATE", "PID", "HOST UID", "STARTS", "CRASHES", "NOTE",
                    ],
                    &rows,
                );
            }
        }
        GrainCommand::Start { grain } => {
            let g = with_admin(config, |admin: admin::Client| async move {
                let mut req = admin.start_grain_request();
                req.get().set_grain(grain.as_str());
                let response = req.send().promise.await.map_err(remote)?;
                grain_view(
                    response
                        .get()
                        .map_err(remote)?
                        .get_status()
                        .map_err(remote)?,
                )
            })?;
            println!("{} is {}", shown(&g.id), g.state);
        }
        GrainCommand::Stop { grain } => {
            let was = with_admin(config, |admin: admin::Client| async move {
                let mut req = admin.stop_grain_request();
                req.get().set_grain(grain.as_str());
                let response = req.send().promise.await.map_err(remote)?;
                Ok(response.get().map_err(remote)?.get_was_running())
            })?;
            if was {
                println!("stopped {grain}");
            } else {
                println!("{grain} was not running");
            }
        }
        GrainCommand::Status { grain, output } => {
            let g = with_admin(config, |admin: admin::Client| async move {
                let mut req = admin.grain_status_request();
                req.get().set_grain(grain.as_str());
                let response = req.send().promise.await.map_err(remote)?;
                grain_view(
                    response
                        .get()
                        .map_err(remote)?
                        .get_status()
                        .map_err(remote)?,
                )
            })?;
            if output.json {
                print_json(&g)?;
            } else {
                print_status(&g);
            }
        }
        GrainCommand::Logs { grain, bytes } => {
            let log = with_admin(config, |admin: admin::Client| async move {
                let mut req = admin.grain_logs_request();
                req.get().set_grain(grain.as_str());
                req.get().set_max_bytes(*bytes);
                let response = req.send().promise.await.map_err(remote)?;
                Ok(response
                    .get()
                    .map_err(remote)?
                    .get_log()
                    .map_err(remote)?
                    .to_vec())
            })?;
            std::io::stdout().write_all(&log)?;
        }
        GrainCommand::Connect {
            grain,
            service,
            user,
        } => connect(config, grain, service, user.as_deref())?,
    }
    Ok(ExitCode::SUCCESS)
}

/// What the grain sends, to standard output; says when the grain ended it.
struct Stdout {
    ended: std::cell::RefCell<Option<tokio::sync::oneshot::Sender<()>>>,
}

impl byte_stream::Server for Stdout {
    async fn write(
        self: capnp::capability::Rc<Self>,
        params: byte_stream::WriteParams,
        _: byte_stream::WriteResults,
    ) -> Result<(), capnp::Error> {
        let bytes = params.get()?.get_bytes()?;
        let mut out = std::io::stdout().lock();
        out.write_all(bytes)
            .and_then(|()| out.flush())
            .map_err(|e| capnp::Error::failed(format!("standard output: {e}")))
    }

    async fn end(
        self: capnp::capability::Rc<Self>,
        _: byte_stream::EndParams,
        _: byte_stream::EndResults,
    ) -> Result<(), capnp::Error> {
        if let Some(tx) = self.ended.borrow_mut().take() {
            let _ = tx.send(());
        }
        Ok(())
    }
}

fn connect(config: &Config, grain: &str, service: &str, user: Option<&str>) -> anyhow::Result<()> {
    with_admin(config, |admin: admin::Client| async move {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let stdout: byte_stream::Client = capnp_rpc::new_client(Stdout {
            ended: std::cell::RefCell::new(Some(tx)),
        });
        let mut req = admin.connect_grain_request();
        req.get().set_grain(grain);
        req.get().set_service(service);
        req.get().set_user(user.unwrap_or(""));
        req.get().set_client(stdout);
        let response = req.send().promise.await.map_err(remote)?;
        let upstream = response
            .get()
            .map_err(remote)?
            .get_upstream()
            .map_err(remote)?;
        // Standard input to the grain until it ends; the grain's answer to
        // standard output until the grain closes its side.
        let sending = granary_supervisor::handoff::pump_to(tokio::io::stdin(), upstream);
        let (sent, ended) = futures::join!(sending, rx);
        sent.map_err(remote)?;
        ended.context("the daemon dropped the connection")?;
        Ok(())
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
                let mut req = admin.add_grant_request();
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
                let response = admin
                    .list_grants_request()
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
                let mut req = admin.revoke_grant_request();
                req.get().set_id(*id);
                req.send().promise.await.map_err(remote)?;
                Ok(())
            })?;
            println!("revoked grant {id}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn snapshot(config: &Config, cmd: &SnapshotCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        SnapshotCommand::List { grain, output } => {
            #[derive(Serialize)]
            struct SnapshotView {
                name: String,
                created_at: i64,
            }
            let snaps = with_admin(config, |admin: admin::Client| async move {
                let mut req = admin.list_snapshots_request();
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
                let mut req = admin.create_snapshot_request();
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
                let mut req = admin.rollback_snapshot_request();
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
                let mut req = admin.prune_snapshots_request();
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

pub(crate) fn git(config: &Config, cmd: &GitCommand) -> anyhow::Result<ExitCode> {
    let (user, repo, create, visibility) = match cmd {
        GitCommand::Create { user, repo, public } => {
            (user, repo, true, if *public { "public" } else { "" })
        }
        GitCommand::Visibility {
            user,
            repo,
            visibility,
        } => (user, repo, false, visibility.as_str()),
    };
    let (public, created) = with_admin(config, |admin: admin::Client| async move {
        let mut req = admin.git_repo_request();
        req.get().set_user(user.as_str());
        req.get().set_repo(repo.as_str());
        req.get().set_create(create);
        req.get().set_visibility(visibility);
        let response = req.send().promise.await.map_err(remote)?;
        let r = response.get().map_err(remote)?;
        Ok((r.get_public(), r.get_created()))
    })?;
    let name = format!("{user}/{}.git", repo.trim_end_matches(".git"));
    if create {
        println!(
            "{name}: {}",
            if created { "created" } else { "already there" }
        );
    }
    println!(
        "{name} is {}",
        if public {
            "public: anyone may clone it; only its owner pushes"
        } else {
            "private: only its owner reads and pushes"
        }
    );
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Serialize)]
struct SshKeyView {
    id: i64,
    user: String,
    fingerprint: String,
    label: String,
    key: String,
    created_at: i64,
    last_used_at: i64,
}

fn ssh_key_view(k: admin_capnp::ssh_key::Reader<'_>) -> anyhow::Result<SshKeyView> {
    Ok(SshKeyView {
        id: k.get_id(),
        user: text(k.get_user())?,
        fingerprint: text(k.get_fingerprint())?,
        label: text(k.get_label())?,
        key: text(k.get_key())?,
        created_at: k.get_created_at(),
        last_used_at: k.get_last_used_at(),
    })
}

pub(crate) fn ssh_key(config: &Config, cmd: &SshKeyCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        SshKeyCommand::Add { user, file, label } => {
            let line = match file {
                Some(f) if f.as_os_str() != "-" => std::fs::read_to_string(f)
                    .with_context(|| format!("cannot read {}", f.display()))?,
                _ => std::io::read_to_string(std::io::stdin()).context("reading standard input")?,
            };
            let line = line
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("")
                .to_owned();
            let added = with_admin(config, |admin: admin::Client| async move {
                let mut req = admin.add_ssh_key_request();
                req.get().set_user(user.as_str());
                req.get().set_key(line.as_str());
                req.get().set_label(label.as_deref().unwrap_or(""));
                let response = req.send().promise.await.map_err(remote)?;
                ssh_key_view(response.get().map_err(remote)?.get_key().map_err(remote)?)
            })?;
            println!(
                "added SSH key {} ({}) for {} as id {}",
                added.fingerprint, added.label, added.user, added.id
            );
        }
        SshKeyCommand::List { user, output } => {
            let keys = with_admin(config, |admin: admin::Client| async move {
                let mut req = admin.list_ssh_keys_request();
                req.get().set_user(user.as_str());
                let response = req.send().promise.await.map_err(remote)?;
                let list = response.get().map_err(remote)?.get_keys().map_err(remote)?;
                list.iter()
                    .map(ssh_key_view)
                    .collect::<anyhow::Result<Vec<_>>>()
            })?;
            if output.json {
                print_json(&keys)?;
            } else {
                let rows: Vec<Vec<String>> = keys
                    .iter()
                    .map(|k| {
                        vec![
                            k.id.to_string(),
                            k.fingerprint.clone(),
                            k.label.clone(),
                            table::time(k.created_at),
                            if k.last_used_at == 0 {
                                "never".to_owned()
                            } else {
                                table::time(k.last_used_at)
                            },
                        ]
                    })
                    .collect();
                table::print(
                    &["ID", "FINGERPRINT", "LABEL", "ADDED (UTC)", "LAST USED"],
                    &rows,
                );
            }
        }
        SshKeyCommand::Remove { user, id } => {
            let removed = with_admin(config, |admin: admin::Client| async move {
                let mut req = admin.remove_ssh_key_request();
                req.get().set_user(user.as_str());
                req.get().set_id(*id);
                let response = req.send().promise.await.map_err(remote)?;
                Ok(response.get().map_err(remote)?.get_removed())
            })?;
            if !removed {
                anyhow::bail!("{user} has no SSH key {id}");
            }
            println!("removed SSH key {id} of {user}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn blog(config: &Config, cmd: &BlogCommand) -> anyhow::Result<ExitCode> {
    let BlogCommand::Domain(cmd) = cmd;
    let (user, add, remove) = match cmd {
        BlogDomainCommand::Add { user, domain } => (user, domain.as_str(), ""),
        BlogDomainCommand::Remove { user, domain } => (user, "", domain.as_str()),
        BlogDomainCommand::List { user } => (user, "", ""),
    };
    let domains = with_admin(config, |admin: admin::Client| async move {
        let mut req = admin.blog_domains_request();
        req.get().set_user(user.as_str());
        req.get().set_add(add);
        req.get().set_remove(remove);
        let response = req.send().promise.await.map_err(remote)?;
        texts(response.get().map_err(remote)?.get_domains())
    })?;
    if !add.is_empty() {
        let certs = config
            .tls_dir()
            .join("domains")
            .join(add.to_ascii_lowercase());
        println!(
            "{add} now serves {user}'s blog; put its certificate in {}/cert.pem and key.pem",
            certs.display()
        );
    }
    for d in &domains {
        println!("{d}");
    }
    Ok(ExitCode::SUCCESS)
}
