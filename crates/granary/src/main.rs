//! `granary`: the daemon and the admin CLI in one binary.
//!
//! This crate only wires the others together: it parses the command line,
//! resolves the configuration, and either runs the daemon ([`daemon`]) or
//! talks to a running one over its admin socket ([`admin`]).

mod admin;
mod cli;
mod daemon;
mod docs;
mod logging;
mod pack;
mod web;

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use granary_config::{Config, Environment};

use crate::cli::{Cli, Command, ConfigCommand};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            // One line: what failed, then why.
            eprintln!("granary: {}", format_chain(&e));
            ExitCode::FAILURE
        }
    }
}

fn format_chain(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let text = cause.to_string();
        // Skip a cause already spelled out by its context.
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
    }
    parts.join(": ")
}

fn environment(cli: &Cli) -> anyhow::Result<Environment> {
    Ok(Environment {
        cwd: std::env::current_dir().context("cannot read the current directory")?,
        data_dir: cli.home.clone(),
        log_level: std::env::var("GRANARY_LOG").ok(),
    })
}

/// The configuration for commands that act on a data dir: `--config`, or
/// the system one if it exists, or the built-in defaults.
fn load_config(cli: &Cli) -> anyhow::Result<Config> {
    let env = environment(cli)?;
    let system = Path::new("/etc/granary/granary.toml");
    let file = match &cli.config {
        Some(file) => Some(file.as_path()),
        None if cli.home.is_none() && system.exists() => Some(system),
        None => None,
    };
    Ok(Config::load(file, &env)?)
}

/// Refuses a grain uid range that overlaps this host's users, groups or
/// subordinate id ranges: grains must never share a uid with anything else.
fn check_uid_range(config: &Config) -> anyhow::Result<()> {
    granary_jail::uid_range_free_on_host(&config.uid_range).map_err(|e| {
        anyhow::anyhow!(granary_config::ConfigError {
            file: config.file.clone(),
            key: Some("jail.uid_range".to_owned()),
            reason: e.step,
        })
    })
}

/// `[packages]` as the package reader takes it.
pub(crate) fn package_limits(config: &Config) -> granary_package::Limits {
    granary_package::Limits {
        max_package_bytes: config.packages.max_package_bytes,
        max_unpacked_bytes: config.packages.max_unpacked_bytes,
        max_entries: config.packages.max_entries,
    }
}

/// The architectures whose app images this node unpacks and runs:
/// `[cluster].arches`, or the host's alone.
pub(crate) fn image_arches(config: &Config) -> Vec<&'static str> {
    let host = std::env::consts::ARCH;
    daemon::install::host_first(granary_model::ARCHES.into_iter().filter(
        |a| match &config.cluster {
            Some(c) => c.arches.iter().any(|n| n == a),
            None => *a == host,
        },
    ))
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match &cli.command {
        Command::Serve => {
            let config = load_config(&cli)?;
            daemon::run(config, daemon::Mode::Serve)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo => {
            let config = load_config(&cli)?;
            daemon::run(config, daemon::Mode::Demo)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { output } => {
            let config = load_config(&cli)?;
            admin::client::status(&config, *output)
        }
        Command::Doctor { output } => {
            let config = load_config(&cli)?;
            admin::doctor::run(&config, *output)
        }
        Command::User(cmd) => {
            let config = load_config(&cli)?;
            admin::client::user(&config, cmd)
        }
        Command::Cluster(cmd) => {
            let config = load_config(&cli)?;
            admin::cluster::cluster(&config, cmd)
        }
        Command::Node(cmd) => {
            let config = load_config(&cli)?;
            admin::cluster::node(&config, cmd)
        }
        Command::AppPassword(cmd) => {
            let config = load_config(&cli)?;
            admin::client::app_password(&config, cmd)
        }
        Command::App(cmd) => {
            let config = load_config(&cli)?;
            admin::apps::app(&config, cmd)
        }
        Command::Grain(cmd) => {
            let config = load_config(&cli)?;
            admin::grains::grain(&config, cmd)
        }
        Command::Pack(cmd) => {
            let limits = match load_config(&cli) {
                Ok(c) => package_limits(&c),
                Err(_) => granary_package::Limits::default(),
            };
            pack::run(cmd, &limits)
        }
        Command::Blog(cmd) => {
            let config = load_config(&cli)?;
            admin::git::blog(&config, cmd)
        }
        Command::Mail(cmd) => {
            let config = load_config(&cli)?;
            admin::mail::run(&config, cmd)
        }
        Command::Xmpp(cmd) => {
            let config = load_config(&cli)?;
            admin::xmpp::run(&config, cmd)
        }
        Command::Tasks(cmd) => {
            let config = load_config(&cli)?;
            admin::tasks::run(&config, cmd)
        }
        Command::Certificates(cmd) => {
            let config = load_config(&cli)?;
            admin::certificates::run(&config, cmd)
        }
        Command::Audit(args) => {
            let config = load_config(&cli)?;
            admin::certificates::audit(&config, args)
        }
        Command::Invite(cmd) => {
            let config = load_config(&cli)?;
            admin::invites::run(&config, cmd)
        }
        Command::SshKey(cmd) => {
            let config = load_config(&cli)?;
            admin::git::ssh_key(&config, cmd)
        }
        Command::Git(cmd) => {
            let config = load_config(&cli)?;
            admin::git::git(&config, cmd)
        }
        Command::Backup(cmd) => {
            let config = load_config(&cli)?;
            admin::backup::backup(&config, cmd)
        }
        Command::Restore {
            from,
            grain,
            identity,
            as_user,
            snapshot,
            trust,
            output,
        } => {
            let config = load_config(&cli)?;
            admin::backup::restore(
                &config,
                admin::backup::RestoreArgs {
                    from,
                    grain,
                    identity,
                    as_user: as_user.as_deref(),
                    snapshot: snapshot.as_deref(),
                    trust,
                    json: output.json,
                },
            )
        }
        Command::Snapshot(cmd) => {
            let config = load_config(&cli)?;
            admin::snapshots::snapshot(&config, cmd)
        }
        Command::Grant(cmd) => {
            let config = load_config(&cli)?;
            admin::grants::grant(&config, cmd)
        }
        Command::Config(ConfigCommand::Default) => {
            print!("{}", granary_config::DEFAULT_CONFIG_TOML);
            Ok(ExitCode::SUCCESS)
        }
        Command::Config(ConfigCommand::Check { file }) => {
            let config = Config::load(Some(file), &environment(&cli)?)?;
            logging::check_filter(&config)?;
            check_uid_range(&config)?;
            println!("{}: ok", config.file.as_deref().unwrap_or(file).display());
            println!("  {:<20}{}", "data_dir", config.data_dir.display());
            println!("  {:<20}{}", "domain", config.domain);
            for (name, addr) in &config.listen.listeners {
                println!("  {:<20}{addr}", format!("listen.{name}"));
            }
            println!("  {:<20}{}", "storage.backend", config.storage.name());
            println!(
                "  {:<20}{} (free on this host)",
                "jail.uid_range", config.uid_range
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Completions { shell } => {
            docs::completions(*shell);
            Ok(ExitCode::SUCCESS)
        }
        Command::Man { out } => {
            docs::man_pages(out)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
