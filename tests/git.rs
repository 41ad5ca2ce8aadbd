//! Git over HTTPS end to end: the real daemon, its gateway (TLS from the
//! local CA, HTTP Basic with app passwords), a git grain started on demand
//! running Debian's git in the jail, and the real git client, which
//! resolves the name through `http.curloptResolve` and trusts the local CA
//! file, never with verification turned off.

use std::path::Path;
use std::process::Command;

use granary_testkit::{Daemon, DaemonMode, GitClient};

const DOMAIN: &str = "example.test";

/// The git client against `daemon`, with names under [`DOMAIN`].
fn git_client<'a>(daemon: &'a Daemon, home: std::path::PathBuf) -> GitClient<'a> {
    GitClient {
        daemon,
        home,
        domain: DOMAIN,
    }
}

/// A TLS connection to the daemon as a client that trusts the local CA.
fn tls(daemon: &Daemon) -> rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream> {
    tls_trusting(daemon, &daemon.ca_file())
}

/// A TLS connection to the daemon as a client that trusts `ca` only.
fn tls_trusting(
    daemon: &Daemon,
    ca: &Path,
) -> rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = rustls_pki_types::ServerName::try_from(format!("git.{DOMAIN}")).unwrap();
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
    let tcp = std::net::TcpStream::connect(daemon.https_addr()).unwrap();
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    rustls::StreamOwned::new(conn, tcp)
}

/// Reads until the server closes; what it sent.
fn read_to_close(stream: &mut impl std::io::Read) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            // A close without close_notify, or a reset: closed all the same.
            Err(e)
                if e.kind() != std::io::ErrorKind::WouldBlock
                    && e.kind() != std::io::ErrorKind::TimedOut =>
            {
                break;
            }
            Err(e) => panic!("the server did not close the connection: {e}"),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn app_password(daemon: &Daemon, user: &str) -> String {
    granary_testkit::app_password(daemon, user, "git")
}

#[test]
fn push_and_clone_over_https_through_the_gateway() {
    let daemon = Daemon::start_with(
        DaemonMode::Serve,
        &format!(
            "domain = \"{DOMAIN}\"\n[grains]\nidle_timeout = \"1s\"\n[gateway]\nupstream_idle = \"300ms\"\n"
        ),
    );
    let tmp = tempfile::tempdir().unwrap();
    let pkg = granary_testkit::git_package(tmp.path());
    daemon
        .granary(&["app", "install", pkg.to_str().unwrap()])
        .success();
    daemon.granary(&["user", "add", "alice"]).success();
    daemon.granary(&["user", "add", "bob"]).success();
    let alice = app_password(&daemon, "alice");
    let bob = app_password(&daemon, "bob");
    let home = tmp.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let client = git_client(&daemon, home);

    // A repository with a few files, pushed: the first push creates it.
    let work = tmp.path().join("work");
    std::fs::create_dir_all(work.join("docs")).unwrap();
    std::fs::write(work.join("index.html"), "<h1>Alice</h1>\n").unwrap();
    std::fs::write(
        work.join("docs/notes.txt"),
        granary_testkit::noise(1, 300_000),
    )
    .unwrap();
    client.ok(&work, &["init", "-q"]);
    client.ok(&work, &["add", "."]);
    client.ok(&work, &["commit", "-q", "-m", "first"]);
    let head = client.ok(&work, &["rev-parse", "HEAD"]);
    client.ok(
        &work,
        &[
            "push",
            "-q",
            &client.url(Some(("alice", &alice)), "alice/site.git"),
            "main",
        ],
    );

    // Cloned back byte for byte, over protocol v2 and v0.
    for (n, version) in ["2", "0"].iter().enumerate() {
        let dest = tmp.path().join(format!("clone{n}"));
        client.ok(
            tmp.path(),
            &[
                "-c",
                &format!("protocol.version={version}"),
                "clone",
                "-q",
                &client.url(Some(("alice", &alice)), "alice/site.git"),
                dest.to_str().unwrap(),
            ],
        );
        assert_eq!(client.ok(&dest, &["rev-parse", "HEAD"]), head);
        assert_eq!(
            std::fs::read(dest.join("docs/notes.txt")).unwrap(),
            granary_testkit::noise(1, 300_000)
        );
    }

    // Bob cannot read Alice's repository, and the answer is the same
    // whether or not it exists.
    let (ok, out) = client.git(
        tmp.path(),
        &[
            "ls-remote",
            &client.url(Some(("bob", &bob)), "alice/site.git"),
        ],
    );
    assert!(!ok && out.contains("403"), "{out}");
    let (ok, out2) = client.git(
        tmp.path(),
        &[
            "ls-remote",
            &client.url(Some(("bob", &bob)), "alice/nothing.git"),
        ],
    );
    assert!(!ok && out2.contains("403"), "{out2}");
    // No credentials, or a wrong password: 401.
    let (ok, out) = client.git(
        tmp.path(),
        &["ls-remote", &client.url(None, "alice/site.git")],
    );
    assert!(!ok, "{out}");
    let (ok, out) = client.git(
        tmp.path(),
        &[
            "ls-remote",
            &client.url(Some(("alice", "wrong-password")), "alice/site.git"),
        ],
    );
    assert!(
        !ok && (out.contains("401") || out.contains("Authentication failed")),
        "{out}"
    );
    assert!(!daemon.log().contains(&alice), "no password is logged");

    // Public: anyone clones, nobody but Alice pushes; private again: gone.
    let made_public = daemon
        .granary(&["git", "visibility", "alice", "site", "public"])
        .success();
    assert!(
        made_public.stdout.contains("public"),
        "{}",
        made_public.stdout
    );
    let anon = tmp.path().join("anon");
    client.ok(
        tmp.path(),
        &[
            "clone",
            "-q",
            &client.url(None, "alice/site.git"),
            anon.to_str().unwrap(),
        ],
    );
    assert_eq!(client.ok(&anon, &["rev-parse", "HEAD"]), head);
    std::fs::write(anon.join("evil.txt"), "x").unwrap();
    client.ok(&anon, &["add", "."]);
    client.ok(&anon, &["commit", "-q", "-m", "anonymous"]);
    let (ok, out) = client.git(
        &anon,
        &["push", "-q", &client.url(None, "alice/site.git"), "main"],
    );
    assert!(!ok, "an anonymous push is refused: {out}");
    let (ok, out) = client.git(
        &anon,
        &[
            "push",
            "-q",
            &client.url(Some(("bob", &bob)), "alice/site.git"),
            "main",
        ],
    );
    assert!(!ok && out.contains("403"), "Bob cannot push: {out}");
    daemon
        .granary(&["git", "visibility", "alice", "site", "private"])
        .success();
    let (ok, _) = client.git(
        tmp.path(),
        &["ls-remote", &client.url(None, "alice/site.git")],
    );
    assert!(!ok, "private again");

    // An empty repository made by the admin.
    let made = daemon
        .granary(&["git", "create", "alice", "empty.git"])
        .success();
    assert!(made.stdout.contains("created"), "{}", made.stdout);
    let again = daemon
        .granary(&["git", "create", "alice", "empty"])
        .success();
    assert!(again.stdout.contains("already there"), "{}", again.stdout);
    let out = client.ok(
        tmp.path(),
        &[
            "ls-remote",
            &client.url(Some(("alice", &alice)), "alice/empty.git"),
        ],
    );
    assert!(out.trim().is_empty(), "{out}");
    daemon
        .granary(&["git", "create", "alice", "../evil"])
        .failure();

    // Idle, the grain stops; the next clone starts it again unnoticed.
    let state = |daemon: &Daemon| {
        daemon
            .granary(&["grain", "status", "alice/git", "--json"])
            .success()
            .json()["state"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    granary_testkit::eventually(
        "the idle git grain to stop",
        std::time::Duration::from_secs(30),
        || (state(&daemon) == "stopped").then_some(()),
    );
    let again = tmp.path().join("again");
    client.ok(
        tmp.path(),
        &[
            "clone",
            "-q",
            &client.url(Some(("alice", &alice)), "alice/site.git"),
            again.to_str().unwrap(),
        ],
    );
    assert_eq!(client.ok(&again, &["rev-parse", "HEAD"]), head);
}

/// Bad clients are closed cleanly and cost other users nothing: garbage
/// instead of a TLS handshake, a malformed request, an oversized head, a
/// client dripping its head slower than the timeout; repeated bad
/// passwords hit the rate limit before any hashing.
#[test]
fn bad_clients_are_closed_and_others_are_served() {
    use std::io::{Read, Write};
    let daemon = Daemon::start_with(
        DaemonMode::Serve,
        &format!(
            "domain = \"{DOMAIN}\"\n[gateway]\nheader_timeout = \"1s\"\nmax_header_kib = 16\n"
        ),
    );
    let healthy = |daemon: &Daemon| {
        let mut s = tls(daemon);
        s.write_all(b"GET /.well-known/granary/health HTTP/1.1\r\nHost: git.example.test\r\nConnection: close\r\n\r\n")
            .unwrap();
        let answer = read_to_close(&mut s);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    };

    // A slow client holds its connection while others are served.
    let mut drip = tls(&daemon);
    drip.write_all(b"GET / HTTP/1.1\r\nHost: git.example.test\r\n")
        .unwrap();
    // Garbage instead of a TLS handshake.
    let mut raw = std::net::TcpStream::connect(daemon.https_addr()).unwrap();
    raw.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    raw.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut sink = Vec::new();
    let _ = raw.read_to_end(&mut sink);
    healthy(&daemon);
    // A malformed request line.
    let mut bad = tls(&daemon);
    bad.write_all(b"NOT HTTP AT ALL\r\n\r\n").unwrap();
    let answer = read_to_close(&mut bad);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 400"),
        "{answer}"
    );
    // A head over max_header_kib.
    let mut big = tls(&daemon);
    let head = format!(
        "GET / HTTP/1.1\r\nHost: git.example.test\r\nX-Big: {}\r\n\r\n",
        "a".repeat(64 << 10)
    );
    let _ = big.write_all(head.as_bytes());
    let answer = read_to_close(&mut big);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
        "{answer}"
    );
    healthy(&daemon);
    // The dripping client is cut at the header timeout.
    let answer = read_to_close(&mut drip);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "{answer}"
    );

    // Repeated bad passwords: refused, then rate-limited (429) without
    // hashing, for that address (tests/lockout.rs: never for the user).
    daemon.granary(&["user", "add", "carol"]).success();
    let mut codes = Vec::new();
    for _ in 0..12 {
        let mut s = tls(&daemon);
        s.write_all(
            b"GET /carol/x.git/info/refs?service=git-upload-pack HTTP/1.1\r\nHost: git.example.test\r\n\
              Authorization: Basic Y2Fyb2w6bm9wZQ==\r\nConnection: close\r\n\r\n",
        )
        .unwrap();
        let answer = read_to_close(&mut s);
        codes.push(answer.get(9..12).unwrap_or("").to_owned());
    }
    assert_eq!(&codes[..10], vec!["401"; 10].as_slice(), "{codes:?}");
    assert_eq!(&codes[10..], vec!["429"; 2].as_slice(), "{codes:?}");
    healthy(&daemon);
}

/// A CA and a certificate for git.example.test it signed, made by openssl:
/// (ca.pem, cert.pem, key.pem) in `dir`.
fn openssl_pair(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    openssl_pair_for(dir, &format!("git.{DOMAIN}"))
}

/// [`openssl_pair`] for another name.
fn openssl_pair_for(
    dir: &Path,
    name: &str,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let sh = |script: &str| {
        let out = Command::new("sh")
            .arg("-c")
            .arg(script)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    std::fs::write(
        dir.join("ext.cnf"),
        format!(
            "subjectAltName=DNS:{name}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
        ),
    )
    .unwrap();
    sh(
        "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=granary-test-ca 2>/dev/null",
    );
    sh(&format!(
        "openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout key.pem -out req.csr -subj /CN=git.{DOMAIN} 2>/dev/null"
    ));
    sh(
        "openssl x509 -req -in req.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out cert.pem -days 2 -extfile ext.cnf 2>/dev/null",
    );
    (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    )
}

/// The admin replaces the certificate files; new handshakes get the new
/// certificate without a restart.
#[test]
fn a_replaced_certificate_is_served_without_a_restart() {
    use std::io::Write;
    let tmp = tempfile::tempdir().unwrap();
    let (ca1, cert1, key1) = openssl_pair(&tmp.path().join("one"));
    let (ca2, cert2, key2) = openssl_pair(&tmp.path().join("two"));
    let (cert, key) = (tmp.path().join("served.pem"), tmp.path().join("served.key"));
    std::fs::copy(&cert1, &cert).unwrap();
    std::fs::copy(&key1, &key).unwrap();
    let daemon = Daemon::start_with(
        DaemonMode::Serve,
        &format!(
            "domain = \"{DOMAIN}\"\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
            cert.display(),
            key.display()
        ),
    );
    let health = |ca: &Path| -> bool {
        let mut s = tls_trusting(&daemon, ca);
        s.write_all(b"GET /.well-known/granary/health HTTP/1.1\r\nHost: git.example.test\r\nConnection: close\r\n\r\n")
            .is_ok()
            && read_to_close(&mut s).starts_with("HTTP/1.1 200")
    };
    assert!(health(&ca1));
    assert!(!health(&ca2), "not trusted before the change");
    // Replaced the way admins and ACME clients do: new files renamed in.
    for (from, to) in [(&key2, &key), (&cert2, &cert)] {
        let staged = to.with_extension("new");
        std::fs::copy(from, &staged).unwrap();
        std::fs::rename(&staged, to).unwrap();
    }
    granary_testkit::eventually(
        "the new certificate",
        std::time::Duration::from_secs(30),
        || health(&ca2).then_some(()),
    );
    assert!(!health(&ca1), "the old certificate is gone");
    assert!(daemon.log().contains("TLS certificate reloaded"));
}

/// A push to `site` updates Alice's blog through the two routes she
/// granted (the blog reads the repository through `git.read:site`; the
/// git grain tells it `notify:site`), never serving a half-built version;
/// revoking the route stops updates.
#[test]
fn a_push_publishes_the_blog_through_granted_capabilities() {
    let daemon = Daemon::start_with(DaemonMode::Serve, &format!("domain = \"{DOMAIN}\"\n"));
    let tmp = tempfile::tempdir().unwrap();
    for pkg in [
        granary_testkit::git_package(tmp.path()),
        granary_testkit::app_package(tmp.path(), "blog", "granary-blog", ""),
    ] {
        daemon
            .granary(&["app", "install", pkg.to_str().unwrap()])
            .success();
    }
    daemon.granary(&["user", "add", "alice"]).success();
    let alice = app_password(&daemon, "alice");
    let home = tmp.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let client = git_client(&daemon, home);
    let site = format!("alice.{DOMAIN}");
    let url = client.url(Some(("alice", &alice)), "alice/site.git");

    // Version n: an index naming it, a stylesheet, and 40 pages that all
    // name it too.
    let work = tmp.path().join("site");
    std::fs::create_dir_all(work.join("posts")).unwrap();
    let write_version = |n: u32| {
        std::fs::write(
            work.join("index.html"),
            format!("<h1>version {n}</h1>\n{}", "<p>words</p>\n".repeat(50)),
        )
        .unwrap();
        std::fs::write(work.join("style.css"), "body { color: #333 }\n").unwrap();
        std::fs::write(
            work.join("404.html"),
            "<h1>no such page on Alice's blog</h1>\n",
        )
        .unwrap();
        for i in 0..40 {
            std::fs::write(
                work.join(format!("posts/{i}.html")),
                format!("post {i} of version {n}\n"),
            )
            .unwrap();
        }
    };
    write_version(1);
    client.ok(&work, &["init", "-q"]);
    client.ok(&work, &["add", "."]);
    client.ok(&work, &["commit", "-q", "-m", "v1"]);
    client.ok(&work, &["push", "-q", &url, "main"]);
    let (code, _) = daemon.curl(&site, "/", &[]);
    assert_eq!(
        code, "404",
        "nothing published before the routes are granted"
    );

    daemon
        .granary(&[
            "grant",
            "add",
            "--from",
            "alice/blog",
            "--to",
            "alice/git",
            "--cap",
            "git.read:site",
        ])
        .success();
    let notify = daemon
        .granary(&[
            "grant",
            "add",
            "--from",
            "alice/git",
            "--to",
            "alice/blog",
            "--cap",
            "notify:site",
            "--json",
        ])
        .success()
        .json();
    let push = |n: u32| {
        write_version(n);
        client.ok(&work, &["commit", "-q", "-a", "-m", &format!("v{n}")]);
        client.ok(&work, &["push", "-q", &url, "main"]);
    };
    push(2);
    let started = std::time::Instant::now();
    granary_testkit::eventually(
        "version 2 on the blog",
        std::time::Duration::from_secs(20),
        || {
            let (code, body) = daemon.curl(&site, "/", &[]);
            (code == "200" && body.contains("version 2")).then_some(())
        },
    );
    let took = started.elapsed();
    println!("blog updated {took:?} after the push returned");
    assert!(
        took < std::time::Duration::from_secs(2),
        "the blog took {took:?} to update"
    );

    // Served well: types, ETags, gzip, the site's own 404 page.
    let (code, _) = daemon.curl(&site, "/style.css", &["--write-out", "%{content_type}"]);
    assert!(code.starts_with("text/css"), "{code}");
    let headers = tmp.path().join("headers");
    let (code, _) = daemon.curl(
        &site,
        "/",
        &["--compressed", "--dump-header", headers.to_str().unwrap()],
    );
    assert_eq!(code, "200");
    let head = std::fs::read_to_string(&headers)
        .unwrap()
        .to_ascii_lowercase();
    assert!(head.contains("content-encoding: gzip"), "{head}");
    let etag = head
        .lines()
        .find_map(|l| l.strip_prefix("etag: "))
        .unwrap()
        .trim()
        .to_owned();
    let (code, _) = daemon.curl(&site, "/", &["--header", &format!("If-None-Match: {etag}")]);
    assert_eq!(code, "304");
    let (code, body) = daemon.curl(&site, "/no/such/page", &[]);
    assert_eq!(code, "404");
    assert!(body.contains("no such page on Alice's blog"), "{body}");

    // A domain Alice registered for her blog, with its own certificate.
    let custom = "blog.alice-example.test";
    let (custom_ca, custom_cert, custom_key) = openssl_pair_for(&tmp.path().join("custom"), custom);
    let certs = daemon.data_dir().join("tls/domains").join(custom);
    std::fs::create_dir_all(&certs).unwrap();
    std::fs::copy(&custom_cert, certs.join("cert.pem")).unwrap();
    std::fs::copy(&custom_key, certs.join("key.pem")).unwrap();
    let (code, _) = daemon.curl(custom, "/", &["--insecure"]);
    assert_eq!(code, "404", "not registered yet");
    daemon
        .granary(&["blog", "domain", "add", "alice", custom])
        .success();
    daemon
        .granary(&["blog", "domain", "add", "alice", &format!("x.{DOMAIN}")])
        .failure();
    let port = daemon.https_addr().port();
    let out = Command::new("curl")
        .args(["--silent", "--show-error", "--resolve"])
        .arg(format!("{custom}:{port}:127.0.0.1"))
        .arg("--cacert")
        .arg(&custom_ca)
        .arg(format!("https://{custom}:{port}/"))
        .output()
        .unwrap();
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(
        body.contains("version 2"),
        "{body}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // While version 3 goes up, every answer is a whole version.
    push(3);
    let mut seen = std::collections::BTreeSet::new();
    granary_testkit::eventually(
        "version 3 on the blog",
        std::time::Duration::from_secs(20),
        || {
            let (code, body) = daemon.curl(&site, "/posts/39.html", &[]);
            assert_eq!(code, "200", "never missing mid-switch: {body}");
            let version = body.trim().rsplit(' ').next().unwrap().to_owned();
            assert!(version == "2" || version == "3", "{body}");
            seen.insert(version.clone());
            (version == "3").then_some(())
        },
    );

    // Revoked: the git grain may no longer tell the blog; it stays put.
    daemon
        .granary(&[
            "grant",
            "revoke",
            &notify["id"].as_i64().unwrap().to_string(),
        ])
        .success();
    push(4);
    granary_testkit::eventually(
        "the refused notification",
        std::time::Duration::from_secs(20),
        || {
            let logs = daemon
                .granary(&["grain", "logs", "alice/git"])
                .success()
                .stdout;
            logs.contains("no notify:site route").then_some(())
        },
    );
    let (_, body) = daemon.curl(&site, "/", &[]);
    assert!(body.contains("version 3"), "{body}");
}

/// Git over SSH: public keys only, only the two git commands, the owner
/// pushes, others are refused, no shell; the host key survives restarts.
#[test]
fn push_and_clone_over_ssh() {
    let mut daemon = Daemon::start_with(DaemonMode::Serve, &format!("domain = \"{DOMAIN}\"\n"));
    let tmp = tempfile::tempdir().unwrap();
    let pkg = granary_testkit::git_package(tmp.path());
    daemon
        .granary(&["app", "install", pkg.to_str().unwrap()])
        .success();
    for user in ["alice", "bob"] {
        daemon.granary(&["user", "add", user]).success();
        let key = tmp.path().join(format!("{user}_key"));
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
            .unwrap()
            .success();
        assert!(ok);
        let added = daemon
            .granary(&[
                "ssh-key",
                "add",
                user,
                key.with_extension("pub").to_str().unwrap(),
            ])
            .success();
        assert!(added.stdout.contains("SHA256:"), "{}", added.stdout);
    }
    let known = tmp.path().join("known_hosts");
    let ssh = |daemon: &Daemon, user: &str, strict: &str| {
        format!(
            "ssh -i {} -o IdentitiesOnly=yes -o BatchMode=yes -o HostKeyAlias=granary-test -o UserKnownHostsFile={} -o StrictHostKeyChecking={strict} -p {}",
            tmp.path().join(format!("{user}_key")).display(),
            known.display(),
            daemon.ssh_addr().port()
        )
    };
    let git = |daemon: &Daemon, dir: &Path, user: &str, strict: &str, args: &[&str]| {
        let out = Command::new("git")
            .args([
                "-c",
                "user.name=A",
                "-c",
                "user.email=a@x",
                "-c",
                "init.defaultBranch=main",
            ])
            .args(args)
            .current_dir(dir)
            .env("GIT_SSH_COMMAND", ssh(daemon, user, strict))
            .env("HOME", tmp.path())
            .output()
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let url = |daemon: &Daemon| {
        format!(
            "ssh://alice@127.0.0.1:{}/alice/site.git",
            daemon.ssh_addr().port()
        )
    };
    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::write(work.join("README"), granary_testkit::noise(9, 100_000)).unwrap();
    for args in [
        &["init", "-q"][..],
        &["add", "."],
        &["commit", "-q", "-m", "over ssh"],
    ] {
        let (ok, out) = git(&daemon, &work, "alice", "accept-new", args);
        assert!(ok, "{out}");
    }
    let (ok, out) = git(
        &daemon,
        &work,
        "alice",
        "accept-new",
        &["push", "-q", &url(&daemon), "main"],
    );
    assert!(ok, "push over ssh: {out}\n{}", daemon.log());
    for version in ["2", "0"] {
        let dest = tmp.path().join(format!("clone-v{version}"));
        let (ok, out) = git(
            &daemon,
            tmp.path(),
            "alice",
            "yes",
            &[
                "-c",
                &format!("protocol.version={version}"),
                "clone",
                "-q",
                &url(&daemon),
                dest.to_str().unwrap(),
            ],
        );
        assert!(ok, "clone over ssh (v{version}): {out}");
        assert_eq!(
            std::fs::read(dest.join("README")).unwrap(),
            granary_testkit::noise(9, 100_000)
        );
    }
    // Bob's key does not open Alice's repository (as himself or as her).
    let bob_url = url(&daemon).replace("alice@", "bob@");
    let (ok, out) = git(&daemon, tmp.path(), "bob", "yes", &["ls-remote", &bob_url]);
    assert!(!ok && out.contains("cannot access"), "{out}");
    let (ok, _) = git(
        &daemon,
        tmp.path(),
        "bob",
        "yes",
        &["ls-remote", &url(&daemon)],
    );
    assert!(!ok, "bob's key is not alice's");
    // No shell, no other command.
    let shell = |args: &[&str]| {
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(format!(
            "{} alice@127.0.0.1 {}",
            ssh(&daemon, "alice", "yes"),
            args.join(" ")
        ));
        let out = cmd.stdin(std::process::Stdio::null()).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, err) = shell(&[]);
    assert!(!ok && err.contains("no shell"), "{err}");
    let (ok, err) = shell(&["id"]);
    assert!(!ok && err.contains("only git-upload-pack"), "{err}");

    // The host key is the same after a restart (known_hosts is strict).
    daemon.restart();
    let (ok, out) = git(
        &daemon,
        tmp.path(),
        "alice",
        "yes",
        &["ls-remote", &url(&daemon)],
    );
    assert!(ok, "same host key after a restart: {out}");
    // A removed key is refused.
    let keys = daemon
        .granary(&["ssh-key", "list", "alice", "--json"])
        .success()
        .json();
    let id = keys[0]["id"].as_i64().unwrap().to_string();
    daemon
        .granary(&["ssh-key", "remove", "alice", &id])
        .success();
    let (ok, _) = git(
        &daemon,
        tmp.path(),
        "alice",
        "yes",
        &["ls-remote", &url(&daemon)],
    );
    assert!(!ok, "a removed key no longer works");

    // Bob's own key works, and keeps working while another key fails as
    // bob from the same address: a registered key cannot be guessed, so
    // failures never refuse it; they refuse the address for what can be
    // (tests/lockout.rs).
    let bob_own = format!(
        "ssh://bob@127.0.0.1:{}/bob/none.git",
        daemon.ssh_addr().port()
    );
    let (_, out) = git(&daemon, tmp.path(), "bob", "yes", &["ls-remote", &bob_own]);
    assert!(out.contains("no repository"), "bob gets in: {out}");
    for _ in 0..10 {
        let (ok, _) = git(
            &daemon,
            tmp.path(),
            "alice",
            "yes",
            &["ls-remote", &bob_own],
        );
        assert!(!ok);
    }
    let (_, out) = git(&daemon, tmp.path(), "bob", "yes", &["ls-remote", &bob_own]);
    assert!(out.contains("no repository"), "bob is still let in: {out}");
    let status = daemon.granary(&["status", "--json"]).success().json();
    assert_eq!(
        status["logins"]["refused"][0]["source"], "127.0.0.1",
        "ten refused keys refuse their address: {status}"
    );
}
