//! `granary pack build`: from a definition to a signed, deterministic
//! package.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::definition::host_path;
use crate::keys::{SigningKey, app_id};
use crate::{Definition, PackageError, io};

/// What a build made.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BuildReport {
    pub app_id: String,
    pub kind: String,
    pub version: String,
    /// The images' architectures (`--target`); empty for one `image/`.
    pub arches: Vec<String>,
    pub files: usize,
    /// Shared libraries and loaders collected through ldd.
    pub libraries: Vec<String>,
    pub unpacked_bytes: u64,
    pub package_bytes: u64,
    pub sha256: String,
}

/// What one image path holds.
#[derive(Debug, Clone)]
enum Source {
    /// A host file's contents, and whether it is executable.
    File(PathBuf, bool),
    /// A symlink found inside a copied directory whose target stays inside
    /// the image (kept as a link: /usr/lib/git-core has a hundred links to
    /// one 3.7 MB binary).
    Symlink(String),
}

/// Image path (absolute, '/'-separated) → what it holds.
type Files = BTreeMap<String, Source>;

fn is_elf(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && magic == *b"\x7fELF"
}

/// The shared libraries and loader of an ELF file, as ldd resolves them on
/// this host. A static binary has none.
fn libraries(path: &Path) -> Result<Vec<PathBuf>, PackageError> {
    let out = Command::new("ldd")
        .arg("--")
        .arg(path)
        .output()
        .map_err(io("running ldd (apt install libc-bin)"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // "not a dynamic executable": nothing to collect.
        return Ok(Vec::new());
    }
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.contains("not found") {
            return Err(PackageError::Refused(format!(
                "{}: ldd cannot find {line}",
                path.display()
            )));
        }
        let candidate = match line.split_once("=>") {
            Some((_, rest)) => rest.trim(),
            None => line,
        };
        let file = candidate.split_whitespace().next().unwrap_or("");
        if file.starts_with('/') {
            libs.push(PathBuf::from(file));
        }
    }
    Ok(libs)
}

fn image_path(p: &str) -> Result<String, PackageError> {
    let ok = p.starts_with('/')
        && p.len() > 1
        && !p.ends_with('/')
        && p.split('/')
            .skip(1)
            .all(|c| !c.is_empty() && c != "." && c != "..");
    if ok {
        Ok(p.to_owned())
    } else {
        Err(PackageError::Refused(format!(
            "{p:?} is not a clean absolute path inside the image"
        )))
    }
}

/// Whether a symlink at `link` with a relative `target` stays inside the
/// directory tree it was found in (`root`, an image path).
fn relative_link_inside(root: &str, link: &str, target: &str) -> bool {
    let root = root.trim_end_matches('/');
    !target.starts_with('/')
        && crate::resolve_link(link, target)
            .is_some_and(|r| r == root || r.starts_with(&format!("{root}/")))
}

/// Adds `host` at image path `at`: a file (following links), or a
/// directory's contents, keeping the relative links inside it as links.
fn add(
    files: &mut Files,
    at: String,
    host: &Path,
    libs: &mut BTreeSet<String>,
    with_libraries: bool,
    arch: Option<&str>,
) -> Result<(), PackageError> {
    let root = at.clone();
    add_inner(files, &root, at, host, libs, with_libraries, arch)
}

fn add_inner(
    files: &mut Files,
    root: &str,
    at: String,
    host: &Path,
    libs: &mut BTreeSet<String>,
    with_libraries: bool,
    arch: Option<&str>,
) -> Result<(), PackageError> {
    // A link to a parent directory would recurse forever.
    if at.matches('/').count() > 64 {
        return Err(PackageError::Refused(format!(
            "{} is nested too deeply (a symlink loop?)",
            host.display()
        )));
    }
    if at != root {
        let link = std::fs::symlink_metadata(host)
            .map_err(io(format!("cannot read {}", host.display())))?;
        if link.file_type().is_symlink() {
            let target =
                std::fs::read_link(host).map_err(io(format!("reading {}", host.display())))?;
            if let Some(t) = target.to_str()
                && relative_link_inside(root, &at, t)
            {
                files.insert(at, Source::Symlink(t.to_owned()));
                return Ok(());
            }
        }
    }
    let meta = std::fs::metadata(host).map_err(io(format!("cannot read {}", host.display())))?;
    if meta.is_dir() {
        for entry in std::fs::read_dir(host).map_err(io(format!("reading {}", host.display())))? {
            let entry = entry.map_err(io(format!("reading {}", host.display())))?;
            let name = entry.file_name();
            let name = name.to_str().ok_or_else(|| {
                PackageError::Refused(format!(
                    "{} has a name that is not UTF-8",
                    entry.path().display()
                ))
            })?;
            add_inner(
                files,
                root,
                format!("{at}/{name}"),
                &entry.path(),
                libs,
                with_libraries,
                arch,
            )?;
        }
        return Ok(());
    }
    if !meta.is_file() {
        return Err(PackageError::Refused(format!(
            "{} is not a regular file or directory",
            host.display()
        )));
    }
    use std::os::unix::fs::PermissionsExt;
    let exec = meta.permissions().mode() & 0o111 != 0;
    if with_libraries && is_elf(host) {
        if let Some(arch) = arch {
            check_program(host, arch)?;
        }
        // ldd answers for this host's programs only; another
        // architecture's are static (checked above).
        let native = arch.is_none_or(|a| a == std::env::consts::ARCH);
        for lib in if native { libraries(host)? } else { Vec::new() } {
            let at = lib.to_str().expect("ldd prints UTF-8 paths").to_owned();
            if let std::collections::btree_map::Entry::Vacant(slot) = files.entry(at.clone()) {
                libs.insert(at);
                slot.insert(Source::File(lib, true));
            }
        }
    }
    files.insert(at, Source::File(host.to_path_buf(), exec));
    Ok(())
}

/// A program for an image of `arch`: built for it, and, when `arch` is
/// not this host's, linked statically (ldd here cannot collect another
/// architecture's libraries).
fn check_program(host: &Path, arch: &str) -> Result<(), PackageError> {
    let bytes = std::fs::read(host).map_err(io(format!("reading {}", host.display())))?;
    let built = granary_model::elf_arch(&bytes);
    if built != Some(arch) {
        return Err(PackageError::Refused(format!(
            "{} is built for {}, not {arch}",
            host.display(),
            built.unwrap_or("an architecture no node runs")
        )));
    }
    if arch != std::env::consts::ARCH && granary_model::elf_needs_loader(&bytes) != Some(false) {
        return Err(PackageError::Refused(format!(
            "{} is linked dynamically: a {arch} image built on a {} host takes static programs only \
             (build it with -C target-feature=+crt-static)",
            host.display(),
            std::env::consts::ARCH
        )));
    }
    Ok(())
}

/// A definition's host path for the image of `arch`: `{arch}` in it names
/// the architecture (this host's when the build names none).
fn for_arch(p: &str, arch: Option<&str>) -> String {
    p.replace("{arch}", arch.unwrap_or(std::env::consts::ARCH))
}

/// The files of one image: `arch`'s, or the one image of a build that
/// names no architecture (`None`).
fn collect(
    def: &Definition,
    def_path: &Path,
    exec: &str,
    arch: Option<&str>,
    libs: &mut BTreeSet<String>,
) -> Result<Files, PackageError> {
    let base = def_path.parent().unwrap_or(Path::new("."));
    let mut files = Files::new();
    let same_path = def.files.binaries.iter().chain(&def.files.runtime);
    if let Some(p) = same_path.clone().find(|p| p.contains("{arch}")) {
        return Err(PackageError::Definition {
            path: def_path.display().to_string(),
            message: format!(
                "{p}: binaries and runtime keep their path in the image; name an architecture's files with {{arch}} in a copy's from"
            ),
        });
    }
    for b in &def.files.binaries {
        let at = image_path(b)?;
        add(
            &mut files,
            at,
            &host_path(base, &for_arch(b, arch)),
            libs,
            true,
            arch,
        )?;
    }
    for r in &def.files.runtime {
        let at = image_path(r)?;
        add(
            &mut files,
            at,
            &host_path(base, &for_arch(r, arch)),
            libs,
            true,
            arch,
        )?;
    }
    for c in &def.files.copy {
        let at = image_path(&c.to)?;
        let from = host_path(base, &for_arch(&c.from, arch));
        add(&mut files, at, &from, libs, c.with_libraries, arch)?;
    }
    let Some(Source::File(program, true)) = files.get(exec) else {
        return Err(PackageError::Definition {
            path: def_path.display().to_string(),
            message: format!(
                "exec {exec} is not among the executable files the definition puts in the image"
            ),
        });
    };
    // The program is built for its image however it was listed.
    if let Some(arch) = arch
        && is_elf(program)
    {
        check_program(program, arch)?;
    }
    Ok(files)
}

/// Builds the package `out` from the definition at `def_path`, signed with
/// `key`, with one `image/` for this host. The output is replaced
/// atomically.
pub fn build(def_path: &Path, key: &SigningKey, out: &Path) -> Result<BuildReport, PackageError> {
    build_for(def_path, key, out, &[])
}

/// [`build`] with one `image-<arch>/` for each of `targets` (x86_64,
/// aarch64) instead, named in the manifest's `arches`; `{arch}` in the
/// definition's host paths names each. Programs for another architecture
/// than this host's must be static. No targets: one `image/`.
pub fn build_for(
    def_path: &Path,
    key: &SigningKey,
    out: &Path,
    targets: &[&str],
) -> Result<BuildReport, PackageError> {
    let def = Definition::load(def_path)?;
    let id = app_id(&key.public());
    let mut manifest = def.manifest(&id).map_err(|e| PackageError::Definition {
        path: def_path.display().to_string(),
        message: e.to_string(),
    })?;
    let mut arches: Vec<String> = Vec::new();
    for t in targets {
        if !granary_model::ARCHES.contains(t) {
            return Err(PackageError::Refused(format!(
                "--target {t}: images are built for {}",
                granary_model::ARCHES.join(", ")
            )));
        }
        arches.push((*t).to_owned());
    }
    arches.sort();
    arches.dedup();
    manifest.arches = arches.clone();

    let mut libs = BTreeSet::new();
    let mut images: Vec<(String, Files)> = Vec::new();
    if arches.is_empty() {
        let files = collect(&def, def_path, &manifest.exec[0], None, &mut libs)?;
        images.push(("image".to_owned(), files));
    }
    for a in &arches {
        let files = collect(&def, def_path, &manifest.exec[0], Some(a), &mut libs)?;
        images.push((format!("image-{a}"), files));
    }

    let mut tar = tar::Builder::new(Vec::new());
    tar.mode(tar::HeaderMode::Deterministic);
    let manifest_text = manifest.to_toml();
    append(
        &mut tar,
        "granary-app.toml",
        tar::EntryType::Regular,
        0o644,
        manifest_text.as_bytes(),
    )?;
    let mut unpacked = manifest_text.len() as u64;
    let mut count = 0;
    for (top, files) in &images {
        unpacked += append_image(&mut tar, top, files)?;
        count += files.len();
    }
    let tar_bytes = tar.into_inner().map_err(io("finishing the archive"))?;
    let mut gz = flate2::GzBuilder::new()
        .mtime(0)
        .operating_system(255)
        .write(Vec::new(), flate2::Compression::new(6));
    gz.write_all(&tar_bytes).map_err(io("compressing"))?;
    let body = gz.finish().map_err(io("compressing"))?;

    let file = crate::seal(key, &body);

    let tmp = out.with_extension("gpkg.partial");
    std::fs::write(&tmp, &file).map_err(io(format!("writing {}", tmp.display())))?;
    std::fs::rename(&tmp, out).map_err(io(format!("writing {}", out.display())))?;
    Ok(BuildReport {
        app_id: id,
        kind: manifest.kind,
        version: manifest.version,
        arches,
        files: count,
        libraries: libs.into_iter().collect(),
        unpacked_bytes: unpacked,
        package_bytes: file.len() as u64,
        sha256: crate::sha256_hex(&file),
    })
}

/// Appends one image's tree under `top` ("image", "image-aarch64"):
/// every directory its files need, then everything in path order.
/// Returns the bytes its files hold.
fn append_image(
    tar: &mut tar::Builder<Vec<u8>>,
    top: &str,
    files: &Files,
) -> Result<u64, PackageError> {
    let mut dirs = BTreeSet::new();
    for path in files.keys() {
        let mut p = path.as_str();
        while let Some((parent, _)) = p.rsplit_once('/') {
            if parent.is_empty() {
                break;
            }
            dirs.insert(parent.to_owned());
            p = parent;
        }
    }
    append(tar, top, tar::EntryType::Directory, 0o755, &[])?;
    let mut order: BTreeMap<&str, Option<&Source>> = BTreeMap::new();
    for d in &dirs {
        order.insert(d, None);
    }
    for (p, f) in files {
        order.insert(p, Some(f));
    }
    let mut unpacked = 0;
    for (path, file) in order {
        let name = format!("{top}{path}");
        match file {
            None => append(tar, &name, tar::EntryType::Directory, 0o755, &[])?,
            Some(Source::Symlink(target)) => {
                let mut header = tar::Header::new_gnu();
                header.set_entry_type(tar::EntryType::Symlink);
                header.set_mode(0o777);
                header.set_mtime(0);
                header.set_uid(0);
                header.set_gid(0);
                header.set_size(0);
                tar.append_link(&mut header, &name, target)
                    .map_err(io(format!("adding {name} to the archive")))?;
            }
            Some(Source::File(host, exec)) => {
                let bytes =
                    std::fs::read(host).map_err(io(format!("reading {}", host.display())))?;
                unpacked += bytes.len() as u64;
                let mode = if *exec { 0o755 } else { 0o644 };
                append(tar, &name, tar::EntryType::Regular, mode, &bytes)?;
            }
        }
    }
    Ok(unpacked)
}

fn append(
    tar: &mut tar::Builder<Vec<u8>>,
    path: &str,
    kind: tar::EntryType,
    mode: u32,
    data: &[u8],
) -> Result<(), PackageError> {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_mtime(0);
    header.set_uid(0);
    header.set_gid(0);
    header.set_size(data.len() as u64);
    tar.append_data(&mut header, path, data)
        .map_err(io(format!("adding {path} to the archive")))
}
