//! Grain datasets: each grain's one writable, persistent directory (mounted
//! at `/var` inside its sandbox), behind the [`Datasets`] interface.
//!
//! The plain-directory backend ([`Plain`]) is the fallback that works on any
//! filesystem: no quotas; snapshots are trees of hard links and copies. [`Zfs`] (one dataset per grain
//! with a `refquota`, through the real `zfs` command) and [`Btrfs`] (one
//! subvolume per grain with a qgroup limit) implement the same trait.
//!
//! Layout under the backend's root (`<data dir>/grains`):
//!
//! ```text
//! <grain id>/        root-owned, 0700: host-only
//!     data/          the dataset, owned by the grain's host uid, 0700
//! ```
//!
//! The supervisor keeps host-only files (the grain's log) beside `data/`.

use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
#[error("dataset of grain {grain}: {op}: {source}")]
pub struct DatasetError {
    pub grain: String,
    pub op: &'static str,
    #[source]
    pub source: io::Error,
}

/// Beside a grain's data (not in it): the fencing epoch, on backends
/// without user properties.
const EPOCH_FILE: &str = "epoch";

/// Put at the root of a grain's data when it is set back to an earlier
/// copy (`granary_sdk::REWOUND` names it inside the grain).
pub const REWOUND_MARK: &str = ".granary-rewound";

/// Tells the grain its data at `data` was set back to an earlier copy
/// (a failover, a rollback): writes [`REWOUND_MARK`] there, owned by
/// `host_uid` so the grain can remove it. Blocking.
pub fn mark_rewound(data: &Path, host_uid: u32) -> io::Result<()> {
    let mark = data.join(REWOUND_MARK);
    granary_files::write_atomic(&mark, b"", 0o600).map_err(io::Error::other)?;
    if nix::unistd::geteuid().is_root() {
        std::os::unix::fs::lchown(&mark, Some(host_uid), Some(host_uid))?;
    }
    Ok(())
}

/// A grain dataset's space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Space {
    /// Bytes its data takes (ZFS `referenced`: what the quota limits;
    /// snapshots are not counted against it).
    pub used: u64,
    /// Its quota; `None`: none.
    pub quota: Option<u64>,
}

/// A grain's quota as set by the admin (`granary grain quota`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quota {
    /// `storage.quota_mib`, the backend's default.
    Default,
    Bytes(u64),
    Unlimited,
}

/// Each grain's quota where it is not the default. The daemon keeps it
/// from the state; every path that makes or replaces a grain's dataset
/// (its creation, a btrfs start or rollback, a received move or replica,
/// a restore) reads it here, so a quota set once lasts through all of
/// them.
#[derive(Debug)]
pub struct Quotas {
    default: u64,
    set: std::sync::RwLock<std::collections::HashMap<String, Quota>>,
}

impl Quotas {
    pub fn new(default: u64) -> Quotas {
        Quotas {
            default,
            set: Default::default(),
        }
    }

    /// The grain's quota as set (`Default` when it was not).
    pub fn get(&self, grain: &str) -> Quota {
        let set = self.set.read().expect("not poisoned");
        set.get(grain).copied().unwrap_or(Quota::Default)
    }

    /// The grain's limit in bytes; `None`: no quota. A staging dataset
    /// (a move, a failover, a restore or a drill under a name of its own,
    /// which starts with a digit as no grain id does) has none: it takes
    /// the grain's own quota when it is renamed into place, so data larger
    /// than the default is never refused on the way.
    pub fn limit(&self, grain: &str) -> Option<u64> {
        if grain.starts_with(|c: char| c.is_ascii_digit()) {
            return None;
        }
        self.limit_of(self.get(grain))
    }

    fn limit_of(&self, quota: Quota) -> Option<u64> {
        match quota {
            Quota::Bytes(b) => Some(b),
            Quota::Unlimited => None,
            Quota::Default => Some(self.default),
        }
    }

    /// The limit as `zfs set refquota=` and `btrfs qgroup limit` take it.
    pub fn value(&self, grain: &str) -> String {
        Self::shown(self.limit(grain))
    }

    /// [`Quotas::value`] of `quota`, before it is set.
    pub fn value_of(&self, quota: Quota) -> String {
        Self::shown(self.limit_of(quota))
    }

    fn shown(limit: Option<u64>) -> String {
        limit.map_or_else(|| "none".to_owned(), |b| b.to_string())
    }

    pub fn put(&self, grain: &str, quota: Quota) {
        let mut set = self.set.write().expect("not poisoned");
        match quota {
            Quota::Default => set.remove(grain),
            q => set.insert(grain.to_owned(), q),
        };
    }

    /// Every grain's, replacing what was known.
    pub fn replace(&self, quotas: impl IntoIterator<Item = (String, Quota)>) {
        let fresh = quotas
            .into_iter()
            .filter(|(_, q)| *q != Quota::Default)
            .collect();
        *self.set.write().expect("not poisoned") = fresh;
    }
}

/// What every dataset backend offers the supervisor.
pub trait Datasets: Send + Sync {
    /// `plain`, `zfs` or `btrfs`.
    fn backend(&self) -> &'static str;
    /// The directory that holds the grain's host-only files and its dataset.
    fn grain_dir(&self, grain: &str) -> PathBuf;
    /// The dataset's mount point on the host.
    fn path(&self, grain: &str) -> PathBuf {
        self.grain_dir(grain).join("data")
    }
    /// Each grain's space as the backend accounts it, by grain id, in one
    /// look (`zfs get -r`, `btrfs qgroup show`); empty where the backend
    /// keeps no account (plain directories). Blocking.
    fn spaces(&self) -> Result<std::collections::HashMap<String, Space>, DatasetError> {
        Ok(std::collections::HashMap::new())
    }
    /// The per-grain quotas this backend applies, where it has quotas.
    fn quotas(&self) -> Option<&Quotas> {
        None
    }
    /// Sets a grain's quota: applied to its dataset here if there is one
    /// (its data stays), then kept for every dataset of it made from now
    /// on. Refused, with nothing changed, where the backend has no quotas
    /// (plain directories), and by the backend for a limit below what the
    /// data takes. Blocking.
    fn set_quota(&self, grain: &str, quota: Quota) -> Result<(), DatasetError> {
        let _ = quota;
        Err(err(grain, "set the quota")(io::Error::other(
            "plain directories have no quotas: storage.backend zfs or btrfs has them",
        )))
    }
    /// Creates the dataset, owned by `host_uid`, or checks an existing one.
    /// Idempotent, so a crash half-way is repaired by running it again.
    fn create(&self, grain: &str, host_uid: u32) -> Result<PathBuf, DatasetError>;
    /// Whether the dataset holds anything at all (a fresh one is empty).
    fn has_data(&self, grain: &str) -> Result<bool, DatasetError> {
        check_id(grain)?;
        match std::fs::read_dir(self.path(grain)) {
            Ok(mut entries) => Ok(entries.next().is_some()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(err(grain, "look into the dataset")(e)),
        }
    }
    /// Takes a read-only snapshot named `label`; `None` where the backend has
    /// no snapshots.
    fn snapshot(&self, grain: &str, label: &str) -> Result<Option<String>, DatasetError>;
    /// Destroys the dataset and the grain's directory. Missing is fine.
    fn destroy(&self, grain: &str) -> Result<(), DatasetError>;

    /// The grain's snapshots, oldest first.
    fn list_snapshots(&self, grain: &str) -> Result<Vec<Snapshot>, DatasetError>;

    /// Deletes one snapshot.
    fn delete_snapshot(&self, grain: &str, name: &str) -> Result<(), DatasetError>;

    /// Puts the dataset back to a snapshot (the grain must be stopped).
    /// Later snapshots are kept where the backend allows it (plain, btrfs)
    /// and destroyed where it does not (ZFS).
    fn rollback(&self, grain: &str, name: &str, host_uid: u32) -> Result<(), DatasetError>;

    /// Removes a grain for good, keeping its final state (named
    /// `<grain>-<label>`); returns where it is kept, `None` when there was
    /// no data.
    fn retire(&self, grain: &str, label: &str) -> Result<Option<String>, DatasetError>;

    /// How this backend's snapshots leave the host in a backup.
    fn send_format(&self) -> SendFormat {
        SendFormat::Tree
    }

    /// The snapshot's files, read-only, for as long as the view lives
    /// (plain and btrfs: the snapshot directory; ZFS: a clone, destroyed
    /// when the view is dropped).
    fn view_snapshot(&self, grain: &str, label: &str) -> Result<SnapshotView, DatasetError> {
        check_id(grain)?;
        check_label(grain, label)?;
        let dir = self.grain_dir(grain).join("snapshots").join(label);
        if !dir.is_dir() {
            return Err(err(grain, "find the snapshot")(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no snapshot {label:?}"),
            )));
        }
        Ok(SnapshotView {
            path: dir,
            cleanup: None,
        })
    }

    /// The backend's own stream of a snapshot (`zfs send`), incremental
    /// from `base` when given; its stdout is the stream.
    fn send(
        &self,
        grain: &str,
        _label: &str,
        _base: Option<&str>,
    ) -> Result<std::process::Child, DatasetError> {
        Err(err(grain, "send a snapshot")(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("the {} backend has no native stream", self.backend()),
        )))
    }

    /// Applies one stream [`Datasets::send`] made (full first, then
    /// incrementals in order) to the dataset `grain`, creating it from a
    /// full stream. It stays unmounted until [`Datasets::rename`].
    fn receive(&self, grain: &str, _stream: &mut dyn io::Read) -> Result<(), DatasetError> {
        Err(err(grain, "receive a snapshot")(io::Error::new(
            io::ErrorKind::Unsupported,
            format!(
                "the {} backend cannot receive a native ZFS stream; restore it on a node with storage.backend = \"zfs\"",
                self.backend()
            ),
        )))
    }

    /// The fencing epoch last written into the grain's dataset (see
    /// [`Datasets::set_epoch`]); `None` when none was.
    fn epoch(&self, grain: &str) -> Result<Option<i64>, DatasetError> {
        check_id(grain)?;
        let path = self.grain_dir(grain).join(EPOCH_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => text.trim().parse().map(Some).map_err(|_| {
                err(grain, "read its fencing epoch")(io::Error::other(format!(
                    "{} holds {:?}, not a number",
                    path.display(),
                    text.trim()
                )))
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(err(grain, "read its fencing epoch")(e)),
        }
    }

    /// Records, durably, the epoch of the placement under which a cluster
    /// node is about to start the grain: a node holding an older placement
    /// then refuses to start it. On plain directories and btrfs it is a
    /// file beside the data, out of the grain's reach; ZFS keeps it as the
    /// user property `granary:epoch` of the dataset.
    fn set_epoch(&self, grain: &str, epoch: i64) -> Result<(), DatasetError> {
        check_id(grain)?;
        let dir = self.grain_dir(grain);
        mkdir(&dir, 0o700).map_err(err(grain, "create the grain directory"))?;
        granary_files::write_atomic(
            &dir.join(EPOCH_FILE),
            format!("{epoch}\n").as_bytes(),
            0o600,
        )
        .map_err(|e| err(grain, "write its fencing epoch")(io::Error::other(e.to_string())))
    }

    /// Makes the dataset read-only, or writable again: what a fenced node
    /// does to the datasets of the grains it stopped. Plain directories
    /// have no such switch without a mount of their own, so there it does
    /// nothing (their grains are stopped, which is what keeps them from
    /// writing).
    fn set_read_only(&self, grain: &str, _read_only: bool) -> Result<(), DatasetError> {
        check_id(grain)
    }

    /// Keeps a snapshot from being deleted until every holder released it
    /// (ZFS: `zfs hold`; elsewhere a marker beside the snapshots).
    fn hold(&self, grain: &str, label: &str, tag: &str) -> Result<(), DatasetError> {
        check_id(grain)?;
        check_label(grain, label)?;
        check_label(grain, tag)?;
        let dir = self.grain_dir(grain).join("holds");
        mkdir(&dir, 0o700).map_err(err(grain, "create the holds directory"))?;
        std::fs::write(dir.join(format!("{label}@{tag}")), b"")
            .map_err(err(grain, "hold a snapshot"))
    }

    /// Undoes [`Datasets::hold`]; releasing what is not held is fine.
    fn release(&self, grain: &str, label: &str, tag: &str) -> Result<(), DatasetError> {
        check_id(grain)?;
        check_label(grain, label)?;
        check_label(grain, tag)?;
        let marker = self
            .grain_dir(grain)
            .join("holds")
            .join(format!("{label}@{tag}"));
        match std::fs::remove_file(marker) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(err(grain, "release a hold")(e)),
            _ => Ok(()),
        }
    }

    /// Renames a whole dataset (a restore's staging one into place), hands
    /// it to `host_uid` and mounts it where [`Datasets::path`] says.
    fn rename(&self, from: &str, to: &str, host_uid: u32) -> Result<PathBuf, DatasetError> {
        check_id(from)?;
        check_id(to)?;
        if self.path(to).exists() && self.has_data(to)? {
            return Err(err(to, "take the restored data")(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "the grain already holds data",
            )));
        }
        mkdir(&self.grain_dir(to), 0o700).map_err(err(to, "create the grain directory"))?;
        // An empty dataset left by a grain that never ran gives way.
        match std::fs::remove_dir(self.path(to)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                self.destroy_data(to)?;
            }
            _ => {}
        }
        std::fs::rename(self.path(from), self.path(to)).map_err(err(to, "move the data in"))?;
        let _ = std::fs::remove_dir_all(self.grain_dir(from));
        self.create(to, host_uid)
    }

    /// Removes what a crash left of restores, drills and snapshot views
    /// (datasets whose names start with a digit, which no grain id does).
    /// Returns their names.
    fn remove_scratch(&self) -> Result<Vec<String>, DatasetError> {
        remove_numbered(self)
    }

    /// Removes only the dataset of a grain (not its directory).
    fn destroy_data(&self, grain: &str) -> Result<(), DatasetError> {
        check_id(grain)?;
        match std::fs::remove_dir_all(self.path(grain)) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other.map_err(err(grain, "remove the dataset")),
        }
    }
}

/// What [`Datasets::remove_scratch`] removes on every backend: the
/// datasets whose names start with a digit (restores, drills and snapshot
/// views a crash left behind; no grain id does). Returns their names.
pub(crate) fn remove_numbered<D: Datasets + ?Sized>(ds: &D) -> Result<Vec<String>, DatasetError> {
    let root = ds.grain_dir("x");
    let root = root.parent().expect("grain directories have a parent");
    let mut removed = Vec::new();
    for entry in std::fs::read_dir(root).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(|c: char| c.is_ascii_digit()) && check_id(&name).is_ok() {
            ds.destroy(&name)?;
            removed.push(name);
        }
    }
    Ok(removed)
}

/// How a backend's snapshots are streamed into a backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendFormat {
    /// Granary's own file-tree stream, read from a snapshot's files;
    /// restorable onto any backend.
    Tree,
    /// `zfs send` / `zfs receive`; restorable onto ZFS only.
    Zfs,
}

/// A read-only view of a snapshot's files.
pub struct SnapshotView {
    pub path: PathBuf,
    cleanup: Option<Box<dyn FnOnce() + Send>>,
}

impl Drop for SnapshotView {
    fn drop(&mut self) {
        if let Some(cleanup) = self.cleanup.take() {
            cleanup();
        }
    }
}

/// Whether a snapshot carries a hold (plain and btrfs markers).
pub(crate) fn is_held(grain_dir: &Path, label: &str) -> bool {
    let prefix = format!("{label}@");
    std::fs::read_dir(grain_dir.join("holds")).is_ok_and(|entries| {
        entries
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with(&prefix))
    })
}

pub(crate) fn refuse_if_held(
    grain: &str,
    grain_dir: &Path,
    label: &str,
) -> Result<(), DatasetError> {
    if is_held(grain_dir, label) {
        Err(err(grain, "delete a snapshot")(io::Error::new(
            io::ErrorKind::ResourceBusy,
            format!("snapshot {label} is held (a backup's base); it is busy"),
        )))
    } else {
        Ok(())
    }
}

/// One read-only snapshot of a grain's dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The label given at creation (`auto-<unix time>`, `manual-...`).
    pub name: String,
    /// Unix seconds.
    pub created: i64,
}

/// The prefixes of the labels Granary makes itself.
const TIMED_PREFIXES: [&str; 7] = [
    "auto", "manual", "final", "upgrade", "backup", "move", "replica",
];

/// A label `<prefix>-<unix seconds>` for a snapshot taken now.
pub fn timed_label(prefix: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!("{prefix}-{now}")
}

/// The unix time in a label [`timed_label`] made (a suffix after another
/// '-' allowed), else 0.
pub fn label_time(label: &str) -> i64 {
    label
        .split_once('-')
        .filter(|(p, _)| TIMED_PREFIXES.contains(p))
        .and_then(|(_, t)| t.split('-').next()?.parse().ok())
        .unwrap_or(0)
}

/// Snapshots in a directory with one entry per snapshot (plain copies,
/// btrfs subvolumes), oldest first.
pub(crate) fn list_snapshot_dir(grain: &str, dir: &Path) -> Result<Vec<Snapshot>, DatasetError> {
    let mut snaps: Vec<Snapshot> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(str::to_owned))
            .filter(|n| !n.starts_with('.'))
            .map(|name| Snapshot {
                created: label_time(&name),
                name,
            })
            .collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(err(grain, "list snapshots")(e)),
    };
    snaps.sort_by(|a, b| (a.created, &a.name).cmp(&(b.created, &b.name)));
    Ok(snaps)
}

/// A snapshot label names a directory or a ZFS snapshot: 1 to 64 of
/// `[A-Za-z0-9._-]`, not starting with '.' or '-'.
pub fn valid_label(label: &str) -> bool {
    !label.is_empty()
        && label.len() <= 64
        && !label.starts_with('.')
        && !label.starts_with('-')
        && label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

pub(crate) fn check_label(grain: &str, label: &str) -> Result<(), DatasetError> {
    if valid_label(label) {
        Ok(())
    } else {
        Err(err(grain, "name a snapshot")(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{label:?} is not a snapshot name"),
        )))
    }
}

pub mod retention;

pub(crate) fn err<'a>(
    grain: &'a str,
    op: &'static str,
) -> impl FnOnce(io::Error) -> DatasetError + 'a {
    move |source| DatasetError {
        grain: grain.to_owned(),
        op,
        source,
    }
}

pub(crate) fn check_id(grain: &str) -> Result<(), DatasetError> {
    if granary_model::valid_resource_name(grain) {
        Ok(())
    } else {
        Err(DatasetError {
            grain: grain.to_owned(),
            op: "check the grain id",
            source: io::Error::new(io::ErrorKind::InvalidInput, "not a grain id"),
        })
    }
}

pub(crate) fn mkdir(path: &Path, mode: u32) -> io::Result<()> {
    match std::fs::DirBuilder::new().mode(mode).create(path) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let meta = std::fs::symlink_metadata(path)?;
            if !meta.is_dir() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a directory", path.display()),
                ));
            }
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        }
        other => other,
    }
}

mod cow;
mod plain;
pub mod testing;

pub use cow::{Btrfs, Zfs};
pub use plain::Plain;
pub use retention::Grid;

pub(crate) fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    #[test]
    fn a_grains_quota_is_its_own_and_staging_has_none() {
        let q = Quotas::new(100);
        assert_eq!(q.limit("alice-mail"), Some(100));
        q.put("alice-mail", Quota::Bytes(500));
        q.put("bob-git", Quota::Unlimited);
        assert_eq!(q.value("alice-mail"), "500");
        assert_eq!(q.value("bob-git"), "none");
        // Staging names (a digit first) take the grain's quota only when
        // renamed into place.
        assert_eq!(q.limit("0restore-1a2b"), None);
        q.put("alice-mail", Quota::Default);
        assert_eq!(q.get("alice-mail"), Quota::Default);
        q.replace([("carol-dav".to_owned(), Quota::Bytes(7))]);
        assert_eq!(
            (q.limit("bob-git"), q.limit("carol-dav")),
            (Some(100), Some(7))
        );
        assert_eq!(q.value_of(Quota::Unlimited), "none");
    }

    #[test]
    fn create_is_idempotent_private_and_destroy_stays_inside() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        std::fs::write(&outside, "keep me").unwrap();
        let plain = Plain::new(&tmp.path().join("grains")).unwrap();
        let data = plain.create("g-1", 1_500_000_007).unwrap();
        assert_eq!(data, plain.path("g-1"));
        assert_eq!(plain.create("g-1", 1_500_000_007).unwrap(), data);
        let meta = std::fs::metadata(&data).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o700);
        if running_as_root() {
            assert_eq!(meta.uid(), 1_500_000_007);
        }
        assert_eq!(
            std::fs::metadata(plain.grain_dir("g-1")).unwrap().mode() & 0o777,
            0o700
        );
        assert!(!plain.has_data("g-1").unwrap());
        assert_eq!(plain.epoch("g-1").unwrap(), None);
        plain.set_epoch("g-1", 9).unwrap();
        assert_eq!(plain.epoch("g-1").unwrap(), Some(9));
        assert!(
            !plain.has_data("g-1").unwrap(),
            "the epoch is beside the data"
        );
        std::fs::write(plain.grain_dir("g-1").join("epoch"), "nine").unwrap();
        assert!(
            plain
                .epoch("g-1")
                .unwrap_err()
                .to_string()
                .contains("not a number")
        );
        plain.set_epoch("g-1", 9).unwrap();
        std::fs::write(data.join("note"), "x").unwrap();
        std::os::unix::fs::symlink(&outside, data.join("link")).unwrap();
        assert!(plain.has_data("g-1").unwrap());
        let snap = plain.snapshot("g-1", "manual-5").unwrap().unwrap();
        assert_eq!(
            std::fs::read_link(std::path::Path::new(&snap).join("link")).unwrap(),
            outside,
            "links are copied as links, never followed"
        );
        std::fs::write(data.join("note"), "changed").unwrap();
        assert_eq!(plain.list_snapshots("g-1").unwrap()[0].name, "manual-5");
        plain.rollback("g-1", "manual-5", 1_500_000_007).unwrap();
        assert_eq!(std::fs::read_to_string(data.join("note")).unwrap(), "x");
        assert!(plain.snapshot("g-1", "../x").is_err());
        assert!(plain.snapshot("g-1", "-rf").is_err());
        // What a crash left of a snapshot being made goes at start-up.
        let half = plain.grain_dir("g-1").join("snapshots/.partial-auto-9");
        std::fs::create_dir_all(half.join("sub")).unwrap();
        let removed = plain.remove_scratch().unwrap();
        assert_eq!(removed, ["g-1/snapshots/.partial-auto-9"]);
        assert!(!half.exists());
        assert_eq!(plain.list_snapshots("g-1").unwrap().len(), 1);
        plain.delete_snapshot("g-1", "manual-5").unwrap();
        plain.destroy("g-1").unwrap();
        plain.destroy("g-1").unwrap();
        assert!(!plain.grain_dir("g-1").exists());
        assert_eq!(std::fs::read_to_string(&outside).unwrap(), "keep me");
        assert!(plain.create("../evil", 1).is_err());
    }
}
