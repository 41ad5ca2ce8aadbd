//! Opening packages: signature first, then a strict, bounded walk of the
//! archive. Everything here reads untrusted bytes (a package signed by a
//! key nobody vetted yet); `fuzz/` has a target for it.

use std::collections::HashSet;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use granary_model::{ARCHES, MANIFEST_FILE, Manifest};

use crate::keys::{PublicKey, app_id};
use crate::{HEADER_LEN, MAGIC, PackageError, io};

/// Bounds on what a package may make the host do.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The package file itself.
    pub max_package_bytes: u64,
    /// All files unpacked together (a decompression bomb stops here).
    pub max_unpacked_bytes: u64,
    /// Entries in the archive.
    pub max_entries: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_package_bytes: 512 << 20,
            max_unpacked_bytes: 2 << 30,
            max_entries: 100_000,
        }
    }
}

/// A package whose signature verified.
#[derive(Debug)]
pub struct Verified<'a> {
    pub signer: PublicKey,
    /// The app id the signer's key stands for.
    pub app_id: String,
    /// SHA-256 of the whole package file: the image's content address.
    pub sha256: String,
    body: &'a [u8],
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    File { size: u64, executable: bool },
    Dir,
    Symlink { target: String },
}

/// One entry of an image, its path absolute inside the image.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Entry {
    /// Which image: `None` for the one `image/`, the architecture for
    /// `image-<arch>/`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arch: Option<&'static str>,
    pub path: String,
    #[serde(flatten)]
    pub kind: EntryKind,
}

/// Checks the magic and the signature. Nothing of the body is parsed yet.
pub fn open<'a>(bytes: &'a [u8], limits: &Limits) -> Result<Verified<'a>, PackageError> {
    if bytes.len() as u64 > limits.max_package_bytes {
        return Err(PackageError::TooLarge {
            what: "package file",
            limit: limits.max_package_bytes,
        });
    }
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        return Err(PackageError::NotAPackage);
    }
    if bytes.len() < HEADER_LEN {
        return Err(PackageError::Truncated(bytes.len()));
    }
    let mut key = [0u8; 32];
    key.copy_from_slice(&bytes[8..40]);
    let signer = PublicKey(key);
    let signature = &bytes[40..HEADER_LEN];
    let body = &bytes[HEADER_LEN..];
    let mut signed = Vec::with_capacity(40 + body.len());
    signed.extend_from_slice(&bytes[..40]);
    signed.extend_from_slice(body);
    if !signer.verify(&signed, signature) {
        return Err(PackageError::BadSignature);
    }
    Ok(Verified {
        app_id: app_id(&signer),
        sha256: crate::sha256_hex(bytes),
        signer,
        body,
    })
}

/// A tar size field: octal digits, or base-256 when the top bit is set.
fn tar_size(field: &[u8]) -> Option<u64> {
    if field[0] & 0x80 != 0 {
        let mut n: u64 = u64::from(field[0] & 0x7f);
        for b in &field[1..] {
            n = n.checked_mul(256)?.checked_add(u64::from(*b))?;
        }
        return Some(n);
    }
    let text = std::str::from_utf8(field).ok()?;
    let digits = text.trim_matches(|c: char| c == '\0' || c == ' ');
    if digits.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(digits, 8).ok()
}

fn refuse(message: String) -> PackageError {
    PackageError::Refused(message)
}

fn corrupt(e: std::io::Error) -> PackageError {
    PackageError::Corrupt(e.to_string())
}

/// Checks an archive path below `image/` or `image-<arch>/` and returns
/// which image it is in (`None` for `image/`) and the path absolute inside
/// it ("/bin/app"), or "/" for the image's root.
fn image_path(raw: &[u8]) -> Result<(Option<&'static str>, String), PackageError> {
    let text =
        std::str::from_utf8(raw).map_err(|_| refuse("an entry's name is not UTF-8".to_owned()))?;
    let trimmed = text.strip_suffix('/').unwrap_or(text);
    let (top, rest) = match trimmed.split_once('/') {
        Some((top, rest)) => (top, Some(rest)),
        None => (trimmed, None),
    };
    let arch = match top.strip_prefix("image-") {
        _ if top == "image" => None,
        Some(a) => Some(*ARCHES.iter().find(|k| **k == a).ok_or_else(|| {
            refuse(format!(
                "entry {text:?} is in an image for {a:?}, which no node runs"
            ))
        })?),
        None => return Err(refuse(format!("entry {text:?} is outside image/"))),
    };
    let Some(rest) = rest else {
        return Ok((arch, "/".to_owned()));
    };
    if rest
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
        || rest.contains('\0')
    {
        return Err(refuse(format!(
            "entry {text:?} is not a clean relative path (no '..', '.', '//' or absolute paths)"
        )));
    }
    Ok((arch, format!("/{rest}")))
}

fn parent(path: &str) -> &str {
    match path.rsplit_once('/') {
        Some(("", _)) | None => "/",
        Some((p, _)) => p,
    }
}

/// Whether a symlink at `link` (absolute in the image) with `target` stays
/// inside the image.
fn symlink_stays_inside(link: &str, target: &str) -> bool {
    crate::resolve_link(link, target).is_some()
}

impl Verified<'_> {
    /// Reads only the 512-byte headers of the decompressed archive and
    /// refuses, before the tar parser buffers them, GNU long-name/long-link
    /// and PAX entries over 64 KiB, global PAX headers and sparse files.
    fn prescan(&self, cap: u64) -> Result<(), PackageError> {
        let mut stream = flate2::read::GzDecoder::new(self.body).take(cap);
        let mut header = [0u8; 512];
        loop {
            match stream.read_exact(&mut header) {
                Ok(()) => {}
                // The tar parser reports truncation with its own words.
                Err(_) => return Ok(()),
            }
            if header.iter().all(|b| *b == 0) {
                return Ok(());
            }
            let size = tar_size(&header[124..136])
                .ok_or_else(|| PackageError::Corrupt("an entry has a malformed size".to_owned()))?;
            match header[156] {
                b'L' | b'K' | b'x' if size > 64 * 1024 => {
                    return Err(refuse(format!(
                        "an extended header of {size} bytes (at most 64 KiB)"
                    )));
                }
                b'g' => return Err(refuse("global PAX headers are not allowed".to_owned())),
                b'S' => return Err(refuse("sparse files are not allowed".to_owned())),
                _ => {}
            }
            let padded = size.div_ceil(512) * 512;
            let skipped = std::io::copy(&mut (&mut stream).take(padded), &mut std::io::sink())
                .map_err(corrupt)?;
            if skipped < padded {
                return Ok(());
            }
        }
    }

    /// Walks the archive with every check, calling `visit` for each image
    /// entry with the manifest and the entry's contents (for files).
    /// Returns the manifest. A package holds `image/`, or one
    /// `image-<arch>/` for each of the manifest's `arches`, and its program
    /// in each (built for that architecture when it is an ELF file).
    fn walk(
        &self,
        limits: &Limits,
        mut visit: impl FnMut(&Manifest, &Entry, &mut dyn Read) -> Result<(), PackageError>,
    ) -> Result<Manifest, PackageError> {
        // Reading stops a little past the limit whatever the archive says.
        let cap = limits
            .max_unpacked_bytes
            .saturating_add(limits.max_entries.saturating_mul(1024))
            .saturating_add(1 << 20);
        self.prescan(cap)?;
        let decoder = flate2::read::GzDecoder::new(self.body).take(cap);
        let mut archive = tar::Archive::new(decoder);
        let mut entries = archive.entries().map_err(corrupt)?;

        // The manifest comes first.
        let mut first = entries
            .next()
            .ok_or_else(|| PackageError::Corrupt("the archive is empty".to_owned()))?
            .map_err(corrupt)?;
        if first.path_bytes().as_ref() != MANIFEST_FILE.as_bytes()
            || first.header().entry_type() != tar::EntryType::Regular
            || first.size() > 64 * 1024
        {
            return Err(PackageError::Corrupt(format!(
                "the first entry must be {MANIFEST_FILE} (at most 64 KiB)"
            )));
        }
        let mut text = String::new();
        first
            .read_to_string(&mut text)
            .map_err(|e| PackageError::Corrupt(format!("{MANIFEST_FILE}: {e}")))?;
        let manifest = Manifest::parse(&text).map_err(|e| refuse(e.to_string()))?;
        if manifest.id != self.app_id {
            return Err(refuse(format!(
                "the manifest says app {} but the package is signed by the key of {}",
                manifest.id, self.app_id
            )));
        }

        // The images the manifest promises: `image/`, or one per arch.
        let images: Vec<Option<&'static str>> = match manifest.arches.is_empty() {
            true => vec![None],
            false => ARCHES
                .iter()
                .filter(|a| manifest.arches.iter().any(|m| m == *a))
                .map(|a| Some(*a))
                .collect(),
        };
        let shown = |arch: Option<&str>| match arch {
            None => "image/".to_owned(),
            Some(a) => format!("image-{a}/"),
        };
        let mut seen = HashSet::new();
        let mut dirs: HashSet<(Option<&'static str>, String)> = HashSet::new();
        let mut total = 0u64;
        let mut count = 0u64;
        let mut exec_ok = HashSet::new();
        for entry in entries {
            let mut entry = entry.map_err(corrupt)?;
            count += 1;
            if count > limits.max_entries {
                return Err(PackageError::TooLarge {
                    what: "entries",
                    limit: limits.max_entries,
                });
            }
            let (arch, path) = image_path(&entry.path_bytes())?;
            if !images.contains(&arch) {
                return Err(refuse(format!(
                    "the archive has {} but the manifest lists {}",
                    shown(arch),
                    images
                        .iter()
                        .map(|a| shown(*a))
                        .collect::<Vec<_>>()
                        .join(" ")
                )));
            }
            if !seen.insert((arch, path.clone())) {
                return Err(refuse(format!("entry {}{path} appears twice", shown(arch))));
            }
            let header = entry.header();
            let mode = header.mode().map_err(corrupt)?;
            if mode & 0o7000 != 0 {
                return Err(refuse(format!(
                    "{path} has a setuid, setgid or sticky bit (mode {mode:o})"
                )));
            }
            let kind = match header.entry_type() {
                tar::EntryType::Directory => EntryKind::Dir,
                tar::EntryType::Regular => EntryKind::File {
                    size: entry.size(),
                    executable: mode & 0o111 != 0,
                },
                tar::EntryType::Symlink => {
                    let target = entry
                        .link_name_bytes()
                        .ok_or_else(|| refuse(format!("symlink {path} has no target")))?;
                    let target = std::str::from_utf8(&target)
                        .map_err(|_| refuse(format!("symlink {path} has a non-UTF-8 target")))?
                        .to_owned();
                    if !symlink_stays_inside(&path, &target) {
                        return Err(refuse(format!(
                            "symlink {path} -> {target} points out of the image"
                        )));
                    }
                    EntryKind::Symlink { target }
                }
                tar::EntryType::Link => {
                    return Err(refuse(format!("{path} is a hard link")));
                }
                other => {
                    return Err(refuse(format!(
                        "{path} is a {other:?} entry; only files, directories and symlinks are allowed"
                    )));
                }
            };
            if path == "/" {
                if kind != EntryKind::Dir {
                    return Err(refuse(format!("{} must be a directory", shown(arch))));
                }
                dirs.insert((arch, path));
                continue;
            }
            // Parents come first and are directories of this archive, so
            // nothing is ever created through a symlink.
            if !dirs.contains(&(arch, parent(&path).to_owned())) {
                return Err(refuse(format!(
                    "{path} comes before its directory, or its directory is not a directory"
                )));
            }
            // The program's first bytes, read ahead to check its
            // architecture, then handed on with the rest.
            let mut head = Vec::new();
            if let EntryKind::File { size, executable } = kind {
                total = total.saturating_add(size);
                if total > limits.max_unpacked_bytes {
                    return Err(PackageError::TooLarge {
                        what: "unpacked files",
                        limit: limits.max_unpacked_bytes,
                    });
                }
                if path == manifest.exec[0] && executable {
                    (&mut entry)
                        .take(20)
                        .read_to_end(&mut head)
                        .map_err(corrupt)?;
                    // An ELF program of an image per architecture must be
                    // that architecture's (one no node runs is not).
                    let built = granary_model::elf_arch(&head);
                    if let Some(image) = arch
                        && head.starts_with(b"\x7fELF")
                        && built != Some(image)
                    {
                        return Err(refuse(format!(
                            "{}{path} is built for {}, not {image}",
                            shown(arch).trim_end_matches('/'),
                            built.unwrap_or("an architecture no node runs")
                        )));
                    }
                    exec_ok.insert(arch);
                }
            }
            if kind == EntryKind::Dir {
                dirs.insert((arch, path.clone()));
            }
            let e = Entry { arch, path, kind };
            visit(
                &manifest,
                &e,
                &mut std::io::Cursor::new(head).chain(&mut entry),
            )?;
        }
        for image in &images {
            if !dirs.contains(&(*image, "/".to_owned())) {
                return Err(PackageError::Corrupt(format!(
                    "the archive has no {}",
                    shown(*image)
                )));
            }
            if !exec_ok.contains(image) {
                return Err(refuse(format!(
                    "exec {} is not an executable file of {}",
                    manifest.exec[0],
                    shown(*image)
                )));
            }
        }
        Ok(manifest)
    }

    /// The manifest and every entry, without writing anything.
    pub fn inspect(&self, limits: &Limits) -> Result<(Manifest, Vec<Entry>), PackageError> {
        let mut entries = Vec::new();
        let manifest = self.walk(limits, |_, e, r| {
            std::io::copy(r, &mut std::io::sink()).map_err(corrupt)?;
            entries.push(e.clone());
            Ok(())
        })?;
        Ok((manifest, entries))
    }

    /// Unpacks into `dest` (which must not exist): `granary-app.toml` and
    /// `image/`, files read-only. Of a package with an image per
    /// architecture, the first of `runs` (the architectures this host
    /// runs, the one it prefers first) that it has becomes `image/`. On any
    /// error `dest` is removed again.
    pub fn unpack(
        &self,
        dest: &Path,
        limits: &Limits,
        runs: &[&str],
    ) -> Result<Manifest, PackageError> {
        std::fs::create_dir(dest).map_err(io(format!("creating {}", dest.display())))?;
        let result = self.unpack_into(dest, limits, runs);
        if result.is_err() {
            let _ = std::fs::remove_dir_all(dest);
        }
        result
    }

    fn unpack_into(
        &self,
        dest: &Path,
        limits: &Limits,
        runs: &[&str],
    ) -> Result<Manifest, PackageError> {
        use std::os::unix::fs::PermissionsExt;
        let image = dest.join("image");
        std::fs::create_dir(&image).map_err(io(format!("creating {}", image.display())))?;
        let mut chosen = None;
        let manifest = self.walk(limits, |manifest, e, r| {
            let wanted = match chosen {
                Some(wanted) => wanted,
                None => *chosen.insert(image_for(manifest, runs)?),
            };
            if e.arch != wanted {
                std::io::copy(r, &mut std::io::sink()).map_err(corrupt)?;
                return Ok(());
            }
            let at = image.join(e.path.trim_start_matches('/'));
            use std::os::unix::fs::PermissionsExt;
            let mode = |m: u32| std::fs::set_permissions(&at, std::fs::Permissions::from_mode(m));
            // Modes are set explicitly: the daemon may run with umask 077
            // (its systemd unit does), and the grain's uid must read these.
            match &e.kind {
                EntryKind::Dir => std::fs::create_dir(&at).and_then(|()| mode(0o755)),
                EntryKind::Symlink { target } => std::os::unix::fs::symlink(target, &at),
                EntryKind::File { executable, .. } => (|| {
                    let mut f = std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .custom_flags(libc::O_NOFOLLOW)
                        .mode(if *executable { 0o555 } else { 0o444 })
                        .open(&at)?;
                    std::io::copy(r, &mut f)?;
                    f.sync_all()?;
                    mode(if *executable { 0o555 } else { 0o444 })
                })(),
            }
            .map_err(io(format!("unpacking {}", e.path)))
        })?;
        for p in [dest, &image] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755))
                .map_err(io(format!("chmod {}", p.display())))?;
        }
        std::fs::write(dest.join(MANIFEST_FILE), manifest.to_toml())
            .map_err(io("writing the manifest"))?;
        Ok(manifest)
    }
}

/// Which of a package's images a host that runs `runs` (preferred first)
/// unpacks: `None` for the one `image/` (its architecture is checked when
/// a grain starts), else the first of `runs` the package carries.
pub fn image_for(manifest: &Manifest, runs: &[&str]) -> Result<Option<&'static str>, PackageError> {
    if manifest.arches.is_empty() {
        return Ok(None);
    }
    runs.iter()
        .find_map(|r| {
            ARCHES
                .iter()
                .find(|a| *a == r && manifest.arches.iter().any(|m| m == *a))
        })
        .map(|a| Some(*a))
        .ok_or_else(|| {
            refuse(format!(
                "{} has images for {} only, and this node runs {}",
                manifest,
                manifest.arches.join(", "),
                runs.join(", ")
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symlinks_are_resolved_inside_the_image() {
        assert!(symlink_stays_inside("/lib64/ld.so", "/lib/x86_64/ld.so"));
        assert!(symlink_stays_inside("/usr/bin/sh", "dash"));
        assert!(symlink_stays_inside("/usr/bin/sh", "../../bin/dash"));
        assert!(!symlink_stays_inside("/usr/bin/sh", "../../../etc/shadow"));
        assert!(!symlink_stays_inside("/a", ".."));
        assert!(!symlink_stays_inside("/a", ""));
    }

    #[test]
    fn archive_paths_are_clean() {
        assert_eq!(image_path(b"image/").unwrap(), (None, "/".to_owned()));
        assert_eq!(
            image_path(b"image/bin/app").unwrap(),
            (None, "/bin/app".to_owned())
        );
        assert_eq!(
            image_path(b"image-aarch64/bin/app").unwrap(),
            (Some("aarch64"), "/bin/app".to_owned())
        );
        assert_eq!(
            image_path(b"image-x86_64").unwrap(),
            (Some("x86_64"), "/".to_owned())
        );
        for bad in [
            &b"image-riscv64/bin/app"[..],
            b"image-/x",
            b"image-aarch64/../image/x",
            &b"image/../etc"[..],
            b"/etc/passwd",
            b"image//x",
            b"image/./x",
            b"other/x",
            b"image/\xff",
        ] {
            assert!(image_path(bad).is_err(), "{bad:?}");
        }
    }
}
