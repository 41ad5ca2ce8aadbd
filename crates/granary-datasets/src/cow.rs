//! Copy-on-write backends: ZFS datasets and btrfs subvolumes, one per
//! grain, each with a size quota and cheap read-only snapshots. Both drive
//! the real command-line tools (`zfs`, `btrfs`), so what runs here is what
//! an admin would type.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::{
    DatasetError, Datasets, SendFormat, Snapshot, SnapshotView, check_id, check_label, err,
    label_time, list_snapshot_dir, mkdir, refuse_if_held, running_as_root,
};

/// The ZFS user property that carries a grain's fencing epoch, so it
/// travels with the dataset's properties.
const EPOCH_PROPERTY: &str = "granary:epoch";

/// Runs a storage tool; its stderr becomes the error.
fn run(tool: &str, args: &[&str]) -> io::Result<String> {
    let out = Command::new(tool).args(args).output().map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot run {tool} ({e}); is its package installed?"),
        )
    })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(io::Error::other(format!(
            "{tool} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Runs a tool, retrying while it says the target is busy (zfs-fuse's
/// destroy sometimes does, for a moment).
fn run_retrying_busy(tool: &str, args: &[&str]) -> io::Result<String> {
    let mut last = None;
    for attempt in 0..20u32 {
        match run(tool, args) {
            Err(e) if e.to_string().contains("busy") => {
                last = Some(e);
                std::thread::sleep(Duration::from_millis(25 * u64::from(attempt + 1)));
            }
            other => return other,
        }
    }
    Err(last.expect("retried at least once"))
}

/// Copies with 1 MiB reads and writes through a 1 MiB pipe: the default
/// 8 KiB copy costs a syscall pair per page of a multi-gigabyte stream.
pub(crate) fn copy_big(
    from: &mut dyn io::Read,
    to: &mut std::process::ChildStdin,
) -> io::Result<u64> {
    use std::io::Write;
    let _ = nix::fcntl::fcntl(
        std::os::fd::AsRawFd::as_raw_fd(&*to),
        nix::fcntl::FcntlArg::F_SETPIPE_SZ(1 << 20),
    );
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buf[..n])?;
        total += n as u64;
    }
}

/// `zfs list`'s creation date ("Tue Nov 24 23:20 2026", the host's local
/// time, taken as UTC) in Unix seconds.
fn parse_zfs_date(text: &str) -> Option<i64> {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let parts: Vec<&str> = text.split_whitespace().collect();
    let [_, month, day, time, year] = parts.as_slice() else {
        return None;
    };
    let m = MONTHS.iter().position(|x| x == month)? as i64 + 1;
    let d: i64 = day.parse().ok()?;
    let y: i64 = year.parse().ok()?;
    let (h, min) = time.split_once(':')?;
    let (h, min): (i64, i64) = (h.parse().ok()?, min.parse().ok()?);
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + h * 3600 + min * 60)
}

#[cfg(test)]
mod tests {
    #[test]
    fn zfs_spaces_parse() {
        let text = "tank/g\treferenced\t900\t-\ntank/g/alice-mail\treferenced\t4096\t-\n\
                    tank/g/alice-mail\trefquota\t50331648\t-\ntank/g/bob-git\treferenced\t12\t-\n\
                    tank/g/bob-git\trefquota\t0\t-\ntank/g/bob-git@s1\treferenced\t1\t-\n";
        let s = super::parse_spaces("tank/g", text);
        assert_eq!(s.len(), 2);
        assert_eq!(s["alice-mail"].used, 4096);
        assert_eq!(s["alice-mail"].quota, Some(48 << 20));
        assert_eq!(s["bob-git"].quota, None);
    }

    #[test]
    fn btrfs_qgroups_parse() {
        let text = "Qgroupid    Referenced    Exclusive  Max referenced   Path \n\
                    --------    ----------    ---------  --------------   ---- \n\
                    0/5              16384        16384            none   <toplevel>\n\
                    0/256          3162112      3162112        16777216   x/grains/alice-mail/data\n\
                    0/257             4096         4096            none   x/grains/bob-git/data\n\
                    0/258             4096         4096            none   x/grains/bob-git/snapshots/s1\n\
                    0/259             8192         8192            none   y/grains/carol-dav/data\n";
        let s = super::parse_qgroups(text, "x/grains");
        assert_eq!(s.len(), 2, "{s:?}");
        assert_eq!(s["alice-mail"].used, 3_162_112);
        assert_eq!(s["alice-mail"].quota, Some(16 << 20));
        assert_eq!(s["bob-git"].quota, None);
        // At the top of the filesystem.
        let top = "0/300 10 10 none alice-mail/data\n";
        assert_eq!(super::parse_qgroups(top, "")["alice-mail"].used, 10);
        // A space in the data directory's path.
        let spaced = "0/301  20  20  1048576  my data/grains/dan-git/data\n";
        let s = super::parse_qgroups(spaced, "my data/grains");
        assert_eq!(s["dan-git"].quota, Some(1 << 20));
    }

    #[test]
    fn zfs_dates_parse() {
        assert_eq!(super::parse_zfs_date("Thu Jan  1 00:00 1970"), Some(0));
        assert_eq!(
            super::parse_zfs_date("Tue Nov 24 23:20 2026"),
            Some(1_795_562_400)
        );
        assert_eq!(super::parse_zfs_date("yesterday"), None);
    }
}

/// `btrfs qgroup show --raw -r` (qgroup, referenced, exclusive, max
/// referenced, path) for the grains whose subvolumes are at
/// `<prefix>/<grain>/data` (paths from the filesystem's top).
fn parse_qgroups(text: &str, prefix: &str) -> std::collections::HashMap<String, crate::Space> {
    let mut out = std::collections::HashMap::new();
    for line in text.lines() {
        // Four columns, then the path, which may hold spaces.
        let mut rest = line.trim_start();
        let mut f = [""; 4];
        for slot in &mut f {
            let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
            *slot = &rest[..end];
            rest = rest[end..].trim_start();
        }
        let [_, referenced, _, max] = f;
        let path = rest.trim_end();
        let below = match prefix {
            "" => Some(path),
            p => path.strip_prefix(p).and_then(|r| r.strip_prefix('/')),
        };
        let Some(grain) = below.and_then(|r| r.strip_suffix("/data")) else {
            continue;
        };
        let Ok(used) = referenced.parse::<u64>() else {
            continue;
        };
        if grain.contains('/') || check_id(grain).is_err() {
            continue;
        }
        let quota = max.parse::<u64>().ok().filter(|q| *q > 0);
        out.insert(grain.to_owned(), crate::Space { used, quota });
    }
    out
}

fn own(grain: &str, data: &Path, host_uid: u32) -> Result<(), DatasetError> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    // Already so: nothing to change, which also works on a dataset a fence
    // made read-only (changing it there would fail).
    if let Ok(m) = std::fs::symlink_metadata(data)
        && m.mode() & 0o7777 == 0o700
        && (!running_as_root() || (m.uid() == host_uid && m.gid() == host_uid))
    {
        return Ok(());
    }
    if running_as_root() {
        std::os::unix::fs::lchown(data, Some(host_uid), Some(host_uid))
            .map_err(err(grain, "hand the dataset to the grain's uid"))?;
    }
    std::fs::set_permissions(data, std::fs::Permissions::from_mode(0o700))
        .map_err(err(grain, "restrict the dataset"))
}

/// One ZFS dataset per grain under a parent dataset, mounted at
/// `<root>/<grain>/data`, with `refquota` (snapshots do not count against
/// the grain).
#[derive(Debug, Clone)]
pub struct Zfs {
    root: PathBuf,
    parent: String,
    quotas: std::sync::Arc<crate::Quotas>,
}

impl Zfs {
    /// Uses `parent` (which must exist: `zpool create` or `zfs create` it)
    /// for grains whose directories live under `root`.
    pub fn new(root: &Path, parent: &str, quota_bytes: u64) -> io::Result<Zfs> {
        run("zfs", &["list", "-H", "-o", "name", parent]).map_err(|e| {
            io::Error::other(format!(
                "ZFS dataset {parent} is not there ({e}); create it first, e.g. `zpool create {parent} DEVICE`"
            ))
        })?;
        std::fs::create_dir_all(root)?;
        Ok(Zfs {
            root: root.to_path_buf(),
            parent: parent.to_owned(),
            quotas: std::sync::Arc::new(crate::Quotas::new(quota_bytes)),
        })
    }

    fn name(&self, grain: &str) -> String {
        format!("{}/{grain}", self.parent)
    }
}

/// `zfs get -Hp -r -d 1 -o name,property,value referenced,refquota` under
/// `parent` (zfs-fuse's `get` has no `-t`: snapshots are skipped here):
/// each child dataset's space, by its last name component.
fn parse_spaces(parent: &str, text: &str) -> std::collections::HashMap<String, crate::Space> {
    let mut out: std::collections::HashMap<String, crate::Space> = Default::default();
    for line in text.lines() {
        let mut f = line.split('\t');
        let (Some(name), Some(prop), Some(value)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        let Some(grain) = name.strip_prefix(parent).and_then(|n| n.strip_prefix('/')) else {
            continue;
        };
        if grain.contains('/') || grain.contains('@') {
            continue;
        }
        let Ok(v) = value.trim().parse::<u64>() else {
            continue;
        };
        let e = out.entry(grain.to_owned()).or_insert(crate::Space {
            used: 0,
            quota: None,
        });
        match prop {
            "referenced" => e.used = v,
            "refquota" => e.quota = (v > 0).then_some(v),
            _ => {}
        }
    }
    out
}

impl Datasets for Zfs {
    fn backend(&self) -> &'static str {
        "zfs"
    }

    fn quotas(&self) -> Option<&crate::Quotas> {
        Some(&self.quotas)
    }

    fn set_quota(&self, grain: &str, quota: crate::Quota) -> Result<(), DatasetError> {
        check_id(grain)?;
        let name = self.name(grain);
        if run("zfs", &["list", "-H", "-o", "name", &name]).is_ok() {
            let value = format!("refquota={}", self.quotas.value_of(quota));
            run("zfs", &["set", &value, &name]).map_err(err(grain, "set the quota"))?;
        }
        self.quotas.put(grain, quota);
        Ok(())
    }

    fn spaces(&self) -> Result<std::collections::HashMap<String, crate::Space>, DatasetError> {
        let text = run(
            "zfs",
            &[
                "get",
                "-Hp",
                "-r",
                "-d",
                "1",
                "-o",
                "name,property,value",
                "referenced,refquota",
                &self.parent,
            ],
        )
        .map_err(err(&self.parent, "read the datasets' space"))?;
        Ok(parse_spaces(&self.parent, &text))
    }

    fn grain_dir(&self, grain: &str) -> PathBuf {
        self.root.join(grain)
    }

    fn create(&self, grain: &str, host_uid: u32) -> Result<PathBuf, DatasetError> {
        check_id(grain)?;
        mkdir(&self.grain_dir(grain), 0o700).map_err(err(grain, "create the grain directory"))?;
        let data = self.path(grain);
        let name = self.name(grain);
        if run("zfs", &["list", "-H", "-o", "name", &name]).is_err() {
            let mountpoint = format!("mountpoint={}", data.display());
            let quota = format!("refquota={}", self.quotas.value(grain));
            run("zfs", &["create", "-o", &mountpoint, "-o", &quota, &name])
                .map_err(err(grain, "create the ZFS dataset"))?;
        } else if !data.join(".").exists() || !self.has_data(grain)? {
            // Present but perhaps not mounted (after a reboot).
            let _ = run("zfs", &["mount", &name]);
        }
        // Never hand the grain a bare mountpoint on the parent filesystem
        // (no quota, its real data hidden).
        let mounted = run("zfs", &["get", "-H", "-o", "value", "mounted", &name])
            .map_err(err(grain, "check the dataset is mounted"))?;
        if mounted.trim() != "yes" {
            return Err(err(grain, "mount the ZFS dataset")(io::Error::other(
                format!(
                    "{name} is not mounted (mounted={}); see `zfs get canmount,mountpoint {name}`",
                    mounted.trim()
                ),
            )));
        }
        own(grain, &data, host_uid)?;
        Ok(data)
    }

    fn snapshot(&self, grain: &str, label: &str) -> Result<Option<String>, DatasetError> {
        check_id(grain)?;
        check_label(grain, label)?;
        let snap = format!("{}@{label}", self.name(grain));
        run("zfs", &["snapshot", &snap]).map_err(err(grain, "take a ZFS snapshot"))?;
        Ok(Some(snap))
    }

    fn list_snapshots(&self, grain: &str) -> Result<Vec<Snapshot>, DatasetError> {
        check_id(grain)?;
        let name = self.name(grain);
        let out = match run(
            "zfs",
            &[
                "list",
                "-H",
                "-t",
                "snapshot",
                "-o",
                "name,creation",
                "-s",
                "creation",
                "-d",
                "1",
                &name,
            ],
        ) {
            Ok(out) => out,
            Err(e) if e.to_string().contains("does not exist") => return Ok(Vec::new()),
            Err(e) => return Err(err(grain, "list ZFS snapshots")(e)),
        };
        Ok(out
            .lines()
            .filter_map(|l| {
                let (full, created) = l.split_once('\t')?;
                let (_, label) = full.split_once('@')?;
                Some(Snapshot {
                    name: label.to_owned(),
                    // Our labels carry the exact time; otherwise zfs's
                    // (zfs-fuse has no -p: "Tue Nov 24 23:20 2026").
                    created: Some(label_time(label))
                        .filter(|t| *t > 0)
                        .or_else(|| created.trim().parse().ok())
                        .or_else(|| parse_zfs_date(created.trim()))
                        .unwrap_or(0),
                })
            })
            .collect())
    }

    fn delete_snapshot(&self, grain: &str, label: &str) -> Result<(), DatasetError> {
        check_id(grain)?;
        check_label(grain, label)?;
        let snap = format!("{}@{label}", self.name(grain));
        // A held snapshot (a backup's base) is busy for good: say so at
        // once instead of retrying.
        let refs = run("zfs", &["get", "-H", "-o", "value", "userrefs", &snap])
            .map_err(err(grain, "look at a ZFS snapshot"))?;
        if refs.trim().parse::<u64>().is_ok_and(|n| n > 0) {
            return Err(err(grain, "destroy a ZFS snapshot")(io::Error::new(
                io::ErrorKind::ResourceBusy,
                format!("snapshot {label} is held (a backup's base); it is busy"),
            )));
        }
        run_retrying_busy("zfs", &["destroy", &snap])
            .map(drop)
            .map_err(err(grain, "destroy a ZFS snapshot"))
    }

    fn rollback(&self, grain: &str, label: &str, host_uid: u32) -> Result<(), DatasetError> {
        check_id(grain)?;
        check_label(grain, label)?;
        run(
            "zfs",
            &["rollback", "-r", &format!("{}@{label}", self.name(grain))],
        )
        .map_err(err(grain, "roll the ZFS dataset back"))?;
        own(grain, &self.path(grain), host_uid)
    }

    /// The final snapshot stays with the dataset, which is renamed to
    /// `<parent>/retired-<grain>-<label>` and unmounted: the grain's name
    /// is free again and its last state is kept until an admin destroys it.
    fn retire(&self, grain: &str, label: &str) -> Result<Option<String>, DatasetError> {
        check_id(grain)?;
        check_label(grain, label)?;
        let name = self.name(grain);
        if run("zfs", &["list", "-H", "-o", "name", &name]).is_err() {
            self.destroy(grain)?;
            return Ok(None);
        }
        run("zfs", &["snapshot", &format!("{name}@{label}")])
            .map_err(err(grain, "take the final ZFS snapshot"))?;
        let kept = format!("{}/retired-{grain}-{label}", self.parent);
        run_retrying_busy("zfs", &["umount", &name]).map_err(err(grain, "unmount the dataset"))?;
        run("zfs", &["set", "canmount=off", &name])
            .map_err(err(grain, "keep the retired dataset unmounted"))?;
        run("zfs", &["rename", &name, &kept]).map_err(err(grain, "rename the dataset"))?;
        let _ = run("zfs", &["set", "mountpoint=none", &kept]);
        match std::fs::remove_dir_all(self.grain_dir(grain)) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            other => other.map_err(err(grain, "remove the grain directory"))?,
        }
        Ok(Some(format!("{kept}@{label}")))
    }

    /// From ZFS itself: a dataset with snapshots holds data, and one that is
    /// not mounted (after a reboot) is mounted to look, never taken as empty.
    fn has_data(&self, grain: &str) -> Result<bool, DatasetError> {
        check_id(grain)?;
        let name = self.name(grain);
        if run("zfs", &["list", "-H", "-o", "name", &name]).is_err() {
            return Ok(false);
        }
        let snaps = run(
            "zfs",
            &[
                "list", "-H", "-t", "snapshot", "-o", "name", "-d", "1", &name,
            ],
        )
        .map_err(err(grain, "list ZFS snapshots"))?;
        if !snaps.trim().is_empty() {
            return Ok(true);
        }
        let mounted = |s: &Zfs| {
            run(
                "zfs",
                &["get", "-H", "-o", "value", "mounted", &s.name(grain)],
            )
            .is_ok_and(|m| m.trim() == "yes")
        };
        if !mounted(self) {
            let _ = run("zfs", &["mount", &name]);
            if !mounted(self) {
                return Ok(true);
            }
        }
        match std::fs::read_dir(self.path(grain)) {
            Ok(mut entries) => Ok(entries.next().is_some()),
            Err(e) => Err(err(grain, "look into the dataset")(e)),
        }
    }

    fn remove_scratch(&self) -> Result<Vec<String>, DatasetError> {
        let list = run(
            "zfs",
            &["list", "-H", "-o", "name", "-d", "1", &self.parent],
        )
        .map_err(err("-", "list datasets"))?;
        let mut removed = Vec::new();
        for full in list.lines() {
            let Some(short) = full.strip_prefix(&format!("{}/", self.parent)) else {
                continue;
            };
            if short.starts_with(|c: char| c.is_ascii_digit()) {
                run_retrying_busy("zfs", &["destroy", "-r", full])
                    .map_err(err(short, "destroy a leftover dataset"))?;
                let _ = std::fs::remove_dir_all(self.grain_dir(short));
                removed.push(short.to_owned());
            }
        }
        let _ = std::fs::remove_dir_all(self.root.join(".views"));
        Ok(removed)
    }

    fn send_format(&self) -> SendFormat {
        SendFormat::Zfs
    }

    /// A read-only clone of the snapshot, mounted under `<root>/.views`
    /// and destroyed when the view is dropped (zfs-fuse has no `.zfs`
    /// directory to read snapshots through).
    fn view_snapshot(&self, grain: &str, label: &str) -> Result<SnapshotView, DatasetError> {
        check_id(grain)?;
        check_label(grain, label)?;
        let mut nonce = [0u8; 6];
        getrandom::fill(&mut nonce)
            .map_err(|e| err(grain, "name a view")(io::Error::other(e.to_string())))?;
        let nonce = hex::encode(nonce);
        let views = self.root.join(".views");
        mkdir(&views, 0o700).map_err(err(grain, "create the views directory"))?;
        let path = views.join(format!("{grain}-{label}-{nonce}"));
        let clone = format!("{}/0view-{grain}-{nonce}", self.parent);
        run(
            "zfs",
            &[
                "clone",
                "-o",
                &format!("mountpoint={}", path.display()),
                "-o",
                "readonly=on",
                &format!("{}@{label}", self.name(grain)),
                &clone,
            ],
        )
        .map_err(err(grain, "clone the snapshot to read it"))?;
        let cleanup_path = path.clone();
        Ok(SnapshotView {
            path,
            cleanup: Some(Box::new(move || {
                if let Err(e) = run_retrying_busy("zfs", &["destroy", &clone]) {
                    tracing::warn!(clone, error = %e, "cannot destroy a snapshot view");
                }
                let _ = std::fs::remove_dir(cleanup_path);
            })),
        })
    }

    fn send(
        &self,
        grain: &str,
        label: &str,
        base: Option<&str>,
    ) -> Result<std::process::Child, DatasetError> {
        check_id(grain)?;
        check_label(grain, label)?;
        let mut cmd = Command::new("zfs");
        cmd.arg("send");
        if let Some(base) = base {
            check_label(grain, base)?;
            cmd.args(["-i", base]);
        }
        cmd.arg(format!("{}@{label}", self.name(grain)))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(err(grain, "run zfs send"))
    }

    fn receive(&self, grain: &str, stream: &mut dyn io::Read) -> Result<(), DatasetError> {
        check_id(grain)?;
        let mut child = Command::new("zfs")
            .args(["receive", "-u", &self.name(grain)])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(err(grain, "run zfs receive"))?;
        let mut stdin = child.stdin.take().expect("piped");
        let copied = copy_big(stream, &mut stdin);
        drop(stdin);
        let out = child
            .wait_with_output()
            .map_err(err(grain, "wait for zfs receive"))?;
        copied.map_err(err(grain, "feed zfs receive"))?;
        if out.status.success() {
            // One plain dataset, nothing a stream could have brought along
            // (children, shares).
            let tree = run(
                "zfs",
                &["list", "-H", "-r", "-o", "name", &self.name(grain)],
            )
            .map_err(err(grain, "list the received dataset"))?;
            if tree.lines().count() != 1 {
                return Err(err(grain, "receive a ZFS stream")(io::Error::other(
                    "the stream made more than one dataset; refused",
                )));
            }
            for property in ["sharenfs=off", "sharesmb=off", "setuid=off", "devices=off"] {
                let _ = run("zfs", &["set", property, &self.name(grain)]);
            }
            // Where `create` will mount it, and its quota (none for a staging
            // name: the grain's is set as it is renamed into place).
            mkdir(&self.grain_dir(grain), 0o700)
                .map_err(err(grain, "create the grain directory"))?;
            for property in [
                format!("mountpoint={}", self.path(grain).display()),
                format!("refquota={}", self.quotas.value(grain)),
            ] {
                run("zfs", &["set", &property, &self.name(grain)])
                    .map_err(err(grain, "set a property"))?;
            }
            Ok(())
        } else {
            Err(err(grain, "receive a ZFS stream")(io::Error::other(
                String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            )))
        }
    }

    fn hold(&self, grain: &str, label: &str, tag: &str) -> Result<(), DatasetError> {
        check_id(grain)?;
        check_label(grain, label)?;
        check_label(grain, tag)?;
        match run(
            "zfs",
            &["hold", tag, &format!("{}@{label}", self.name(grain))],
        ) {
            Err(e) if e.to_string().contains("already exists") => Ok(()),
            other => other.map(drop).map_err(err(grain, "hold a ZFS snapshot")),
        }
    }

    fn release(&self, grain: &str, label: &str, tag: &str) -> Result<(), DatasetError> {
        check_id(grain)?;
        check_label(grain, label)?;
        check_label(grain, tag)?;
        match run(
            "zfs",
            &["release", tag, &format!("{}@{label}", self.name(grain))],
        ) {
            Err(e)
                if e.to_string().contains("no such tag")
                    || e.to_string().contains("does not exist") =>
            {
                Ok(())
            }
            other => other.map(drop).map_err(err(grain, "release a ZFS hold")),
        }
    }

    fn rename(&self, from: &str, to: &str, host_uid: u32) -> Result<PathBuf, DatasetError> {
        check_id(from)?;
        check_id(to)?;
        let target = self.name(to);
        if run("zfs", &["list", "-H", "-o", "name", &target]).is_ok() {
            if self.has_data(to)? {
                return Err(err(to, "take the restored data")(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "the grain already holds data",
                )));
            }
            // Empty and without snapshots: no -r, so nothing more can go.
            run_retrying_busy("zfs", &["destroy", &target])
                .map_err(err(to, "remove the empty dataset"))?;
        }
        mkdir(&self.grain_dir(to), 0o700).map_err(err(to, "create the grain directory"))?;
        // zfs-fuse renames only unmounted datasets.
        let mounted = run(
            "zfs",
            &["get", "-H", "-o", "value", "mounted", &self.name(from)],
        )
        .map_err(err(from, "look at the dataset"))?;
        if mounted.trim() == "yes" {
            run_retrying_busy("zfs", &["umount", &self.name(from)])
                .map_err(err(from, "unmount the dataset"))?;
        }
        // The grain's quota before its name. Data already over it (a quota
        // set where the grain did not run, a lowered storage.quota_mib, a
        // pool that packs it worse) still goes in place, without a quota:
        // a failover or a restore must not fail over a quota.
        let quota = format!("refquota={}", self.quotas.value(to));
        if let Err(e) = run("zfs", &["set", &quota, &self.name(from)]) {
            tracing::warn!(grain = to, error = %e, "the grain's data is over its quota; it goes in place without one until the quota is set again");
            run("zfs", &["set", "refquota=none", &self.name(from)])
                .map_err(err(to, "lift the quota"))?;
        }
        run_retrying_busy("zfs", &["rename", &self.name(from), &target])
            .map_err(err(to, "rename the restored dataset"))?;
        let _ = std::fs::remove_dir_all(self.grain_dir(from));
        for property in [
            format!("mountpoint={}", self.path(to).display()),
            "canmount=on".to_owned(),
        ] {
            run("zfs", &["set", &property, &target]).map_err(err(to, "set a property"))?;
        }
        self.create(to, host_uid)
    }

    fn destroy_data(&self, grain: &str) -> Result<(), DatasetError> {
        check_id(grain)?;
        let name = self.name(grain);
        if run("zfs", &["list", "-H", "-o", "name", &name]).is_ok() {
            run_retrying_busy("zfs", &["destroy", "-r", &name])
                .map_err(err(grain, "destroy the ZFS dataset"))?;
        }
        match std::fs::remove_dir(self.path(grain)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                Err(err(grain, "remove the mountpoint")(e))
            }
            _ => Ok(()),
        }
    }

    fn epoch(&self, grain: &str) -> Result<Option<i64>, DatasetError> {
        check_id(grain)?;
        let value = run(
            "zfs",
            &[
                "get",
                "-H",
                "-p",
                "-o",
                "value",
                // Set on this dataset or received with it, never inherited.
                "-s",
                "local,received",
                EPOCH_PROPERTY,
                &self.name(grain),
            ],
        )
        .map_err(err(grain, "read its fencing epoch"))?;
        match value.trim() {
            "-" | "" => Ok(None),
            v => v.parse().map(Some).map_err(|_| {
                err(grain, "read its fencing epoch")(io::Error::other(format!(
                    "{EPOCH_PROPERTY} is {v:?}, not a number"
                )))
            }),
        }
    }

    fn set_read_only(&self, grain: &str, read_only: bool) -> Result<(), DatasetError> {
        check_id(grain)?;
        let value = if read_only {
            "readonly=on"
        } else {
            "readonly=off"
        };
        run("zfs", &["set", value, &self.name(grain)])
            .map_err(err(grain, "switch the dataset's read-only property"))?;
        Ok(())
    }

    fn set_epoch(&self, grain: &str, epoch: i64) -> Result<(), DatasetError> {
        check_id(grain)?;
        let property = format!("{EPOCH_PROPERTY}={epoch}");
        run("zfs", &["set", &property, &self.name(grain)])
            .map_err(err(grain, "write its fencing epoch"))?;
        Ok(())
    }

    fn destroy(&self, grain: &str) -> Result<(), DatasetError> {
        check_id(grain)?;
        let name = self.name(grain);
        if run("zfs", &["list", "-H", "-o", "name", &name]).is_ok() {
            run_retrying_busy("zfs", &["destroy", "-r", &name])
                .map_err(err(grain, "destroy the ZFS dataset"))?;
        }
        match std::fs::remove_dir_all(self.grain_dir(grain)) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other.map_err(err(grain, "remove the grain directory")),
        }
    }
}

/// One btrfs subvolume per grain at `<root>/<grain>/data` with a qgroup
/// limit; snapshots are read-only subvolumes in `<root>/<grain>/snapshots`.
#[derive(Debug, Clone)]
pub struct Btrfs {
    root: PathBuf,
    quotas: std::sync::Arc<crate::Quotas>,
}

impl Btrfs {
    /// `root` must be on btrfs; quotas are enabled on its filesystem.
    pub fn new(root: &Path, quota_bytes: u64) -> io::Result<Btrfs> {
        std::fs::create_dir_all(root)?;
        let fs = run("stat", &["-f", "-c", "%T", &root.to_string_lossy()])?;
        if fs.trim() != "btrfs" {
            return Err(io::Error::other(format!(
                "{} is on {}, not btrfs; choose storage.backend = \"plain\" or move the data directory",
                root.display(),
                fs.trim()
            )));
        }
        run("btrfs", &["quota", "enable", &root.to_string_lossy()])?;
        Ok(Btrfs {
            root: root.to_path_buf(),
            quotas: std::sync::Arc::new(crate::Quotas::new(quota_bytes)),
        })
    }

    fn snapshots(&self, grain: &str) -> PathBuf {
        self.grain_dir(grain).join("snapshots")
    }
}

impl Datasets for Btrfs {
    fn backend(&self) -> &'static str {
        "btrfs"
    }

    fn set_read_only(&self, grain: &str, read_only: bool) -> Result<(), DatasetError> {
        check_id(grain)?;
        let path = self.path(grain).to_string_lossy().into_owned();
        let value = if read_only { "true" } else { "false" };
        run("btrfs", &["property", "set", "-ts", &path, "ro", value])
            .map_err(err(grain, "switch the subvolume's read-only property"))?;
        Ok(())
    }

    fn grain_dir(&self, grain: &str) -> PathBuf {
        self.root.join(grain)
    }

    fn quotas(&self) -> Option<&crate::Quotas> {
        Some(&self.quotas)
    }

    /// From the qgroups (one `btrfs qgroup show` for all), matched to the
    /// grains by their subvolumes' paths from the filesystem's top, which
    /// `btrfs subvolume show` of one grain's subvolume tells.
    fn spaces(&self) -> Result<std::collections::HashMap<String, crate::Space>, DatasetError> {
        let root = self.root.to_string_lossy().into_owned();
        let one = std::fs::read_dir(&self.root)
            .map_err(err(&root, "list the grains"))?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .find(|g| check_id(g).is_ok() && self.path(g).is_dir());
        let Some(one) = one else {
            return Ok(Default::default());
        };
        let shown = run(
            "btrfs",
            &["subvolume", "show", &self.path(&one).to_string_lossy()],
        )
        .map_err(err(&one, "look at the subvolume"))?;
        let suffix = format!("{one}/data");
        let Some(prefix) = shown
            .lines()
            .next()
            .and_then(|l| l.trim().strip_suffix(&suffix))
            .map(|p| p.trim_end_matches('/').to_owned())
        else {
            return Ok(Default::default());
        };
        let text = run("btrfs", &["qgroup", "show", "--raw", "-r", &root])
            .map_err(err(&root, "read the qgroups"))?;
        Ok(parse_qgroups(&text, &prefix))
    }

    fn set_quota(&self, grain: &str, quota: crate::Quota) -> Result<(), DatasetError> {
        check_id(grain)?;
        let data = self.path(grain);
        if data.exists() {
            let path = data.to_string_lossy().into_owned();
            let value = self.quotas.value_of(quota);
            run("btrfs", &["qgroup", "limit", &value, &path])
                .map_err(err(grain, "set the quota"))?;
        }
        self.quotas.put(grain, quota);
        Ok(())
    }

    fn create(&self, grain: &str, host_uid: u32) -> Result<PathBuf, DatasetError> {
        check_id(grain)?;
        mkdir(&self.grain_dir(grain), 0o700).map_err(err(grain, "create the grain directory"))?;
        let data = self.path(grain);
        let path = data.to_string_lossy().into_owned();
        if !data.exists() {
            run("btrfs", &["subvolume", "create", &path])
                .map_err(err(grain, "create the btrfs subvolume"))?;
        }
        run(
            "btrfs",
            &["qgroup", "limit", &self.quotas.value(grain), &path],
        )
        .map_err(err(grain, "limit the subvolume's qgroup"))?;
        own(grain, &data, host_uid)?;
        Ok(data)
    }

    fn snapshot(&self, grain: &str, label: &str) -> Result<Option<String>, DatasetError> {
        check_id(grain)?;
        check_label(grain, label)?;
        let dir = self.snapshots(grain);
        mkdir(&dir, 0o700).map_err(err(grain, "create the snapshot directory"))?;
        let target = dir.join(label);
        run(
            "btrfs",
            &[
                "subvolume",
                "snapshot",
                "-r",
                &self.path(grain).to_string_lossy(),
                &target.to_string_lossy(),
            ],
        )
        .map_err(err(grain, "take a btrfs snapshot"))?;
        Ok(Some(target.display().to_string()))
    }

    fn list_snapshots(&self, grain: &str) -> Result<Vec<Snapshot>, DatasetError> {
        check_id(grain)?;
        list_snapshot_dir(grain, &self.snapshots(grain))
    }

    fn delete_snapshot(&self, grain: &str, label: &str) -> Result<(), DatasetError> {
        check_id(grain)?;
        check_label(grain, label)?;
        refuse_if_held(grain, &self.grain_dir(grain), label)?;
        run(
            "btrfs",
            &[
                "subvolume",
                "delete",
                &self.snapshots(grain).join(label).to_string_lossy(),
            ],
        )
        .map(drop)
        .map_err(err(grain, "delete a btrfs snapshot"))
    }

    fn rollback(&self, grain: &str, label: &str, host_uid: u32) -> Result<(), DatasetError> {
        check_id(grain)?;
        check_label(grain, label)?;
        let snap = self.snapshots(grain).join(label);
        if !snap.exists() {
            return Err(err(grain, "find the snapshot")(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no snapshot {label:?}"),
            )));
        }
        let data = self.path(grain);
        // A writable copy of the snapshot first, then the swap: a failure
        // leaves the current data in place.
        let fresh = self.grain_dir(grain).join(".rollback");
        let _ = run("btrfs", &["subvolume", "delete", &fresh.to_string_lossy()]);
        run(
            "btrfs",
            &[
                "subvolume",
                "snapshot",
                &snap.to_string_lossy(),
                &fresh.to_string_lossy(),
            ],
        )
        .map_err(err(grain, "copy the snapshot"))?;
        // Swap by renames (the current data stays whole until the copy is
        // in place), then delete the old subvolume.
        let old = self.grain_dir(grain).join(".replaced");
        std::fs::rename(&data, &old).map_err(err(grain, "move the current data aside"))?;
        if let Err(e) = std::fs::rename(&fresh, &data) {
            let _ = std::fs::rename(&old, &data);
            return Err(err(grain, "move the copy into place")(e));
        }
        run("btrfs", &["subvolume", "delete", &old.to_string_lossy()])
            .map_err(err(grain, "delete the old subvolume"))?;
        run(
            "btrfs",
            &[
                "qgroup",
                "limit",
                &self.quotas.value(grain),
                &data.to_string_lossy(),
            ],
        )
        .map_err(err(grain, "limit the subvolume's qgroup"))?;
        own(grain, &data, host_uid)
    }

    /// The final snapshot is kept as a read-only subvolume in
    /// `<root>/.retired/<grain>-<label>`; everything else goes.
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
        run(
            "btrfs",
            &[
                "subvolume",
                "snapshot",
                "-r",
                &data.to_string_lossy(),
                &kept.to_string_lossy(),
            ],
        )
        .map_err(err(grain, "take the final btrfs snapshot"))?;
        self.destroy(grain)?;
        Ok(Some(kept.display().to_string()))
    }

    fn destroy_data(&self, grain: &str) -> Result<(), DatasetError> {
        check_id(grain)?;
        let data = self.path(grain);
        if data.exists() {
            run("btrfs", &["subvolume", "delete", &data.to_string_lossy()])
                .map_err(err(grain, "delete the btrfs subvolume"))?;
        }
        Ok(())
    }

    fn destroy(&self, grain: &str) -> Result<(), DatasetError> {
        check_id(grain)?;
        if let Ok(entries) = std::fs::read_dir(self.snapshots(grain)) {
            for e in entries.flatten() {
                run(
                    "btrfs",
                    &["subvolume", "delete", &e.path().to_string_lossy()],
                )
                .map_err(err(grain, "delete a btrfs snapshot"))?;
            }
        }
        let data = self.path(grain);
        if data.exists() {
            run("btrfs", &["subvolume", "delete", &data.to_string_lossy()])
                .map_err(err(grain, "delete the btrfs subvolume"))?;
        }
        match std::fs::remove_dir_all(self.grain_dir(grain)) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other.map_err(err(grain, "remove the grain directory")),
        }
    }
}
