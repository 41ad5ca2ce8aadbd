//! Taskwarrior sync under test: a daemon with the tasks app, and the real
//! clients pointed at `tasks.<DOMAIN>`.
//!
//! taskchampion-py (Taskwarrior 3's sync library) trusts only the public
//! web roots compiled into it and resolves names with the system's
//! resolver, so it cannot be told to trust the local CA. Its requests go
//! through a TLS bridge started here (plain HTTP on a loopback port in,
//! TLS to the gateway's HTTPS listener out, checked against the local CA),
//! and the client runs in a mount namespace of its own whose /etc/hosts
//! names `tasks.<DOMAIN>` as loopback, so the requests carry the real host
//! name and reach the real gateway. Debian's `task` 2.6 runs the same way.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::Daemon;

/// The domain every tasks test serves.
pub const DOMAIN: &str = "example.test";

/// Plain TCP in, TLS (SNI and certificate checked for `BRIDGE_HOST`
/// against `BRIDGE_CA`) out to `BRIDGE_TARGET`; prints its port.
const BRIDGE: &str = r#"
import asyncio, os, ssl, sys
ctx = ssl.create_default_context(cafile=os.environ["BRIDGE_CA"])
host = os.environ["BRIDGE_HOST"]
target_port = int(os.environ["BRIDGE_TARGET"])

async def pump(reader, writer):
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except (OSError, ssl.SSLError, asyncio.IncompleteReadError):
        pass
    finally:
        try:
            writer.close()
        except Exception:
            pass

async def handle(client_r, client_w):
    try:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", target_port, ssl=ctx, server_hostname=host)
    except Exception as e:
        print(f"bridge: {e}", file=sys.stderr, flush=True)
        client_w.close()
        return
    await asyncio.gather(pump(client_r, up_w), pump(up_r, client_w))

async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()

asyncio.run(main())
"#;

pub struct TasksHost {
    pub daemon: Daemon,
    pub dir: tempfile::TempDir,
    bridge: Child,
    bridge_port: u16,
    hosts: PathBuf,
}

impl TasksHost {
    /// A daemon serving `DOMAIN` with the tasks app and `users`; `extra`
    /// is appended to the config, `listen` to its listeners.
    pub fn start(users: &[&str], extra: &str, listen: &str) -> TasksHost {
        let (daemon, dir, _) =
            crate::app_host(DOMAIN, extra, listen, crate::tasks_package, "tasks", users);
        TasksHost::around(daemon, dir)
    }

    /// The clients' side (names, the HTTP bridge) around a daemon that
    /// serves `DOMAIN` with the tasks app already; `dir` is theirs.
    pub fn around(daemon: Daemon, dir: tempfile::TempDir) -> TasksHost {
        let hosts = dir.path().join("hosts");
        std::fs::write(
            &hosts,
            format!("127.0.0.1 localhost tasks.{DOMAIN} {DOMAIN}\n::1 localhost\n"),
        )
        .unwrap();
        let mut bridge = Command::new(crate::mail::python())
            .args(["-c", BRIDGE])
            .env("BRIDGE_CA", daemon.ca_file())
            .env("BRIDGE_HOST", format!("tasks.{DOMAIN}"))
            .env("BRIDGE_TARGET", daemon.https_addr().port().to_string())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python for the TLS bridge");
        let mut line = String::new();
        BufReader::new(bridge.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let bridge_port = line.trim().parse().expect("the bridge's port");
        TasksHost {
            daemon,
            dir,
            bridge,
            bridge_port,
            hosts,
        }
    }

    /// `sync.server.url` as the clients use it (through the bridge).
    pub fn url(&self) -> String {
        format!("http://tasks.{DOMAIN}:{}", self.bridge_port)
    }

    /// Makes a client id for `user` with the CLI and takes it from what it
    /// prints.
    pub fn client_id(&self, user: &str) -> String {
        let out = self
            .daemon
            .granary(&["tasks", "client", "add", user, "--label", "test"])
            .success()
            .stdout;
        out.lines()
            .find_map(|l| l.trim().strip_prefix("task config sync.server.client_id "))
            .unwrap_or_else(|| panic!("no client id in:\n{out}"))
            .trim()
            .to_owned()
    }

    /// A command run in a mount namespace whose /etc/hosts names
    /// `tasks.<DOMAIN>` as loopback.
    pub fn namespaced(&self, program: &Path, args: &[&str]) -> Command {
        let mut c = Command::new("unshare");
        c.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg("mount --bind \"$GRANARY_TEST_HOSTS\" /etc/hosts && exec \"$@\"")
            .arg("sh")
            .arg(program)
            .args(args)
            .env("GRANARY_TEST_HOSTS", &self.hosts);
        c
    }

    /// Runs a Python script with taskchampion-py against this host;
    /// `TC_URL` is set; (success, output).
    pub fn python(&self, script: &str, env: &[(&str, String)]) -> (bool, String) {
        let out = self
            .namespaced(&crate::mail::python(), &["-c", script])
            .env("TC_URL", self.url())
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .output()
            .expect("unshare and python");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    /// `curl` to `tasks.<DOMAIN>` through the real HTTPS listener:
    /// (status, body).
    pub fn curl(&self, path: &str, extra: &[&str]) -> (String, String) {
        self.daemon.curl(&format!("tasks.{DOMAIN}"), path, extra)
    }

    /// The state of `user`'s tasks grain (`running`, `stopped`).
    pub fn grain_state(&self, user: &str) -> String {
        self.daemon
            .granary(&["grain", "status", &format!("{user}/tasks"), "--json"])
            .success()
            .json()["state"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    }
}

impl Drop for TasksHost {
    fn drop(&mut self) {
        let _ = self.bridge.kill();
        let _ = self.bridge.wait();
    }
}

/// One Taskwarrior 2.6 replica: its own data directory and `.taskrc`,
/// the certificate files `granary tasks cert` wrote.
pub struct TaskReplica<'a> {
    host: &'a TasksHost,
    pub taskrc: PathBuf,
}

impl TasksHost {
    /// The taskd listener's port.
    pub fn taskd_port(&self) -> u16 {
        self.daemon.listener("taskd").port()
    }

    /// A replica named `name` of `user`'s task list, with a certificate of
    /// its own from `granary tasks cert`.
    pub fn task_replica(&self, user: &str, name: &str) -> TaskReplica<'_> {
        let dir = self.dir.path().join(format!("task-{name}"));
        let certs = dir.join("certs");
        self.daemon
            .granary(&[
                "tasks",
                "cert",
                user,
                "--out",
                certs.to_str().unwrap(),
                "--label",
                name,
            ])
            .success();
        let lines = std::fs::read_to_string(certs.join("taskrc")).unwrap();
        let taskrc = dir.join("taskrc");
        std::fs::write(
            &taskrc,
            format!(
                "data.location={}\nconfirmation=off\nverbose=nothing\nnews.version=2.6.0\n{lines}",
                dir.join("data").display()
            ),
        )
        .unwrap();
        TaskReplica { host: self, taskrc }
    }
}

impl TaskReplica<'_> {
    /// Runs Debian's `task` with this replica's `.taskrc`: (success,
    /// output).
    pub fn task(&self, args: &[&str]) -> (bool, String) {
        self.run(Path::new("task"), args)
    }

    /// `task` with the clock at `when` (`YYYY-MM-DD hh:mm:ss`, through
    /// faketime): two replicas' edits at known times, as two machines make
    /// them.
    pub fn task_at(&self, when: &str, args: &[&str]) -> String {
        let mut all = vec![when, "task"];
        all.extend_from_slice(args);
        let (ok, out) = self.run(Path::new("faketime"), &all);
        assert!(ok, "task {args:?} at {when} failed:\n{out}");
        out
    }

    fn run(&self, program: &Path, args: &[&str]) -> (bool, String) {
        let out = self
            .host
            .namespaced(program, args)
            .env("TASKRC", &self.taskrc)
            .env_remove("TASKDATA")
            .output()
            .expect("unshare and task (Debian's taskwarrior)");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let (ok, out) = self.task(args);
        assert!(ok, "task {args:?} failed:\n{out}");
        out
    }

    /// Every task as Taskwarrior exports it.
    pub fn export(&self) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["export"])).unwrap()
    }
}
