//! `granary backup ...` and `granary restore`: the CLI side. Export,
//! restore and drill run in the daemon (they need its snapshots, datasets
//! and state) and report progress back over a capability; verify, keygen,
//! key and receive need no daemon.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use granary_backup::progress::Progress;
use granary_backup::target::{DirTarget, Target};
use granary_config::{BackupPlace, Config};
use granary_schema::admin_capnp::{admin, backups, progress};
use serde::Serialize;

use super::client::print_json;
use super::connection::{remote, text, with_admin};
use super::table;
use crate::cli::BackupCommand;

/// Prints the daemon's progress reports on standard error: a line that
/// updates in place on a terminal, JSON lines with `--json`, otherwise
/// each step's last report.
struct Printer {
    json: bool,
    tty: bool,
}

impl progress::Server for Printer {
    async fn update(
        self: capnp::capability::Rc<Self>,
        params: progress::UpdateParams,
        _: progress::UpdateResults,
    ) -> Result<(), capnp::Error> {
        let json = params.get()?.get_json()?.to_str()?.to_owned();
        let mut err = std::io::stderr().lock();
        if self.json {
            let _ = writeln!(err, "{json}");
            return Ok(());
        }
        let Ok(p) = serde_json::from_str::<Progress>(&json) else {
            return Ok(());
        };
        if self.tty {
            let _ = write!(err, "\r\x1b[2K{}", p.line());
            if p.done {
                let _ = writeln!(err);
            }
        } else if p.done {
            let _ = writeln!(err, "{}", p.line());
        }
        Ok(())
    }
}

pub(super) fn printer(json: bool) -> progress::Client {
    capnp_rpc::new_client(Printer {
        json,
        tty: std::io::stderr().is_terminal(),
    })
}

fn as_place(place: &str) -> (String, String) {
    if place.contains('/') {
        (place.to_owned(), String::new())
    } else {
        (String::new(), place.to_owned())
    }
}

fn read_identity(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read the identity file {}", path.display()))
}

/// An absolute path, for the daemon (whose working directory differs).
fn absolute(p: &Path) -> anyhow::Result<PathBuf> {
    Ok(if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()?.join(p)
    })
}

#[derive(Debug, serde::Deserialize, Serialize)]
struct ExportResult {
    grain: String,
    stream: Option<granary_backup::export::StreamReport>,
    error: Option<String>,
}

pub(crate) fn backup(config: &Config, cmd: &BackupCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        BackupCommand::Export {
            to,
            target,
            user,
            grain,
            output,
        } => {
            let dir = match to {
                Some(d) => absolute(d)?.display().to_string(),
                None => String::new(),
            };
            anyhow::ensure!(
                !dir.is_empty() || target.is_some(),
                "say where: --to DIR or --target NAME"
            );
            let json = output.json;
            let report = with_admin(config, |admin: admin::Client| async move {
                let mut req = super::backups(&admin).export_request();
                req.get().set_dir(dir.as_str());
                req.get().set_target(target.as_deref().unwrap_or(""));
                req.get().set_user(user.as_deref().unwrap_or(""));
                req.get().set_grain(grain.as_deref().unwrap_or(""));
                req.get().set_progress(printer(json));
                let response = req.send().promise.await.map_err(remote)?;
                text(response.get().map_err(remote)?.get_report_json())
            })?;
            let results: Vec<ExportResult> = serde_json::from_str(&report)?;
            let failed = results.iter().filter(|r| r.error.is_some()).count();
            if json {
                print_json(&results)?;
            } else if results.is_empty() {
                println!("no grain holds data yet; nothing to export");
            } else {
                let rows: Vec<Vec<String>> = results
                    .iter()
                    .map(|r| match (&r.stream, &r.error) {
                        (Some(s), _) => vec![
                            r.grain.replacen('-', "/", 1),
                            s.snapshot.clone(),
                            s.base
                                .clone()
                                .map_or("full".to_owned(), |b| format!("since {b}")),
                            mib(s.plain_bytes),
                            mib(s.stored_bytes),
                            format!(
                                "{}{}",
                                s.chunks,
                                if s.resumed_chunks > 0 {
                                    format!(" ({} resumed)", s.resumed_chunks)
                                } else {
                                    String::new()
                                }
                            ),
                            format!("{:.1}s", s.seconds),
                        ],
                        (None, e) => vec![
                            r.grain.replacen('-', "/", 1),
                            "FAILED".to_owned(),
                            e.clone().unwrap_or_default(),
                            String::new(),
                            String::new(),
                            String::new(),
                            String::new(),
                        ],
                    })
                    .collect();
                table::print(
                    &[
                        "GRAIN", "SNAPSHOT", "STREAM", "DATA", "STORED", "CHUNKS", "TIME",
                    ],
                    &rows,
                );
            }
            Ok(if failed > 0 {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        BackupCommand::Verify { place, output } => {
            let mut target = open_locally(config, place)?;
            let json = output.json;
            let tty = std::io::stderr().is_terminal();
            let report = granary_backup::restore::verify(target.as_mut(), &mut |p| {
                if !json && tty {
                    eprint!("\r\x1b[2K{}", p.line());
                    if p.done {
                        eprintln!();
                    }
                }
            })?;
            if json {
                print_json(&report)?;
            } else {
                println!(
                    "ok: signed by node {}; {} grains, {} streams, {} chunks ({}) all match",
                    &report.signer[..16],
                    report.grains,
                    report.streams,
                    report.chunks,
                    mib(report.bytes)
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        BackupCommand::Drill {
            from,
            identity,
            grain,
            trust,
            output,
        } => {
            let identity = read_identity(identity)?;
            let (dir, _) = as_place(from);
            let from = if dir.is_empty() {
                from.clone()
            } else {
                absolute(Path::new(&dir))?.display().to_string()
            };
            let json = output.json;
            let report = with_admin(config, |admin: admin::Client| async move {
                let mut req = super::backups(&admin).restore_request();
                req.get().set_from(from.as_str());
                req.get().set_grain(grain.as_deref().unwrap_or(""));
                req.get().set_identity(&identity);
                req.get().set_drill(true);
                set_trust(&mut req.get(), trust);
                req.get().set_progress(printer(json));
                let response = req.send().promise.await.map_err(remote)?;
                text(response.get().map_err(remote)?.get_report_json())
            })?;
            let results: Vec<serde_json::Value> = serde_json::from_str(&report)?;
            let failed = results
                .iter()
                .filter(|r| r["ok"] != serde_json::Value::Bool(true))
                .count();
            if json {
                print_json(&results)?;
            } else {
                for r in &results {
                    let grain = r["grain"]
                        .as_str()
                        .unwrap_or_default()
                        .replacen('-', "/", 1);
                    if r["ok"] == serde_json::Value::Bool(true) {
                        println!(
                            "{grain}: ok, {} restored and matching snapshot {} ({:.1}s)",
                            mib(r["bytes"].as_u64().unwrap_or(0)),
                            r["snapshot"].as_str().unwrap_or_default(),
                            r["seconds"].as_f64().unwrap_or(0.0)
                        );
                    } else {
                        println!(
                            "{grain}: FAILED: {}",
                            r["error"].as_str().unwrap_or_default()
                        );
                    }
                }
            }
            Ok(if failed > 0 {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        BackupCommand::Keygen { out } => {
            let (secret, public) = granary_backup::crypt::generate();
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(out)
                .with_context(|| {
                    format!("cannot create {} (it must not exist yet)", out.display())
                })?;
            file.write_all(secret.as_bytes())
                .and_then(|()| file.sync_all())
                .with_context(|| format!("cannot write {}", out.display()))?;
            eprintln!(
                "wrote the secret identity to {}: keep it off this host; restores need it",
                out.display()
            );
            eprintln!("put the public key in the config's [backup] recipients:");
            println!("{public}");
            Ok(ExitCode::SUCCESS)
        }
        BackupCommand::Key => {
            let key = granary_backup::node_key(&config.data_dir)?;
            println!("{}", key.public().hex());
            Ok(ExitCode::SUCCESS)
        }
        BackupCommand::Receive {
            listen,
            dir,
            allow,
            max_file_mib,
        } => receive(config, listen, dir, allow, *max_file_mib),
    }
}

use std::os::unix::fs::OpenOptionsExt;

fn set_trust(req: &mut backups::restore_params::Builder<'_>, trust: &[String]) {
    let mut list = req.reborrow().init_trust(trust.len() as u32);
    for (i, t) in trust.iter().enumerate() {
        list.set(i as u32, t);
    }
}

fn mib(bytes: u64) -> String {
    if bytes < 1 << 20 {
        format!("{:.1} KiB", bytes as f64 / 1024.0)
    } else {
        format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
    }
}

/// A directory, or a configured target, opened in this process (verify).
fn open_locally(config: &Config, place: &str) -> anyhow::Result<Box<dyn Target>> {
    if place.contains('/') {
        let dir = Path::new(place);
        anyhow::ensure!(dir.is_dir(), "{} is not a directory", dir.display());
        return Ok(Box::new(DirTarget::new(dir)?));
    }
    let t = config
        .backup
        .targets
        .iter()
        .find(|t| t.name == place)
        .with_context(|| {
            format!(
                "no backup target {place:?} in the config (a directory needs a '/', e.g. ./{place})"
            )
        })?;
    Ok(match &t.place {
        BackupPlace::Dir(d) => Box::new(DirTarget::new(d)?),
        BackupPlace::Remote { address, key } => {
            let node = granary_backup::node_key(&config.data_dir)?;
            let server = granary_backup::catalogue::parse_key(key)?;
            Box::new(granary_backup::remote::RemoteTarget::connect(
                address, &node, server,
            )?)
        }
    })
}

fn receive(
    config: &Config,
    listen: &str,
    dir: &Path,
    allow: &[String],
    max_file_mib: u64,
) -> anyhow::Result<ExitCode> {
    let key = granary_backup::node_key(&config.data_dir)?;
    let allowed = allow
        .iter()
        .map(|k| granary_backup::catalogue::parse_key(k))
        .collect::<Result<Vec<_>, _>>()?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        let bound = listener.local_addr()?;
        let public = key.public().hex();
        let receiver = Arc::new(granary_backup::remote::Receiver {
            key,
            allowed,
            dir: dir.to_path_buf(),
            max_file_bytes: max_file_mib << 20,
        });
        println!("listening on {bound}");
        println!("node key {public}");
        std::io::stdout().flush()?;
        tokio::select! {
            served = receiver.serve(listener) => served.map_err(anyhow::Error::from),
            _ = tokio::signal::ctrl_c() => Ok(()),
            _ = async {
                let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
                term.recv().await;
                Ok::<_, std::io::Error>(())
            } => Ok(()),
        }
    })?;
    Ok(ExitCode::SUCCESS)
}

pub(crate) struct RestoreArgs<'a> {
    pub(crate) from: &'a str,
    pub(crate) grain: &'a str,
    pub(crate) identity: &'a Path,
    pub(crate) as_user: Option<&'a str>,
    pub(crate) snapshot: Option<&'a str>,
    pub(crate) trust: &'a [String],
    pub(crate) json: bool,
}

pub(crate) fn restore(config: &Config, args: RestoreArgs<'_>) -> anyhow::Result<ExitCode> {
    let identity = read_identity(args.identity)?;
    let from = if args.from.contains('/') {
        absolute(Path::new(args.from))?.display().to_string()
    } else {
        args.from.to_owned()
    };
    let json = args.json;
    let report = with_admin(config, |admin: admin::Client| async move {
        let mut req = super::backups(&admin).restore_request();
        req.get().set_from(from.as_str());
        req.get().set_grain(args.grain);
        req.get().set_identity(&identity);
        req.get().set_as(args.as_user.unwrap_or(""));
        req.get().set_snapshot(args.snapshot.unwrap_or(""));
        set_trust(&mut req.get(), args.trust);
        req.get().set_progress(printer(json));
        let response = req.send().promise.await.map_err(remote)?;
        text(response.get().map_err(remote)?.get_report_json())
    })?;
    let r: serde_json::Value = serde_json::from_str(&report)?;
    if json {
        print_json(&r)?;
    } else {
        println!(
            "restored {} as {} at snapshot {} ({}, {} streams, {:.1}s), files owned by uid {}",
            r["from_grain"].as_str().unwrap_or_default(),
            r["grain"].as_str().unwrap_or_default(),
            r["snapshot"].as_str().unwrap_or_default(),
            mib(r["bytes"].as_u64().unwrap_or(0)),
            r["streams"],
            r["seconds"].as_f64().unwrap_or(0.0),
            r["host_uid"]
        );
        println!("  app {}", r["app_version"].as_str().unwrap_or_default());
        if r["user_created"] == serde_json::Value::Bool(true) {
            println!(
                "  the user did not exist and was created without a usable password: set one with `granary user passwd`"
            );
        }
        for g in r["grants_restored"].as_array().into_iter().flatten() {
            println!("  grant {}", g.as_str().unwrap_or_default());
        }
        for g in r["grants_skipped"].as_array().into_iter().flatten() {
            println!("  grant NOT restored: {}", g.as_str().unwrap_or_default());
        }
        if r["started"] == serde_json::Value::Bool(true) {
            println!("  started");
        } else {
            println!(
                "  NOT started: {}",
                r["start_error"].as_str().unwrap_or_default()
            );
        }
    }
    Ok(if r["started"] == serde_json::Value::Bool(true) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
