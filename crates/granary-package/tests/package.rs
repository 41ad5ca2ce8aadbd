//! Packages end to end, and every kind of bad input the reader must refuse
//! with a clear error and nothing left behind.

use std::io::Write;
use std::path::{Path, PathBuf};

use granary_package::{Limits, PackageError, SigningKey, app_id, build, build_for, open};

/// The architectures this host runs, as a node without a cluster names
/// them.
const HERE: &[&str] = &[std::env::consts::ARCH];

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
    pkg.unpack(&dest, &limits, HERE).unwrap();
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
        let err = verified
            .unpack(&dest, &limits, HERE)
            .unwrap_err()
            .to_string();
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
        .unpack(&dest, &limits, HERE)
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
            let _ = v.unpack(&dest, &limits, HERE);
        }
        let _ = std::fs::remove_dir_all(&dest);
    }
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    assert!(left.is_empty(), "something escaped: {left:?}");
}

/// A minimal static ELF program for `machine` (62 x86_64, 183 aarch64):
/// the header and one program header, of type `ptype` (1 PT_LOAD; 3
/// PT_INTERP makes it ask for a loader).
fn elf(machine: u16, ptype: u32) -> Vec<u8> {
    let mut f = vec![0u8; 64 + 56];
    f[..4].copy_from_slice(b"\x7fELF");
    f[4] = 2;
    f[5] = 1;
    f[6] = 1;
    f[16] = 2;
    f[18..20].copy_from_slice(&machine.to_le_bytes());
    f[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
    f[0x34..0x36].copy_from_slice(&64u16.to_le_bytes());
    f[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
    f[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
    f[64..68].copy_from_slice(&ptype.to_le_bytes());
    f
}

/// A definition whose program comes from `files/{arch}/app`, with the
/// given programs per architecture.
fn arch_definition(dir: &Path, programs: &[(&str, Vec<u8>)]) -> PathBuf {
    for (arch, bytes) in programs {
        let at = dir.join("files").join(arch);
        std::fs::create_dir_all(&at).unwrap();
        std::fs::write(at.join("app"), bytes).unwrap();
        std::fs::set_permissions(
            at.join("app"),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
    }
    std::fs::create_dir_all(dir.join("files/share")).unwrap();
    std::fs::write(dir.join("files/share/readme"), "same everywhere").unwrap();
    let def = dir.join("app.toml");
    std::fs::write(
        &def,
        r#"format = 1
[app]
kind = "notes"
version = "1.0.0"
exec = ["/bin/app"]
[files]
copy = [
  { from = "files/{arch}/app", to = "/bin/app" },
  { from = "files/share", to = "/usr/share/notes" },
]
"#,
    )
    .unwrap();
    def
}

#[test]
fn a_package_carries_one_image_per_architecture_and_a_host_unpacks_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let (x86, arm) = (elf(62, 1), elf(183, 1));
    let def = arch_definition(
        dir.path(),
        &[("x86_64", x86.clone()), ("aarch64", arm.clone())],
    );
    let key = SigningKey::generate().unwrap();
    let out = dir.path().join("multi.gpkg");
    let report = build_for(&def, &key, &out, &["x86_64", "aarch64", "x86_64"]).unwrap();
    assert_eq!(report.arches, ["aarch64", "x86_64"]);
    let bytes = std::fs::read(&out).unwrap();
    let limits = Limits::default();
    let pkg = open(&bytes, &limits).unwrap();
    let (manifest, entries) = pkg.inspect(&limits).unwrap();
    assert_eq!(manifest.arches, ["aarch64", "x86_64"]);
    for arch in ["x86_64", "aarch64"] {
        assert!(
            entries
                .iter()
                .any(|e| e.arch == Some(arch) && e.path == "/bin/app"),
            "{arch}: {entries:?}"
        );
    }
    // Each host unpacks the image it runs as image/, and only that one.
    for (runs, expect) in [
        (&["x86_64"][..], &x86),
        (&["aarch64"][..], &arm),
        (&["aarch64", "x86_64"][..], &arm),
    ] {
        let dest = dir.path().join(format!("unpacked-{}", runs.join("-")));
        let m = pkg.unpack(&dest, &limits, runs).unwrap();
        assert_eq!(m.arches, manifest.arches);
        assert_eq!(&std::fs::read(dest.join("image/bin/app")).unwrap(), expect);
        assert_eq!(
            std::fs::read_to_string(dest.join("image/usr/share/notes/readme")).unwrap(),
            "same everywhere"
        );
        let tops: Vec<String> = std::fs::read_dir(&dest)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(tops.len(), 2, "{tops:?}");
    }

    // An aarch64-only package on a host that runs x86_64 only: a clear
    // refusal and nothing written.
    let only = dir.path().join("arm.gpkg");
    build_for(&def, &key, &only, &["aarch64"]).unwrap();
    let bytes = std::fs::read(&only).unwrap();
    let pkg = open(&bytes, &limits).unwrap();
    let dest = dir.path().join("refused");
    let err = pkg
        .unpack(&dest, &limits, &["x86_64"])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("has images for aarch64 only, and this node runs x86_64"),
        "{err}"
    );
    assert!(!dest.exists());
    // Deterministic, as single-image builds are.
    build_for(&def, &key, &out, &["aarch64", "x86_64"]).unwrap();
    assert_eq!(
        report.sha256,
        granary_package::sha256_hex(&std::fs::read(&out).unwrap())
    );
}

#[test]
fn builds_refuse_programs_of_the_wrong_kind_for_an_image() {
    let key = SigningKey::generate().unwrap();
    let here = std::env::consts::ARCH;
    let (other, machine_here, machine_other) = match here {
        "aarch64" => ("x86_64", 183, 62),
        _ => ("aarch64", 62, 183),
    };
    let wrong = format!("is built for {here}, not {other}");
    for (programs, targets, expect) in [
        (
            vec![(other, elf(machine_here, 1))],
            &[other][..],
            wrong.as_str(),
        ),
        (
            vec![(other, elf(machine_other, 3))],
            &[other][..],
            "is linked dynamically",
        ),
        (
            vec![(here, elf(machine_here, 1))],
            &["riscv64"][..],
            "--target riscv64",
        ),
        (
            vec![(here, elf(machine_here, 1))],
            &["x86_64", "aarch64"][..],
            "cannot read",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let def = arch_definition(dir.path(), &programs);
        let out = dir.path().join("p.gpkg");
        let err = build_for(&def, &key, &out, targets)
            .unwrap_err()
            .to_string();
        assert!(err.contains(expect), "{targets:?}: {err}");
        assert!(!out.exists());
    }
}

#[test]
fn hostile_images_per_architecture_are_refused() {
    let key = SigningKey::generate().unwrap();
    let with_arches = |arches: &str| format!("{}arches = [{arches}]\n", manifest_for(&key));
    let both = with_arches("\"aarch64\", \"x86_64\"");
    let arm_only = with_arches("\"aarch64\"");
    let (x86, arm) = (elf(62, 1), elf(183, 1));
    let entry = |name: &'static [u8], kind: u8, mode: u32, data: &'static [u8]| Raw {
        name,
        kind,
        mode,
        data,
        link: b"",
    };
    let leak = |v: Vec<u8>| -> &'static [u8] { Vec::leak(v) };
    let (x86, arm) = (leak(x86), leak(arm));
    let arm32 = leak(elf(40, 1));
    let image = |top: &'static str, program: &'static [u8]| -> Vec<Raw<'static>> {
        let top: &'static str = top;
        vec![
            entry(leak(format!("{top}/").into_bytes()), b'5', 0o755, b""),
            entry(leak(format!("{top}/bin/").into_bytes()), b'5', 0o755, b""),
            entry(
                leak(format!("{top}/bin/app").into_bytes()),
                b'0',
                0o755,
                program,
            ),
        ]
    };
    let manifest = |text: &str| {
        entry(
            leak(b"granary-app.toml".to_vec()),
            b'0',
            0o644,
            leak(text.as_bytes().to_vec()),
        )
    };
    let cases: Vec<(&str, Vec<Raw<'_>>, &str)> = vec![
        (
            "a program of the wrong architecture",
            [vec![manifest(&arm_only)], image("image-aarch64", x86)].concat(),
            "is built for x86_64, not aarch64",
        ),
        (
            "a program for an architecture no node runs",
            [vec![manifest(&arm_only)], image("image-aarch64", arm32)].concat(),
            "is built for an architecture no node runs, not aarch64",
        ),
        (
            "an image the manifest does not list",
            [
                vec![manifest(&arm_only)],
                image("image-aarch64", arm),
                image("image-x86_64", x86),
            ]
            .concat(),
            "the archive has image-x86_64/",
        ),
        (
            "a listed image missing",
            [vec![manifest(&both)], image("image-aarch64", arm)].concat(),
            "the archive has no image-x86_64/",
        ),
        (
            "a plain image beside per-architecture images",
            [
                vec![manifest(&arm_only)],
                image("image-aarch64", arm),
                image("image", x86),
            ]
            .concat(),
            "the archive has image/",
        ),
        (
            "an architecture no node runs",
            [vec![manifest(&arm_only)], image("image-riscv64", arm)].concat(),
            "which no node runs",
        ),
    ];
    let limits = Limits::default();
    let tmp = tempfile::tempdir().unwrap();
    for (what, entries, expect) in cases {
        let pkg = signed(&key, &raw_tar(&entries));
        let verified = open(&pkg, &limits).unwrap();
        let err = verified.inspect(&limits).unwrap_err().to_string();
        assert!(err.contains(expect), "{what}: {err}");
        let dest = tmp.path().join(what.replace(' ', "-"));
        let err = verified
            .unpack(&dest, &limits, &["aarch64", "x86_64"])
            .unwrap_err()
            .to_string();
        assert!(err.contains(expect), "{what}: {err}");
        assert!(!dest.exists(), "{what}: left {}", dest.display());
    }
}
