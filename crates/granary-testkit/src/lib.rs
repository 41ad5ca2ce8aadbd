//! Test helpers for end-to-end tests: the real `granary` binary, started in
//! a temporary data dir with port-0 listeners, driven through its CLI.
//!
//! ```no_run
//! let daemon = granary_testkit::Daemon::start();
//! daemon.granary(&["user", "add", "alice"]).success();
//! ```
//!
//! Every daemon is stopped (by its own pid) and its directory removed when
//! the handle drops. Nothing sleeps for a fixed time: waits poll a condition
//! until a deadline and fail with what was seen.

pub mod cluster;
pub mod dav;
pub mod etcd;
pub mod mail;
pub mod netns;
pub mod pebble;
pub mod postfix;
pub mod prosody;
pub mod tasks;
pub mod xmpp;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// How long a daemon may take to start or stop before a test fails.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// A live `granary grain connect` session: one line in, one line out.
pub struct Session {
    child: Child,
    stdin: Option<std::process::ChildStdin>,
    lines: mpsc::Receiver<String>,
}

impl Session {
    pub fn open(daemon: &Daemon, grain: &str) -> Session {
        let mut child = Command::new(granary_bin())
            .arg("--config")
            .arg(daemon.config_path())
            .args(["grain", "connect", grain, "hello"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Session {
            stdin: child.stdin.take(),
            child,
            lines,
        }
    }

    pub fn ask(&mut self, line: &str) -> String {
        let stdin = self.stdin.as_mut().unwrap();
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
        self.lines
            .recv_timeout(DEADLINE)
            .unwrap_or_else(|e| panic!("no answer to {line:?}: {e}"))
    }

    /// Sends a line without waiting for its answer; `Err` once the
    /// session's process has gone.
    pub fn send(&mut self, line: &str) -> std::io::Result<()> {
        let stdin = self.stdin.as_mut().expect("an open session");
        writeln!(stdin, "{line}")?;
        stdin.flush()
    }

    /// An answer that has arrived, if any, without waiting.
    pub fn try_line(&self) -> Option<String> {
        self.lines.try_recv().ok()
    }

    pub fn close(mut self) {
        drop(self.stdin.take());
        let status = self.child.wait().unwrap();
        assert!(status.success(), "grain connect exited with {status}");
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if self.stdin.is_some() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The `granary` binary of this build: `$GRANARY_BIN`, or the one cargo
/// built next to the test executable (`./run-tests` builds it first).
pub fn granary_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("GRANARY_BIN") {
        return PathBuf::from(bin);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/granary
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("granary"))
        .expect("test executable is inside target/");
    assert!(
        bin.exists(),
        "{} is missing: build it first with `cargo build --workspace --bins` (./run-tests does)",
        bin.display()
    );
    bin
}

/// The example app (`apps/hello`), linked statically for images that hold
/// nothing else: `$GRANARY_HELLO`, or the one `./run-tests` builds with
/// `+crt-static` for the explicit host target.
pub fn hello_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("GRANARY_HELLO") {
        return PathBuf::from(p);
    }
    static_binary("granary-hello")
}

/// A binary `./run-tests` builds statically for the explicit host target
/// (`target/<triple>/debug/<name>`): the apps and the probe.
pub fn static_binary(name: &str) -> PathBuf {
    let triple = format!("{}-unknown-linux-gnu", std::env::consts::ARCH);
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<triple>/debug/<name>
    let path = exe
        .ancestors()
        .nth(3)
        .map(|target| target.join(&triple).join("debug").join(name))
        .expect("test executable is inside target/");
    assert!(
        path.exists(),
        "{} is missing; ./run-tests builds it statically (cargo build -p {name} --target {triple} with +crt-static)",
        path.display()
    );
    path
}

/// An unsigned app directory for the example app under `kind`, run with
/// extra `args` (installed in development mode by `granary app install`).
pub fn hello_app(root: &Path, kind: &str, args: &[&str]) -> PathBuf {
    let dir = root.join(format!("app-{kind}"));
    std::fs::create_dir_all(dir.join("image/bin")).unwrap();
    std::fs::copy(hello_binary(), dir.join("image/bin/granary-hello")).unwrap();
    let mut exec = vec!["/bin/granary-hello".to_owned()];
    exec.extend(args.iter().map(|s| s.to_string()));
    let exec: Vec<String> = exec.iter().map(|a| format!("{a:?}")).collect();
    std::fs::write(
        dir.join("granary-app.toml"),
        format!(
            "id = \"org.granary.test.{kind}\"\nversion = \"1\"\nkind = \"{kind}\"\n\
             exec = [{}]\nservices = [\"hello\", \"http\"]\noffers = [\"notify\", \"ping\"]\n\
             [limits]\nmemory_mib = 64\npids = 32\n",
            exec.join(", ")
        ),
    )
    .unwrap();
    dir
}

/// `len` incompressible bytes, the same for the same `seed` (xorshift):
/// data for tests and benchmarks that must not shrink under compression.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// An app as a signed package (its own key), built with `granary pack
/// build` from `files` (a TOML [files] table body) and the app's statically
/// linked binary.
pub fn app_package(dir: &Path, kind: &str, app: &str, files: &str) -> std::path::PathBuf {
    app_package_from(dir, kind, app, files, &static_binary(app))
}

/// [`app_package`] with the app's binary taken from `binary` (a release
/// build, for benchmarks).
pub fn app_package_from(
    dir: &Path,
    kind: &str,
    app: &str,
    files: &str,
    binary: &Path,
) -> std::path::PathBuf {
    let key = dir.join(format!("{kind}.key"));
    let pack = |args: &[&str]| {
        let mut all = vec!["pack"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--key", key.to_str().unwrap()]);
        run_granary(&all, None).success()
    };
    pack(&["keygen"]);
    let def = dir.join(format!("{kind}-package.toml"));
    std::fs::write(
        &def,
        format!(
            "format = 1\n[app]\nkind = \"{kind}\"\nversion = \"0.1.0\"\nexec = [\"/bin/{app}\"]\n\
             services = [{services}]\noffers = [{offers}]\nshares = [{shares}]\n[limits]\nmemory_mib = 256\npids = 64\n\
             [files]\n{files}copy = [{{ from = \"{}\", to = \"/bin/{app}\" }}]\n",
            binary.display(),
            offers = match kind {
                "git" => "\"git.read\"",
                "mail" => "\"mail.deliver\"",
                "dav" => DAV_INTERFACES,
                "xmpp" => "\"xmpp.deliver\"",
                "tasks" => "",
                _ => "\"notify\"",
            },
            shares = if kind == "dav" { DAV_INTERFACES } else { "" },
            services = match kind {
                "git" => "\"http\", \"git-ssh\"",
                "mail" => "\"imap\"",
                "xmpp" => "\"xmpp\"",
                "tasks" => "\"http\", \"taskd\"",
                _ => "\"http\"",
            },
        ),
    )
    .unwrap();
    let out = dir.join(format!("{kind}.gpkg"));
    pack(&["build", def.to_str().unwrap(), "-o", out.to_str().unwrap()]);
    out
}

/// The architecture app images are built for that this host is not.
pub fn other_arch() -> &'static str {
    match std::env::consts::ARCH {
        "aarch64" => "x86_64",
        _ => "aarch64",
    }
}

/// The smallest static ELF program for `arch` (x86_64 or aarch64): a
/// header and one loadable segment. A host of the other architecture
/// cannot run it; a package only carries it.
pub fn minimal_program(arch: &str) -> Vec<u8> {
    let machine: u16 = if arch == "aarch64" { 183 } else { 62 };
    let mut f = vec![0u8; 64 + 56];
    f[..4].copy_from_slice(b"\x7fELF");
    (f[4], f[5], f[6], f[16]) = (2, 1, 1, 2);
    f[18..20].copy_from_slice(&machine.to_le_bytes());
    f[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
    f[0x34..0x36].copy_from_slice(&64u16.to_le_bytes());
    f[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
    f[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
    // PT_LOAD
    f[64..68].copy_from_slice(&1u32.to_le_bytes());
    f
}

/// A definition of the example app as `kind` whose program comes from
/// `DIR/{arch}/granary-hello`: the real app for this host, a
/// [`minimal_program`] for [`other_arch`].
pub fn two_arch_definition(dir: &Path, kind: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let (here, other) = (std::env::consts::ARCH, other_arch());
    for arch in [here, other] {
        std::fs::create_dir_all(dir.join(arch)).unwrap();
    }
    std::fs::copy(hello_binary(), dir.join(here).join("granary-hello")).unwrap();
    let foreign = dir.join(other).join("granary-hello");
    std::fs::write(&foreign, minimal_program(other)).unwrap();
    std::fs::set_permissions(&foreign, std::fs::Permissions::from_mode(0o755)).unwrap();
    let def = dir.join(format!("{kind}-two-arch.toml"));
    std::fs::write(
        &def,
        format!(
            "format = 1\n[app]\nkind = \"{kind}\"\nversion = \"1.0\"\nexec = [\"/bin/granary-hello\"]\n\
             services = [\"hello\", \"http\"]\noffers = [\"ping\"]\n[files]\n\
             copy = [{{ from = \"{{arch}}/granary-hello\", to = \"/bin/granary-hello\" }}]\n"
        ),
    )
    .unwrap();
    def
}

/// [`two_arch_definition`] built with `--target` for both architectures,
/// signed by a key of its own in `dir`.
pub fn two_arch_package(dir: &Path, kind: &str) -> std::path::PathBuf {
    let key = dir.join(format!("{kind}.key"));
    let def = two_arch_definition(dir, kind);
    let out = dir.join(format!("{kind}.gpkg"));
    let (k, d, o) = (
        key.to_str().unwrap(),
        def.to_str().unwrap(),
        out.to_str().unwrap(),
    );
    run_granary(&["pack", "keygen", "--key", k], None).success();
    run_granary(
        &[
            "pack", "build", d, "-o", o, "--key", k, "--target", "x86_64", "--target", "aarch64",
        ],
        None,
    )
    .success();
    out
}

/// What the DAV app offers, and shares with other users' grains.
const DAV_INTERFACES: &str = "\"dav.calendar.read\", \"dav.calendar.write\", \"dav.addressbook.read\", \"dav.addressbook.write\"";

/// The DAV app (calendars and contacts): the static debug build, or
/// `$GRANARY_DAV_APP` (a release build, for benchmarks).
pub fn dav_package(dir: &Path) -> std::path::PathBuf {
    match std::env::var_os("GRANARY_DAV_APP") {
        Some(bin) => app_package_from(dir, "dav", "granary-dav", "", Path::new(&bin)),
        None => app_package(dir, "dav", "granary-dav", ""),
    }
}

/// The chat app: the static debug build, or `$GRANARY_XMPP_APP` (a
/// release build, for benchmarks).
pub fn xmpp_package(dir: &Path) -> std::path::PathBuf {
    match std::env::var_os("GRANARY_XMPP_APP") {
        Some(bin) => app_package_from(dir, "xmpp", "granary-xmpp", "", Path::new(&bin)),
        None => app_package(dir, "xmpp", "granary-xmpp", ""),
    }
}

/// Group chats: the chat app's binary as the on-demand `room` kind, from
/// its real package definition (`apps/xmpp/room-package.toml`), the binary
/// taken from the static debug build or `$GRANARY_XMPP_APP`.
pub fn room_package(dir: &Path) -> std::path::PathBuf {
    let binary = std::env::var_os("GRANARY_XMPP_APP")
        .map(PathBuf::from)
        .unwrap_or_else(|| static_binary("granary-xmpp"));
    let key = dir.join("room.key");
    let pack = |args: &[&str]| {
        let mut all = vec!["pack"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--key", key.to_str().unwrap()]);
        run_granary(&all, None).success()
    };
    pack(&["keygen"]);
    let here = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../apps/xmpp/room-package.toml");
    let definition = std::fs::read_to_string(here).unwrap().replace(
        "from = \"dist/granary-xmpp\"",
        &format!("from = \"{}\"", binary.display()),
    );
    let def = dir.join("room-package.toml");
    std::fs::write(&def, definition).unwrap();
    let out = dir.join("room.gpkg");
    pack(&["build", def.to_str().unwrap(), "-o", out.to_str().unwrap()]);
    out
}

/// The tasks app (Taskwarrior sync): the static debug build, or
/// `$GRANARY_TASKS_APP` (a release build, for benchmarks).
pub fn tasks_package(dir: &Path) -> std::path::PathBuf {
    match std::env::var_os("GRANARY_TASKS_APP") {
        Some(bin) => app_package_from(dir, "tasks", "granary-tasks", "", Path::new(&bin)),
        None => app_package(dir, "tasks", "granary-tasks", ""),
    }
}

/// A daemon serving `domain` with one app installed (the package
/// `package` makes in the returned directory) and `users`, each with an app
/// password of `kind`; `extra` is appended to the config, `listen` (lines
/// inside `[listen]`, such as `xmpp-s2s = "127.0.0.1:0"`) to its listeners.
pub fn app_host(
    domain: &str,
    extra: &str,
    listen: &str,
    package: fn(&Path) -> PathBuf,
    kind: &str,
    users: &[&str],
) -> (
    Daemon,
    tempfile::TempDir,
    std::collections::HashMap<String, String>,
) {
    let daemon = Daemon::start_full(
        DaemonMode::Serve,
        &format!("domain = \"{domain}\"\n{extra}"),
        listen,
        &[],
    );
    let dir = tempfile::tempdir().unwrap();
    let pkg = package(dir.path());
    daemon
        .granary(&["app", "install", pkg.to_str().unwrap()])
        .success();
    let mut passwords = std::collections::HashMap::new();
    for u in users {
        daemon.granary(&["user", "add", u]).success();
        passwords.insert(u.to_string(), app_password(&daemon, u, kind));
    }
    (daemon, dir, passwords)
}

/// The git app with Debian's git inside.
pub fn git_package(dir: &Path) -> std::path::PathBuf {
    app_package(
        dir,
        "git",
        "granary-git",
        "binaries = [\"/usr/bin/git\", \"/usr/lib/git-core/git-http-backend\"]\nruntime = [\"/bin/sh\"]\n",
    )
}

/// The real git client against a daemon's gateway: names under `domain`
/// resolved to the daemon through `http.curloptResolve`, the local CA
/// trusted (never verification turned off), and a `HOME` of its own.
pub struct GitClient<'a> {
    pub daemon: &'a Daemon,
    pub home: PathBuf,
    pub domain: &'a str,
}

/// Makes an Ed25519 key pair for `user` in `dir` with `ssh-keygen` and
/// registers its public half; the private key's path.
pub fn ssh_key(daemon: &Daemon, dir: &Path, user: &str) -> PathBuf {
    let key = dir.join(format!("{user}_key"));
    let ok = Command::new("ssh-keygen")
        .args([
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            &format!("{user}@laptop"),
            "-f",
        ])
        .arg(&key)
        .status()
        .expect("ssh-keygen must be installed (./run-tests installs openssh-client)")
        .success();
    assert!(ok, "ssh-keygen failed");
    daemon
        .granary(&[
            "ssh-key",
            "add",
            user,
            key.with_extension("pub").to_str().unwrap(),
        ])
        .success();
    key
}

impl GitClient<'_> {
    /// `https://[user:password@]git.<domain>:<port>/<path>`.
    pub fn url(&self, cred: Option<(&str, &str)>, path: &str) -> String {
        let port = self.daemon.https_addr().port();
        let domain = self.domain;
        match cred {
            Some((u, p)) => format!("https://{u}:{p}@git.{domain}:{port}/{path}"),
            None => format!("https://git.{domain}:{port}/{path}"),
        }
    }

    /// `ssh://<user>@<address>:<port>/<path>`.
    pub fn ssh_url(&self, user: &str, path: &str) -> String {
        format!(
            "ssh://{user}@{}:{}/{path}",
            self.daemon.ssh_addr().ip(),
            self.daemon.ssh_addr().port()
        )
    }

    /// Runs git in `dir` over SSH with `key` (the daemon's host key taken
    /// on first use); (success, stdout + stderr).
    pub fn git_ssh(&self, dir: &Path, key: &Path, args: &[&str]) -> (bool, String) {
        let ssh = format!(
            "ssh -i {} -o IdentitiesOnly=yes -o BatchMode=yes -o StrictHostKeyChecking=accept-new -o UserKnownHostsFile={}/known_hosts",
            key.display(),
            self.home.display()
        );
        self.run(dir, args, Some(&ssh))
    }

    /// Runs git in `dir`; (success, stdout + stderr).
    pub fn git(&self, dir: &Path, args: &[&str]) -> (bool, String) {
        self.run(dir, args, None)
    }

    fn run(&self, dir: &Path, args: &[&str], ssh: Option<&str>) -> (bool, String) {
        let https = self.daemon.https_addr();
        let (port, ip) = (https.port(), https.ip());
        let mut cmd = Command::new("git");
        if let Some(ssh) = ssh {
            cmd.env("GIT_SSH_COMMAND", ssh);
        }
        let out = cmd
            .args([
                "-c",
                &format!("http.curloptResolve=git.{}:{port}:{ip}", self.domain),
                "-c",
                "user.name=Alice",
                "-c",
                "user.email=alice@example.test",
                "-c",
                "init.defaultBranch=main",
            ])
            .args(args)
            .current_dir(dir)
            .env("GIT_SSL_CAINFO", self.daemon.ca_file())
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("HOME", &self.home)
            .env_remove("GIT_DIR")
            .output()
            .expect("git must be installed (./run-tests installs it)");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    /// [`GitClient::git`], which must succeed; its output.
    pub fn ok(&self, dir: &Path, args: &[&str]) -> String {
        let (ok, out) = self.git(dir, args);
        assert!(
            ok,
            "git {args:?}:\n{out}\n--- daemon log ---\n{}",
            self.daemon.log()
        );
        out
    }
}

/// An app password of `kind` for `user`, made through the CLI.
pub fn app_password(daemon: &Daemon, user: &str, kind: &str) -> String {
    let added = daemon
        .granary(&[
            "app-password",
            "add",
            user,
            "--kind",
            kind,
            "--label",
            "laptop",
            "--json",
        ])
        .success()
        .json();
    added["password"].as_str().expect("a password").to_owned()
}

/// Polls `check` until it returns `Some` or `deadline` passes; on timeout,
/// panics with `what`.
pub fn eventually<T>(what: &str, deadline: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    let mut pause = Duration::from_millis(2);
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// The outcome of one CLI run, with assertions that print everything on
/// failure.
#[derive(Debug)]
pub struct Run {
    pub args: Vec<String>,
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn success(self) -> Run {
        assert!(
            self.status.success(),
            "granary {:?} failed:\n{self}",
            self.args
        );
        self
    }

    pub fn failure(self) -> Run {
        assert!(
            !self.status.success(),
            "granary {:?} should have failed:\n{self}",
            self.args
        );
        self
    }

    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout of {:?} is not JSON ({e}):\n{self}", self.args))
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "status: {}\n--- stdout\n{}--- stderr\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// Runs `granary` with `args` (and optional standard input) to completion.
pub fn run_granary(args: &[&str], stdin: Option<&str>) -> Run {
    let mut child = Command::new(granary_bin())
        .args(args)
        .env_remove("GRANARY_HOME")
        .env_remove("GRANARY_CONFIG")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn granary");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(input.as_bytes())
            .expect("write stdin");
    }
    let out = child.wait_with_output().expect("wait for granary");
    Run {
        args: args.iter().map(|s| s.to_string()).collect(),
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// [`run_granary`] for a command that must end by itself (a `serve` that
/// is expected to refuse to start): killed, and the test failed, if it
/// runs past `deadline`.
pub fn run_granary_within(args: &[&str], deadline: Duration) -> Run {
    let mut child = Command::new(granary_bin())
        .args(args)
        .env_remove("GRANARY_HOME")
        .env_remove("GRANARY_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn granary");
    let drain = |r: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut out = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut out);
            }
            String::from_utf8_lossy(&out).into_owned()
        })
    };
    let stdout = drain(child.stdout.take().map(|o| Box::new(o) as _));
    let stderr = drain(child.stderr.take().map(|o| Box::new(o) as _));
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for granary") {
            break status;
        }
        if start.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "granary {} still ran after {deadline:?}; stderr:\n{}",
                args.join(" "),
                stderr.join().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Run {
        args: args.iter().map(|s| s.to_string()).collect(),
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    }
}

/// Which daemon command to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DaemonMode {
    Serve,
    Demo,
}

/// A running `granary serve` (or `demo`) in its own temporary data dir.
/// The CPU every daemon started from now on runs on (-1: any).
static PINNED_CPU: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

/// Runs every daemon started from now on (and the grains it starts) on
/// CPU `cpu` only, from its first instruction: it sizes its runtime to the
/// one CPU it has, as a peer run with one worker on that CPU does. For
/// benchmarks; pinning a running daemon leaves it with threads for CPUs it
/// no longer has, all waking each other on one.
pub fn pin_daemons_to(cpu: usize) {
    PINNED_CPU.store(cpu as i32, std::sync::atomic::Ordering::Relaxed);
}

pub struct Daemon {
    dir: tempfile::TempDir,
    child: Option<Child>,
    stdout_lines: Option<mpsc::Receiver<String>>,
    mode: DaemonMode,
    /// The network namespace it runs in ([`Daemon::run_in`]).
    netns: Option<String>,
}

static NEXT_DAEMON: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

impl Daemon {
    /// Starts `granary serve` with HTTPS on 127.0.0.1:0.
    pub fn start() -> Daemon {
        Daemon::start_with(DaemonMode::Serve, "")
    }

    /// Starts the daemon with extra TOML appended to the test config.
    pub fn start_with(mode: DaemonMode, extra_config: &str) -> Daemon {
        Daemon::start_with_builtin(mode, extra_config, &[])
    }

    /// Starts the daemon with `packages` in `DATA_DIR/builtin-apps`, as
    /// `./granary-demo` leaves them (the demo installs them at start).
    pub fn start_with_builtin(
        mode: DaemonMode,
        extra_config: &str,
        packages: &[PathBuf],
    ) -> Daemon {
        Daemon::start_full(mode, extra_config, "", packages)
    }

    /// [`Daemon::start_with_builtin`] with more listeners: `listen` is
    /// lines inside `[listen]` (`xmpp-s2s = "127.0.0.1:0"`).
    pub fn start_full(
        mode: DaemonMode,
        extra_config: &str,
        listen: &str,
        packages: &[PathBuf],
    ) -> Daemon {
        let mut daemon = Daemon::prepare(mode, extra_config, listen, packages);
        daemon.launch();
        daemon
    }

    /// [`Daemon::start_full`] without starting it: its config and data dir
    /// are ready for CLI commands that must run first (`granary node
    /// join`); [`Daemon::launch`] starts it.
    pub fn prepare(
        mode: DaemonMode,
        extra_config: &str,
        listen: &str,
        packages: &[PathBuf],
    ) -> Daemon {
        let dir = tempfile::Builder::new()
            .prefix("granary-test-")
            .tempdir()
            .expect("temp dir");
        // Each test daemon gets its own cgroup parent and host uids, so
        // daemons running side by side never share either.
        let n = NEXT_DAEMON.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let slot = (std::process::id() % 10_000) * 16 + n % 16;
        let config = format!(
            "data_dir = \"data\"\n{extra_config}\n[listen]\nhttps = \"127.0.0.1:0\"\nssh = \"127.0.0.1:0\"\nsmtp = \"127.0.0.1:0\"\nimap = \"127.0.0.1:0\"\nimaps = \"127.0.0.1:0\"\nsubmission = \"127.0.0.1:0\"\nsubmissions = \"127.0.0.1:0\"\nxmpp = \"127.0.0.1:0\"\nxmpps = \"127.0.0.1:0\"\nmetrics = \"127.0.0.1:0\"\n{listen}\n[log]\nlevel = \"info,granary=debug\"\n\
             [jail]\nuid_range = \"{}+1000\"\ncgroup_parent = \"granary-test-{}-{n}\"\n",
            1_600_000_000 + slot * 1000,
            std::process::id(),
        );
        std::fs::write(dir.path().join("granary.toml"), config).expect("write config");
        let daemon = Daemon {
            dir,
            child: None,
            stdout_lines: None,
            mode,
            netns: None,
        };
        if !packages.is_empty() {
            use std::os::unix::fs::DirBuilderExt;
            // The data dir as the daemon makes it (owner-only), then the
            // packages beside it.
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(daemon.data_dir())
                .expect("the data dir");
            let builtin = daemon.data_dir().join("builtin-apps");
            std::fs::create_dir_all(&builtin).expect("builtin-apps");
            for p in packages {
                std::fs::copy(p, builtin.join(p.file_name().expect("a package file")))
                    .expect("copy a package");
            }
        }
        daemon
    }

    /// Starts the daemon and waits until it has written its ports.
    pub fn launch(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("daemon log");
        let command = match self.mode {
            DaemonMode::Serve => "serve",
            DaemonMode::Demo => "demo",
        };
        let cpu = PINNED_CPU.load(std::sync::atomic::Ordering::Relaxed);
        let mut command_line = if let Some(ns) = &self.netns {
            // Only the network namespace: `ip netns exec` would give it a
            // mount namespace of its own too, where zfs-fuse's mounts (made
            // by its daemon, outside) do not show. `nsenter` execs the
            // daemon: the child's pid is its own.
            let mut c = Command::new("nsenter");
            c.arg(format!("--net=/run/netns/{ns}")).arg(granary_bin());
            c
        } else if cpu >= 0 {
            let mut c = Command::new("taskset");
            c.args(["-c", &cpu.to_string()]).arg(granary_bin());
            c
        } else {
            Command::new(granary_bin())
        };
        let mut child = command_line
            .arg("--config")
            .arg(self.config_path())
            .arg(command)
            .env_remove("GRANARY_HOME")
            .env_remove("GRANARY_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn granary daemon");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let pid = child.id();
        self.child = Some(child);
        self.stdout_lines = Some(rx);
        let ports = self.ports_path();
        eventually("the daemon to write ports.json", DEADLINE, || {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("daemon exited during start-up ({status}):\n{}", self.log());
            }
            let text = std::fs::read_to_string(&ports).ok()?;
            let json: serde_json::Value = serde_json::from_str(&text).ok()?;
            (json["pid"].as_u64() == Some(u64::from(pid))).then_some(())
        });
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Runs this (not yet launched) daemon in network namespace `ns`,
    /// where `ip` is its address: its listeners and its node link bind
    /// there instead of loopback, so clients and other nodes reach it
    /// over the namespace's link ([`netns::Net`]).
    pub fn run_in(&mut self, ns: &str, ip: std::net::Ipv4Addr) {
        let text = std::fs::read_to_string(self.config_path()).expect("config");
        assert!(
            text.contains("\"127.0.0.1:0\""),
            "no loopback address in the config to move"
        );
        std::fs::write(
            self.config_path(),
            text.replace("\"127.0.0.1:0\"", &format!("\"{ip}:0\"")),
        )
        .expect("config");
        self.netns = Some(ns.to_owned());
    }

    /// Gives this (not yet launched) daemon the host uid range of
    /// `other`: nodes of one cluster share one range, as their grains'
    /// uids are picked cluster-wide.
    pub fn share_uid_range(&self, other: &Daemon) {
        let range = |d: &Daemon| -> String {
            std::fs::read_to_string(d.config_path())
                .expect("config")
                .lines()
                .find(|l| l.starts_with("uid_range = "))
                .expect("a uid_range line")
                .to_owned()
        };
        let (mine, theirs) = (range(self), range(other));
        let text = std::fs::read_to_string(self.config_path()).expect("config");
        std::fs::write(self.config_path(), text.replace(&mine, &theirs)).expect("config");
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("granary.toml")
    }
    pub fn ports_path(&self) -> PathBuf {
        self.data_dir().join("run/ports.json")
    }
    pub fn ca_file(&self) -> PathBuf {
        self.data_dir().join("tls/ca.pem")
    }
    fn log_path(&self) -> PathBuf {
        self.dir.path().join("daemon.log")
    }

    /// What the daemon logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon is running").id()
    }

    /// `ports.json` as written by the running daemon.
    pub fn ports(&self) -> serde_json::Value {
        let text = std::fs::read_to_string(self.ports_path()).expect("ports.json");
        serde_json::from_str(&text).expect("ports.json is JSON")
    }

    pub fn https_addr(&self) -> SocketAddr {
        self.ports()["listeners"]["https"]
            .as_str()
            .expect("https in ports.json")
            .parse()
            .expect("https address")
    }

    /// The address a named listener is bound to (from `ports.json`).
    pub fn listener(&self, name: &str) -> SocketAddr {
        self.ports()["listeners"][name]
            .as_str()
            .unwrap_or_else(|| panic!("{name} in ports.json"))
            .parse()
            .expect("a listener address")
    }

    pub fn ssh_addr(&self) -> SocketAddr {
        self.ports()["listeners"]["ssh"]
            .as_str()
            .expect("ssh in ports.json")
            .parse()
            .expect("ssh address")
    }

    /// `curl` against the daemon's HTTPS listener for `host` (resolved to
    /// it, the local CA trusted): (status code, body).
    pub fn curl(&self, host: &str, path: &str, extra: &[&str]) -> (String, String) {
        self.try_curl(host, path, extra)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Daemon::curl`], with a failure to connect (or to verify the
    /// certificate) as an error rather than a panic.
    pub fn try_curl(
        &self,
        host: &str,
        path: &str,
        extra: &[&str],
    ) -> Result<(String, String), String> {
        let addr = self.https_addr();
        let url = format!("https://{host}:{}{path}", addr.port());
        let resolve = format!("{host}:{}:{}", addr.port(), addr.ip());
        let out = Command::new("curl")
            .args([
                "--silent",
                "--show-error",
                "--max-time",
                "20",
                "--resolve",
                &resolve,
                "--cacert",
            ])
            .arg(self.ca_file())
            .args(["--write-out", "\n%{http_code}"])
            .args(extra)
            .arg(&url)
            .output()
            .expect("curl must be installed (./run-tests installs it)");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        if !out.status.success() && code == "000" {
            return Err(format!(
                "curl {url} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok((code.to_owned(), body.to_owned()))
    }

    /// Runs the CLI against this daemon.
    pub fn granary(&self, args: &[&str]) -> Run {
        self.granary_with_stdin(args, None)
    }

    pub fn granary_with_stdin(&self, args: &[&str], stdin: Option<&str>) -> Run {
        let config = self.config_path();
        let mut full = vec!["--config", config.to_str().expect("utf-8 temp path")];
        full.extend_from_slice(args);
        run_granary(&full, stdin)
    }

    /// [`run_granary_within`] against this daemon's config.
    pub fn granary_within(&self, args: &[&str], deadline: Duration) -> Run {
        let config = self.config_path();
        let mut full = vec!["--config", config.to_str().expect("utf-8 temp path")];
        full.extend_from_slice(args);
        run_granary_within(&full, deadline)
    }

    /// One line to a grain's `hello` service (the example app) over
    /// `granary grain connect`; its one-line answer.
    pub fn ask(&self, grain: &str, line: &str) -> String {
        self.granary_with_stdin(
            &["grain", "connect", grain, "hello"],
            Some(&format!("{line}\n")),
        )
        .success()
        .stdout
        .trim_end()
        .to_owned()
    }

    /// The next line the daemon printed on stdout (the demo banner).
    pub fn next_stdout_line(&self) -> Option<String> {
        self.stdout_lines.as_ref()?.recv_timeout(DEADLINE).ok()
    }

    /// Sends SIGTERM and waits for a clean exit; returns its status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("daemon is running");
        kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).expect("SIGTERM the daemon");
        let status = eventually("the daemon to exit after SIGTERM", DEADLINE, || {
            child.try_wait().expect("wait for daemon")
        });
        self.stdout_lines = None;
        status
    }

    /// Kills the daemon with SIGKILL (no clean-up at all: its grains die
    /// with it through the parent-death signal) and starts it again on the
    /// same data dir.
    pub fn crash_and_restart(&mut self) {
        let mut child = self.child.take().expect("daemon is running");
        kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).expect("SIGKILL the daemon");
        let _ = child.wait();
        self.stdout_lines = None;
        // The lock is the kernel's; ports.json is stale until the new one.
        let _ = std::fs::remove_file(self.ports_path());
        self.launch();
    }

    /// Kills the daemon with SIGKILL, as a dead box would go, and leaves
    /// it down; [`Daemon::launch`] starts it again.
    pub fn kill_hard(&mut self) {
        let mut child = self.child.take().expect("daemon is running");
        kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).expect("SIGKILL the daemon");
        let _ = child.wait();
        self.stdout_lines = None;
        let _ = std::fs::remove_file(self.ports_path());
    }

    /// Stops the daemon and starts it again on the same data dir.
    pub fn restart(&mut self) {
        let status = self.stop();
        assert!(
            status.success(),
            "daemon exited with {status}:\n{}",
            self.log()
        );
        self.launch();
    }
}

impl Drop for Daemon {
    /// Stops the daemon gracefully, so it stops its grains and removes their
    /// cgroups; SIGKILL only if it does not exit in time (its grains then
    /// die with it, through the parent-death signal).
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = Pid::from_raw(child.id() as i32);
            let _ = kill(pid, Signal::SIGTERM);
            let deadline = std::time::Instant::now() + DEADLINE;
            let mut exited = false;
            while std::time::Instant::now() < deadline {
                if !matches!(child.try_wait(), Ok(None)) {
                    exited = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            if !exited {
                let _ = kill(pid, Signal::SIGKILL);
                let _ = child.wait();
            }
        }
        // The temp dir goes too. A grain dataset the test's pool still
        // has mounted inside it (the pool is dropped after the daemon) is
        // detached first; the pool's own clean-up destroys it. Say so when
        // it cannot go: TempDir's drop is silent, and leftovers filled /tmp
        // run after run.
        let dir = self.dir.path().to_path_buf();
        if std::fs::remove_dir_all(&dir).is_err() {
            for mount in mounts_under(&dir) {
                let _ = Command::new("umount")
                    .arg("-l")
                    .arg(&mount)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                eprintln!("testkit: cannot remove {}: {e}", dir.display());
            }
        }
    }
}

/// Mount points at or below `dir`, deepest first.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut out: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        // Spaces and such are octal-escaped in mountinfo.
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(dir))
        .collect();
    out.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    out
}

/// Every entry under `dir`, by its path relative to `dir`: its kind (`d`,
/// `f`, `l`), permission bits, and its bytes (a file) or target (a
/// symlink). Two trees with equal maps hold the same data, which is how
/// tests compare a copy with what it was made from.
pub fn tree_contents(dir: &Path) -> std::collections::BTreeMap<PathBuf, (char, u32, Vec<u8>)> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = std::collections::BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            let meta = std::fs::symlink_metadata(&path).expect("an entry's metadata");
            let rel = path.strip_prefix(dir).expect("under dir").to_path_buf();
            let mode = meta.permissions().mode() & 0o7777;
            let entry = if meta.is_symlink() {
                let target = std::fs::read_link(&path).expect("a link's target");
                ('l', mode, target.into_os_string().into_encoded_bytes())
            } else if meta.is_dir() {
                todo.push(path);
                ('d', mode, Vec::new())
            } else {
                ('f', mode, std::fs::read(&path).expect("a file's bytes"))
            };
            out.insert(rel, entry);
        }
    }
    out
}
