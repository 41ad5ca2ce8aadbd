//! Grain spawn time, side by side with its peers, in one run.
//!
//! ```sh
//! sudo cargo bench -p granary-jail --bench spawn            # 200 rounds
//! sudo cargo bench -p granary-jail --bench spawn -- --smoke  # 5 rounds (CI)
//! ```
//!
//! Every variant starts the same static binary (`granary-probe --stamp`,
//! which prints the CLOCK_MONOTONIC time it began running and exits). Two
//! figures per variant: spawn to app exec (the time to a running app, set-up
//! only) and spawn to exit (set-up, the app, and tear-down). Rounds interleave the variants, and the process is
//! pinned to one CPU: unpinned runs on small VMs are bimodal (idle vCPUs
//! wake late). Needs root, and the static probe built (`./run-tests` builds
//! it).

#![allow(unsafe_code)] // the minimal reference sandbox is raw syscalls

use std::ffi::CString;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use granary_jail::spawn::{LaunchRequest, Spawner};
use granary_jail::{DEFAULT_UID_RANGE, GrainSpec, JailConfig, Limits, Plan};

/// One grain the way the daemon starts it: the spawner asks its zygote.
fn via_zygote(spawner: &Spawner, plan: &Plan) -> Result<String, String> {
    use std::io::Read;
    let (mut out, out_w) = std::io::pipe().map_err(|e| e.to_string())?;
    let (mut err, err_w) = std::io::pipe().map_err(|e| e.to_string())?;
    let mut launched = spawner
        .spawn(LaunchRequest {
            plan: plan.clone(),
            stdout: out_w.into(),
            stderr: err_w.into(),
            fds: vec![],
        })
        .map_err(|e| e.to_string())?;
    let mut text = String::new();
    let _ = out.read_to_string(&mut text);
    let status = launched.wait().map_err(|e| e.to_string())?;
    if status.success() {
        Ok(text)
    } else {
        let mut why = String::new();
        let _ = err.read_to_string(&mut why);
        Err(why.lines().last().unwrap_or("failed").to_owned())
    }
}

fn probe() -> PathBuf {
    let triple = format!("{}-unknown-linux-gnu", std::env::consts::ARCH);
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(format!("../../target/{triple}/debug/granary-probe"));
    assert!(
        path.exists(),
        "{} is missing: run ./run-tests once, or build the static probe",
        path.display()
    );
    path
}

/// clone into new mount, pid, net, ipc, uts and cgroup namespaces, bind the
/// binary's directory into a tmpfs root, pivot_root, install the same
/// seccomp filters, exec: the least a sandbox of this kind can do.
fn minimal(
    bin_dir: &Path,
    filters: &granary_jail::linux::seccomp::Filters,
) -> Result<String, String> {
    let flags = libc::CLONE_NEWNS
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWNET
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWUTS
        | libc::CLONE_NEWCGROUP
        | libc::SIGCHLD;
    let bin = CString::new(bin_dir.as_os_str().as_encoded_bytes()).unwrap();
    let c = |s: &str| CString::new(s).unwrap();
    let (tmp, tmpfs, root_bin, dot, slash, true_path, arg) = (
        c("/tmp"),
        c("tmpfs"),
        c("/tmp/bin"),
        c("."),
        c("/"),
        c("/bin/true"),
        c("--stamp"),
    );
    let mut out = [0; 2];
    // SAFETY: `out` receives two descriptors.
    if unsafe { libc::pipe(out.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    // SAFETY: the benchmark is single-threaded; the child only makes
    // syscalls with the strings prepared above and exits or execs.
    unsafe {
        let pid = libc::syscall(libc::SYS_clone, flags as libc::c_ulong, 0, 0, 0, 0);
        if pid < 0 {
            return Err(std::io::Error::last_os_error().to_string());
        }
        if pid == 0 {
            libc::dup2(out[1], 1);
            let ok = libc::mount(
                std::ptr::null(),
                slash.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) == 0
                && {
                    let fd = libc::open(bin.as_ptr(), libc::O_PATH | libc::O_DIRECTORY);
                    let src = CString::new(format!("/proc/self/fd/{fd}")).unwrap();
                    fd >= 0
                        && libc::mount(
                            tmpfs.as_ptr(),
                            tmp.as_ptr(),
                            tmpfs.as_ptr(),
                            0,
                            std::ptr::null(),
                        ) == 0
                        && libc::mkdir(root_bin.as_ptr(), 0o755) == 0
                        && libc::mount(
                            src.as_ptr(),
                            root_bin.as_ptr(),
                            std::ptr::null(),
                            libc::MS_BIND,
                            std::ptr::null(),
                        ) == 0
                }
                && libc::chdir(tmp.as_ptr()) == 0
                && libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) == 0
                && libc::umount2(dot.as_ptr(), libc::MNT_DETACH) == 0
                && libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0
                && filters.install().is_ok();
            if ok {
                let argv = [true_path.as_ptr(), arg.as_ptr(), std::ptr::null()];
                let envp = [std::ptr::null()];
                libc::execve(true_path.as_ptr(), argv.as_ptr(), envp.as_ptr());
            }
            libc::_exit(127);
        }
        libc::close(out[1]);
        let mut reader = <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(out[0]);
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut reader, &mut text);
        let mut status = 0;
        libc::waitpid(pid as i32, &mut status, 0);
        if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
            Ok(text)
        } else {
            Err(format!("exit status {status:#x}"))
        }
    }
}

fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr)
            .lines()
            .last()
            .unwrap_or("failed")
            .to_owned())
    }
}

fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t with one bit set, passed with its size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

fn oci_bundle(dir: &Path, probe: &Path) -> PathBuf {
    let bundle = dir.join("bundle");
    std::fs::create_dir_all(bundle.join("rootfs/bin")).unwrap();
    std::fs::copy(probe, bundle.join("rootfs/bin/true")).unwrap();
    let status = Command::new("runc")
        .arg("spec")
        .current_dir(&bundle)
        .status();
    if !matches!(status, Ok(s) if s.success()) {
        return bundle;
    }
    let path = bundle.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    config["process"]["args"] = serde_json::json!(["/bin/true", "--stamp"]);
    config["process"]["terminal"] = serde_json::json!(false);
    std::fs::write(&path, serde_json::to_vec(&config).unwrap()).unwrap();
    bundle
}

struct Variant<'a> {
    name: &'static str,
    /// Runs once; returns the app's stdout (its start time).
    run: Box<dyn FnMut(usize) -> Result<String, String> + 'a>,
    to_exec: Vec<Duration>,
    to_exit: Vec<Duration>,
    unavailable: Option<String>,
}

/// CLOCK_MONOTONIC in nanoseconds, the clock `granary-probe --stamp` prints.
fn monotonic_ns() -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime fills `ts`.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let smoke = std::env::args().any(|a| a == "--smoke")
        || std::env::var_os("GRANARY_BENCH_SMOKE").is_some();
    let rounds = if smoke { 5 } else { 200 };
    assert_eq!(
        std::fs::metadata("/proc/self").unwrap().uid(),
        0,
        "the spawn benchmark needs root"
    );

    let dir = tempfile::Builder::new()
        .prefix("granary-bench-")
        .tempdir()
        .unwrap();
    let probe = probe();
    let image = dir.path().join("image");
    std::fs::create_dir_all(image.join("bin")).unwrap();
    std::fs::copy(&probe, image.join("bin/true")).unwrap();
    let data = dir.path().join("data");
    let dataset = data.join("grains/bench");
    std::fs::create_dir_all(&dataset).unwrap();
    let uid = DEFAULT_UID_RANGE.start + 900;
    std::os::unix::fs::chown(&dataset, Some(uid), Some(uid)).unwrap();
    let config = JailConfig {
        data_root: data.clone(),
        uid_range: DEFAULT_UID_RANGE,
        cgroup: JailConfig::detect_cgroup(),
        cgroup_parent: "granary-bench".to_owned(),
    };
    let mut plan = config
        .plan(&GrainSpec {
            grain: "bench".to_owned(),
            image: image.clone(),
            dataset,
            host_uid: uid,
            argv: vec!["/bin/true".to_owned(), "--stamp".to_owned()],
            env: vec![],
            keep_fds: vec![],
            limits: Limits::default(),
        })
        .unwrap();
    // As the daemon runs grains: the cgroup is kept from one start to the
    // next (removed at the end of this run).
    plan.keep_cgroup = true;
    let plan_file = dir.path().join("plan.json");
    std::fs::write(&plan_file, serde_json::to_string(&plan).unwrap()).unwrap();
    // The same grain without cgroups, to show what they cost.
    let no_cgroup_file = dir.path().join("plan-no-cgroup.json");
    let no_cgroup = granary_jail::Plan {
        cgroup: None,
        ..plan.clone()
    };
    std::fs::write(&no_cgroup_file, serde_json::to_string(&no_cgroup).unwrap()).unwrap();
    let bundle = oci_bundle(dir.path(), &probe);
    let filters = granary_jail::linux::seccomp::compile().unwrap();
    let true_bin = image.join("bin/true");
    let bin_dir = image.join("bin");
    let launcher = PathBuf::from(env!("CARGO_BIN_EXE_granary-launcher"));
    let spawner = Spawner::new(launcher.clone()).unwrap();

    let mut variants: Vec<Variant<'_>> = vec![
        Variant {
            name: "fork+exec",
            run: Box::new(|_| run(Command::new(&true_bin).arg("--stamp"))),
            to_exec: vec![],
            to_exit: vec![],
            unavailable: None,
        },
        Variant {
            name: "minimal sandbox",
            run: Box::new(|_| minimal(&bin_dir, &filters)),
            to_exec: vec![],
            to_exit: vec![],
            unavailable: None,
        },
        Variant {
            name: "granary",
            run: Box::new(|_| via_zygote(&spawner, &plan)),
            to_exec: vec![],
            to_exit: vec![],
            unavailable: None,
        },
        Variant {
            name: "  without cgroups",
            run: Box::new(|_| via_zygote(&spawner, &no_cgroup)),
            to_exec: vec![],
            to_exit: vec![],
            unavailable: None,
        },
        Variant {
            name: "  exec'd launcher",
            run: Box::new(|_| run(Command::new(&launcher).arg("--plan").arg(&plan_file))),
            to_exec: vec![],
            to_exit: vec![],
            unavailable: None,
        },
        Variant {
            name: "unshare(1)",
            run: Box::new(|_| {
                run(Command::new("unshare")
                    .args(["-mpinuf", "--mount-proc"])
                    .arg(&true_bin)
                    .arg("--stamp"))
            }),
            to_exec: vec![],
            to_exit: vec![],
            unavailable: None,
        },
        Variant {
            name: "bubblewrap",
            run: Box::new(|_| {
                run(Command::new("bwrap")
                    .args([
                        "--unshare-all",
                        "--die-with-parent",
                        "--new-session",
                        "--ro-bind",
                    ])
                    .arg(&bin_dir)
                    .args([
                        "/bin",
                        "--proc",
                        "/proc",
                        "--dev",
                        "/dev",
                        "--tmpfs",
                        "/tmp",
                        "/bin/true",
                        "--stamp",
                    ]))
            }),
            to_exec: vec![],
            to_exit: vec![],
            unavailable: None,
        },
        Variant {
            name: "crun",
            run: Box::new(|i| {
                run(Command::new("crun")
                    .args(["run", "--bundle"])
                    .arg(&bundle)
                    .arg(format!("granary-bench-crun-{}-{i}", std::process::id())))
            }),
            to_exec: vec![],
            to_exit: vec![],
            unavailable: None,
        },
        Variant {
            name: "runc",
            run: Box::new(|i| {
                run(Command::new("runc")
                    .args(["run", "--bundle"])
                    .arg(&bundle)
                    .arg(format!("granary-bench-runc-{}-{i}", std::process::id())))
            }),
            to_exec: vec![],
            to_exit: vec![],
            unavailable: None,
        },
    ];

    pin_to_cpu(0);
    for v in variants.iter_mut() {
        if let Err(e) = (v.run)(usize::MAX) {
            v.unavailable = Some(e);
        }
    }
    for round in 0..rounds {
        for v in variants.iter_mut().filter(|v| v.unavailable.is_none()) {
            let start = monotonic_ns();
            let result = (v.run)(round);
            let end = monotonic_ns();
            let stamp = result.and_then(|out| {
                out.trim()
                    .parse::<i128>()
                    .map_err(|_| format!("no start time in the app's output {out:?}"))
            });
            match stamp {
                Ok(exec) => {
                    v.to_exec
                        .push(Duration::from_nanos((exec - start).max(0) as u64));
                    v.to_exit.push(Duration::from_nanos((end - start) as u64));
                }
                Err(e) => v.unavailable = Some(format!("failed in round {round}: {e}")),
            }
        }
    }

    println!("{rounds} interleaved rounds per variant, pinned to CPU 0; milliseconds");
    println!(
        "{:<18} {:>12} {:>9} {:>12} {:>9}",
        "variant", "to exec p50", "p90", "to exit p50", "p90"
    );
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let mut exec_medians = std::collections::BTreeMap::new();
    let mut exit_medians = std::collections::BTreeMap::new();
    for v in &mut variants {
        if let Some(why) = &v.unavailable {
            println!("{:<18} unavailable: {why}", v.name);
            continue;
        }
        v.to_exec.sort();
        v.to_exit.sort();
        let exec50 = percentile(&v.to_exec, 0.5);
        let exit50 = percentile(&v.to_exit, 0.5);
        exec_medians.insert(v.name, exec50);
        exit_medians.insert(v.name, exit50);
        println!(
            "{:<18} {:>12.3} {:>9.3} {:>12.3} {:>9.3}",
            v.name,
            ms(exec50),
            ms(percentile(&v.to_exec, 0.9)),
            ms(exit50),
            ms(percentile(&v.to_exit, 0.9)),
        );
    }
    let ratio = |m: &std::collections::BTreeMap<&str, Duration>, a: &str, b: &str| {
        Some(m.get(a)?.as_secs_f64() / m.get(b)?.as_secs_f64())
    };
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    for (label, m) in [("to exec", &exec_medians), ("to exit", &exit_medians)] {
        if let Some(r) = ratio(m, "granary", "minimal sandbox") {
            println!(
                "{label}: granary / minimal sandbox = {r:.2}x (goal: at most 1.3x) {}",
                verdict(r <= 1.3)
            );
        }
        if let Some(r) = ratio(m, "bubblewrap", "granary") {
            println!(
                "{label}: bubblewrap / granary = {r:.2}x (goal: above 1x, faster than bubblewrap) {}",
                verdict(r > 1.0)
            );
        }
        for peer in [
            "  exec'd launcher",
            "fork+exec",
            "unshare(1)",
            "crun",
            "runc",
        ] {
            if let Some(r) = ratio(m, peer, "granary") {
                println!("{label}: {} / granary = {r:.2}x", peer.trim());
            }
        }
    }
    if let Some(driver) = &config.cgroup {
        let _ = granary_jail::cgroup::remove_grain(
            driver,
            "granary-bench",
            "bench",
            Duration::from_secs(5),
        );
    }
}
