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
) -> Result<(), PackageError> {
    let root = at.clone();
    add_inner(files, &root, at, host, libs, with_libraries)
}

fn add_inner(
    files: &mut Files,
    root: &str,
    at: String,
    host: &Path,
    libs: &mut BTreeSet<String>,
    with_libraries: bool,
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
        for lib in libraries(host)? {
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

/// Builds the package `out` from the definition at `def_path`, signed with
/// `key`. The output is replaced atomically.
pub fn build(def_path: &Path, key: &SigningKey, out: &Path) -> Result<BuildReport, PackageError> {
    let def = Definition::load(def_path)?;
    let base = def_path.parent().unwrap_or(Path::new("."));
    let id = app_id(&key.public());
    let manifest = def.manifest(&id).map_err(|e| PackageError::Definition {
        path: def_path.display().to_string(),
        message: e.to_string(),
    })?;

    let mut files = Files::new();
    let mut libs = BTreeSet::new();
    for b in &def.files.binaries {
        let at = image_path(b)?;
        add(&mut files, at, &host_path(base, b), &mut libs, true)?;
    }
    for r in &def.files.runtime {
        let at = image_path(r)?;
        add(&mut files, at, &host_path(base, r), &mut libs, true)?;
    }
    for c in &def.files.copy {
        let at = image_path(&c.to)?;
        add(
            &mut files,
            at,
            &host_path(base, &c.from),
            &mut libs,
            c.with_libraries,
        )?;
    }
    if !matches!(files.get(&manifest.exec[0]), Some(Source::File(_, true))) {
        return Err(PackageError::Definition {
            path: def_path.display().to_string(),
            message: format!(
                "exec {} is not among the executable files the definition puts in the image",
                manifest.exec[0]
            ),
        });
    }

    // Every directory the files need, then everything in path order.
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
    append(&mut tar, "image", tar::EntryType::Directory, 0o755, &[])?;
    let mut order: BTreeMap<&str, Option<&Source>> = BTreeMap::new();
    for d in &dirs {
        order.insert(d, None);
    }
    for (p, f) in &files {
        order.insert(p, Some(f));
    }
    let mut unpacked = manifest_text.len() as u64;
    for (path, file) in order {
        let name = format!("image{path}");
        match file {
            None => append(&mut tar, &name, tar::EntryType::Directory, 0o755, &[])?,
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
                append(&mut tar, &name, tar::EntryType::Regular, mode, &bytes)?;
            }
        }
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
        files: files.len(),
        libraries: libs.into_iter().collect(),
        unpacked_bytes: unpacked,
        package_bytes: file.len() as u64,
        sha256: crate::sha256_hex(&file),
    })
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
