//! The hostile-grain quota attack, on real ZFS (zfs-fuse) and btrfs: the
//! static probe, jailed as a grain with its dataset from the backend,
//! writes until it is refused, and must stop at its quota while another
//! grain's dataset keeps working. Root only, as CI runs.

#![cfg(target_os = "linux")]

use std::path::{Path, PathBuf};
use std::process::Command;

use granary_datasets::testing::{BtrfsLoop, ZfsPool};
use granary_datasets::{Btrfs, Datasets, Zfs};
use granary_jail::{DEFAULT_UID_RANGE, GrainSpec, JailConfig, Limits};

const QUOTA: u64 = 16 << 20;

fn probe() -> PathBuf {
    let triple = format!("{}-unknown-linux-gnu", std::env::consts::ARCH);
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(format!("../../target/{triple}/debug/granary-probe"));
    assert!(
        path.exists(),
        "{} is missing; run ./run-tests",
        path.display()
    );
    path
}

fn attack(backend: &dyn Datasets, data_root: &Path, image: &Path) {
    let uid = DEFAULT_UID_RANGE.start + 970;
    let dataset = backend.create("quota-attacker", uid).unwrap();
    let config = JailConfig {
        data_root: data_root.to_path_buf(),
        uid_range: DEFAULT_UID_RANGE,
        cgroup: JailConfig::detect_cgroup(),
        cgroup_parent: "granary-test-quota".to_owned(),
    };
    let plan = config
        .plan(&GrainSpec {
            grain: "quota-attacker".to_owned(),
            image: image.to_path_buf(),
            dataset,
            host_uid: uid,
            argv: vec![
                "/bin/probe".to_owned(),
                "--fill".to_owned(),
                "/var/fill".to_owned(),
            ],
            env: vec![],
            keep_fds: vec![],
            limits: Limits::default(),
        })
        .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_granary-launcher"))
        .arg("--plan-json")
        .arg(serde_json::to_string(&plan).unwrap())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let words: Vec<&str> = stdout.split_whitespace().collect();
    let (written, errno) = match words.as_slice() {
        ["filled", n, "errno", e] => (n.parse::<u64>().unwrap(), e.parse::<i32>().unwrap()),
        _ => panic!(
            "{}: unexpected probe output {stdout:?} {}",
            backend.backend(),
            String::from_utf8_lossy(&out.stderr)
        ),
    };
    // EDQUOT, or ENOSPC as zfs-fuse reports a full refquota.
    assert!(
        errno == 122 || errno == 28,
        "{}: errno {errno}",
        backend.backend()
    );
    assert!(
        written <= QUOTA + (4 << 20),
        "{}: the grain wrote {written} bytes past a {QUOTA} quota",
        backend.backend()
    );
    // Nor can it make a subvolume (btrfs) to write outside its quota.
    let mut subvol = plan.clone();
    subvol.argv = vec!["/bin/probe".to_owned(), "--subvol".to_owned()];
    let out = Command::new(env!("CARGO_BIN_EXE_granary-launcher"))
        .arg("--plan-json")
        .arg(serde_json::to_string(&subvol).unwrap())
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "subvol refused errno 1",
        "{}: {}",
        backend.backend(),
        String::from_utf8_lossy(&out.stderr)
    );
    // The neighbour is unaffected.
    let other = backend.create("neighbour", uid + 1).unwrap();
    std::fs::write(other.join("still-room"), vec![1u8; 4 << 20]).unwrap();
    println!(
        "{}: the grain stopped after {written} bytes (errno {errno})",
        backend.backend()
    );
    backend.destroy("quota-attacker").unwrap();
    backend.destroy("neighbour").unwrap();
    if let Some(driver) = &config.cgroup {
        granary_jail::cgroup::remove_leftovers(driver, &config.cgroup_parent, None);
    }
}

fn image(dir: &Path) -> PathBuf {
    let image = dir.join("image");
    std::fs::create_dir_all(image.join("bin")).unwrap();
    std::fs::copy(probe(), image.join("bin/probe")).unwrap();
    for p in [dir, &image, &image.join("bin")] {
        std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    image
}

#[test]
fn a_grain_cannot_exceed_its_quota_on_zfs_or_btrfs() {
    let tmp = tempfile::Builder::new()
        .prefix("granary-quota-")
        .tempdir()
        .unwrap();
    let image = image(tmp.path());

    let pool = ZfsPool::create(tmp.path(), "256M").unwrap();
    let root = tmp.path().join("zfs-grains");
    let zfs = Zfs::new(&root, &pool.name, QUOTA).unwrap();
    attack(&zfs, &root, &image);
    drop(pool);

    let fs = BtrfsLoop::create(tmp.path(), "512M").unwrap();
    let root = fs.mount.join("grains");
    let btrfs = Btrfs::new(&root, QUOTA).unwrap();
    attack(&btrfs, &root, &image);
}
