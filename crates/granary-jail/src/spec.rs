//! From what the supervisor asks for ([`GrainSpec`]) to what the launcher
//! does ([`Plan`]), checked against the host's [`JailConfig`].

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::JailError;

/// The uid (and gid) every grain runs as inside its user namespace. Its host
/// uid is the grain's own.
pub const INSIDE_UID: u32 = 1000;
pub const INSIDE_GID: u32 = 1000;

pub use granary_model::{DEFAULT_UID_RANGE, UidRange};

/// [`UidRange::check_free`] against this host's users, groups and
/// subordinate id ranges: grains must never share a uid with anything else.
pub fn uid_range_free_on_host(range: &UidRange) -> Result<(), JailError> {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let ids = format!("{}\n{}", read("/etc/passwd"), read("/etc/group"));
    let subs = format!("{}\n{}", read("/etc/subuid"), read("/etc/subgid"));
    range
        .check_free(&ids, &subs)
        .map_err(|e| JailError::new(e.0))
}

/// Which cgroup hierarchy to use, and where it is mounted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CgroupDriver {
    /// cgroup v1: one hierarchy per controller under `root`
    /// (`root/memory`, `root/pids`, ...).
    V1 { root: PathBuf },
    /// cgroup v2: one unified hierarchy at `root`.
    V2 { root: PathBuf },
}

/// Resource limits of one grain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Memory (and, on v1, kernel memory accounted with it) in bytes.
    pub memory_bytes: u64,
    /// Processes and threads.
    pub pids: u64,
    /// CPU weight, 1 to 10000 (100 is the default share).
    pub cpu_weight: u32,
    /// IO weight, 1 to 10000, where the kernel offers it.
    pub io_weight: u32,
    /// Size of the grain's private /tmp in bytes, and its inode count.
    pub tmp_bytes: u64,
    pub tmp_inodes: u64,
    /// Open files per process.
    pub nofile: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            memory_bytes: 256 << 20,
            pids: 256,
            cpu_weight: 100,
            io_weight: 100,
            tmp_bytes: 64 << 20,
            tmp_inodes: 4096,
            nofile: 1024,
        }
    }
}

/// What the host knows about sandboxes in general.
#[derive(Debug, Clone)]
pub struct JailConfig {
    /// Grain datasets must live below this directory.
    pub data_root: PathBuf,
    /// Host uids grains may be given.
    pub uid_range: UidRange,
    /// The cgroup hierarchy, or `None` to run without cgroup limits (only
    /// for unprivileged laptop demos; the supervisor says so loudly).
    pub cgroup: Option<CgroupDriver>,
    /// Parent cgroup under which every grain gets its own.
    pub cgroup_parent: String,
}

impl JailConfig {
    /// Finds the cgroup hierarchy of this host: v2 when the unified mount at
    /// `/sys/fs/cgroup` offers controllers, else v1 when the memory
    /// hierarchy exists.
    pub fn detect_cgroup() -> Option<CgroupDriver> {
        crate::cgroup::detect(Path::new("/sys/fs/cgroup"))
    }
}

/// What the supervisor asks for one grain.
#[derive(Debug, Clone)]
pub struct GrainSpec {
    /// A short id: `[a-z0-9-]`, 1 to 64 characters; names its cgroup.
    pub grain: String,
    /// The app image: the grain's read-only root filesystem.
    pub image: PathBuf,
    /// The grain's dataset, mounted read-write at `/var`.
    pub dataset: PathBuf,
    pub host_uid: u32,
    /// The program inside the image and its arguments; `argv[0]` is an
    /// absolute path inside the image.
    pub argv: Vec<String>,
    /// `KEY=value` pairs: the app's whole environment.
    pub env: Vec<String>,
    /// Descriptors (3 and up) handed to the app at the same numbers, e.g.
    /// the capnp socket on 3.
    pub keep_fds: Vec<i32>,
    pub limits: Limits,
}

/// The checked, serialisable instructions the launcher follows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    pub grain: String,
    pub image: PathBuf,
    pub dataset: PathBuf,
    pub host_uid: u32,
    pub host_gid: u32,
    pub argv: Vec<String>,
    pub env: Vec<String>,
    pub keep_fds: Vec<i32>,
    pub limits: Limits,
    pub cgroup: Option<CgroupDriver>,
    pub cgroup_parent: String,
    pub hostname: String,
    /// Leave the grain's cgroup when it ends: the caller reads what it
    /// counted (memory-limit kills) and removes it.
    #[serde(default)]
    pub keep_cgroup: bool,
}

fn check_id(grain: &str) -> Result<(), JailError> {
    if granary_model::valid_resource_name(grain) {
        Ok(())
    } else {
        Err(JailError::new(format!(
            "grain id {grain:?} must be 1 to 64 of a-z, 0-9 and '-', not starting with '-'"
        )))
    }
}

fn existing_dir(what: &str, path: &Path) -> Result<PathBuf, JailError> {
    if !path.is_absolute() {
        return Err(JailError::new(format!(
            "{what} {} is not an absolute path",
            path.display()
        )));
    }
    let real = std::fs::canonicalize(path)
        .map_err(|e| JailError::os(format!("{what} {}", path.display()), e))?;
    if !real.is_dir() {
        return Err(JailError::new(format!(
            "{what} {} is not a directory",
            path.display()
        )));
    }
    Ok(real)
}

impl JailConfig {
    /// Checks `spec` and turns it into a plan. Nothing is created or changed.
    pub fn plan(&self, spec: &GrainSpec) -> Result<Plan, JailError> {
        check_id(&spec.grain)?;
        check_id(&self.cgroup_parent)?;
        let image = existing_dir("image", &spec.image)?;
        let dataset = existing_dir("dataset", &spec.dataset)?;
        let root = existing_dir("data root", &self.data_root)?;
        if !dataset.starts_with(&root) || dataset == root {
            return Err(JailError::new(format!(
                "dataset {} is outside the data root {}",
                spec.dataset.display(),
                root.display()
            )));
        }
        if !self.uid_range.contains(spec.host_uid) {
            return Err(JailError::new(format!(
                "uid {} is outside the grain uid range {}+{}",
                spec.host_uid, self.uid_range.start, self.uid_range.count
            )));
        }
        let Some(program) = spec.argv.first() else {
            return Err(JailError::new("argv is empty"));
        };
        if !program.starts_with('/') {
            return Err(JailError::new(format!(
                "program {program:?} is not an absolute path inside the image"
            )));
        }
        if let Some(bad) = spec
            .env
            .iter()
            .find(|e| !e.contains('=') || e.contains('\0'))
        {
            return Err(JailError::new(format!(
                "environment entry {bad:?} is not KEY=value"
            )));
        }
        if let Some(bad) = spec.keep_fds.iter().find(|fd| **fd < 3) {
            return Err(JailError::new(format!("kept descriptor {bad} is below 3")));
        }
        let l = &spec.limits;
        if !(1..=10_000).contains(&l.cpu_weight) || !(1..=10_000).contains(&l.io_weight) {
            return Err(JailError::new("cpu and io weights must be 1 to 10000"));
        }
        if l.memory_bytes < (4 << 20) || l.pids < 2 || l.tmp_bytes == 0 || l.tmp_inodes == 0 {
            return Err(JailError::new(
                "limits too small: memory at least 4 MiB, pids at least 2, /tmp non-empty",
            ));
        }
        Ok(Plan {
            grain: spec.grain.clone(),
            image,
            dataset,
            host_uid: spec.host_uid,
            host_gid: spec.host_uid,
            argv: spec.argv.clone(),
            env: spec.env.clone(),
            keep_fds: spec.keep_fds.clone(),
            limits: spec.limits,
            cgroup: self.cgroup.clone(),
            cgroup_parent: self.cgroup_parent.clone(),
            hostname: "grain".to_owned(),
            keep_cgroup: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixture {
        _dir: tempfile::TempDir,
        config: JailConfig,
        spec: GrainSpec,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("data");
        std::fs::create_dir_all(root.join("grains/g1")).unwrap();
        std::fs::create_dir_all(dir.path().join("image/bin")).unwrap();
        let config = JailConfig {
            data_root: root.clone(),
            uid_range: DEFAULT_UID_RANGE,
            cgroup: None,
            cgroup_parent: "granary".to_owned(),
        };
        let spec = GrainSpec {
            grain: "g1".to_owned(),
            image: dir.path().join("image"),
            dataset: root.join("grains/g1"),
            host_uid: DEFAULT_UID_RANGE.start + 7,
            argv: vec!["/bin/app".to_owned()],
            env: vec!["PATH=/bin".to_owned()],
            keep_fds: vec![3],
            limits: Limits::default(),
        };
        Fixture {
            _dir: dir,
            config,
            spec,
        }
    }

    #[test]
    fn a_good_spec_becomes_a_plan_that_round_trips() {
        let f = fixture();
        let plan = f.config.plan(&f.spec).unwrap();
        assert_eq!(plan.host_gid, plan.host_uid);
        let json = serde_json::to_string(&plan).unwrap();
        assert_eq!(serde_json::from_str::<Plan>(&json).unwrap(), plan);
    }

    #[test]
    fn bad_specs_name_what_is_wrong() {
        type Mutation = Box<dyn Fn(&mut GrainSpec)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("image", Box::new(|s| s.image = s.image.join("missing"))),
            (
                "outside the data root",
                Box::new(|s| s.dataset = s.image.clone()),
            ),
            (
                "outside the grain uid range",
                Box::new(|s| s.host_uid = 1000),
            ),
            ("argv is empty", Box::new(|s| s.argv.clear())),
            (
                "not an absolute path inside",
                Box::new(|s| s.argv[0] = "app".into()),
            ),
            ("grain id", Box::new(|s| s.grain = "../x".into())),
            ("below 3", Box::new(|s| s.keep_fds = vec![1])),
            ("KEY=value", Box::new(|s| s.env = vec!["NOEQUALS".into()])),
            ("weights", Box::new(|s| s.limits.cpu_weight = 0)),
        ];
        for (expect, mutate) in cases {
            let f = fixture();
            let mut spec = f.spec.clone();
            mutate(&mut spec);
            let err = f.config.plan(&spec).unwrap_err().to_string();
            assert!(
                err.starts_with("jail: ") && err.contains(expect),
                "{expect}: {err}"
            );
        }
    }

    #[test]
    fn dataset_symlink_out_of_the_data_root_is_refused() {
        let f = fixture();
        let link = f.config.data_root.join("grains/evil");
        std::os::unix::fs::symlink("/etc", &link).unwrap();
        let mut spec = f.spec.clone();
        spec.dataset = link;
        let err = f.config.plan(&spec).unwrap_err().to_string();
        assert!(err.contains("outside the data root"), "{err}");
    }

    #[test]
    fn the_default_uid_range_is_free_on_this_host() {
        uid_range_free_on_host(&DEFAULT_UID_RANGE).unwrap();
    }
}
