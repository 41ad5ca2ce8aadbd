//! Real storage for tests: a ZFS pool on a sparse file (zfs-fuse) and a
//! btrfs filesystem on a loop device. Each fixture makes uniquely named
//! things and removes exactly those on drop; a zfs-fuse daemon is started
//! only if none runs, and stopped, if this process started it, when its
//! last pool goes (test processes running side by side each count their
//! own pools only).

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static NEXT: AtomicU32 = AtomicU32::new(0);

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

fn sh(cmd: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{cmd} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A ZFS pool on a sparse file, destroyed on drop.
pub struct ZfsPool {
    pub name: String,
    pub dir: PathBuf,
    file: PathBuf,
}

/// The zfs-fuse daemon this process started, if any, and how many of its
/// pools exist: the last pool to go stops it, so pools of tests running
/// side by side (or of one test) never lose the daemon under them.
static DAEMON: std::sync::Mutex<(usize, Option<Child>)> = std::sync::Mutex::new((0, None));

impl ZfsPool {
    /// `dir` holds the pool's file and its mountpoint.
    pub fn create(dir: &Path, size: &str) -> Result<ZfsPool, String> {
        let mut daemon = DAEMON.lock().unwrap_or_else(|e| e.into_inner());
        // A daemon that answers is reused (a zombie or a dying one named
        // zfs-fuse is not a daemon).
        // Ours, and still alive: a slow answer, not a dead daemon; wait
        // for it below rather than start a second one under live pools.
        let ours_alive = daemon
            .1
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)));
        if !ours_alive && sh("zpool", &["list"]).is_err() {
            if let Some(mut old) = daemon.1.take() {
                let _ = old.wait();
            }
            let child = Command::new("zfs-fuse")
                .arg("--no-daemon")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .map_err(|e| format!("cannot start zfs-fuse (apt install zfs-fuse): {e}"))?;
            daemon.1 = Some(child);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while sh("zpool", &["list"]).is_err() {
            if Instant::now() > deadline {
                if daemon.0 == 0
                    && let Some(mut child) = daemon.1.take()
                {
                    let _ = child.kill();
                    let _ = child.wait();
                }
                return Err("zfs-fuse did not come up".to_owned());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let name = unique("granarytest");
        daemon.0 += 1;
        // Counted from here: a failure below drops the pool, which counts
        // itself out again.
        let pool = ZfsPool {
            name: name.clone(),
            dir: dir.to_path_buf(),
            file: dir.join(format!("{name}.img")),
        };
        drop(daemon);
        let file = pool.file.clone();
        sh("truncate", &["-s", size, &file.to_string_lossy()])?;
        let mount = dir.join("pool");
        sh(
            "zpool",
            &[
                "create",
                "-m",
                &mount.to_string_lossy(),
                &name,
                &file.to_string_lossy(),
            ],
        )?;
        Ok(pool)
    }
}

impl Drop for ZfsPool {
    fn drop(&mut self) {
        for _ in 0..20 {
            if sh("zpool", &["destroy", "-f", &self.name]).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = std::fs::remove_file(&self.file);
        let mut daemon = DAEMON.lock().unwrap_or_else(|e| e.into_inner());
        daemon.0 = daemon.0.saturating_sub(1);
        if daemon.0 == 0
            && let Some(mut child) = daemon.1.take()
        {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A btrfs filesystem on a loop device, mounted at `mount`; unmounted and
/// detached on drop.
pub struct BtrfsLoop {
    pub mount: PathBuf,
    device: String,
    file: PathBuf,
}

impl BtrfsLoop {
    pub fn create(dir: &Path, size: &str) -> Result<BtrfsLoop, String> {
        let file = dir.join(format!("{}.img", unique("btrfs")));
        sh("truncate", &["-s", size, &file.to_string_lossy()])?;
        let device = sh("losetup", &["-f", "--show", &file.to_string_lossy()])?
            .trim()
            .to_owned();
        let fail = |e: String, device: &str| {
            let _ = sh("losetup", &["-d", device]);
            e
        };
        sh("mkfs.btrfs", &["-q", &device]).map_err(|e| fail(e, &device))?;
        let mount = dir.join("btrfs");
        std::fs::create_dir_all(&mount).map_err(|e| fail(e.to_string(), &device))?;
        sh("mount", &[&device, &mount.to_string_lossy()]).map_err(|e| fail(e, &device))?;
        Ok(BtrfsLoop {
            mount,
            device,
            file,
        })
    }
}

impl Drop for BtrfsLoop {
    fn drop(&mut self) {
        let _ = sh("umount", &[&self.mount.to_string_lossy()]);
        let _ = sh("losetup", &["-d", &self.device]);
        let _ = std::fs::remove_file(&self.file);
    }
}
