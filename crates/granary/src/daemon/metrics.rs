//! `/metrics` in the Prometheus text format (0.0.4), on the `metrics`
//! listener only (loopback by default: it is for the admin's Prometheus,
//! never the public HTTPS listener, where `/metrics` is an ordinary 404).
//! Plain HTTP/1.1, `GET /metrics` and nothing else.

use std::convert::Infallible;
use std::fmt::Write;
use std::future::Future;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// What the metrics are read from.
pub(crate) struct Metrics {
    pub(crate) shared: Arc<granary_gateway::Shared>,
    pub(crate) datasets: Arc<dyn granary_datasets::Datasets>,
    pub(crate) store: Arc<granary_state::Store>,
    /// `snapshots.interval`, for the alert on stale snapshots.
    pub(crate) snapshot_interval: Option<std::time::Duration>,
    /// The server certificate's file (the local CA's or the admin's).
    pub(crate) certificate: std::path::PathBuf,
    /// `DATA_DIR/tls`, whose `domains/<name>/cert.pem` are served too.
    pub(crate) tls_dir: std::path::PathBuf,
    /// This node's place in a cluster (replication lag); `None` alone.
    pub(crate) member: Option<Arc<super::cluster::Member>>,
}

/// Serves `/metrics` on `listener` until `shutdown`.
pub(crate) async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let (tcp, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let metrics = metrics.clone();
                async move { Ok::<_, Infallible>(answer(&metrics, &req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(tcp), service);
            let _ = tokio::time::timeout(std::time::Duration::from_secs(60), conn).await;
        });
    }
}

async fn answer(m: &Metrics, req: &Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let (status, kind, body) = if req.method() != Method::GET {
        (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET /metrics\n".to_owned(),
        )
    } else if req.uri().path() != "/metrics" {
        (
            StatusCode::NOT_FOUND,
            "text/plain",
            "Metrics are at /metrics.\n".to_owned(),
        )
    } else {
        (
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            render(m).await,
        )
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, header::HeaderValue::from_static(kind));
    r
}

/// A label value, escaped as the text format wants.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Every metric, as text.
pub(crate) async fn render(m: &Metrics) -> String {
    let mut out = String::new();
    family(
        &mut out,
        "granary_build_info",
        "gauge",
        "Granary's version.",
    );
    let _ = writeln!(
        out,
        "granary_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
    grains(m, &mut out).await;
    spools(m, &mut out);
    let (failures, refusals) = m.shared.limiter.totals();
    family(
        &mut out,
        "granary_login_failures_total",
        "counter",
        "Failed logins, every protocol.",
    );
    let _ = writeln!(out, "granary_login_failures_total {failures}");
    family(
        &mut out,
        "granary_login_refusals_total",
        "counter",
        "Logins refused unchecked because their source failed too often.",
    );
    let _ = writeln!(out, "granary_login_refusals_total {refusals}");
    family(
        &mut out,
        "granary_login_sources_refused",
        "gauge",
        "Addresses and ranges refused now.",
    );
    let _ = writeln!(
        out,
        "granary_login_sources_refused {}",
        m.shared.limiter.refused_count()
    );
    m.shared.stats.render(&mut out);
    certificates(m, &mut out).await;
    if let Some(acme) = &m.shared.acme {
        acme_orders(acme, &mut out);
    }
    if let Some(member) = &m.member
        && member.replicas > 0
    {
        family(
            &mut out,
            "granary_grain_replication_lag_seconds",
            "gauge",
            "Seconds since the newest copy on another node of each grain this node runs.",
        );
        for (grain, lag) in super::cluster::replication_lags(member, &m.datasets).await {
            let _ = writeln!(
                out,
                "granary_grain_replication_lag_seconds{{grain=\"{}\"}} {lag}",
                label(&grain)
            );
        }
    }
    if let Some(i) = m.snapshot_interval {
        family(
            &mut out,
            "granary_snapshot_interval_seconds",
            "gauge",
            "How often grains are snapshotted (snapshots.interval).",
        );
        let _ = writeln!(out, "granary_snapshot_interval_seconds {}", i.as_secs());
    }
    out
}

/// One counter of a grain's status.
type Count = fn(&granary_grains::GrainStatus) -> u64;

async fn grains(m: &Metrics, out: &mut String) {
    let list = match m.shared.grains.list().await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "metrics: cannot list grains");
            Vec::new()
        }
    };
    let (datasets, store) = (m.datasets.clone(), m.store.clone());
    let ids: Vec<String> = list.iter().map(|g| g.id.clone()).collect();
    // Snapshot and backup times come from the disk and the state.
    let times = tokio::task::spawn_blocking(move || {
        let backups = store.last_backups().unwrap_or_default();
        let spaces = datasets.spaces().unwrap_or_default();
        ids.iter()
            .map(|id| {
                let snap = datasets
                    .list_snapshots(id)
                    .ok()
                    .and_then(|s| s.iter().map(|s| s.created).filter(|t| *t > 0).max());
                // Older than the newest exports read at once: asked alone.
                let backup = match backups.get(id) {
                    Some(t) => Some(*t),
                    None => store.last_backup(id).ok().flatten(),
                };
                (snap, backup, spaces.get(id).copied())
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    let now = crate::daemon::unix_now();
    family(
        out,
        "granary_grain_state",
        "gauge",
        "1 for each grain's current state (stopped, starting, running, stopping, backoff, held).",
    );
    for g in &list {
        let _ = writeln!(
            out,
            "granary_grain_state{{grain=\"{}\",user=\"{}\",kind=\"{}\",state=\"{}\"}} 1",
            label(&g.id),
            label(&g.user),
            label(&g.kind),
            label(&g.state)
        );
    }
    let counters: [(&str, &str, Count); 3] = [
        (
            "granary_grain_starts_total",
            "Starts since the daemon started.",
            |g| g.starts,
        ),
        (
            "granary_grain_crashes_total",
            "Exits that were not asked for, since the daemon started.",
            |g| g.crashes,
        ),
        (
            "granary_grain_oom_kills_total",
            "Processes killed at the grain's memory limit.",
            |g| g.oom_kills,
        ),
    ];
    for (name, help, value) in counters {
        family(out, name, "counter", help);
        for g in &list {
            let _ = writeln!(out, "{name}{{grain=\"{}\"}} {}", label(&g.id), value(g));
        }
    }
    family(
        out,
        "granary_grain_connections",
        "gauge",
        "Open connections to the grain.",
    );
    for g in &list {
        let _ = writeln!(
            out,
            "granary_grain_connections{{grain=\"{}\"}} {}",
            label(&g.id),
            g.connections
        );
    }
    family(
        out,
        "granary_grain_memory_limit_bytes",
        "gauge",
        "The grain's memory limit.",
    );
    for g in list.iter().filter(|g| g.memory_limit.is_some()) {
        let _ = writeln!(
            out,
            "granary_grain_memory_limit_bytes{{grain=\"{}\"}} {}",
            label(&g.id),
            g.memory_limit.unwrap_or(0)
        );
    }
    family(
        out,
        "granary_grain_memory_bytes",
        "gauge",
        "Memory a running grain uses now (its cgroup's, page cache included).",
    );
    for g in &list {
        if let Some(b) = g.memory_bytes {
            let _ = writeln!(
                out,
                "granary_grain_memory_bytes{{grain=\"{}\"}} {b}",
                label(&g.id)
            );
        }
    }
    family(
        out,
        "granary_grain_cpu_seconds_total",
        "counter",
        "CPU time the grain's processes used (its cgroup's, across runs; resets when it is removed).",
    );
    for g in &list {
        if let Some(c) = g.cpu_seconds {
            let _ = writeln!(
                out,
                "granary_grain_cpu_seconds_total{{grain=\"{}\"}} {c:.3}",
                label(&g.id)
            );
        }
    }
    family(
        out,
        "granary_grain_dataset_bytes",
        "gauge",
        "Bytes the grain's dataset uses, where the storage accounts it (ZFS).",
    );
    for (g, (_, _, space)) in list.iter().zip(&times) {
        if let Some(s) = space {
            let _ = writeln!(
                out,
                "granary_grain_dataset_bytes{{grain=\"{}\"}} {}",
                label(&g.id),
                s.used
            );
        }
    }
    family(
        out,
        "granary_grain_dataset_quota_bytes",
        "gauge",
        "The grain's dataset quota, where it has one.",
    );
    for (g, (_, _, space)) in list.iter().zip(&times) {
        if let Some(q) = space.and_then(|s| s.quota) {
            let _ = writeln!(
                out,
                "granary_grain_dataset_quota_bytes{{grain=\"{}\"}} {q}",
                label(&g.id)
            );
        }
    }
    family(
        out,
        "granary_grain_snapshot_age_seconds",
        "gauge",
        "Age of the grain's newest local snapshot (absent: none).",
    );
    for (g, (snap, _, _)) in list.iter().zip(&times) {
        if let Some(t) = snap {
            let _ = writeln!(
                out,
                "granary_grain_snapshot_age_seconds{{grain=\"{}\"}} {}",
                label(&g.id),
                (now - t).max(0)
            );
        }
    }
    family(
        out,
        "granary_grain_last_backup_timestamp_seconds",
        "gauge",
        "When the grain was last exported whole by a backup on this node (absent: never).",
    );
    for (g, (_, backup, _)) in list.iter().zip(&times) {
        if let Some(t) = backup {
            let _ = writeln!(
                out,
                "granary_grain_last_backup_timestamp_seconds{{grain=\"{}\"}} {t}",
                label(&g.id)
            );
        }
    }
}

/// When each certificate served stops being valid: the server's, and
/// those of the domains under `tls/domains/`.
async fn certificates(m: &Metrics, out: &mut String) {
    let (server, domains) = (m.certificate.clone(), m.tls_dir.join("domains"));
    let found = tokio::task::spawn_blocking(move || {
        let mut files = vec![("server".to_owned(), server)];
        if let Ok(dir) = std::fs::read_dir(&domains) {
            for e in dir.flatten() {
                files.push((
                    e.file_name().to_string_lossy().into_owned(),
                    e.path().join("cert.pem"),
                ));
            }
        }
        files.sort();
        files
            .into_iter()
            .filter_map(|(name, path)| {
                use rustls::pki_types::pem::PemObject;
                let leaf = rustls::pki_types::CertificateDer::pem_file_iter(&path)
                    .ok()?
                    .next()?
                    .ok()?;
                Some((name, granary_wire::x509::not_after(&leaf)?))
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    family(
        out,
        "granary_certificate_expiry_timestamp_seconds",
        "gauge",
        "When each certificate served stops being valid (its notAfter).",
    );
    for (name, t) in found {
        let _ = writeln!(
            out,
            "granary_certificate_expiry_timestamp_seconds{{certificate=\"{}\"}} {t}",
            label(&name)
        );
    }
}

fn spools(m: &Metrics, out: &mut String) {
    let Some(mx) = &m.shared.mx else { return };
    let now = crate::daemon::unix_now();
    let queues = [
        ("inbound", mx.spool.list()),
        ("outbound", mx.outbound.list()),
    ];
    family(
        out,
        "granary_mail_queue_messages",
        "gauge",
        "Messages waiting in the inbound spool and the outbound queue.",
    );
    for (q, list) in &queues {
        let _ = writeln!(
            out,
            "granary_mail_queue_messages{{queue=\"{q}\"}} {}",
            list.len()
        );
    }
    family(
        out,
        "granary_mail_queue_oldest_seconds",
        "gauge",
        "Age of the oldest waiting message (0: none).",
    );
    for (q, list) in &queues {
        let oldest = list
            .iter()
            .map(|e| e.received_at)
            .min()
            .map_or(0, |t| (now - t).max(0));
        let _ = writeln!(
            out,
            "granary_mail_queue_oldest_seconds{{queue=\"{q}\"}} {oldest}"
        );
    }
}

/// ACME orders by outcome, and the failures in a row now.
fn acme_orders(acme: &granary_gateway::acme::Acme, out: &mut String) {
    use std::sync::atomic::Ordering::Relaxed;
    family(
        out,
        "granary_acme_orders_total",
        "counter",
        "Certificate orders to the ACME CA since the start, by outcome.",
    );
    let (issued, failed) = (acme.issued.load(Relaxed), acme.failed.load(Relaxed));
    let _ = writeln!(
        out,
        "granary_acme_orders_total{{outcome=\"issued\"}} {issued}"
    );
    let _ = writeln!(
        out,
        "granary_acme_orders_total{{outcome=\"failed\"}} {failed}"
    );
    family(
        out,
        "granary_acme_failures",
        "gauge",
        "Certificate orders that failed in a row (0 after a success).",
    );
    let failures = acme.status().map_or(0, |s| s.failures);
    let _ = writeln!(out, "granary_acme_failures {failures}");
}

#[cfg(test)]
mod tests {
    #[test]
    fn labels_are_escaped() {
        assert_eq!(super::label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
