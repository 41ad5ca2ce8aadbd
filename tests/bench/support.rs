//! What the mail benchmarks share: tools on PATH, free ports, medians,
//! commands that must succeed, waiting for a peer's processes to go, and
//! a TLS client trusting one CA.

#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

pub(crate) fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub(crate) fn sh(cmd: &mut Command) {
    let out = cmd.output().expect("run");
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// In `d`: `ca.pem` (a CA made for the run) and `cert.pem`/`key.pem`, a
/// certificate it signed for 127.0.0.1 (webpki refuses a self-signed
/// certificate as its own CA).
pub(crate) fn openssl_leaf(d: &Path) {
    let p = |name: &str| d.join(name).to_str().unwrap().to_owned();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    sh(Command::new("openssl")
        .args(["req", "-x509"])
        .args(ec)
        .args(["-keyout", &p("ca.key"), "-out", &p("ca.pem"), "-days", "1"])
        .args(["-subj", "/CN=bench CA"])
        .args(["-addext", "basicConstraints=critical,CA:TRUE"])
        .args(["-addext", "keyUsage=critical,keyCertSign"]));
    sh(Command::new("openssl")
        .arg("req")
        .args(ec)
        .args(["-keyout", &p("key.pem"), "-out", &p("leaf.csr")])
        .args([
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ]));
    sh(Command::new("openssl")
        .args(["x509", "-req", "-in", &p("leaf.csr"), "-CA", &p("ca.pem")])
        .args([
            "-CAkey",
            &p("ca.key"),
            "-CAcreateserial",
            "-copy_extensions",
            "copy",
        ])
        .args(["-days", "1", "-out", &p("cert.pem")]));
}

pub(crate) fn tls_config(ca: &Path) -> Arc<rustls::ClientConfig> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    )
}

#[allow(unused_imports)]
pub(crate) use granary_testkit::postfix::{Postfix, wait_gone};

/// One wrk run pinned to CPU 0 (1 thread, 64 connections, `secs`
/// seconds) with `headers`: requests/s, p50 and p99 in ms. Non-2xx
/// answers or socket errors panic when `strict`, and are reported
/// otherwise.
pub(crate) fn wrk(url: &str, headers: &[String], secs: u32, strict: bool) -> (f64, f64, f64) {
    let mut cmd = Command::new("taskset");
    cmd.args([
        "-c",
        "0",
        "wrk",
        "-t1",
        "-c64",
        &format!("-d{secs}s"),
        "--latency",
    ]);
    for h in headers {
        cmd.arg("-H").arg(h);
    }
    let out = cmd.arg(url).output().expect("wrk");
    let text = String::from_utf8_lossy(&out.stdout);
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("wrk said:\n{text}"));
    let ms = |p: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(p))
            .map(|v| {
                let v = v.trim();
                let (num, unit) =
                    v.split_at(v.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(v.len()));
                let n: f64 = num.parse().unwrap_or(f64::NAN);
                match unit {
                    "us" => n / 1000.0,
                    "s" => n * 1000.0,
                    _ => n,
                }
            })
            .unwrap_or(f64::NAN)
    };
    if let Some(e) = text
        .lines()
        .find(|l| l.contains("Non-2xx") || l.contains("Socket errors"))
    {
        match strict {
            true => panic!("wrk {url}: {}", e.trim()),
            false => eprintln!("  wrk {url}: {}", e.trim()),
        }
    }
    (rps, ms("50%"), ms("99%"))
}

/// Writes `bytes` of incompressible data to `path`.
pub(crate) fn fill(path: &std::path::Path, bytes: u64) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut block = vec![0u8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        for chunk in block.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
        let n = left.min(block.len() as u64) as usize;
        std::io::Write::write_all(&mut f, &block[..n]).unwrap();
        left -= n as u64;
    }
    f.into_inner().unwrap().sync_all().unwrap();
}
