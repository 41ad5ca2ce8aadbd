//! The doctor's look at the storage's own health: the ZFS pool Granary's
//! datasets live in (`zpool status -x <pool>`: a degraded mirror, a
//! faulted disk, checksum errors), or the error counters of the btrfs
//! devices under `DATA_DIR/grains`.

use super::doctor::{Finding, Level, ok};

/// The longest the tools may take (a suspended pool can block them).
const LIMIT_SECS: &str = "10";

/// `None` on the plain backend.
pub(super) async fn pool_health(
    zfs_pool: Option<&str>,
    backend: &str,
    data_dir: &std::path::Path,
) -> Option<Finding> {
    // coreutils' timeout: the check ends even when the pool does not answer.
    let mut cmd = std::process::Command::new("timeout");
    cmd.arg(LIMIT_SECS);
    match (backend, zfs_pool) {
        ("zfs", Some(pool)) => cmd.args(["zpool", "status", "-x", pool]),
        ("btrfs", _) => cmd
            .args(["btrfs", "device", "stats", "--check"])
            .arg(data_dir.join("grains")),
        _ => return None,
    };
    let name = format!("{backend} pool health");
    let cannot = |detail: String| Finding {
        area: "storage",
        name: name.clone(),
        level: Level::Warn,
        detail,
        fix: String::new(),
    };
    let out = match tokio::task::spawn_blocking(move || cmd.output()).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => return Some(cannot(format!("cannot run the {backend} tools: {e}"))),
        Err(e) => return Some(cannot(format!("the pool check failed: {e}"))),
    };
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    let code = out.status.code();
    if code == Some(124) {
        return Some(cannot(format!("no answer from the pool in {LIMIT_SECS} s")));
    }
    Some(match backend {
        "zfs" => {
            let pool = zfs_pool.unwrap_or_default();
            if code == Some(0) && stdout == format!("pool '{pool}' is healthy") {
                ok("storage", name, stdout)
            } else if code == Some(0) && !stdout.is_empty() {
                bad(&name, &stdout, "zfs")
            } else {
                cannot(format!("zpool status {pool} failed: {stderr}"))
            }
        }
        // --check exits 64 when a counter is not zero.
        _ => match code {
            Some(0) => ok("storage", name, "no device errors".to_owned()),
            Some(64) => {
                let errors: Vec<&str> = stdout
                    .lines()
                    .filter(|l| !l.trim_end().ends_with(" 0"))
                    .collect();
                bad(&name, &errors.join("\n"), "btrfs")
            }
            _ => cannot(format!("btrfs device stats failed: {stderr}")),
        },
    })
}

fn bad(name: &str, text: &str, backend: &str) -> Finding {
    let shown: Vec<&str> = text.lines().take(12).collect();
    Finding {
        area: "storage",
        name: name.to_owned(),
        level: Level::Fail,
        detail: shown.join("\n"),
        fix: match backend {
            "zfs" => "replace the failed disk (zpool replace), then zpool clear; see zpool status -v",
            _ => "check the disks (btrfs device stats, smartctl); btrfs device stats -z clears the counters",
        }
        .to_owned(),
    }
}
