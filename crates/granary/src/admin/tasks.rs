//! `granary tasks`: the CLI side (client ids for Taskwarrior 3,
//! certificates for Taskwarrior 2.6).

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use granary_config::Config;
use granary_schema::admin_capnp::{admin, task_cert, task_client};
use serde::Serialize;

use super::client::print_json;
use super::connection::{remote, text, with_admin};
use super::table;
use crate::cli::{TasksClientCommand, TasksCommand};

#[derive(Debug, Serialize)]
struct ClientView {
    id: i64,
    user: String,
    label: String,
    created_at: i64,
    last_used_at: Option<i64>,
}

#[derive(Debug, Serialize)]
struct CertView {
    id: i64,
    user: String,
    label: String,
    key: String,
    expires_at: i64,
    created_at: i64,
}

fn client_view(c: task_client::Reader<'_>) -> anyhow::Result<ClientView> {
    Ok(ClientView {
        id: c.get_id(),
        user: text(c.get_user())?,
        label: text(c.get_label())?,
        created_at: c.get_created_at(),
        last_used_at: Some(c.get_last_used_at()).filter(|t| *t != 0),
    })
}

fn cert_view(c: task_cert::Reader<'_>) -> anyhow::Result<CertView> {
    Ok(CertView {
        id: c.get_id(),
        user: text(c.get_user())?,
        label: text(c.get_label())?,
        key: text(c.get_key())?,
        expires_at: c.get_expires_at(),
        created_at: c.get_created_at(),
    })
}

pub(crate) fn run(config: &Config, cmd: &TasksCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        TasksCommand::Client(TasksClientCommand::Add { user, label }) => {
            add_client(config, user, label)
        }
        TasksCommand::Client(TasksClientCommand::List { user, output }) => {
            clients(config, user.as_deref(), output.json)
        }
        TasksCommand::Client(TasksClientCommand::Revoke { user, id }) => {
            let (u, id) = (user.clone(), *id);
            with_admin(config, |admin: admin::Client| async move {
                let mut req = super::tasks(&admin).revoke_client_request();
                req.get().set_user(u.as_str());
                req.get().set_id(id);
                req.send().promise.await.map_err(remote)?;
                Ok(())
            })?;
            println!("Client id {id} of {user} is revoked: its clients are refused from now on.");
            Ok(ExitCode::SUCCESS)
        }
        TasksCommand::Cert { user, out, label } => cert(config, user, out, label),
        TasksCommand::Certs { user, output } => certs(config, user.as_deref(), output.json),
        TasksCommand::RevokeCert { user, id } => {
            let (u, id) = (user.clone(), *id);
            with_admin(config, |admin: admin::Client| async move {
                let mut req = super::tasks(&admin).revoke_cert_request();
                req.get().set_user(u.as_str());
                req.get().set_id(id);
                req.send().promise.await.map_err(remote)?;
                Ok(())
            })?;
            println!("Certificate {id} of {user} is revoked: taskd refuses it from now on.");
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn add_client(config: &Config, user: &str, label: &str) -> anyhow::Result<ExitCode> {
    let (u, l) = (user.to_owned(), label.to_owned());
    let (view, id, url) = with_admin(config, |admin: admin::Client| async move {
        let mut req = super::tasks(&admin).add_client_request();
        req.get().set_user(u.as_str());
        req.get().set_label(l.as_str());
        let r = req.send().promise.await.map_err(remote)?;
        let r = r.get().map_err(remote)?;
        Ok((
            client_view(r.get_client().map_err(remote)?)?,
            text(r.get_client_id())?,
            text(r.get_url())?,
        ))
    })?;
    println!(
        "Client id {} for {} (shown once; only its hash is kept):\n",
        view.id, view.user
    );
    println!("    task config sync.server.url {url}");
    println!("    task config sync.server.client_id {id}");
    println!();
    println!(
        "Then set sync.encryption_secret to a secret of your own (the server never sees it or \
         your tasks): `task config sync.encryption_secret \"$(openssl rand -hex 32)\"`. Every \
         replica of this task list uses the same client id and the same secret; run `task sync` \
         on each."
    );
    Ok(ExitCode::SUCCESS)
}

fn clients(config: &Config, user: Option<&str>, json: bool) -> anyhow::Result<ExitCode> {
    let u = user.unwrap_or("").to_owned();
    let list = with_admin(config, |admin: admin::Client| async move {
        let mut req = super::tasks(&admin).clients_request();
        req.get().set_user(u.as_str());
        let r = req.send().promise.await.map_err(remote)?;
        let mut out = Vec::new();
        for c in r.get().map_err(remote)?.get_clients().map_err(remote)? {
            out.push(client_view(c)?);
        }
        Ok(out)
    })?;
    if json {
        print_json(&list)?;
    } else {
        table::print(
            &["ID", "USER", "LABEL", "CREATED", "LAST USED"],
            &list
                .iter()
                .map(|c| {
                    vec![
                        c.id.to_string(),
                        c.user.clone(),
                        c.label.clone(),
                        table::time(c.created_at),
                        c.last_used_at.map_or("never".to_owned(), table::time),
                    ]
                })
                .collect::<Vec<_>>(),
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn certs(config: &Config, user: Option<&str>, json: bool) -> anyhow::Result<ExitCode> {
    let u = user.unwrap_or("").to_owned();
    let list = with_admin(config, |admin: admin::Client| async move {
        let mut req = super::tasks(&admin).certs_request();
        req.get().set_user(u.as_str());
        let r = req.send().promise.await.map_err(remote)?;
        let mut out = Vec::new();
        for c in r.get().map_err(remote)?.get_certs().map_err(remote)? {
            out.push(cert_view(c)?);
        }
        Ok(out)
    })?;
    if json {
        print_json(&list)?;
    } else {
        table::print(
            &["ID", "USER", "LABEL", "KEY", "EXPIRES", "CREATED"],
            &list
                .iter()
                .map(|c| {
                    vec![
                        c.id.to_string(),
                        c.user.clone(),
                        c.label.clone(),
                        c.key.clone(),
                        table::time(c.expires_at),
                        table::time(c.created_at),
                    ]
                })
                .collect::<Vec<_>>(),
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes `contents` to `path`, refusing to overwrite (a key is never
/// replaced silently), with `mode`.
fn write_new(path: &Path, contents: &str, mode: u32) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(contents.as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

fn cert(config: &Config, user: &str, out: &Path, label: &str) -> anyhow::Result<ExitCode> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let key_path = out.join(format!("{user}.key.pem"));
    let cert_path = out.join(format!("{user}.cert.pem"));
    let ca_path = out.join("ca.cert.pem");
    let rc_path = out.join("taskrc");
    for p in [&key_path, &cert_path, &ca_path, &rc_path] {
        anyhow::ensure!(
            !p.exists(),
            "{} exists already; choose another --out directory",
            p.display()
        );
    }
    let (u, l) = (user.to_owned(), label.to_owned());
    let (view, key_pem, cert_pem, ca_pem, server, credentials) =
        with_admin(config, |admin: admin::Client| async move {
            let mut req = super::tasks(&admin).issue_cert_request();
            req.get().set_user(u.as_str());
            req.get().set_label(l.as_str());
            let r = req.send().promise.await.map_err(remote)?;
            let r = r.get().map_err(remote)?;
            Ok((
                cert_view(r.get_cert().map_err(remote)?)?,
                text(r.get_key_pem())?,
                text(r.get_cert_pem())?,
                text(r.get_ca_pem())?,
                text(r.get_server())?,
                text(r.get_credentials())?,
            ))
        })?;
    write_new(&key_path, &key_pem, 0o600)?;
    write_new(&cert_path, &cert_pem, 0o644)?;
    write_new(&ca_path, &ca_pem, 0o644)?;
    let abs = |p: &Path| {
        std::path::absolute(p)
            .unwrap_or_else(|_| p.to_path_buf())
            .display()
            .to_string()
    };
    let rc = format!(
        "taskd.server={server}\ntaskd.credentials={credentials}\ntaskd.certificate={}\n\
         taskd.key={}\ntaskd.ca={}\n",
        abs(&cert_path),
        abs(&key_path),
        abs(&ca_path)
    );
    write_new(&rc_path, &rc, 0o644)?;
    println!(
        "Certificate {} for {} (expires {}), written to {}.\n",
        view.id,
        view.user,
        table::time(view.expires_at),
        out.display()
    );
    println!(
        "Add these lines to the user's ~/.taskrc (also in {}):\n",
        rc_path.display()
    );
    for line in rc.lines() {
        println!("    {line}");
    }
    println!("\nThen `task sync init` once, and `task sync` from then on.");
    Ok(ExitCode::SUCCESS)
}
