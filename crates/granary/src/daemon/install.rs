//! Putting apps on disk: checking and unpacking signed packages into the
//! content-addressed image store, and copying unsigned app directories
//! (development mode) into place through a staging directory. Blocking:
//! run on the blocking pool.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context;
use granary_model::{MANIFEST_FILE, Manifest};

/// A package file, verified and inspected (nothing written yet).
pub(crate) struct CheckedPackage {
    pub(crate) bytes: Vec<u8>,
    pub(crate) manifest: Manifest,
    pub(crate) sha256: String,
}

/// Reads, verifies and walks a package file with every check.
pub(crate) fn check_package(
    path: &Path,
    limits: &granary_package::Limits,
) -> anyhow::Result<CheckedPackage> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    // Nothing but a regular file is opened (the admin page passes paths
    // too): a device may act on open, and a FIFO would block a thread.
    let is_file = std::fs::metadata(path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .is_file();
    anyhow::ensure!(is_file, "{} is not a regular file", path.display());
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .with_context(|| format!("cannot read {}", path.display()))?;
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

/// `arches` with this host's own first: the image a node prefers when a
/// package carries several it runs.
pub(crate) fn host_first(arches: impl Iterator<Item = &'static str>) -> Vec<&'static str> {
    let mut runs: Vec<&'static str> = arches.collect();
    runs.sort_by_key(|a| *a != std::env::consts::ARCH);
    runs
}

/// Unpacks a checked package into `apps_dir/<kind>/<sha256>` unless that
/// image exists already (the same package gives the same image): of a
/// package with an image per architecture, the first of `runs` it has.
/// Keeps the package file beside it (`<sha256>.gpkg`), which other nodes of
/// a cluster fetch by its content address. Returns the image directory
/// relative to `apps_dir`.
pub(crate) fn unpack_package(
    apps_dir: &Path,
    pkg: &CheckedPackage,
    limits: &granary_package::Limits,
    runs: &[&str],
) -> anyhow::Result<String> {
    // Refused before anything is written when no image fits this node.
    let wanted = granary_package::image_for(&pkg.manifest, runs)?;
    let kind_dir = apps_dir.join(&pkg.manifest.kind);
    std::fs::create_dir_all(&kind_dir)?;
    for d in [apps_dir, &kind_dir] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))?;
    }
    let kept = kind_dir.join(format!("{}.gpkg", pkg.sha256));
    if !kept.exists() {
        granary_files::write_atomic(&kept, &pkg.bytes, 0o644)
            .with_context(|| format!("cannot keep the package at {}", kept.display()))?;
    }
    let relative = format!("{}/{}", pkg.manifest.kind, pkg.sha256);
    let target = apps_dir.join(&relative);
    // Unpacked before, for the architecture it wants now (a node whose
    // `arches` changed unpacks the package's other image again).
    let unpacked_for = |target: &Path| {
        let arch = crate::daemon::cluster::arch_of(&target.join("image"), &pkg.manifest.exec[0]);
        wanted.is_none() || arch.map(|a| a.as_str()) == wanted
    };
    let stale = target.join(MANIFEST_FILE).exists();
    if stale && unpacked_for(&target) {
        return Ok(relative);
    }
    let staging = kind_dir.join(staging_name("unpacking")?);
    let verified = granary_package::open(&pkg.bytes, limits)?;
    verified.unpack(&staging, limits, runs)?;
    if stale {
        let swapped = nix::fcntl::renameat2(
            None,
            &staging,
            None,
            &target,
            nix::fcntl::RenameFlags::RENAME_EXCHANGE,
        );
        if let Err(e) = swapped {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(e).with_context(|| format!("cannot swap in {}", target.display()));
        }
        // `staging` now holds the other architecture's image.
        let _ = std::fs::remove_dir_all(&staging);
        return Ok(relative);
    }
    if let Err(e) = std::fs::rename(&staging, &target) {
        let _ = std::fs::remove_dir_all(&staging);
        // Another start fetched and unpacked the same image meanwhile.
        if target.join(MANIFEST_FILE).exists() {
            return Ok(relative);
        }
        return Err(e).with_context(|| format!("cannot move the image to {}", target.display()));
    }
    Ok(relative)
}

/// `.<what>-<16 random hex digits>`: a hidden name nothing else uses,
/// for an image being written before it is renamed into place.
fn staging_name(what: &str) -> anyhow::Result<String> {
    let mut nonce = [0u8; 8];
    getrandom::fill(&mut nonce).map_err(|e| anyhow::anyhow!("random staging name: {e}"))?;
    Ok(format!(".{what}-{}", hex::encode(nonce)))
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
pub(crate) fn read_app_dir(dir: &Path) -> anyhow::Result<(Manifest, String)> {
    let manifest_path = dir.join(MANIFEST_FILE);
    let text = std::fs::read_to_string(&manifest_path)
        .with_context(|| format!("cannot read {}", manifest_path.display()))?;
    let manifest = Manifest::parse(&text).with_context(|| dir.display().to_string())?;
    anyhow::ensure!(
        manifest.arches.is_empty(),
        "{}: arches names a package's images (`granary pack build --target`); an app directory holds one image/",
        dir.display()
    );
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
pub(crate) fn version_dir(apps_dir: &Path, manifest: &Manifest) -> PathBuf {
    // Both parts are checked names (kind: [a-z0-9], version: no '/' and no
    // leading '.'), so this stays inside apps_dir.
    apps_dir.join(&manifest.kind).join(&manifest.version)
}

/// Copies an app directory into `apps_dir/<kind>/<version>`: into a staging
/// directory of its own first, then swapped in atomically
/// (`renameat2(RENAME_EXCHANGE)` when the version exists), so a failed copy
/// leaves the installed version as it was. The caller has stopped the
/// kind's grains if the version existed.
pub(crate) fn install_dir(
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
