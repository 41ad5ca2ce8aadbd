//! The admin calls about apps, grains and grants: the daemon side.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use granary_datasets::Datasets;
use granary_model::{MANIFEST_FILE, Manifest};
use granary_schema::admin_capnp;
use granary_state::{App, HostUid, Store};
use granary_supervisor::{GrainStatus, Supervisor};

/// What the admin service needs for grains.
pub(super) struct Grains {
    pub(super) sup: Supervisor,
    pub(super) datasets: Arc<dyn Datasets>,
    pub(super) apps_dir: PathBuf,
    pub(super) uids: HostUid,
    pub(super) package_limits: granary_package::Limits,
}

/// A package file, verified and inspected (nothing written yet).
pub(super) struct CheckedPackage {
    pub(super) bytes: Vec<u8>,
    pub(super) manifest: Manifest,
    pub(super) sha256: String,
}

/// Reads, verifies and walks a package file with every check.
pub(super) fn check_package(
    path: &Path,
    limits: &granary_package::Limits,
) -> anyhow::Result<CheckedPackage> {
    use std::io::Read;
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let meta = file.metadata()?;
    anyhow::ensure!(meta.is_file(), "{} is not a regular file", path.display());
    let mut bytes = Vec::new();
    file.take(limits.max_package_bytes + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("cannot read {}", path.display()))?;
    anyhow::ensure!(
        bytes.len() as u64 <= limits.max_package_bytes,
        "{} is larger than packages.max_package_mib",
        path.display()
    );
    let verified = granary_package::open(&bytes, limits)?;
    let (manifest, _) = verified.inspect(limits)?;
    let sha256 = verified.sha256.clone();
    Ok(CheckedPackage {
        bytes,
        manifest,
        sha256,
    })
}

/// Unpacks a checked package into `apps_dir/<kind>/<sha256>` unless that
/// image exists already (the same package gives the same image). Returns
/// the image directory relative to `apps_dir`.
pub(super) fn unpack_package(
    apps_dir: &Path,
    pkg: &CheckedPackage,
    limits: &granary_package::Limits,
) -> anyhow::Result<String> {
    let kind_dir = apps_dir.join(&pkg.manifest.kind);
    std::fs::create_dir_all(&kind_dir)?;
    for d in [apps_dir, &kind_dir] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))?;
    }
    let relative = format!("{}/{}", pkg.manifest.kind, pkg.sha256);
    let target = apps_dir.join(&relative);
    if target.join(MANIFEST_FILE).exists() {
        return Ok(relative);
    }
    let staging = kind_dir.join(staging_name("unpacking")?);
    let verified = granary_package::open(&pkg.bytes, limits)?;
    verified.unpack(&staging, limits)?;
    if let Err(e) = std::fs::rename(&staging, &target) {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e).with_context(|| format!("cannot move the image to {}", target.display()));
    }
    Ok(relative)
}

/// `.<what>-<16 random hex digits>`: a hidden name nothing else uses,
/// for an image being written before it is renamed into place.
fn staging_name(what: &str) -> anyhow::Result<String> {
    let mut nonce = [0u8; 8];
    getrandom::fill(&mut nonce).map_err(|e| anyhow::anyhow!("random staging name: {e}"))?;
    let hex: String = nonce.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!(".{what}-{hex}"))
}

/// `alice/git` or a grain id, as the grain id.
pub(super) fn grain_id(reference: &str) -> String {
    granary_model::GrainId::from_reference(reference)
        .map(|g| g.to_string())
        .unwrap_or_else(|_| reference.to_owned())
}

/// Copies `from` into `to` (which must not exist): directories, regular
/// files with their modes, and symlinks as symlinks. Nothing is followed:
/// files are opened with `O_NOFOLLOW` and checked on the open descriptor,
/// so a file swapped for a link mid-copy is refused, not followed.
fn copy_tree(from: &Path, to: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let meta = std::fs::symlink_metadata(from)?;
    let file_type = meta.file_type();
    if file_type.is_symlink() {
        std::os::unix::fs::symlink(std::fs::read_link(from)?, to)?;
    } else if file_type.is_dir() {
        std::fs::create_dir(to)?;
        for entry in std::fs::read_dir(from)? {
            let entry = entry?;
            copy_tree(&entry.path(), &to.join(entry.file_name()))?;
        }
        std::fs::set_permissions(to, std::fs::Permissions::from_mode(meta.mode() & 0o755))?;
    } else if file_type.is_file() {
        let mut source = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(from)?;
        let opened = source.metadata()?;
        anyhow::ensure!(
            opened.is_file(),
            "{} changed while being copied",
            from.display()
        );
        let mut target = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(opened.mode() & 0o755)
            .open(to)?;
        std::io::copy(&mut source, &mut target)?;
        target.sync_all()?;
        // Explicitly: the daemon's umask (077 under systemd) must not
        // make the image unreadable to the grain.
        std::fs::set_permissions(to, std::fs::Permissions::from_mode(opened.mode() & 0o755))?;
    } else {
        anyhow::bail!("{} is not a file, directory or symlink", from.display());
    }
    Ok(())
}

/// Reads and checks an app directory's manifest and that its exec is an
/// executable file of its image.
pub(super) fn read_app_dir(dir: &Path) -> anyhow::Result<(Manifest, String)> {
    let manifest_path = dir.join(MANIFEST_FILE);
    let text = std::fs::read_to_string(&manifest_path)
        .with_context(|| format!("cannot read {}", manifest_path.display()))?;
    let manifest = Manifest::parse(&text).with_context(|| dir.display().to_string())?;
    let image = dir.join("image");
    let exe = image.join(manifest.exec[0].trim_start_matches('/'));
    let exe_meta = std::fs::metadata(&exe).with_context(|| {
        format!(
            "the manifest's exec {} is not in {}",
            manifest.exec[0],
            image.display()
        )
    })?;
    anyhow::ensure!(
        exe_meta.is_file() && exe_meta.mode() & 0o111 != 0,
        "{} is not an executable file",
        exe.display()
    );
    Ok((manifest, text))
}

/// Where an app version lives.
pub(super) fn version_dir(apps_dir: &Path, manifest: &Manifest) -> PathBuf {
    // Both parts are checked names (kind: [a-z0-9], version: no '/' and no
    // leading '.'), so this stays inside apps_dir.
    apps_dir.join(&manifest.kind).join(&manifest.version)
}

/// Copies an app directory into `apps_dir/<kind>/<version>`: into a staging
/// directory of its own first, then swapped in atomically
/// (`renameat2(RENAME_EXCHANGE)` when the version exists), so a failed copy
/// leaves the installed version as it was. The caller has stopped the
/// kind's grains if the version existed.
pub(super) fn install_dir(
    apps_dir: &Path,
    dir: &Path,
    manifest: &Manifest,
    text: &str,
) -> anyhow::Result<()> {
    let kind_dir = apps_dir.join(&manifest.kind);
    std::fs::create_dir_all(&kind_dir)
        .with_context(|| format!("cannot create {}", kind_dir.display()))?;
    std::fs::set_permissions(apps_dir, std::fs::Permissions::from_mode(0o755))?;
    std::fs::set_permissions(&kind_dir, std::fs::Permissions::from_mode(0o755))?;
    let target = version_dir(apps_dir, manifest);
    anyhow::ensure!(
        target.starts_with(apps_dir),
        "refusing to install outside {}",
        apps_dir.display()
    );
    let staging = kind_dir.join(staging_name("installing")?);
    let copied = (|| -> anyhow::Result<()> {
        std::fs::create_dir(&staging)?;
        std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o755))?;
        granary_files::write_atomic(&staging.join(MANIFEST_FILE), text.as_bytes(), 0o644)?;
        copy_tree(&dir.join("image"), &staging.join("image"))?;
        std::fs::set_permissions(
            staging.join("image"),
            std::fs::Permissions::from_mode(0o755),
        )?;
        Ok(())
    })();
    if let Err(e) = copied {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e.context(format!(
            "cannot copy {} into {}",
            dir.display(),
            kind_dir.display()
        )));
    }
    if target.exists() {
        nix::fcntl::renameat2(
            None,
            &staging,
            None,
            &target,
            nix::fcntl::RenameFlags::RENAME_EXCHANGE,
        )
        .with_context(|| format!("cannot swap in {}", target.display()))?;
        // `staging` now holds the previous copy.
    } else {
        std::fs::rename(&staging, &target)
            .with_context(|| format!("cannot move {} into place", target.display()))?;
    }
    let _ = std::fs::remove_dir_all(&staging);
    Ok(())
}

pub(super) fn fill_app(mut out: admin_capnp::app::Builder<'_>, app: &App) {
    out.set_kind(&app.kind);
    out.set_app_id(&app.app_id);
    out.set_version(&app.version);
    out.set_dev_mode(app.dev_mode);
    out.set_installed_at(app.installed_at);
    if let Ok(m) = Manifest::parse(&app.manifest) {
        set_texts(
            out.reborrow().init_services(m.services.len() as u32),
            &m.services,
        );
        set_texts(out.reborrow().init_offers(m.offers.len() as u32), &m.offers);
        fill_manifest(out.init_manifest(), &m);
    }
}

fn set_texts(mut list: capnp::text_list::Builder<'_>, items: &[String]) {
    for (i, v) in items.iter().enumerate() {
        list.set(i as u32, v);
    }
}

/// `granary_model::Manifest` as `schema/package.capnp`'s `Manifest`.
pub(super) fn fill_manifest(
    mut out: granary_schema::package_capnp::manifest::Builder<'_>,
    m: &Manifest,
) {
    out.set_id(&m.id);
    out.set_version(&m.version);
    out.set_kind(&m.kind);
    out.set_per_user(m.per_user);
    out.set_title(&m.title);
    set_texts(out.reborrow().init_exec(m.exec.len() as u32), &m.exec);
    set_texts(out.reborrow().init_env(m.env.len() as u32), &m.env);
    set_texts(
        out.reborrow().init_services(m.services.len() as u32),
        &m.services,
    );
    set_texts(out.reborrow().init_offers(m.offers.len() as u32), &m.offers);
    set_texts(
        out.reborrow().init_requests(m.requests.len() as u32),
        &m.requests,
    );
    set_texts(
        out.reborrow().init_migrate(m.migrate.len() as u32),
        &m.migrate,
    );
    out.set_idle_timeout_seconds(m.idle_timeout_seconds.unwrap_or(0));
    let mut limits = out.init_limits();
    limits.set_memory_mib(m.limits.memory_mib.unwrap_or(0));
    limits.set_pids(m.limits.pids.unwrap_or(0));
    limits.set_cpu_weight(m.limits.cpu_weight.unwrap_or(0));
}

pub(super) fn fill_status(mut out: admin_capnp::grain_status::Builder<'_>, s: &GrainStatus) {
    out.set_id(&s.id);
    out.set_user(&s.user);
    out.set_kind(&s.kind);
    out.set_host_uid(s.host_uid);
    out.set_state(&s.state);
    out.set_reason(s.reason.as_deref().unwrap_or(""));
    out.set_pid(s.pid.unwrap_or(0));
    out.set_starts(s.starts);
    out.set_crashes(s.crashes);
    out.set_last_exit(s.last_exit.as_deref().unwrap_or(""));
    out.set_running_seconds(s.running_seconds.unwrap_or(0));
    out.set_connections(s.connections as u32);
    out.set_calls_in_flight(s.calls_in_flight as u32);
    let mut locks = out.init_wake_locks(s.wake_locks.len() as u32);
    for (i, why) in s.wake_locks.iter().enumerate() {
        locks.set(i as u32, why);
    }
}

pub(super) fn fill_grant(mut out: admin_capnp::grant::Builder<'_>, g: &granary_state::Grant) {
    out.set_id(g.id);
    out.set_from(&g.from_grain);
    out.set_to(&g.to_grain);
    out.set_capability(&g.capability);
    out.set_created_at(g.created_at);
}

impl Grains {
    /// Stops and destroys grains (`purge`), or refuses when any holds data.
    /// `what` names the owner for the message ("user alice", "app git").
    pub(super) async fn remove_grains(
        &self,
        store: &Arc<Store>,
        grains: Vec<granary_state::Grain>,
        purge: bool,
        what: &str,
    ) -> anyhow::Result<()> {
        if !purge {
            let with_data: Vec<String> = grains
                .iter()
                .filter(|g| self.datasets.has_data(&g.id).unwrap_or(true))
                .map(|g| format!("{}/{}", g.user, g.kind))
                .collect();
            anyhow::ensure!(
                with_data.is_empty(),
                "{what} has grains holding data ({}); add --purge to remove them (their final state is kept: a snapshot on zfs and btrfs, a moved copy in grains/.retired on plain)",
                with_data.join(", "),
            );
        }
        for g in grains {
            // Held first, so nothing restarts it while it goes; its grants'
            // live capabilities are cut.
            self.sup.retire(&g.id).await?;
            // A final snapshot is kept where the backend has snapshots;
            // the data goes before the record, so a failure leaves an
            // empty grain, never a record-less dataset.
            let datasets = self.datasets.clone();
            let id = g.id.clone();
            let label = granary_datasets::timed_label("final");
            let retired = tokio::task::spawn_blocking(move || datasets.retire(&id, &label)).await?;
            match retired {
                Ok(Some(kept)) => {
                    tracing::info!(grain = %g.id, snapshot = %kept, "final snapshot kept")
                }
                Ok(None) => {}
                Err(e) => {
                    self.sup.unretire(&g.id);
                    anyhow::bail!("removing the data of {} failed: {e}", g.id)
                }
            }
            let s = store.clone();
            let id = g.id.clone();
            tokio::task::spawn_blocking(move || s.delete_grain(&id, "admin")).await??;
            self.sup.forget(&g.id);
            tracing::info!(grain = %g.id, "grain destroyed");
        }
        Ok(())
    }
}

/// Asks a git grain to create `repo` over its http service (the header
/// the gateway never lets a client send). Returns whether it was made.
pub(super) async fn ask_git_create(
    conn: granary_supervisor::Connection,
    user: &str,
    repo: &str,
) -> Result<bool, capnp::Error> {
    use http_body_util::BodyExt;
    let fail = |e: String| capnp::Error::failed(format!("the git grain: {e}"));
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(conn.stream))
            .await
            .map_err(|e| fail(e.to_string()))?;
    let guard = conn.guard;
    tokio::task::spawn_local(async move {
        let _ = connection.await;
        drop(guard);
    });
    let req = hyper::Request::post(format!("/{user}/{repo}.git/"))
        .header("host", "git.local")
        .header("x-granary-admin", "create")
        .header("x-granary-user", user)
        .body(http_body_util::Empty::<hyper::body::Bytes>::new())
        .map_err(|e| fail(e.to_string()))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| fail(e.to_string()))?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map(|b| String::from_utf8_lossy(&b.to_bytes()).trim().to_owned())
        .unwrap_or_default();
    match status.as_u16() {
        201 => Ok(true),
        200 => Ok(false),
        _ => Err(fail(format!("{status}: {body}"))),
    }
}
