//! The plain-directory backend: any filesystem, no quotas. Snapshots are
//! trees of hard links and copies (see [`link`]), cheap enough to schedule.

use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use crate::{
    DatasetError, Datasets, Snapshot, check_id, check_label, err, list_snapshot_dir, mkdir,
    refuse_if_held, running_as_root,
};

mod link;

/// Where a snapshot's index (what the live files were when it was taken)
/// is kept, beside it; dot names are never listed as snapshots.
fn index_name(label: &str) -> String {
    format!(".index-{label}")
}

/// Plain directories under `root`.
#[derive(Debug, Clone)]
pub struct Plain {
    root: PathBuf,
}

impl Plain {
    /// Uses (and creates, root-only) `root` as the parent of every grain.
    pub fn new(root: &Path) -> io::Result<Plain> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(root)?;
        Ok(Plain {
            root: root.to_path_buf(),
        })
    }
}

/// `cp -a --reflink=auto`: preserves owners, modes, times, links (never
/// followed) and hard links; shares blocks where the filesystem can.
fn copy_tree(grain: &str, from: &Path, to: &Path) -> Result<(), DatasetError> {
    let out = std::process::Command::new("cp")
        .arg("-a")
        .arg("--reflink=auto")
        .arg("--")
        .arg(from)
        .arg(to)
        .output()
        .map_err(err(grain, "run cp"))?;
    if out.status.success() {
        Ok(())
    } else {
        let _ = std::fs::remove_dir_all(to);
        Err(err(grain, "copy the dataset")(io::Error::other(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        )))
    }
}

impl Datasets for Plain {
    fn backend(&self) -> &'static str {
        "plain"
    }

    fn grain_dir(&self, grain: &str) -> PathBuf {
        self.root.join(grain)
    }

    fn create(&self, grain: &str, host_uid: u32) -> Result<PathBuf, DatasetError> {
        check_id(grain)?;
        let dir = self.grain_dir(grain);
        mkdir(&dir, 0o700).map_err(err(grain, "create the grain directory"))?;
        let data = dir.join("data");
        mkdir(&data, 0o700).map_err(err(grain, "create the dataset"))?;
        if running_as_root() {
            std::os::unix::fs::lchown(&data, Some(host_uid), Some(host_uid))
                .map_err(err(grain, "hand the dataset to the grain's uid"))?;
        }
        Ok(data)
    }

    /// A snapshot in `<grain>/snapshots/<label>`, `rsync --link-dest`
    /// style: a file unchanged since the newest indexed snapshot is a hard
    /// link to that snapshot's copy, anything else is copied (a reflink
    /// where the filesystem has one). Snapshots share files only with each
    /// other, never with the live dataset, so the grain writing in place
    /// cannot change one.
    fn snapshot(&self, grain: &str, label: &str) -> Result<Option<String>, DatasetError> {
        check_id(grain)?;
        check_label(grain, label)?;
        let dir = self.grain_dir(grain).join("snapshots");
        mkdir(&dir, 0o700).map_err(err(grain, "create the snapshot directory"))?;
        let target = dir.join(label);
        if target.exists() {
            return Err(err(grain, "take a snapshot")(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("snapshot {label} exists"),
            )));
        }
        let base = self.list_snapshots(grain)?.into_iter().rev().find_map(|s| {
            let index = link::read_index(&dir.join(index_name(&s.name)))?;
            Some((dir.join(&s.name), index))
        });
        let partial = dir.join(format!(".partial-{label}"));
        let _ = std::fs::remove_dir_all(&partial);
        let index_path = dir.join(index_name(label));
        let index_partial = dir.join(format!(".partial-{}", index_name(label)));
        let made = link::snapshot(
            &self.path(grain),
            base.as_ref().map(|(p, i)| (p.as_path(), i)),
            &partial,
            &index_partial,
        )
        .and_then(|stats| {
            std::fs::rename(&index_partial, &index_path)?;
            std::fs::rename(&partial, &target)?;
            Ok(stats)
        });
        // The rename is the commit: the snapshot exists from here on, and
        // a failure to sync its directory entry is only worth a warning.
        if made.is_ok()
            && let Err(e) = link::sync_dir(&dir)
        {
            tracing::warn!(grain, label, error = %e, "syncing the snapshot directory failed");
        }
        match made {
            Ok(stats) => {
                tracing::debug!(
                    grain,
                    label,
                    linked = stats.linked,
                    copied = stats.copied,
                    copied_bytes = stats.copied_bytes,
                    "plain snapshot taken"
                );
                Ok(Some(target.display().to_string()))
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&partial);
                let _ = std::fs::remove_file(&index_partial);
                let _ = std::fs::remove_file(&index_path);
                Err(err(grain, "take a snapshot")(e))
            }
        }
    }

    fn list_snapshots(&self, grain: &str) -> Result<Vec<Snapshot>, DatasetError> {
        check_id(grain)?;
        list_snapshot_dir(grain, &self.grain_dir(grain).join("snapshots"))
    }

    fn delete_snapshot(&self, grain: &str, label: &str) -> Result<(), DatasetError> {
        check_id(grain)?;
        check_label(grain, label)?;
        refuse_if_held(grain, &self.grain_dir(grain), label)?;
        let dir = self.grain_dir(grain).join("snapshots");
        // The index first: a snapshot without one is only never a base.
        match std::fs::remove_file(dir.join(index_name(label))) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(err(grain, "delete a snapshot's index")(e));
            }
            _ => {}
        }
        std::fs::remove_dir_all(dir.join(label)).map_err(err(grain, "delete a snapshot"))
    }

    fn rollback(&self, grain: &str, label: &str, host_uid: u32) -> Result<(), DatasetError> {
        check_id(grain)?;
        check_label(grain, label)?;
        let snap = self.grain_dir(grain).join("snapshots").join(label);
        if !snap.is_dir() {
            return Err(err(grain, "find the snapshot")(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no snapshot {label:?}"),
            )));
        }
        // Copy first, then swap: a failure leaves the current data.
        let fresh = self.grain_dir(grain).join(".rollback");
        let _ = std::fs::remove_dir_all(&fresh);
        copy_tree(grain, &snap, &fresh)?;
        let data = self.path(grain);
        // One atomic swap: a crash leaves either the old or the new data
        // at `data`, never neither.
        nix::fcntl::renameat2(
            None,
            &fresh,
            None,
            &data,
            nix::fcntl::RenameFlags::RENAME_EXCHANGE,
        )
        .map_err(|e| err(grain, "swap in the rolled-back data")(io::Error::from(e)))?;
        // `fresh` now holds what was replaced.
        let _ = std::fs::remove_dir_all(&fresh);
        if running_as_root() {
            std::os::unix::fs::lchown(&data, Some(host_uid), Some(host_uid))
                .map_err(err(grain, "hand the dataset to the grain's uid"))?;
        }
        Ok(())
    }

    /// The final snapshot moves to `.retired/<grain>-<label>`.
    fn retire(&self, grain: &str, label: &str) -> Result<Option<String>, DatasetError> {
        check_id(grain)?;
        check_label(grain, label)?;
        let data = self.path(grain);
        if !data.exists() {
            self.destroy(grain)?;
            return Ok(None);
        }
        let retired = self.root.join(".retired");
        mkdir(&retired, 0o700).map_err(err(grain, "create the retired directory"))?;
        let kept = retired.join(format!("{grain}-{label}"));
        std::fs::rename(&data, &kept).map_err(err(grain, "keep the final data"))?;
        self.destroy(grain)?;
        Ok(Some(kept.display().to_string()))
    }

    /// Also what a crash left of snapshots being made (`.partial-*` in
    /// each grain's snapshot directory). Runs at start-up, before any
    /// snapshot is taken.
    fn remove_scratch(&self) -> Result<Vec<String>, DatasetError> {
        let mut removed = crate::remove_numbered(self)?;
        for grain in std::fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = grain.file_name().to_string_lossy().into_owned();
            if check_id(&name).is_err() {
                continue;
            }
            let snapshots = grain.path().join("snapshots");
            for entry in std::fs::read_dir(&snapshots)
                .into_iter()
                .flatten()
                .flatten()
            {
                let partial = entry.file_name().to_string_lossy().into_owned();
                if !partial.starts_with(".partial-") {
                    continue;
                }
                let path = entry.path();
                let gone = if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    std::fs::remove_dir_all(&path)
                } else {
                    std::fs::remove_file(&path)
                };
                gone.map_err(err(&name, "remove a half-made snapshot"))?;
                removed.push(format!("{name}/snapshots/{partial}"));
            }
        }
        Ok(removed)
    }

    fn destroy(&self, grain: &str) -> Result<(), DatasetError> {
        check_id(grain)?;
        // std's remove_dir_all never follows symlinks, so a link the grain
        // planted in its dataset cannot make us delete anything outside it.
        match std::fs::remove_dir_all(self.grain_dir(grain)) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other.map_err(err(grain, "remove the dataset")),
        }
    }
}
