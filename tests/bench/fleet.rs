//! The daemon's own memory while many users are busy at once.
//!
//! N users (50; 8 in smoke mode) each own a git grain holding the same
//! ~4 MB repository. Every grain is stopped, then all N clone over HTTPS at
//! the same moment, so each clone also starts its grain. Reported, for the
//! daemon process only (grains are separate processes with their own
//! cgroups):
//!
//! - private memory (RssAnon: heap, stacks) and RSS at the start (users
//!   made, no traffic), at the peak of one push per user, after those
//!   grains idled out, at the peak of the clones, and after every grain
//!   has idled out again;
//! - the growth of private memory per busy grain, and what is left once
//!   idle. RSS also counts the daemon's own code as more of it is paged
//!   in; those are file pages, shared and dropped at will, so the goals
//!   are judged on private memory.
//!
//! Goals (issue 22): at most 1 MB per busy grain; back within 10% of the
//! start once idle.
//!
//! Root (real jails), as CI runs it:
//!   cargo build --release -p granary -p granary-jail --bins && \
//!     GRANARY_BIN=$PWD/target/release/granary cargo bench -p granary-e2e --bench fleet
//! Smoke (./run-tests), with the debug daemon:
//!   GRANARY_BIN=$PWD/target/debug/granary cargo bench -p granary-e2e --bench fleet -- --smoke

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use granary_testkit::{Daemon, DaemonMode, eventually};

const DOMAIN: &str = "example.test";

/// A line of /proc/PID/status, in KiB.
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

fn git(dir: &Path, args: &[&str], ca: &Path) -> std::process::Output {
    Command::new("git")
        .current_dir(dir)
        .env("GIT_SSL_CAINFO", ca)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", dir)
        .args([
            "-c",
            "user.name=Bench",
            "-c",
            "user.email=bench@example.test",
        ])
        .args(args)
        .output()
        .unwrap()
}

fn ok(out: std::process::Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn running(daemon: &Daemon) -> usize {
    daemon
        .granary(&["grain", "list", "--json"])
        .success()
        .json()
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| g["state"] != "stopped")
        .count()
}

fn main() {
    let smoke = std::env::args().any(|a| a == "--smoke");
    let users = if smoke { 8 } else { 50 };
    let idle = 3;
    let tmp = tempfile::Builder::new()
        .prefix("granary-bench-fleet-")
        .tempdir()
        .unwrap();
    let t = tmp.path();
    let daemon = Daemon::start_with(
        DaemonMode::Serve,
        &format!(
            "domain = \"{DOMAIN}\"\n[grains]\nidle_timeout = \"{idle}s\"\n[gateway]\nupstream_idle = \"1s\"\n"
        ),
    );
    daemon
        .granary(&[
            "app",
            "install",
            granary_testkit::git_package(t).to_str().unwrap(),
        ])
        .success();
    let https = daemon.https_addr().port();
    let ca = daemon.ca_file();
    let resolve = format!("http.curloptResolve=git.{DOMAIN}:{https}:127.0.0.1");

    // One repository: 4 MB of incompressible files in two commits.
    let repo = t.join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    ok(git(&repo, &["init", "-q", "-b", "main"], &ca), "git init");
    for round in 0..2u64 {
        for i in 0..4u64 {
            std::fs::write(
                repo.join(format!("blob-{i}.bin")),
                granary_testkit::noise(round * 10 + i, 512 << 10),
            )
            .unwrap();
        }
        ok(git(&repo, &["add", "."], &ca), "git add");
        ok(
            git(
                &repo,
                &["commit", "-q", "-m", &format!("round {round}")],
                &ca,
            ),
            "git commit",
        );
    }

    let mut urls = Vec::new();
    for n in 0..users {
        let user = format!("user{n:02}");
        daemon.granary(&["user", "add", &user]).success();
        let password = granary_testkit::app_password(&daemon, &user, "git");
        urls.push(format!(
            "https://{user}:{password}@git.{DOMAIN}:{https}/{user}/code.git"
        ));
    }
    let pid = daemon.pid();
    // The start: users and grains made, no traffic yet.
    let start = Memory::of(pid);
    let sampler = Sampler::start(pid);
    let started = Instant::now();
    for url in &urls {
        ok(
            git(&repo, &["-c", &resolve, "push", "-q", url, "main"], &ca),
            "git push",
        );
    }
    println!(
        "{users} users, each pushed the same 4 MB repository, one after another ({:.1} s)",
        started.elapsed().as_secs_f64()
    );
    let pushing = sampler.stop();

    let settle = |what: &str| {
        eventually(what, Duration::from_secs(60), || {
            (running(&daemon) == 0).then_some(())
        });
    };
    settle("every grain to idle out after the pushes");
    let pushed = Memory::of(pid);

    let sampler = Sampler::start(pid);
    let started = Instant::now();
    let clones: Vec<_> = urls
        .iter()
        .enumerate()
        .map(|(n, url)| {
            let dest = t.join(format!("clone-{n:02}"));
            Command::new("git")
                .env("GIT_SSL_CAINFO", &ca)
                .env("GIT_TERMINAL_PROMPT", "0")
                .env("GIT_CONFIG_NOSYSTEM", "1")
                .env("HOME", t)
                .args(["-c", &resolve, "clone", "-q", url])
                .arg(&dest)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut failed = 0;
    for c in clones {
        let out = c.wait_with_output().unwrap();
        if !out.status.success() {
            failed += 1;
            eprintln!("clone failed: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    let took = started.elapsed().as_secs_f64();
    let cloning = sampler.stop();
    assert_eq!(failed, 0, "every clone succeeds");
    for n in 0..users {
        assert!(t.join(format!("clone-{n:02}/blob-3.bin")).exists());
    }

    settle("every grain to idle out after the clones");
    // The daemon gives freed memory back a second after a burst of grain
    // exits ends: take the figure once it is there, or after 15 s (5 in
    // smoke mode).
    let patience = Duration::from_secs(if smoke { 5 } else { 15 });
    let idled = Instant::now();
    let mut after = Memory::of(pid);
    while after.anon * 10 > start.anon * 11 && idled.elapsed() < patience {
        std::thread::sleep(Duration::from_millis(100));
        after = Memory::of(pid);
    }
    let after_secs = idled.elapsed().as_secs_f64();

    let mib = |kib: u64| kib as f64 / 1024.0;
    let row = |what: &str, m: Memory| {
        println!(
            "  {what:<34} {:7.1} MiB {:7.1} MiB",
            mib(m.anon),
            mib(m.rss)
        )
    };
    println!("{users} cold clones at once, all succeeded, in {took:.2} s. The daemon's memory:");
    println!("  {:<34} {:>11} {:>11}", "", "private", "RSS");
    row("at the start (no traffic yet)", start);
    row("peak while pushing, one at a time", pushing);
    row("after the pushes, grains idle", pushed);
    row("peak during the clones", cloning);
    row("once every grain idled out", after);
    let per_grain = cloning.anon.saturating_sub(start.anon) as f64 / users as f64;
    let left = after.anon as f64 / start.anon as f64;
    println!(
        "  private memory per busy grain: {per_grain:.0} KiB (goal <= 1024 KiB: {})",
        if per_grain <= 1024.0 { "met" } else { "MISSED" }
    );
    println!(
        "  private memory once idle: {left:.2}x the start, {after_secs:.1} s after the last grain stopped (goal <= 1.10x: {})",
        if left <= 1.10 { "met" } else { "MISSED" }
    );
    let rss_grain = cloning.rss.saturating_sub(start.rss) as f64 / users as f64;
    let rss_left = after.rss as f64 / start.rss as f64;
    println!(
        "  RSS per busy grain: {rss_grain:.0} KiB (goal <= 1024 KiB: {}); once idle: {rss_left:.2}x the start (goal <= 1.10x: {})",
        if rss_grain <= 1024.0 { "met" } else { "MISSED" },
        if rss_left <= 1.10 { "met" } else { "MISSED" }
    );
    println!(
        "  against the warm daemon (after the pushes, idle): private {:.0} KiB more per busy grain at the peak, {:.2}x once idle; RSS {:.2}x once idle",
        cloning.anon.saturating_sub(pushed.anon) as f64 / users as f64,
        after.anon as f64 / pushed.anon as f64,
        after.rss as f64 / pushed.rss as f64
    );
    println!(
        "  (RSS adds the daemon's own code as it is paged in: file pages the kernel can drop and that all processes running it share)"
    );
}

/// The daemon's memory, in KiB: everything resident, and what is private
/// to it (heap, stacks: `RssAnon`).
#[derive(Clone, Copy, Default)]
struct Memory {
    rss: u64,
    anon: u64,
}

impl Memory {
    fn of(pid: u32) -> Memory {
        Memory {
            rss: status_kib(pid, "VmRSS:"),
            anon: status_kib(pid, "RssAnon:"),
        }
    }

    fn max(self, other: Memory) -> Memory {
        Memory {
            rss: self.rss.max(other.rss),
            anon: self.anon.max(other.anon),
        }
    }
}

/// Reads the daemon's memory every 5 ms on a thread and keeps the peak
/// (the kernel's own peak, VmHWM, has no private-only twin).
struct Sampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Memory>,
}

impl Sampler {
    fn start(pid: u32) -> Sampler {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peak = Memory::of(pid);
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(Memory::of(pid));
                std::thread::sleep(Duration::from_millis(5));
            }
            peak.max(Memory::of(pid))
        });
        Sampler { stop, thread }
    }

    fn stop(self) -> Memory {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}
