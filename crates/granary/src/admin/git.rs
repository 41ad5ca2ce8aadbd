//! `granary git`, `granary ssh-key` and `granary blog`: the CLI side.

use std::process::ExitCode;

use anyhow::Context;
use granary_config::Config;
use granary_schema::admin_capnp::{self, admin};
use serde::Serialize;

use super::client::print_json;
use super::connection::{remote, text, texts, with_admin};
use super::table;
use crate::cli::{BlogCommand, BlogDomainCommand, GitCommand, SshKeyCommand};

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
        let mut req = super::git(&admin).repo_request();
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
                let mut req = super::users(&admin).add_ssh_key_request();
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
                let mut req = super::users(&admin).list_ssh_keys_request();
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
                let mut req = super::users(&admin).remove_ssh_key_request();
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
        let mut req = super::blog(&admin).domains_request();
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
