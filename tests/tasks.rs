//! Taskwarrior sync end to end: the real daemon and gateway (TLS, client
//! ids hashed in the state), the tasks grain started on demand in its
//! jail, and real clients: taskchampion-py (Taskwarrior 3's sync library)
//! with replicas on disk, and curl for the protocol's answers.

use std::time::Duration;

use granary_testkit::tasks::{DOMAIN, TasksHost};

/// A replica on disk (`TC_DIR`): optionally adds a task (`TC_ADD`) or
/// changes one's description (`TC_EDIT` = uuid, `TC_DESC`), syncs with the
/// server, then prints every task as `TASK <uuid> <description>`.
const REPLICA: &str = r#"
import os, uuid
import taskchampion as tc
r = tc.Replica.new_on_disk(os.environ["TC_DIR"], True)
if os.environ.get("TC_ADD"):
    ops = tc.Operations()
    u = str(uuid.uuid4())
    t = r.create_task(u, ops)
    t.set_description(os.environ["TC_ADD"], ops)
    t.set_status(tc.Status.Pending, ops)
    r.commit_operations(ops)
    print("ADDED", u)
if os.environ.get("TC_EDIT"):
    ops = tc.Operations()
    t = r.get_task(os.environ["TC_EDIT"])
    t.set_description(os.environ["TC_DESC"], ops)
    r.commit_operations(ops)
r.sync_to_remote(os.environ["TC_URL"], os.environ["TC_CLIENT"],
                 os.environ.get("TC_SECRET", "correct horse battery staple"), False)
for u, t in sorted(r.all_tasks().items()):
    print("TASK", u, t.get_description())
"#;

struct Replica<'a> {
    host: &'a TasksHost,
    dir: std::path::PathBuf,
    client: String,
}

impl Replica<'_> {
    fn sync(&self, extra: &[(&str, String)]) -> (bool, String) {
        let mut env = vec![
            ("TC_DIR", self.dir.display().to_string()),
            ("TC_CLIENT", self.client.clone()),
        ];
        env.extend(extra.iter().cloned());
        self.host.python(REPLICA, &env)
    }

    fn ok(&self, extra: &[(&str, String)]) -> String {
        let (ok, out) = self.sync(extra);
        assert!(ok, "sync failed:\n{out}");
        out
    }
}

fn replica<'a>(host: &'a TasksHost, name: &str, client: &str) -> Replica<'a> {
    let dir = host.dir.path().join(name);
    std::fs::create_dir_all(&dir).unwrap();
    Replica {
        host,
        dir,
        client: client.to_owned(),
    }
}

#[test]
fn taskchampion_replicas_sync_through_the_gateway() {
    let host = TasksHost::start(
        &["alice", "bob"],
        "[grains]\nidle_timeout = \"1s\"\n[gateway]\nupstream_idle = \"300ms\"\n",
        "",
    );
    let alice = host.client_id("alice");
    let (a, b) = (replica(&host, "a", &alice), replica(&host, "b", &alice));

    // A task added on A reaches B.
    let out = a.ok(&[("TC_ADD", "buy milk".to_owned())]);
    let uuid = out
        .lines()
        .find_map(|l| l.strip_prefix("ADDED "))
        .expect("a new task")
        .to_owned();
    let out = b.ok(&[]);
    assert!(out.contains(&format!("TASK {uuid} buy milk")), "{out}");

    // The first version came with a request for a snapshot, which the
    // client honoured: the server now has one.
    let (code, _) = host.curl(
        "/v1/client/snapshot",
        &["-H", &format!("X-Client-Id: {alice}"), "-o", "/dev/null"],
    );
    assert_eq!(code, "200");

    // An edit on B reaches A.
    b.ok(&[
        ("TC_EDIT", uuid.clone()),
        ("TC_DESC", "buy oat milk".to_owned()),
    ]);
    let out = a.ok(&[]);
    assert!(out.contains(&format!("TASK {uuid} buy oat milk")), "{out}");

    // A fresh replica starts from the snapshot and the versions after it.
    let c = replica(&host, "c", &alice);
    let out = c.ok(&[]);
    assert!(out.contains(&format!("TASK {uuid} buy oat milk")), "{out}");

    // Bob's client id reaches Bob's grain: none of Alice's tasks, and
    // nothing he does shows up for her.
    let bob = host.client_id("bob");
    let bob_replica = replica(&host, "bob", &bob);
    let out = bob_replica.ok(&[("TC_ADD", "bob's task".to_owned())]);
    assert!(!out.contains("milk"), "{out}");
    // Alice's list has none of Bob's tasks.
    let out = a.ok(&[]);
    assert!(!out.contains("bob's task"), "{out}");
    let first = |id: &str| {
        let (code, head) = host.curl(
            "/v1/client/get-child-version/00000000-0000-0000-0000-000000000000",
            &[
                "-H",
                &format!("X-Client-Id: {id}"),
                "-D",
                "-",
                "-o",
                "/dev/null",
            ],
        );
        assert_eq!(code, "200", "{head}");
        head.lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("x-version-id: ")
                    .map(str::to_owned)
            })
            .expect("x-version-id")
    };
    assert_ne!(first(&alice), first(&bob), "Bob's id reached Alice's list");

    // Idle, the grain stops; the next sync starts it again.
    granary_testkit::eventually(
        "the idle tasks grain to stop",
        Duration::from_secs(30),
        || (host.grain_state("alice") == "stopped").then_some(()),
    );
    let out = b.ok(&[]);
    assert!(out.contains(&format!("TASK {uuid} buy oat milk")), "{out}");

    // Revoked, the client id is refused.
    let list = host
        .daemon
        .granary(&["tasks", "client", "list", "alice", "--json"])
        .success()
        .json();
    let id = list[0]["id"].as_i64().unwrap().to_string();
    assert!(list[0]["last_used_at"].as_i64().is_some(), "{list}");
    host.daemon
        .granary(&["tasks", "client", "revoke", "alice", &id])
        .success();
    granary_testkit::eventually(
        "the revoked client id to be refused",
        Duration::from_secs(10),
        || {
            let (code, _) = host.curl(
                "/v1/client/snapshot",
                &["-H", &format!("X-Client-Id: {alice}"), "-o", "/dev/null"],
            );
            (code == "403").then_some(())
        },
    );
    let (ok, out) = a.sync(&[]);
    assert!(!ok, "a revoked client id still syncs:\n{out}");
    // A new client id (ids are never reused) is a new, empty task list,
    // whatever secret its replicas use.
    let fresh = host.client_id("alice");
    let d = replica(&host, "d", &fresh);
    let out = d.ok(&[("TC_SECRET", "another secret".to_owned())]);
    assert!(!out.contains("TASK "), "{out}");
    // The id itself is never stored or logged.
    let log = host.daemon.log();
    assert!(!log.contains(&alice), "the client id was logged");
    let state = std::fs::read(host.daemon.data_dir().join("state.db")).unwrap_or_default();
    assert!(
        !state.windows(alice.len()).any(|w| w == alice.as_bytes()),
        "the client id is stored in clear"
    );
}

#[test]
fn the_protocol_answers_like_taskchampion_sync_server() {
    let host = TasksHost::start(&["alice"], "", "");
    let id = host.client_id("alice");
    let nil = "00000000-0000-0000-0000-000000000000";
    let hdr = format!("X-Client-Id: {id}");
    let post = |path: &str, ct: &str, body: &str| {
        host.curl(
            path,
            &[
                "-H",
                &hdr,
                "-H",
                &format!("Content-Type: {ct}"),
                "--data-binary",
                body,
                "-D",
                "/dev/stderr",
            ],
        )
    };
    let history = "application/vnd.taskchampion.history-segment";

    // No client id: 400; an unknown one: 403.
    let (code, _) = host.curl(&format!("/v1/client/get-child-version/{nil}"), &[]);
    assert_eq!(code, "400");
    let (code, _) = host.curl(
        &format!("/v1/client/get-child-version/{nil}"),
        &["-H", "X-Client-Id: 6c2bd2a4-1d4f-4bb0-9c8c-000000000000"],
    );
    assert_eq!(code, "403");

    // Nothing yet: 404 for the child of NIL and for the snapshot.
    let (code, _) = host.curl(
        &format!("/v1/client/get-child-version/{nil}"),
        &["-H", &hdr],
    );
    assert_eq!(code, "404");
    let (code, _) = host.curl("/v1/client/snapshot", &["-H", &hdr]);
    assert_eq!(code, "404");

    // The wrong content type or an empty body: 400.
    let (code, _) = post(&format!("/v1/client/add-version/{nil}"), "text/plain", "x");
    assert_eq!(code, "400");

    // The first version: 200, its id, and a snapshot asked for urgently.
    let out = std::process::Command::new("curl")
        .args(["-sS", "-D", "-", "-o", "/dev/null", "--cacert"])
        .arg(host.daemon.ca_file())
        .args([
            "--resolve",
            &format!(
                "tasks.{DOMAIN}:{}:127.0.0.1",
                host.daemon.https_addr().port()
            ),
            "-H",
            &hdr,
            "-H",
            &format!("Content-Type: {history}"),
            "--data-binary",
            "first",
            &format!(
                "https://tasks.{DOMAIN}:{}/v1/client/add-version/{nil}",
                host.daemon.https_addr().port()
            ),
        ])
        .output()
        .unwrap();
    let head = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
    assert!(head.contains(" 200"), "{head}");
    assert!(head.contains("x-snapshot-request: urgency=high"), "{head}");
    let v1 = head
        .lines()
        .find_map(|l| l.strip_prefix("x-version-id: "))
        .expect("x-version-id")
        .trim()
        .to_owned();

    // Adding on top of NIL again is a conflict naming the latest.
    let (code, _) = post(&format!("/v1/client/add-version/{nil}"), history, "again");
    assert_eq!(code, "409");

    // The child of NIL is the first version, with its bytes.
    let (code, body) = host.curl(
        &format!("/v1/client/get-child-version/{nil}"),
        &["-H", &hdr],
    );
    assert_eq!((code.as_str(), body.as_str()), ("200", "first"));
    // Nothing after it yet.
    let (code, _) = host.curl(&format!("/v1/client/get-child-version/{v1}"), &["-H", &hdr]);
    assert_eq!(code, "404");

    // A snapshot of it, then the snapshot is served.
    let (code, _) = post(
        &format!("/v1/client/add-snapshot/{v1}"),
        "application/vnd.taskchampion.snapshot",
        "snap",
    );
    assert_eq!(code, "200");
    let (code, body) = host.curl("/v1/client/snapshot", &["-H", &hdr]);
    assert_eq!((code.as_str(), body.as_str()), ("200", "snap"));

    // A version nobody has: 410 (gone; start from the snapshot).
    let (code, _) = host.curl(
        "/v1/client/get-child-version/11111111-2222-4333-8444-555555555555",
        &["-H", &hdr],
    );
    assert_eq!(code, "410");

    // Guessing client ids gets the address limited.
    let mut limited = false;
    for i in 0..30 {
        let (code, _) = host.curl(
            "/v1/client/snapshot",
            &[
                "-H",
                &format!("X-Client-Id: 6c2bd2a4-1d4f-4bb0-9c8c-{i:012}"),
            ],
        );
        if code == "429" {
            limited = true;
            break;
        }
        assert_eq!(code, "403");
    }
    assert!(limited, "unknown client ids are never limited");
}

/// The task with `description`, from an export.
fn find<'a>(export: &'a serde_json::Value, description: &str) -> Option<&'a serde_json::Value> {
    export
        .as_array()?
        .iter()
        .find(|t| t["description"] == description)
}

#[test]
fn taskwarrior_2_syncs_over_taskd() {
    let host = TasksHost::start(&["alice", "bob"], "", "taskd = \"127.0.0.1:0\"\n");
    let (a, b) = (
        host.task_replica("alice", "a"),
        host.task_replica("alice", "b"),
    );

    // A task added on A reaches B, and back. A starts with `sync init`
    // (its tasks uploaded whole, as for a list that existed before sync).
    a.ok(&["add", "buy milk", "project:home"]);
    let out = a.ok(&["sync", "init"]);
    assert!(!out.contains("error"), "{out}");
    b.ok(&["sync"]);
    let milk = find(&b.export(), "buy milk")
        .cloned()
        .expect("the task on B");
    let uuid = milk["uuid"].as_str().unwrap().to_owned();
    b.ok(&["add", "call mum"]);
    b.ok(&["sync"]);
    a.ok(&["sync"]);
    assert!(find(&a.export(), "call mum").is_some());

    // Conflicting edits of one task on both sides: both changes survive,
    // and both replicas end up the same.
    a.ok(&[&uuid, "modify", "priority:H"]);
    b.ok(&[&uuid, "modify", "project:shop"]);
    a.ok(&["sync"]);
    b.ok(&["sync"]);
    a.ok(&["sync"]);
    for r in [&a, &b] {
        let t = find(&r.export(), "buy milk").cloned().unwrap();
        assert_eq!(t["priority"], "H", "{t}");
        assert_eq!(t["project"], "shop", "{t}");
    }
    // The same attribute changed on both, the later edit first synced:
    // the later edit wins, whichever replica syncs last (as taskd merges:
    // by modification time).
    b.task_at("2030-01-01 11:00:00", &[&uuid, "modify", "project:later"]);
    a.task_at("2030-01-01 10:00:00", &[&uuid, "modify", "project:earlier"]);
    b.ok(&["sync"]);
    a.ok(&["sync"]);
    b.ok(&["sync"]);
    for r in [&a, &b] {
        let t = find(&r.export(), "buy milk").cloned().unwrap();
        assert_eq!(t["project"], "later", "{t}");
        assert_eq!(t["priority"], "H", "{t}");
    }
    let (ea, eb) = (a.export(), b.export());
    let key = |e: &serde_json::Value| {
        let mut v: Vec<String> = e
            .as_array()
            .unwrap()
            .iter()
            .map(|t| format!("{} {} {}", t["uuid"], t["description"], t["project"]))
            .collect();
        v.sort();
        v
    };
    assert_eq!(key(&ea), key(&eb));

    // Bob's certificate reaches Bob's grain only.
    let bob = host.task_replica("bob", "bob");
    bob.ok(&["add", "bob's own"]);
    bob.ok(&["sync"]);
    assert!(find(&bob.export(), "buy milk").is_none());
    a.ok(&["sync"]);
    assert!(find(&a.export(), "bob's own").is_none());

    // A certificate from another CA fails at the handshake.
    let stranger = host.task_replica("alice", "stranger");
    let certs = stranger.taskrc.parent().unwrap().join("certs");
    let openssl = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(&certs)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    std::fs::remove_file(certs.join("alice.key.pem")).unwrap();
    std::fs::remove_file(certs.join("alice.cert.pem")).unwrap();
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "other-ca.key",
        "-out",
        "other-ca.pem",
        "-subj",
        "/CN=Other CA",
        "-days",
        "2",
    ]);
    openssl(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "alice.key.pem",
        "-out",
        "alice.csr",
        "-subj",
        "/CN=alice",
    ]);
    openssl(&[
        "x509",
        "-req",
        "-in",
        "alice.csr",
        "-CA",
        "other-ca.pem",
        "-CAkey",
        "other-ca.key",
        "-out",
        "alice.cert.pem",
        "-days",
        "2",
    ]);
    stranger.ok(&["add", "sneaky"]);
    let (ok, out) = stranger.task(&["sync"]);
    assert!(!ok, "a certificate from another CA synced:\n{out}");
    assert!(
        host.daemon.log().contains("taskd handshake failed"),
        "refused later than the handshake"
    );
    a.ok(&["sync"]);
    assert!(find(&a.export(), "sneaky").is_none());

    // A revoked certificate is refused (430: taskwarrior says the
    // credentials are wrong).
    let certs = host
        .daemon
        .granary(&["tasks", "certs", "alice", "--json"])
        .success()
        .json();
    let b_id = certs
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["label"] == "b")
        .unwrap()["id"]
        .as_i64()
        .unwrap()
        .to_string();
    host.daemon
        .granary(&["tasks", "revoke-cert", "alice", &b_id])
        .success();
    let (ok, out) = b.task(&["sync"]);
    assert!(!ok, "a revoked certificate synced:\n{out}");
    assert!(out.contains("credentials"), "{out}");
}

/// A client with a good certificate announcing a 2 GiB request: refused at
/// once (nothing that size is allocated or waited for).
const HUGE_FRAME: &str = r#"
import os, socket, ssl, struct
ctx = ssl.create_default_context(cafile=os.environ["CA"])
ctx.load_cert_chain(os.environ["CERT"], os.environ["KEY"])
with socket.create_connection(("127.0.0.1", int(os.environ["PORT"])), timeout=20) as raw:
    with ctx.wrap_socket(raw, server_hostname=os.environ["HOST"]) as s:
        s.sendall(struct.pack(">I", 2**31))
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
n = struct.unpack(">I", data[:4])[0]
assert n == len(data), (n, len(data))
print(data[4:].decode())
"#;

#[test]
fn taskd_refuses_a_huge_frame_before_reading_it() {
    let host = TasksHost::start(&["alice"], "", "taskd = \"127.0.0.1:0\"\n");
    let replica = host.task_replica("alice", "a");
    let certs = replica.taskrc.parent().unwrap().join("certs");
    let (ok, out) = granary_testkit::mail::run_python(
        HUGE_FRAME,
        &[
            ("CA", certs.join("ca.cert.pem").display().to_string()),
            ("CERT", certs.join("alice.cert.pem").display().to_string()),
            ("KEY", certs.join("alice.key.pem").display().to_string()),
            ("PORT", host.taskd_port().to_string()),
            ("HOST", format!("tasks.{DOMAIN}")),
        ],
    );
    assert!(ok, "{out}");
    assert!(out.contains("code: 504"), "{out}");
    // The daemon is fine and the user still syncs.
    replica.ok(&["add", "after"]);
    replica.ok(&["sync"]);
}
