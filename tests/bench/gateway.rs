//! The gateway against nginx, in one run, on this machine:
//!
//! 1. HTTPS to Alice's blog: through Granary (TLS, routing, the pooled
//!    upstream, the jailed blog grain) against nginx (`worker_processes 1`,
//!    the same certificate, upstream keepalive, HTTP/1.1) reverse-proxying
//!    to the same blog binary run unjailed on a unix socket. wrk with 64
//!    connections on CPU 0, the servers on CPU 1; requests/s and p99; the
//!    median of 5 alternating rounds.
//! 2. `git clone` of a ~100 MB repository: through Granary, through nginx +
//!    fcgiwrap + git http-backend on the same repository, and `file://`.
//!
//! Root, and apt's nginx, wrk and fcgiwrap (skipped without them).
//!
//! Full run, against an optimised daemon:
//!   cargo build --release -p granary -p granary-jail --bins && \
//!     GRANARY_BIN=$PWD/target/release/granary cargo bench -p granary-e2e --bench gateway
//! Smoke (./run-tests), with the debug daemon:
//!   GRANARY_BIN=$PWD/target/debug/granary cargo bench -p granary-e2e --bench gateway -- --smoke

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use granary_testkit::{Daemon, DaemonMode, eventually};

#[path = "support.rs"]
mod support;

const DOMAIN: &str = "example.test";

struct Killed(Child);

impl Drop for Killed {
    /// SIGTERM first (nginx's master then stops its workers), SIGKILL if
    /// that does not end it.
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        for _ in 0..100 {
            if self.0.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

use support::{free_port, have, median};

/// wrk against `url` with `host`: (requests/s, p50 ms, p99 ms).
fn wrk(url: &str, host: &str, secs: u32) -> (f64, f64, f64) {
    support::wrk(url, &[format!("Host: {host}")], secs, false)
}

fn git(dir: &Path, args: &[&str], ca: &Path) {
    let out = Command::new("git")
        .args([
            "-c",
            "user.name=B",
            "-c",
            "user.email=b@x",
            "-c",
            "init.defaultBranch=main",
            "-c",
            "safe.directory=*",
        ])
        .args(args)
        .current_dir(dir)
        .env("GIT_SSL_CAINFO", ca)
        .env("GIT_TERMINAL_PROMPT", "0")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn main() {
    let smoke = std::env::args().any(|a| a == "--smoke");
    for tool in ["nginx", "wrk", "fcgiwrap", "taskset"] {
        if !have(tool) {
            eprintln!(
                "{tool} is missing (apt install nginx wrk fcgiwrap); skipping the gateway benchmark"
            );
            return;
        }
    }
    let (rounds, secs, repo_mib) = if smoke { (1, 1, 8) } else { (5, 5, 100) };
    let tmp = tempfile::Builder::new()
        .prefix("granary-bench-gw-")
        .tempdir()
        .unwrap();
    let t = tmp.path();
    // The daemon and every grain it starts on CPU 1 from their start (so
    // the daemon sizes its runtime to one CPU, as nginx gets one worker);
    // wrk on CPU 0.
    granary_testkit::pin_daemons_to(1);
    let daemon = Daemon::start_with(
        DaemonMode::Serve,
        &format!(
            "domain = \"{DOMAIN}\"\n[grains]\nidle_timeout = \"1h\"\n[gateway]\nupstream_idle = \"1h\"\n"
        ),
    );
    for pkg in [
        granary_testkit::git_package(t),
        granary_testkit::app_package(t, "blog", "granary-blog", ""),
    ] {
        daemon
            .granary(&["app", "install", pkg.to_str().unwrap()])
            .success();
    }
    daemon.granary(&["user", "add", "alice"]).success();
    let password = daemon
        .granary(&["app-password", "add", "alice", "--kind", "git", "--json"])
        .success()
        .json()["password"]
        .as_str()
        .unwrap()
        .to_owned();
    let https = daemon.https_addr().port();
    let ca = daemon.ca_file();
    let resolve = |host: &str| format!("http.curloptResolve={host}:{https}:127.0.0.1");
    let url =
        |repo: &str| format!("https://alice:{password}@git.{DOMAIN}:{https}/alice/{repo}.git");

    // The site: one 10 KB page.
    let page = format!(
        "<h1>Alice</h1>\n{}",
        "<p>Some words about things.</p>\n".repeat(320)
    );
    let site = t.join("site");
    std::fs::create_dir_all(&site).unwrap();
    std::fs::write(site.join("index.html"), &page).unwrap();
    git(&site, &["init", "-q"], &ca);
    git(&site, &["add", "."], &ca);
    git(&site, &["commit", "-q", "-m", "site"], &ca);
    git(
        &site,
        &[
            "-c",
            &resolve(&format!("git.{DOMAIN}")),
            "push",
            "-q",
            &url("site"),
            "main",
        ],
        &ca,
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
    daemon
        .granary(&[
            "grant",
            "add",
            "--from",
            "alice/git",
            "--to",
            "alice/blog",
            "--cap",
            "notify:site",
        ])
        .success();
    std::fs::write(
        site.join("index.html"),
        format!("{page}<!-- published -->\n"),
    )
    .unwrap();
    git(&site, &["commit", "-q", "-a", "-m", "publish"], &ca);
    git(
        &site,
        &[
            "-c",
            &resolve(&format!("git.{DOMAIN}")),
            "push",
            "-q",
            &url("site"),
            "main",
        ],
        &ca,
    );
    let host = format!("alice.{DOMAIN}");
    eventually("the blog", Duration::from_secs(30), || {
        let (code, body) = daemon.curl(&host, "/", &[]);
        (code == "200" && body.contains("published")).then_some(())
    });

    // The peer: the same blog binary, unjailed, behind nginx.
    let standalone_site = t.join("standalone/v1");
    std::fs::create_dir_all(&standalone_site).unwrap();
    std::fs::copy(site.join("index.html"), standalone_site.join("index.html")).unwrap();
    let link = t.join("standalone/current");
    std::os::unix::fs::symlink(&standalone_site, &link).unwrap();
    let blog_sock = t.join("blog.sock");
    let _blog = Killed(
        Command::new("taskset")
            .args(["-c", "1"])
            .arg(granary_testkit::static_binary("granary-blog"))
            .arg("--standalone")
            .arg(&blog_sock)
            .arg(&link)
            .spawn()
            .unwrap(),
    );
    // git http-backend through fcgiwrap, on the git grain's own repositories.
    let fcgi_sock = t.join("fcgi.sock");
    let _fcgi = Killed(
        Command::new("taskset")
            .args(["-c", "1", "fcgiwrap", "-c", "1", "-s"])
            .arg(format!("unix:{}", fcgi_sock.display()))
            .spawn()
            .unwrap(),
    );
    let repos = daemon.data_dir().join("grains/alice-git/data/repos");
    let tls = daemon.data_dir().join("tls");
    let nginx_port = free_port();
    let conf = t.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            r#"user root;
worker_processes 1;
pid {pid};
error_log {dir}/nginx-error.log;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir}/nginx-body;
    proxy_temp_path {dir}/nginx-proxy;
    fastcgi_temp_path {dir}/nginx-fastcgi;
    uwsgi_temp_path {dir}/nginx-uwsgi;
    scgi_temp_path {dir}/nginx-scgi;
    upstream blog {{ server unix:{blog}; keepalive 32; }}
    server {{
        listen 127.0.0.1:{port} ssl;
        server_name _;
        ssl_certificate {tls}/server.pem;
        ssl_certificate_key {tls}/server.key;
        ssl_protocols TLSv1.2 TLSv1.3;
        location ~ ^/alice/(.*\.git/.*)$ {{
            client_max_body_size 0;
            fastcgi_pass unix:{fcgi};
            include /etc/nginx/fastcgi_params;
            fastcgi_param SCRIPT_FILENAME /usr/lib/git-core/git-http-backend;
            fastcgi_param GIT_PROJECT_ROOT {repos};
            fastcgi_param GIT_HTTP_EXPORT_ALL 1;
            fastcgi_param PATH_INFO /$1;
            fastcgi_param GIT_CONFIG_COUNT 1;
            fastcgi_param GIT_CONFIG_KEY_0 safe.directory;
            fastcgi_param GIT_CONFIG_VALUE_0 *;
        }}
        location / {{
            proxy_pass http://blog;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
        }}
    }}
}}
"#,
            pid = t.join("nginx.pid").display(),
            dir = t.display(),
            blog = blog_sock.display(),
            fcgi = fcgi_sock.display(),
            port = nginx_port,
            tls = tls.display(),
            repos = repos.display(),
        ),
    )
    .unwrap();
    let check = Command::new("nginx")
        .arg("-t")
        .arg("-c")
        .arg(&conf)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "nginx -t: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    let _nginx = Killed(
        Command::new("taskset")
            .args(["-c", "1", "nginx", "-c"])
            .arg(&conf)
            .args(["-g", "daemon off;"])
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let nginx_url = format!("https://127.0.0.1:{nginx_port}/");
    eventually("nginx", Duration::from_secs(20), || {
        let out = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--resolve"])
            .arg(format!("alice.{DOMAIN}:{nginx_port}:127.0.0.1"))
            .arg("--cacert")
            .arg(&ca)
            .arg(format!("https://alice.{DOMAIN}:{nginx_port}/"))
            .output()
            .ok()?;
        let code = String::from_utf8_lossy(&out.stdout).into_owned();
        if code != "200" {
            eprintln!(
                "nginx answered {code:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        (code == "200").then_some(())
    });

    println!(
        "HTTPS to a blog page ({} B), wrk -c64 on CPU 0, servers on CPU 1, {rounds} alternating rounds of {secs} s:",
        page.len()
    );
    let granary_url = format!("https://127.0.0.1:{https}/");
    let (mut g_rps, mut g_p50, mut g_p99) = (vec![], vec![], vec![]);
    let (mut n_rps, mut n_p50, mut n_p99) = (vec![], vec![], vec![]);
    for _ in 0..rounds {
        let (r, m, p) = wrk(&granary_url, &host, secs);
        g_rps.push(r);
        g_p50.push(m);
        g_p99.push(p);
        let (r, m, p) = wrk(&nginx_url, &host, secs);
        n_rps.push(r);
        n_p50.push(m);
        n_p99.push(p);
    }
    let (gr, gp, nr, np) = (median(g_rps), median(g_p99), median(n_rps), median(n_p99));
    let (gm, nm) = (median(g_p50), median(n_p50));
    println!(
        "  granary gateway -> jailed blog grain   {gr:9.0} req/s   p50 {gm:6.2} ms   p99 {gp:6.2} ms   p99/p50 {:.2}",
        gp / gm
    );
    println!(
        "  nginx -> the same blog, unjailed       {nr:9.0} req/s   p50 {nm:6.2} ms   p99 {np:6.2} ms   p99/p50 {:.2}",
        np / nm
    );
    println!(
        "  requests/s granary/nginx = {:.2}x (goal >= 1x: {});  p99 granary/nginx = {:.2}x (goal <= 1x: {})",
        gr / nr,
        if gr >= nr { "met" } else { "MISSED" },
        gp / np,
        if gp <= np { "met" } else { "MISSED" }
    );
    // 64 connections each waiting for its answer: at saturation the
    // latency is mostly the queue (Little's law: 64 / requests/s), so p99
    // follows the throughput; p99/p50 is the tail's own shape.
    println!(
        "  tail shape (p99/p50) granary/nginx = {:.2}x; queue alone (64 / req/s): granary {:.2} ms, nginx {:.2} ms",
        (gp / gm) / (np / nm),
        64e3 / gr,
        64e3 / nr
    );

    // A ~100 MB repository (incompressible files), pushed once.
    let big = t.join("big");
    std::fs::create_dir_all(&big).unwrap();
    for i in 0..repo_mib / 2 {
        std::fs::write(
            big.join(format!("blob-{i:03}.bin")),
            granary_testkit::noise(i as u64, 2 << 20),
        )
        .unwrap();
    }
    git(&big, &["init", "-q"], &ca);
    git(&big, &["add", "."], &ca);
    git(&big, &["commit", "-q", "-m", "big"], &ca);
    let started = Instant::now();
    git(
        &big,
        &[
            "-c",
            &resolve(&format!("git.{DOMAIN}")),
            "push",
            "-q",
            &url("big"),
            "main",
        ],
        &ca,
    );
    println!(
        "git push of {repo_mib} MB through Granary: {:.2} s",
        started.elapsed().as_secs_f64()
    );
    let clone = |how: &str, n: usize| -> f64 {
        let dest = t.join(format!("clone-{how}-{n}"));
        let start = Instant::now();
        match how {
            "granary" => git(
                t,
                &[
                    "-c",
                    &resolve(&format!("git.{DOMAIN}")),
                    "clone",
                    "-q",
                    &url("big"),
                    dest.to_str().unwrap(),
                ],
                &ca,
            ),
            "nginx" => git(
                t,
                &[
                    "-c",
                    &format!("http.curloptResolve=git.{DOMAIN}:{nginx_port}:127.0.0.1"),
                    "clone",
                    "-q",
                    &format!("https://git.{DOMAIN}:{nginx_port}/alice/big.git"),
                    dest.to_str().unwrap(),
                ],
                &ca,
            ),
            // The repository belongs to the grain's uid: the local
            // upload-pack needs safe.directory itself.
            _ => git(
                t,
                &[
                    "clone",
                    "-q",
                    "--upload-pack",
                    "git -c safe.directory=* upload-pack",
                    &format!("file://{}/big.git", repos.display()),
                    dest.to_str().unwrap(),
                ],
                &ca,
            ),
        }
        let secs = start.elapsed().as_secs_f64();
        std::fs::remove_dir_all(&dest).unwrap();
        secs
    };
    let (mut g, mut n, mut f) = (vec![], vec![], vec![]);
    for i in 0..rounds.min(3) {
        g.push(clone("granary", i));
        n.push(clone("nginx", i));
        f.push(clone("file", i));
    }
    let (g, n, f) = (median(g), median(n), median(f));
    println!("git clone of {repo_mib} MB, median of {}:", rounds.min(3));
    println!("  through Granary                        {g:6.2} s");
    println!("  nginx + fcgiwrap + git http-backend    {n:6.2} s");
    println!("  file://                                {f:6.2} s");
    println!(
        "  granary/nginx = {:.2}x (goal <= 1.2x: {}); granary/file = {:.2}x",
        g / n,
        if g / n <= 1.2 { "met" } else { "MISSED" },
        g / f
    );
    drop(daemon);
}
