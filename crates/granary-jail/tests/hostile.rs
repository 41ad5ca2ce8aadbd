//! The hostile-grain suite: a real launcher builds a real sandbox around
//! `granary-probe`, which tries to get out. Needs root and cgroups (CI has
//! both). The probe must be built statically first (`./run-tests` does:
//! `cargo build -p granary-probe --target <host triple>` with
//! `+crt-static`).
//!
//! Tests take a lock so that only one grain (with its fork and memory
//! bombs) runs at a time on a 2-core machine.

#![cfg(target_os = "linux")]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use granary_jail::spawn::{LaunchRequest, Launched, Spawner};
use granary_jail::{CgroupDriver, DEFAULT_UID_RANGE, GrainSpec, JailConfig, Limits, Plan};

static ONE_GRAIN_AT_A_TIME: Mutex<()> = Mutex::new(());

/// A launched grain with its output pipes, as the tests read it.
struct Child {
    launched: Launched,
    stdout: Option<std::io::PipeReader>,
    stderr: Option<std::io::PipeReader>,
}

impl Child {
    fn id(&self) -> u32 {
        self.launched.id()
    }

    fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        self.launched.wait()
    }

    fn wait_with_output(mut self) -> std::io::Result<Output> {
        let mut err = self.stderr.take().unwrap();
        let errors = std::thread::spawn(move || {
            let mut text = Vec::new();
            err.read_to_end(&mut text).map(|_| text)
        });
        let mut stdout = Vec::new();
        self.stdout.take().unwrap().read_to_end(&mut stdout)?;
        let stderr = errors.join().unwrap()?;
        let status = self.launched.wait()?;
        Ok(Output {
            status,
            stdout,
            stderr,
        })
    }
}

fn launcher() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_granary-launcher"))
}

fn probe() -> PathBuf {
    if let Some(p) = std::env::var_os("GRANARY_PROBE") {
        return PathBuf::from(p);
    }
    let triple = format!("{}-unknown-linux-gnu", std::env::consts::ARCH);
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(format!("../../target/{triple}/debug/granary-probe"));
    assert!(
        path.exists(),
        "{} is missing; build the static probe with ./run-tests or\n  \
         CARGO_TARGET_{}_RUSTFLAGS='-C target-feature=+crt-static' cargo build -p granary-probe --target {triple}",
        path.display(),
        triple.to_uppercase().replace('-', "_"),
    );
    path
}

fn require_root() {
    let uid = std::fs::metadata("/proc/self").unwrap().uid();
    assert_eq!(
        uid, 0,
        "the hostile-grain suite builds real sandboxes and must run as root"
    );
}

fn wait_until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A data root with two grains' datasets and an image holding only the probe.
struct Host {
    dir: tempfile::TempDir,
    config: JailConfig,
    uid: u32,
    grain: String,
}

const LIMITS: Limits = Limits {
    memory_bytes: 64 << 20,
    pids: 32,
    cpu_weight: 100,
    io_weight: 100,
    tmp_bytes: 8 << 20,
    tmp_inodes: 256,
    nofile: 256,
};

impl Host {
    fn new(grain: &str, uid_offset: u32) -> Host {
        require_root();
        let dir = tempfile::Builder::new()
            .prefix("granary-jail-")
            .tempdir()
            .unwrap();
        let root = dir.path().join("data");
        let uid = DEFAULT_UID_RANGE.start + uid_offset;
        std::fs::create_dir_all(root.join("grains/mine")).unwrap();
        std::fs::create_dir_all(root.join("grains/other")).unwrap();
        std::os::unix::fs::chown(root.join("grains/mine"), Some(uid), Some(uid)).unwrap();
        std::fs::write(root.join("grains/other/secret"), "other grain's data").unwrap();
        std::os::unix::fs::chown(root.join("grains/other"), Some(uid + 1), Some(uid + 1)).unwrap();
        let image = dir.path().join("image");
        std::fs::create_dir_all(image.join("bin")).unwrap();
        std::fs::copy(probe(), image.join("bin/probe")).unwrap();
        for p in [dir.path(), &image, &image.join("bin")] {
            std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(0o755))
                .unwrap();
        }
        let config = JailConfig {
            data_root: root,
            uid_range: DEFAULT_UID_RANGE,
            cgroup: JailConfig::detect_cgroup(),
            cgroup_parent: "granary-test".to_owned(),
        };
        assert!(
            config.cgroup.is_some(),
            "no usable cgroup hierarchy on this host"
        );
        Host {
            dir,
            config,
            uid,
            grain: grain.to_owned(),
        }
    }

    fn plan(&self, argv: &[&str], keep_fds: Vec<i32>) -> Plan {
        let spec = GrainSpec {
            grain: self.grain.clone(),
            image: self.dir.path().join("image"),
            dataset: self.config.data_root.join("grains/mine"),
            host_uid: self.uid,
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: vec!["PATH=/bin".to_owned()],
            keep_fds,
            limits: LIMITS,
        };
        self.config.plan(&spec).unwrap()
    }

    fn cgroup_dirs(&self) -> Vec<PathBuf> {
        match self.config.cgroup.as_ref().unwrap() {
            CgroupDriver::V1 { root } => ["memory", "pids"]
                .iter()
                .map(|c| root.join(c).join("granary-test").join(&self.grain))
                .collect(),
            CgroupDriver::V2 { root } => vec![root.join("granary-test").join(&self.grain)],
        }
    }

    /// Starts a grain the way the daemon does: through the long-lived
    /// spawner thread and its zygote.
    fn launch(&self, plan: Plan, fds: Vec<(std::os::fd::OwnedFd, i32)>) -> Child {
        self.try_launch(plan, fds).expect("spawn launcher")
    }

    fn try_launch(
        &self,
        plan: Plan,
        fds: Vec<(std::os::fd::OwnedFd, i32)>,
    ) -> std::io::Result<Child> {
        static SPAWNER: std::sync::OnceLock<Spawner> = std::sync::OnceLock::new();
        let (out_read, out_write) = std::io::pipe()?;
        let (err_read, err_write) = std::io::pipe()?;
        let launched = SPAWNER
            .get_or_init(|| Spawner::new(launcher()).expect("spawner thread"))
            .spawn(LaunchRequest {
                plan,
                stdout: out_write.into(),
                stderr: err_write.into(),
                fds,
            })?;
        Ok(Child {
            launched,
            stdout: Some(out_read),
            stderr: Some(err_read),
        })
    }
}

impl Drop for Host {
    /// Whatever a test left running in its cgroup is killed by pid, and the
    /// cgroup removed.
    fn drop(&mut self) {
        for dir in self.cgroup_dirs() {
            if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
                for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                    let _ = Command::new("kill")
                        .args(["-KILL", &pid.to_string()])
                        .status();
                }
            }
        }
        for dir in self.cgroup_dirs() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while dir.exists() && std::fs::remove_dir(&dir).is_err() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

fn mount_count() -> usize {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .count()
}

#[test]
fn hostile_probe_finds_no_way_out() {
    let _one = ONE_GRAIN_AT_A_TIME
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let host = Host::new("hostile", 11);
    let mounts_before = mount_count();

    let socket_path = host.dir.path().join("host.sock");
    let _path_listener = UnixListener::bind(&socket_path).unwrap();
    let abstract_name = format!("granary-test-{}", std::process::id());
    let _abstract_listener = UnixListener::bind_addr(
        &<SocketAddr as std::os::linux::net::SocketAddrExt>::from_abstract_name(
            abstract_name.as_bytes(),
        )
        .unwrap(),
    )
    .unwrap();
    let (mut ours, theirs) = UnixStream::pair().unwrap();
    let channel = std::thread::spawn(move || {
        let mut buf = [0u8; 5];
        ours.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping\n");
        ours.write_all(b"pong\n").unwrap();
    });

    let other = host.config.data_root.join("grains/other");
    let plan = host.plan(
        &[
            "/bin/probe",
            "--other-dataset",
            other.to_str().unwrap(),
            "--host-socket",
            socket_path.to_str().unwrap(),
            "--abstract",
            &abstract_name,
            "--host-pid",
            &std::process::id().to_string(),
            "--tmp-bytes",
            &LIMITS.tmp_bytes.to_string(),
            "--pids",
            &LIMITS.pids.to_string(),
            "--memory-bytes",
            &LIMITS.memory_bytes.to_string(),
        ],
        vec![3],
    );
    let child = host.launch(plan, vec![(theirs.into(), 3)]);
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    channel
        .join()
        .expect("the grain talked over its host channel");

    let failures: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains("\"ok\":false"))
        .collect();
    assert!(
        failures.is_empty(),
        "the sandbox let these through:\n{}\n--- stderr\n{stderr}",
        failures.join("\n")
    );
    let checks = stdout
        .lines()
        .filter(|l| l.starts_with("{\"check\""))
        .count();
    assert!(
        checks >= 60,
        "only {checks} checks ran:\n{stdout}\n--- stderr\n{stderr}"
    );
    assert!(
        out.status.success(),
        "probe exit {}:\n{stdout}\n{stderr}",
        out.status
    );

    // The grain wrote its dataset as its own host uid, and nothing else.
    let written = host.config.data_root.join("grains/mine/probe-ok");
    assert_eq!(std::fs::metadata(&written).unwrap().uid(), host.uid);
    assert_eq!(
        std::fs::read_to_string(host.config.data_root.join("grains/other/secret")).unwrap(),
        "other grain's data"
    );
    // Host code opening grain data never follows what the grain planted.
    let dataset = std::fs::File::open(host.config.data_root.join("grains/mine")).unwrap();
    match granary_files::open_beneath(&dataset, Path::new("planted-link"), false) {
        Err(granary_files::FileError::Io { source, .. }) => {
            assert_eq!(source.raw_os_error(), Some(libc::ELOOP))
        }
        other => panic!("the planted symlink was followed: {other:?}"),
    }
    // Nothing left behind on the host.
    assert_eq!(
        mount_count(),
        mounts_before,
        "mounts leaked into the host namespace"
    );
    for dir in host.cgroup_dirs() {
        assert!(!dir.exists(), "cgroup {} left behind", dir.display());
    }
}

#[test]
fn sigterm_reaches_the_app_through_launcher_and_init() {
    let _one = ONE_GRAIN_AT_A_TIME
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let host = Host::new("sigterm", 21);
    let mut child = host.launch(host.plan(&["/bin/probe", "--wait"], vec![]), vec![]);
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(
        line.trim(),
        "ready 2",
        "the app is pid 2, under the grain's init"
    );
    // By pid: only the launcher this test started.
    let rc = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(rc.success());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(128 + 15), "the app died of SIGTERM");
    for dir in host.cgroup_dirs() {
        assert!(!dir.exists(), "cgroup {} left behind", dir.display());
    }
}

/// Pids of this process's children whose command line contains `word`.
fn children_with(word: &str) -> Vec<u32> {
    let me = std::process::id();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            ppid == Some(me) && String::from_utf8_lossy(&cmdline).contains(word)
        })
        .collect()
}

#[test]
fn launchers_are_forked_by_one_zygote_that_is_replaced_if_it_dies() {
    let _one = ONE_GRAIN_AT_A_TIME
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let host = Host::new("zygote", 41);
    let ready = |child: &mut Child| {
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready 2");
    };
    let mut first = host.launch(host.plan(&["/bin/probe", "--wait"], vec![]), vec![]);
    ready(&mut first);
    // Forked by the zygote (its command line), yet our own child: we wait
    // for it and get its status as if we had forked it.
    let ours = children_with("--zygote");
    assert!(ours.contains(&first.id()), "{ours:?} {}", first.id());
    let zygotes: Vec<u32> = ours.into_iter().filter(|p| *p != first.id()).collect();
    assert_eq!(zygotes.len(), 1, "one zygote: {zygotes:?}");
    // By pid: the zygote this test's spawner started.
    assert!(
        Command::new("kill")
            .args(["-KILL", &zygotes[0].to_string()])
            .status()
            .unwrap()
            .success()
    );
    // The running grain does not notice; the next launch gets a new zygote.
    let mut second = host.launch(host.plan(&["/bin/probe", "--wait"], vec![]), vec![]);
    ready(&mut second);
    let now: Vec<u32> = children_with("--zygote")
        .into_iter()
        .filter(|p| ![first.id(), second.id()].contains(p))
        .collect();
    assert_eq!(now.len(), 1, "{now:?}");
    assert_ne!(now[0], zygotes[0]);
    // A descriptor the plan does not keep is refused, not handed over.
    let (extra, _other) = UnixStream::pair().unwrap();
    let refused = host
        .try_launch(
            host.plan(&["/bin/probe", "--wait"], vec![]),
            vec![(extra.into(), 5)],
        )
        .err()
        .expect("a descriptor the plan does not keep");
    assert!(
        refused.to_string().contains("not one the plan keeps"),
        "{refused}"
    );
    for child in [&mut first, &mut second] {
        assert!(
            Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status()
                .unwrap()
                .success()
        );
        assert_eq!(child.wait().unwrap().code(), Some(128 + 15));
    }
}

#[test]
fn the_grain_dies_with_its_parent() {
    let _one = ONE_GRAIN_AT_A_TIME
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let host = Host::new("orphan", 31);
    let plan = serde_json::to_string(&host.plan(&["/bin/probe", "--wait"], vec![])).unwrap();
    let plan_file = host.dir.path().join("plan.json");
    std::fs::write(&plan_file, plan).unwrap();
    // A stand-in daemon: a shell that starts the launcher and is then killed.
    let mut daemon = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{} --plan {} & wait",
            launcher().display(),
            plan_file.display()
        ))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(daemon.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert!(line.starts_with("ready"), "{line}");
    let procs = host.cgroup_dirs()[0].join("cgroup.procs");
    assert!(!std::fs::read_to_string(&procs).unwrap().trim().is_empty());
    daemon.kill().unwrap();
    daemon.wait().unwrap();
    wait_until("every grain process to die with the daemon", || {
        std::fs::read_to_string(&procs)
            .ok()
            .filter(|p| p.trim().is_empty())
    });
    // The launcher was killed before it could remove the cgroup; Host's
    // drop does.
}

#[test]
fn a_failing_step_is_named_and_leaves_nothing_behind() {
    let _one = ONE_GRAIN_AT_A_TIME
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let host = Host::new("badexec", 41);
    let mounts_before = mount_count();
    let out = host
        .launch(host.plan(&["/bin/does-not-exist"], vec![]), vec![])
        .wait_with_output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{stderr}");
    assert!(
        stderr.contains("jail: exec /bin/does-not-exist: ENOENT"),
        "{stderr}"
    );
    assert_eq!(mount_count(), mounts_before);
    for dir in host.cgroup_dirs() {
        assert!(!dir.exists(), "cgroup {} left behind", dir.display());
    }

    // A plan whose image vanished after planning fails at the mount step.
    let plan = host.plan(&["/bin/probe"], vec![]);
    std::fs::rename(
        host.dir.path().join("image"),
        host.dir.path().join("image-gone"),
    )
    .unwrap();
    let out = host.launch(plan, vec![]).wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{stderr}");
    assert!(stderr.contains("jail: opening image"), "{stderr}");
    assert!(stderr.contains("ENOENT"), "{stderr}");
    for dir in host.cgroup_dirs() {
        assert!(!dir.exists(), "cgroup {} left behind", dir.display());
    }
}

#[test]
fn a_cpu_hog_does_not_starve_a_sibling_grain() {
    let _one = ONE_GRAIN_AT_A_TIME
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let hog_host = Host::new("hog", 51);
    let sibling_host = Host::new("sibling", 61);
    // Both grains on CPU 0 (children inherit the launcher's affinity), the
    // hog with eight spinning threads, the sibling with one.
    let pinned = |host: &Host, argv: &[&str]| {
        let plan = serde_json::to_string(&host.plan(argv, vec![])).unwrap();
        Command::new("taskset")
            .args(["-c", "0"])
            .arg(launcher())
            .arg("--plan-json")
            .arg(plan)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut hog = pinned(&hog_host, &["/bin/probe", "--hog", "8"]);
    let mut line = String::new();
    BufReader::new(hog.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("hogging"), "{line}");
    let sibling = pinned(&sibling_host, &["/bin/probe", "--cpu-share", "1500"])
        .wait_with_output()
        .unwrap();
    let _ = Command::new("kill")
        .args(["-TERM", &hog.id().to_string()])
        .status();
    let _ = hog.wait();
    let out = String::from_utf8_lossy(&sibling.stdout);
    let share: f64 = out
        .trim()
        .strip_prefix("cpu-share ")
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "no share reported: {out}\n{}",
                String::from_utf8_lossy(&sibling.stderr)
            )
        });
    println!("sibling grain CPU share against an 8-thread hog: {share:.3}");
    // Equal cpu weights: about half of CPU 0 each. Without per-grain cgroups
    // the one thread would get about 1/9 against eight.
    assert!(
        share > 0.3,
        "the sibling got only {:.0}% of its CPU",
        share * 100.0
    );
}

#[test]
fn a_chatty_grain_fills_only_its_capped_log() {
    let _one = ONE_GRAIN_AT_A_TIME
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let host = Host::new("chatty", 71);
    let mut child = host.launch(
        host.plan(&["/bin/probe", "--spew", "4000000"], vec![]),
        vec![],
    );
    let policy = granary_jail::grain_log::LogPolicy {
        dir: host.dir.path().join("logs/chatty"),
        max_file_bytes: 256 << 10,
        keep: 2,
    };
    let stdout = std::fs::File::from(std::os::fd::OwnedFd::from(child.stdout.take().unwrap()));
    let pump = granary_jail::grain_log::drain(stdout, policy.clone()).unwrap();
    let status = child.wait().unwrap();
    pump.join().unwrap().unwrap();
    assert!(status.success(), "{status}");
    let on_disk: u64 = std::fs::read_dir(&policy.dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(
        on_disk <= 3 * (256 << 10),
        "{on_disk} bytes of log for a 768 KiB cap"
    );
    let tail = policy.tail(1 << 10).unwrap();
    assert!(String::from_utf8_lossy(&tail).ends_with("the grain is very chatty today\n"));
}

#[test]
fn without_root_the_launcher_maps_the_invoking_user_and_says_so() {
    let _one = ONE_GRAIN_AT_A_TIME
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let host = Host::new("rootless", 81);
    const NOBODY: u32 = 65534;
    std::os::unix::fs::chown(
        host.config.data_root.join("grains/mine"),
        Some(NOBODY),
        Some(NOBODY),
    )
    .unwrap();
    let plan = serde_json::to_string(&host.plan(&["/bin/probe"], vec![])).unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(launcher())
        .arg("--plan-json")
        .arg(plan)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("WARNING: not running as root"), "{stderr}");
    assert!(stderr.contains("shares one host uid"), "{stderr}");
    // Everything holds but what needs root: cgroup limits, and (in this
    // test) a host channel.
    let mut failed: Vec<String> = stdout
        .lines()
        .filter(|l| l.contains("\"ok\":false"))
        .map(|l| l.split('"').nth(3).unwrap_or_default().to_owned())
        .collect();
    failed.sort();
    assert_eq!(
        failed,
        [
            "fork bomb past pids.max",
            "memory bomb past memory.max",
            "talk over the host channel on fd 3"
        ],
        "{stdout}\n{stderr}"
    );
    let written = host.config.data_root.join("grains/mine/probe-ok");
    assert_eq!(
        std::fs::metadata(written).unwrap().uid(),
        NOBODY,
        "the grain ran as the invoking user"
    );
    for dir in host.cgroup_dirs() {
        assert!(!dir.exists(), "no cgroup is made without root");
    }
}
