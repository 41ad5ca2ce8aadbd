//! `granary pack`: the packaging CLI. Works without a daemon.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use granary_package::{DEFINITION_TEMPLATE, Limits, SigningKey, app_id};

use crate::cli::{KeyArg, PackCommand};

/// The key file: `--key`, `$GRANARY_PACK_KEY`, else
/// `$XDG_CONFIG_HOME/granary/pack.key` or `~/.config/granary/pack.key`.
fn key_path(arg: &KeyArg) -> anyhow::Result<PathBuf> {
    if let Some(p) = &arg.key {
        return Ok(p.clone());
    }
    let config = match std::env::var_os("XDG_CONFIG_HOME") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => PathBuf::from(std::env::var_os("HOME").context("HOME is not set; pass --key")?)
            .join(".config"),
    };
    Ok(config.join("granary").join("pack.key"))
}

fn human(bytes: u64) -> String {
    if bytes >= 1 << 20 {
        format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
    } else {
        format!("{:.1} KiB", bytes as f64 / 1024.0)
    }
}

pub(crate) fn run(cmd: &PackCommand, limits: &Limits) -> anyhow::Result<ExitCode> {
    match cmd {
        PackCommand::Keygen { key } => {
            let path = key_path(key)?;
            let new = SigningKey::generate()?;
            new.save_new(&path)?;
            println!(
                "wrote {} (keep it private; it cannot be recovered)",
                path.display()
            );
            println!("app id      {}", app_id(&new.public()));
            println!("public key  {}", new.public().hex());
        }
        PackCommand::Init { dir } => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            let path = dir.join("granary-package.toml");
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
                .with_context(|| format!("cannot create {} (does it exist?)", path.display()))?;
            std::io::Write::write_all(&mut file, DEFINITION_TEMPLATE.as_bytes())?;
            println!(
                "wrote {}; fill in kind, title and files, then `granary pack build {} -o app.gpkg`",
                path.display(),
                path.display()
            );
        }
        PackCommand::Build {
            definition,
            out,
            targets,
            key,
            output,
        } => {
            let key = SigningKey::load(&key_path(key)?)?;
            let started = Instant::now();
            let targets: Vec<&str> = targets.iter().map(String::as_str).collect();
            let report = granary_package::build_for(definition, &key, out, &targets)?;
            let took = started.elapsed();
            if output.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "built {} ({} {}, app id {})",
                    out.display(),
                    report.kind,
                    report.version,
                    report.app_id
                );
                if !report.arches.is_empty() {
                    println!("  images for {}", report.arches.join(", "));
                }
                println!(
                    "  {} files ({} shared libraries), {} unpacked, {} packed, in {:.2} s",
                    report.files,
                    report.libraries.len(),
                    human(report.unpacked_bytes),
                    human(report.package_bytes),
                    took.as_secs_f64()
                );
                println!("  sha256 {}", report.sha256);
            }
        }
        PackCommand::Verify { file } => {
            let (manifest, entries, pkg_id, signer) = read(file, limits)?;
            println!(
                "{}: signature and contents ok: {} {} (kind {}), {} entries, signed by {} ({})",
                file.display(),
                manifest.id,
                manifest.version,
                manifest.kind,
                entries,
                pkg_id,
                signer
            );
        }
        PackCommand::Inspect { file, output } => {
            let bytes =
                std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
            let pkg = granary_package::open(&bytes, limits)?;
            let (manifest, entries) = pkg.inspect(limits)?;
            if output.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "app_id": pkg.app_id,
                        "signer": pkg.signer.hex(),
                        "sha256": pkg.sha256,
                        "manifest": manifest,
                        "entries": entries,
                    }))?
                );
            } else {
                println!("package   {}", file.display());
                println!("app id    {}", pkg.app_id);
                println!("signer    {}", pkg.signer.hex());
                println!("sha256    {}", pkg.sha256);
                println!();
                print!("{}", manifest.to_toml());
                println!();
                let mut total = 0;
                for e in &entries {
                    // Each image's paths after its name when there are several.
                    let path = match e.arch {
                        Some(a) => format!("[{a}] {}", e.path),
                        None => e.path.clone(),
                    };
                    match &e.kind {
                        granary_package::EntryKind::File { size, executable } => {
                            total += size;
                            println!(
                                "{} {:>10}  {path}",
                                if *executable { "x" } else { "-" },
                                size,
                            );
                        }
                        granary_package::EntryKind::Dir => println!("d {:>10}  {path}/", ""),
                        granary_package::EntryKind::Symlink { target } => {
                            println!("l {:>10}  {path} -> {target}", "")
                        }
                    }
                }
                println!("{} entries, {} unpacked", entries.len(), human(total));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn read(
    file: &Path,
    limits: &Limits,
) -> anyhow::Result<(granary_model::Manifest, usize, String, String)> {
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let pkg = granary_package::open(&bytes, limits)?;
    let (manifest, entries) = pkg.inspect(limits)?;
    Ok((
        manifest,
        entries.len(),
        pkg.app_id.clone(),
        pkg.signer.hex(),
    ))
}
