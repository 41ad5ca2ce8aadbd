//! Packages end to end, and every kind of bad input the reader must refuse
//! with a clear error and nothing left behind.

use std::io::Write;
use std::path::{Path, PathBuf};

use granary_package::{Limits, PackageError, SigningKey, app_id, build, open};

/// A definition with a static-ish payload: a shell script (not ELF) and a
/// data directory.
fn definition(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir.join("files/data")).unwrap();
    std::fs::write(dir.join("files/app.sh"), "#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(
        dir.join("files/app.sh"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    std::fs::write(dir.join("files/data/a.txt"), "a").unwrap();
    std::fs::write(dir.join("files/data/b.txt"), "b").unwrap();
    let def = dir.join("app.toml");
    std::fs::write(
        &def,
        r#"format = 1
[app]
kind = "notes"
version = "1.0.0"
title = "Notes"
exec = ["/bin/app.sh"]
services = ["http"]
[files]
runtime = ["/bin/sh"]
copy = [
  { from = "files/app.sh", to = "/bin/app.sh" },
  { from = "files/data", to = "/usr/share/notes" },
]
"#,
    )
    .unwrap();
    def
}

#[test]
fn build_verify_inspect_unpack_and_builds_are_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let def = definition(dir.path());
    let key = SigningKey::generate().unwrap();
    let out = dir.path().join("notes.gpkg");
    let report = build(&def, &key, &out).unwrap();
    assert_eq!(report.app_id, app_id(&key.public()));
    // /bin/sh is ELF: its libraries and loader were collected.
    assert!(
        report.libraries.iter().any(|l| l.contains("libc.so")),
        "{:?}",
        report.libraries
    );
    let first = std::fs::read(&out).unwrap();
    build(&def, &key, &out).unwrap();
    assert_eq!(
        first,
        std::fs::read(&out).unwrap(),
        "same inputs, same bytes"
    );

    let limits = Limits::default();
    let pkg = open(&first, &limits).unwrap();
    assert_eq!(pkg.app_id, report.app_id);
    let (manifest, entries) = pkg.inspect(&limits).unwrap();
    assert_eq!(manifest.kind, "notes");
    let paths: Vec<&str> = entries.iter().map(|e| e.path.as_str()).collect();
    for p in ["/bin/app.sh", "/bin/sh", "/usr/share/notes/a.txt"] {
        assert!(paths.contains(&p), "{p} missing from {paths:?}");
    }
    let dest = dir.path().join("unpacked");
    pkg.unpack(&dest, &limits).unwrap();
    assert_eq!(
        std::fs::read_to_string(dest.join("image/usr/share/notes/b.txt")).unwrap(),
        "b"
    );
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        std::fs::metadata(dest.join("image/bin/app.sh"))
            .unwrap()
            .mode()
            & 0o777,
        0o555
    );
    assert!(dest.join("granary-app.toml").exists());
}

fn built() -> (tempfile::TempDir, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let def = definition(dir.path());
    let key = SigningKey::generate().unwrap();
    let out = dir.path().join("p.gpkg");
    build(&def, &key, &out).unwrap();
    let bytes = std::fs::read(&out).unwrap();
    (dir, bytes)
}

#[test]
fn tampering_truncation_and_other_files_are_refused() {
    let (_dir, good) = built();
    let limits = Limits::default();
    let mut body = good.clone();
    let last = body.len() - 10;
    body[last] ^= 1;
    assert!(matches!(
        open(&body, &limits),
        Err(PackageError::BadSignature)
    ));
    let mut sig = good.clone();
    sig[50] ^= 0x80;
    assert!(matches!(
        open(&sig, &limits),
        Err(PackageError::BadSignature)
    ));
    let mut key = good.clone();
    key[10] ^= 1;
    assert!(matches!(
        open(&key, &limits),
        Err(PackageError::BadSignature)
    ));
    assert!(matches!(
        open(&good[..60], &limits),
        Err(PackageError::Truncated(60))
    ));
    assert!(matches!(
        open(&good[..good.len() - 1], &limits),
        Err(PackageError::BadSignature)
    ));
    assert!(matches!(
        open(b"PK\x03\x04 a zip file", &limits),
        Err(PackageError::NotAPackage)
    ));
    let small = Limits {
        max_package_bytes: 100,
        ..limits
    };
    assert!(matches!(
        open(&good, &small),
        Err(PackageError::TooLarge { .. })
    ));
}

/// A raw tar entry, written byte by byte so that it can say anything.
struct Raw<'a> {
    name: &'a [u8],
    kind: u8,
    mode: u32,
    data: &'a [u8],
    link: &'a [u8],
}

fn raw_tar(entries: &[Raw<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        let mut h = [0u8; 512];
        h[..e.name.len()].copy_from_slice(e.name);
        let octal = |n: u64, width: usize| format!("{n:0w$o}\0", w = width - 1).into_bytes();
        h[100..108].copy_from_slice(&octal(u64::from(e.mode), 8));
        h[108..116].copy_from_slice(&octal(0, 8));
        h[116..124].copy_from_slice(&octal(0, 8));
        h[124..136].copy_from_slice(&octal(e.data.len() as u64, 12));
        h[136..148].copy_from_slice(&octal(0, 12));
        h[156] = e.kind;
        h[157..157 + e.link.len()].copy_from_slice(e.link);
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
        h[148..156].copy_from_slice(&octal(u64::from(sum), 8));
        out.extend_from_slice(&h);
        out.extend_from_slice(e.data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

/// A package signed by `key` around a hand-made archive.
fn signed(key: &SigningKey, tar: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(tar).unwrap();
    granary_package::seal(key, &gz.finish().unwrap())
}

fn manifest_for(key: &SigningKey) -> String {
    format!(
        "id = \"{}\"\nversion = \"1\"\nkind = \"evil\"\nexec = [\"/bin/app\"]\n",
        app_id(&key.public())
    )
}

static LONG: [u8; 200_000] = [b'a'; 200_000];

#[test]
fn hostile_archives_are_refused_and_leave_nothing() {
    let key = SigningKey::generate().unwrap();
    let manifest = manifest_for(&key);
    let m = Raw {
        name: b"granary-app.toml",
        kind: b'0',
        mode: 0o644,
        data: manifest.as_bytes(),
        link: b"",
    };
    let dir = |name: &'static [u8]| Raw {
        name,
        kind: b'5',
        mode: 0o755,
        data: b"",
        link: b"",
    };
    let file = |name: &'static [u8], mode: u32| Raw {
        name,
        kind: b'0',
        mode,
        data: b"x",
        link: b"",
    };
    let app = || file(b"image/bin/app", 0o755);
    let cases: Vec<(&str, Vec<Raw<'_>>, &str)> = vec![
        (
            "path traversal",
            vec![
                m.clone(),
                dir(b"image/"),
                dir(b"image/bin/"),
                app(),
                file(b"image/../escape", 0o644),
            ],
            "clean relative path",
        ),
        (
            "absolute path",
            vec![
                m.clone(),
                dir(b"image/"),
                dir(b"image/bin/"),
                app(),
                file(b"/etc/evil", 0o644),
            ],
            "outside image/",
        ),
        (
            "symlink out of the image",
            vec![
                m.clone(),
                dir(b"image/"),
                dir(b"image/bin/"),
                app(),
                Raw {
                    name: b"image/bin/out",
                    kind: b'2',
                    mode: 0o777,
                    data: b"",
                    link: b"../../etc/shadow",
                },
            ],
            "points out of the image",
        ),
        (
            "write through a symlink",
            vec![
                m.clone(),
                dir(b"image/"),
                dir(b"image/bin/"),
                app(),
                Raw {
                    name: b"image/etc",
                    kind: b'2',
                    mode: 0o777,
                    data: b"",
                    link: b"/bin",
                },
                file(b"image/etc/passwd", 0o644),
            ],
            "its directory is not a directory",
        ),
        (
            "hard link",
            vec![
                m.clone(),
                dir(b"image/"),
                dir(b"image/bin/"),
                app(),
                Raw {
                    name: b"image/bin/hard",
                    kind: b'1',
                    mode: 0o644,
                    data: b"",
                    link: b"image/bin/app",
                },
            ],
            "hard link",
        ),
        (
            "device node",
            vec![
                m.clone(),
                dir(b"image/"),
                dir(b"image/bin/"),
                app(),
                Raw {
                    name: b"image/bin/sda",
                    kind: b'4',
                    mode: 0o600,
                    data: b"",
                    link: b"",
                },
            ],
            "only files, directories and symlinks",
        ),
        (
            "setuid",
            vec![
                m.clone(),
                dir(b"image/"),
                dir(b"image/bin/"),
                file(b"image/bin/app", 0o4755),
            ],
            "setuid",
        ),
        (
            "duplicate",
            vec![m.clone(), dir(b"image/"), dir(b"image/bin/"), app(), app()],
            "appears twice",
        ),
        (
            "no manifest first",
            vec![dir(b"image/"), m.clone()],
            "first entry must be granary-app.toml",
        ),
        (
            "huge GNU long name",
            vec![
                m.clone(),
                dir(b"image/"),
                Raw {
                    name: b"././@LongLink",
                    kind: b'L',
                    mode: 0o644,
                    data: &LONG,
                    link: b"",
                },
                app(),
            ],
            "extended header",
        ),
        (
            "exec missing",
            vec![m.clone(), dir(b"image/"), dir(b"image/bin/")],
            "exec /bin/app is not an executable file",
        ),
    ];
    let limits = Limits::default();
    let tmp = tempfile::tempdir().unwrap();
    for (what, entries, expect) in cases {
        let pkg = signed(&key, &raw_tar(&entries));
        let verified = open(&pkg, &limits).unwrap();
        let dest = tmp.path().join(what.replace(' ', "-"));
        let err = verified.unpack(&dest, &limits).unwrap_err().to_string();
        assert!(err.contains(expect), "{what}: {err}");
        assert!(!dest.exists(), "{what}: left {}", dest.display());
    }
    assert!(!tmp.path().join("escape").exists());

    // A manifest naming another signer's app id.
    let other = SigningKey::generate().unwrap();
    let stolen = manifest_for(&other);
    let pkg = signed(
        &key,
        &raw_tar(&[
            Raw {
                name: b"granary-app.toml",
                kind: b'0',
                mode: 0o644,
                data: stolen.as_bytes(),
                link: b"",
            },
            dir(b"image/"),
        ]),
    );
    let err = open(&pkg, &limits)
        .unwrap()
        .inspect(&limits)
        .unwrap_err()
        .to_string();
    assert!(err.contains("signed by the key of"), "{err}");
}

impl Clone for Raw<'_> {
    fn clone(&self) -> Self {
        Raw { ..*self }
    }
}

#[test]
fn a_decompression_bomb_stops_at_the_limit() {
    let key = SigningKey::generate().unwrap();
    let manifest = manifest_for(&key);
    let zeros = vec![0u8; 64 << 20];
    let pkg = signed(
        &key,
        &raw_tar(&[
            Raw {
                name: b"granary-app.toml",
                kind: b'0',
                mode: 0o644,
                data: manifest.as_bytes(),
                link: b"",
            },
            Raw {
                name: b"image/",
                kind: b'5',
                mode: 0o755,
                data: b"",
                link: b"",
            },
            Raw {
                name: b"image/zeros",
                kind: b'0',
                mode: 0o644,
                data: &zeros,
                link: b"",
            },
        ]),
    );
    assert!(
        pkg.len() < 1 << 20,
        "64 MiB of zeros compress small: {}",
        pkg.len()
    );
    let limits = Limits {
        max_unpacked_bytes: 8 << 20,
        ..Limits::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("bomb");
    let err = open(&pkg, &limits)
        .unwrap()
        .unpack(&dest, &limits)
        .unwrap_err();
    assert!(
        matches!(
            err,
            PackageError::TooLarge {
                what: "unpacked files",
                ..
            }
        ),
        "{err}"
    );
    assert!(!dest.exists());
}

/// Fuzz-style: thousands of random mutations of a valid package body, each
/// re-signed so it reaches the archive reader. Nothing may panic, and
/// nothing may appear outside the destination. (`fuzz/` has the libFuzzer
/// target for longer runs.)
#[test]
fn mutated_archives_never_panic_or_escape() {
    let (_dir, good) = built();
    let key = SigningKey::generate().unwrap();
    // Re-sign the original body with our key (the manifest's app id will
    // not match, so also build a matching one).
    let body_start = granary_package::HEADER_LEN;
    let mut gz = flate2::read::GzDecoder::new(&good[body_start..]);
    let mut tar = Vec::new();
    std::io::Read::read_to_end(&mut gz, &mut tar).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let limits = Limits {
        max_unpacked_bytes: 16 << 20,
        max_entries: 10_000,
        ..Limits::default()
    };
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for i in 0..400 {
        let mut t = tar.clone();
        for _ in 0..(1 + next() % 4) {
            let at = (next() % t.len() as u64) as usize;
            t[at] = next() as u8;
        }
        if next() % 8 == 0 {
            let cut = (next() % t.len() as u64) as usize;
            t.truncate(cut);
        }
        let pkg = signed(&key, &t);
        let dest = tmp.path().join(format!("d{i}"));
        if let Ok(v) = open(&pkg, &limits) {
            let _ = v.unpack(&dest, &limits);
        }
        let _ = std::fs::remove_dir_all(&dest);
    }
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    assert!(left.is_empty(), "something escaped: {left:?}");
}
