//! Per-grain cgroups: memory, pids, cpu weight and io weight limits, and the
//! freezer, on cgroup v1 (one hierarchy per controller) or v2 (unified).
//!
//! This file only reads and writes cgroupfs files, so both drivers can be
//! tested against a directory laid out like cgroupfs.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::{CgroupDriver, JailError, Limits};

/// Picks the driver for the cgroupfs mounted at `root` (normally
/// `/sys/fs/cgroup`).
pub fn detect(root: &Path) -> Option<CgroupDriver> {
    let controllers = fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
    if controllers.split_whitespace().any(|c| c == "memory") {
        return Some(CgroupDriver::V2 {
            root: root.to_path_buf(),
        });
    }
    if root.join("memory").is_dir() && root.join("pids").is_dir() {
        return Some(CgroupDriver::V1 {
            root: root.to_path_buf(),
        });
    }
    None
}

/// v1 controllers a grain gets a directory in. `cpu` and `freezer` are
/// optional only in the sense that a missing hierarchy is skipped.
const V1_REQUIRED: &[&str] = &["memory", "pids"];
const V1_OPTIONAL: &[&str] = &["cpu", "cpuacct", "blkio", "freezer"];

/// One grain's cgroup (one directory per hierarchy on v1).
#[derive(Debug)]
pub struct GrainCgroup {
    driver: CgroupDriver,
    dirs: Vec<PathBuf>,
}

fn write(path: &Path, value: &str) -> Result<(), JailError> {
    fs::write(path, value)
        .map_err(|e| JailError::os(format!("writing {value:?} to {}", path.display()), e))
}

fn make_dir(dir: &Path, created: &mut Vec<PathBuf>) -> Result<(), JailError> {
    match fs::create_dir(dir) {
        Ok(()) => {
            created.push(dir.to_path_buf());
            Ok(())
        }
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(JailError::os(
            format!("creating cgroup {}", dir.display()),
            e,
        )),
    }
}

impl GrainCgroup {
    /// Creates the grain's cgroup under `parent` and applies `limits`. A
    /// failure removes the directories this call created.
    pub fn create(
        driver: &CgroupDriver,
        parent: &str,
        grain: &str,
        limits: &Limits,
    ) -> Result<GrainCgroup, JailError> {
        let mut created = Vec::new();
        let result = Self::create_inner(driver, parent, grain, limits, &mut created);
        if result.is_err() {
            for dir in created.iter().rev() {
                let _ = fs::remove_dir(dir);
            }
        }
        result
    }

    fn create_inner(
        driver: &CgroupDriver,
        parent: &str,
        grain: &str,
        limits: &Limits,
        created: &mut Vec<PathBuf>,
    ) -> Result<GrainCgroup, JailError> {
        let mut dirs = Vec::new();
        match driver {
            CgroupDriver::V1 { root } => {
                if let Some(missing) = V1_REQUIRED.iter().find(|c| !root.join(c).is_dir()) {
                    return Err(JailError::new(format!(
                        "cgroup v1 controller {missing} is not mounted at {}",
                        root.join(missing).display()
                    )));
                }
                for ctrl in V1_REQUIRED.iter().chain(V1_OPTIONAL) {
                    let hierarchy = root.join(ctrl);
                    if !hierarchy.is_dir() {
                        continue;
                    }
                    make_dir(&hierarchy.join(parent), created)?;
                    let dir = hierarchy.join(parent).join(grain);
                    make_dir(&dir, created)?;
                    match *ctrl {
                        "memory" => {
                            write(
                                &dir.join("memory.limit_in_bytes"),
                                &limits.memory_bytes.to_string(),
                            )?;
                            let memsw = dir.join("memory.memsw.limit_in_bytes");
                            if memsw.exists() {
                                write(&memsw, &limits.memory_bytes.to_string())?;
                            }
                        }
                        "pids" => write(&dir.join("pids.max"), &limits.pids.to_string())?,
                        "cpu" => {
                            let shares = (u64::from(limits.cpu_weight) * 1024 / 100).max(2);
                            write(&dir.join("cpu.shares"), &shares.to_string())?;
                        }
                        "blkio" => {
                            let weight = dir.join("blkio.weight");
                            if weight.exists() {
                                let w = (limits.io_weight / 10).clamp(10, 1000);
                                write(&weight, &w.to_string())?;
                            }
                        }
                        _ => {}
                    }
                    dirs.push(dir);
                }
            }
            CgroupDriver::V2 { root } => {
                let available =
                    fs::read_to_string(root.join("cgroup.controllers")).map_err(|e| {
                        JailError::os(format!("reading {}/cgroup.controllers", root.display()), e)
                    })?;
                let wanted: Vec<&str> = ["memory", "pids", "cpu", "io"]
                    .into_iter()
                    .filter(|c| available.split_whitespace().any(|a| a == *c))
                    .collect();
                for required in ["memory", "pids"] {
                    if !wanted.contains(&required) {
                        return Err(JailError::new(format!(
                            "cgroup v2 at {} does not offer the {required} controller",
                            root.display()
                        )));
                    }
                }
                let enable: String = wanted.iter().map(|c| format!("+{c} ")).collect();
                let enable = enable.trim_end();
                write(&root.join("cgroup.subtree_control"), enable)?;
                let parent_dir = root.join(parent);
                make_dir(&parent_dir, created)?;
                write(&parent_dir.join("cgroup.subtree_control"), enable)?;
                let dir = parent_dir.join(grain);
                make_dir(&dir, created)?;
                write(&dir.join("memory.max"), &limits.memory_bytes.to_string())?;
                let swap = dir.join("memory.swap.max");
                if swap.exists() {
                    write(&swap, "0")?;
                }
                write(&dir.join("pids.max"), &limits.pids.to_string())?;
                if wanted.contains(&"cpu") {
                    write(&dir.join("cpu.weight"), &limits.cpu_weight.to_string())?;
                }
                let io = dir.join("io.weight");
                if wanted.contains(&"io") && io.exists() {
                    write(&io, &format!("default {}", limits.io_weight))?;
                }
                dirs.push(dir);
            }
        }
        Ok(GrainCgroup {
            driver: driver.clone(),
            dirs,
        })
    }

    /// The grain's directories (one per v1 hierarchy, one on v2).
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Moves the calling thread into the grain's cgroup(s); the caller must
    /// be single-threaded, so this moves the whole process.
    ///
    /// On v1 this writes `0` to each `tasks` file: migrating only the
    /// current thread skips the kernel's global threadgroup lock, whose
    /// writer side waits for an RCU grace period (4-13 ms on a quiet VM)
    /// every time a whole process is moved through `cgroup.procs`.
    pub fn join_current(&self) -> Result<(), JailError> {
        let file = match self.driver {
            CgroupDriver::V1 { .. } => "tasks",
            CgroupDriver::V2 { .. } => "cgroup.procs",
        };
        for dir in &self.dirs {
            write(&dir.join(file), "0")?;
        }
        Ok(())
    }

    /// Removes the cgroup once its processes are gone, waiting up to
    /// `patience` for them to leave (the kernel reaps a dying pid namespace
    /// asynchronously).
    pub fn remove(self, patience: Duration) -> Result<(), JailError> {
        let deadline = Instant::now() + patience;
        for dir in self.dirs.iter().rev() {
            loop {
                match fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == ErrorKind::NotFound => break,
                    Err(e)
                        if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline =>
                    {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    Err(e) => {
                        return Err(JailError::os(
                            format!("removing cgroup {}", dir.display()),
                            e,
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

/// A grain's processes, frozen until this is dropped (or `thaw`ed).
pub struct Frozen {
    state_file: PathBuf,
    v2: bool,
}

impl Frozen {
    pub fn thaw(self) {}
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let value = if self.v2 { "0" } else { "THAWED" };
        let _ = fs::write(&self.state_file, value);
    }
}

/// Freezes every process of a running grain (for a consistent snapshot),
/// waiting up to `patience` for the kernel to report it frozen. On
/// timeout the grain is thawed again and an error returned.
pub fn freeze(
    driver: &CgroupDriver,
    parent: &str,
    grain: &str,
    patience: Duration,
) -> Result<Frozen, JailError> {
    let (state_file, v2) = match driver {
        CgroupDriver::V1 { root } => (
            root.join("freezer")
                .join(parent)
                .join(grain)
                .join("freezer.state"),
            false,
        ),
        CgroupDriver::V2 { root } => (root.join(parent).join(grain).join("cgroup.freeze"), true),
    };
    write(&state_file, if v2 { "1" } else { "FROZEN" })?;
    let frozen = Frozen { state_file, v2 };
    let deadline = Instant::now() + patience;
    loop {
        let done = if v2 {
            let events = frozen.state_file.with_file_name("cgroup.events");
            fs::read_to_string(events)
                .map(|e| e.lines().any(|l| l == "frozen 1"))
                .unwrap_or(false)
        } else {
            fs::read_to_string(&frozen.state_file)
                .map(|s| s.trim() == "FROZEN")
                .unwrap_or(false)
        };
        if done {
            return Ok(frozen);
        }
        if Instant::now() > deadline {
            return Err(JailError::new(format!(
                "grain {grain} did not freeze within {} ms; thawed it again",
                patience.as_millis()
            )));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// How many times the kernel killed a process of a running grain for
/// reaching its memory limit (v1 `memory.oom_control`, v2 `memory.events`:
/// `oom_kill N`); `None` when the grain has no cgroup (not running).
pub fn oom_kills(driver: &CgroupDriver, parent: &str, grain: &str) -> Option<u64> {
    let file = match driver {
        CgroupDriver::V1 { root } => root
            .join("memory")
            .join(parent)
            .join(grain)
            .join("memory.oom_control"),
        CgroupDriver::V2 { root } => root.join(parent).join(grain).join("memory.events"),
    };
    let text = fs::read_to_string(file).ok()?;
    parse_oom_kills(&text)
}

/// What a running grain uses now, from its cgroup.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Usage {
    /// Memory charged to it (page cache included), in bytes.
    pub memory_bytes: u64,
    /// CPU time its processes used while the cgroup existed, in seconds;
    /// `None` where the hierarchy has no accounting (v1 without cpuacct).
    pub cpu_seconds: Option<f64>,
}

/// A grain's memory and CPU use (v1 `memory.usage_in_bytes` and
/// `cpuacct.usage`, v2 `memory.current` and `cpu.stat`'s `usage_usec`);
/// `None` when the grain has no cgroup.
pub fn usage(driver: &CgroupDriver, parent: &str, grain: &str) -> Option<Usage> {
    let read = |p: PathBuf| fs::read_to_string(p).ok();
    match driver {
        CgroupDriver::V1 { root } => {
            let memory = read(
                root.join("memory")
                    .join(parent)
                    .join(grain)
                    .join("memory.usage_in_bytes"),
            )?;
            let cpu = read(
                root.join("cpuacct")
                    .join(parent)
                    .join(grain)
                    .join("cpuacct.usage"),
            );
            Some(Usage {
                memory_bytes: memory.trim().parse().ok()?,
                cpu_seconds: cpu
                    .and_then(|c| c.trim().parse::<u64>().ok())
                    .map(|ns| ns as f64 / 1e9),
            })
        }
        CgroupDriver::V2 { root } => {
            let dir = root.join(parent).join(grain);
            let memory = read(dir.join("memory.current"))?;
            Some(Usage {
                memory_bytes: memory.trim().parse().ok()?,
                cpu_seconds: read(dir.join("cpu.stat")).and_then(|t| parse_usage_usec(&t)),
            })
        }
    }
}

fn parse_usage_usec(text: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .and_then(|n| n.trim().parse::<u64>().ok())
        .map(|us| us as f64 / 1e6)
}

fn parse_oom_kills(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|n| n.trim().parse().ok())
}

/// Removes a grain's cgroup directories once their processes are gone,
/// waiting up to `patience` for them to leave (the kernel reaps a dying
/// pid namespace asynchronously). Blocking.
pub fn remove_grain(
    driver: &CgroupDriver,
    parent: &str,
    grain: &str,
    patience: Duration,
) -> Result<(), JailError> {
    let dirs: Vec<PathBuf> = match driver {
        CgroupDriver::V1 { root } => V1_REQUIRED
            .iter()
            .chain(V1_OPTIONAL)
            .map(|c| root.join(c).join(parent).join(grain))
            .collect(),
        CgroupDriver::V2 { root } => vec![root.join(parent).join(grain)],
    };
    GrainCgroup {
        driver: driver.clone(),
        dirs,
    }
    .remove(patience)
}

/// Removes every empty grain cgroup under `parent` (what a daemon that
/// died left behind); busy ones stay. Blocking.
pub fn remove_children(driver: &CgroupDriver, parent: &str) {
    let bases: Vec<PathBuf> = match driver {
        CgroupDriver::V1 { root } => V1_REQUIRED
            .iter()
            .chain(V1_OPTIONAL)
            .map(|c| root.join(c).join(parent))
            .collect(),
        CgroupDriver::V2 { root } => vec![root.join(parent)],
    };
    for base in bases {
        let Ok(entries) = fs::read_dir(&base) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                let _ = fs::remove_dir(entry.path());
            }
        }
    }
}

/// Removes what a grain's launcher could not (it was killed): the grain's
/// empty cgroup directories, and the parent's when `parent_too` and empty.
/// Missing directories and busy ones (still in use) are left alone.
pub fn remove_leftovers(driver: &CgroupDriver, parent: &str, grain: Option<&str>) {
    let bases: Vec<PathBuf> = match driver {
        CgroupDriver::V1 { root } => V1_REQUIRED
            .iter()
            .chain(V1_OPTIONAL)
            .map(|c| root.join(c).join(parent))
            .collect(),
        CgroupDriver::V2 { root } => vec![root.join(parent)],
    };
    for base in bases {
        let dir = match grain {
            Some(g) => base.join(g),
            None => base,
        };
        let _ = fs::remove_dir(dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_use_is_read_from_v2_cpu_stat() {
        let stat = "usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\n";
        assert_eq!(parse_usage_usec(stat), Some(2.5));
        assert_eq!(parse_usage_usec("user_usec 1\n"), None);
    }

    #[test]
    fn usage_reads_a_v1_grains_files() {
        let dir = tempfile::tempdir().unwrap();
        let mem = dir.path().join("memory/granary/alice-mail");
        let cpu = dir.path().join("cpuacct/granary/alice-mail");
        fs::create_dir_all(&mem).unwrap();
        fs::create_dir_all(&cpu).unwrap();
        fs::write(mem.join("memory.usage_in_bytes"), "1048576\n").unwrap();
        fs::write(cpu.join("cpuacct.usage"), "1500000000\n").unwrap();
        let driver = CgroupDriver::V1 {
            root: dir.path().to_path_buf(),
        };
        let u = usage(&driver, "granary", "alice-mail").unwrap();
        assert_eq!(u.memory_bytes, 1 << 20);
        assert_eq!(u.cpu_seconds, Some(1.5));
        assert!(usage(&driver, "granary", "bob-mail").is_none());
    }

    #[test]
    fn oom_kills_are_read_from_either_format() {
        let v1 = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        let v2 = "low 0\nhigh 0\nmax 7\noom 2\noom_kill 2\noom_group_kill 0\n";
        assert_eq!(parse_oom_kills(v1), Some(3));
        assert_eq!(parse_oom_kills(v2), Some(2));
        assert_eq!(parse_oom_kills("oom_kill_disable 0\n"), None);
    }

    fn fake_v2() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("cgroup.controllers"),
            "cpuset cpu io memory hugetlb pids rdma misc\n",
        )
        .unwrap();
        fs::write(dir.path().join("cgroup.subtree_control"), "").unwrap();
        dir
    }

    #[test]
    fn detects_v2_from_its_controllers_and_v1_from_its_hierarchies() {
        let v2 = fake_v2();
        assert!(matches!(detect(v2.path()), Some(CgroupDriver::V2 { .. })));
        let v1 = tempfile::tempdir().unwrap();
        fs::create_dir(v1.path().join("memory")).unwrap();
        fs::create_dir(v1.path().join("pids")).unwrap();
        // A hybrid host: v2 mounted with no controllers, v1 doing the work.
        fs::create_dir(v1.path().join("unified")).unwrap();
        fs::write(v1.path().join("unified/cgroup.controllers"), "").unwrap();
        assert!(matches!(detect(v1.path()), Some(CgroupDriver::V1 { .. })));
        assert_eq!(detect(tempfile::tempdir().unwrap().path()), None);
    }

    /// On real cgroupfs the kernel creates these files in every new
    /// directory; on the fake tree the test makes them, as the kernel would.
    fn pre_create_v2_files(root: &Path, parent: &str, grain: &str) {
        let dir = root.join(parent).join(grain);
        fs::create_dir_all(&dir).unwrap();
        fs::write(root.join(parent).join("cgroup.subtree_control"), "").unwrap();
        for f in [
            "memory.max",
            "memory.swap.max",
            "pids.max",
            "cpu.weight",
            "io.weight",
            "cgroup.procs",
        ] {
            fs::write(dir.join(f), "").unwrap();
        }
    }

    #[test]
    fn v2_limits_land_in_the_unified_files() {
        let root = fake_v2();
        pre_create_v2_files(root.path(), "granary", "g1");
        let limits = Limits {
            memory_bytes: 64 << 20,
            pids: 32,
            cpu_weight: 250,
            io_weight: 50,
            ..Limits::default()
        };
        let driver = CgroupDriver::V2 {
            root: root.path().to_path_buf(),
        };
        let cg = GrainCgroup::create(&driver, "granary", "g1", &limits).unwrap();
        let read = |f: &str| fs::read_to_string(root.path().join("granary/g1").join(f)).unwrap();
        assert_eq!(read("memory.max"), (64u64 << 20).to_string());
        assert_eq!(read("memory.swap.max"), "0");
        assert_eq!(read("pids.max"), "32");
        assert_eq!(read("cpu.weight"), "250");
        assert_eq!(read("io.weight"), "default 50");
        assert_eq!(
            fs::read_to_string(root.path().join("cgroup.subtree_control")).unwrap(),
            "+memory +pids +cpu +io"
        );
        cg.join_current().unwrap();
        assert_eq!(read("cgroup.procs"), "0", "v2 joins through cgroup.procs");
        assert_eq!(cg.dirs(), [root.path().join("granary/g1")]);
    }

    #[test]
    fn v2_without_the_memory_controller_is_an_error() {
        let root = tempfile::tempdir().unwrap();
        fs::write(root.path().join("cgroup.controllers"), "cpu pids\n").unwrap();
        fs::write(root.path().join("cgroup.subtree_control"), "").unwrap();
        let driver = CgroupDriver::V2 {
            root: root.path().to_path_buf(),
        };
        let err = GrainCgroup::create(&driver, "granary", "g1", &Limits::default()).unwrap_err();
        assert!(err.to_string().contains("memory controller"), "{err}");
        assert!(!root.path().join("granary").exists(), "nothing left behind");
    }

    #[test]
    fn v1_writes_each_hierarchy_and_cleans_up_on_failure() {
        let root = tempfile::tempdir().unwrap();
        for ctrl in ["memory", "pids", "cpu"] {
            fs::create_dir(root.path().join(ctrl)).unwrap();
        }
        let driver = CgroupDriver::V1 {
            root: root.path().to_path_buf(),
        };
        let limits = Limits {
            cpu_weight: 50,
            ..Limits::default()
        };
        let cg = GrainCgroup::create(&driver, "granary", "g1", &limits).unwrap();
        let read = |f: &str| fs::read_to_string(root.path().join(f)).unwrap();
        assert_eq!(
            read("memory/granary/g1/memory.limit_in_bytes"),
            (256u64 << 20).to_string()
        );
        assert_eq!(read("pids/granary/g1/pids.max"), "256");
        assert_eq!(read("cpu/granary/g1/cpu.shares"), "512");
        assert_eq!(cg.dirs().len(), 3);
        for ctrl in ["memory", "pids", "cpu"] {
            fs::write(root.path().join(ctrl).join("granary/g1/tasks"), "").unwrap();
        }
        cg.join_current().unwrap();
        assert_eq!(read("pids/granary/g1/tasks"), "0", "v1 joins through tasks");

        // pids missing: an error, and the memory directories made so far go.
        let root = tempfile::tempdir().unwrap();
        fs::create_dir(root.path().join("memory")).unwrap();
        let driver = CgroupDriver::V1 {
            root: root.path().to_path_buf(),
        };
        let err = GrainCgroup::create(&driver, "granary", "g1", &limits).unwrap_err();
        assert!(
            err.to_string().contains("controller pids is not mounted"),
            "{err}"
        );
        assert!(!root.path().join("memory/granary").exists());
    }
}
