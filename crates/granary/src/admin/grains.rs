//! `granary grain`: the CLI side, with `grain connect` bridging standard
//! input and output to a grain's service.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use granary_config::Config;
use granary_schema::admin_capnp::{self, admin};
use serde::Serialize;

use super::client::print_json;
use super::connection::{remote, text, texts, with_admin};
use super::{shown, table};
use granary_schema::stream_capnp::byte_stream;

use crate::cli::GrainCommand;

#[derive(Debug, Serialize)]
struct GrainView {
    id: String,
    user: String,
    kind: String,
    host_uid: u32,
    state: String,
    reason: Option<String>,
    pid: Option<u32>,
    starts: u64,
    crashes: u64,
    last_exit: Option<String>,
    running_seconds: Option<u64>,
    connections: u32,
    calls_in_flight: u32,
    wake_locks: Vec<String>,
    /// Times a process in it was killed at its memory limit.
    oom_kills: u64,
    memory_limit_mib: Option<u64>,
}

fn non_empty(s: String) -> Option<String> {
    Some(s).filter(|s| !s.is_empty())
}

fn grain_view(g: admin_capnp::grain_status::Reader<'_>) -> anyhow::Result<GrainView> {
    let running = g.get_pid() != 0;
    Ok(GrainView {
        id: text(g.get_id())?,
        user: text(g.get_user())?,
        kind: text(g.get_kind())?,
        host_uid: g.get_host_uid(),
        state: text(g.get_state())?,
        reason: non_empty(text(g.get_reason())?),
        pid: Some(g.get_pid()).filter(|p| *p != 0),
        starts: g.get_starts(),
        crashes: g.get_crashes(),
        last_exit: non_empty(text(g.get_last_exit())?),
        running_seconds: running.then_some(g.get_running_seconds()),
        connections: g.get_connections(),
        calls_in_flight: g.get_calls_in_flight(),
        wake_locks: texts(g.get_wake_locks())?,
        oom_kills: g.get_oom_kills(),
        memory_limit_mib: Some(g.get_memory_limit() >> 20).filter(|m| *m != 0),
    })
}

fn print_status(g: &GrainView) {
    println!("{} ({})", shown(&g.id), g.id);
    println!("  state        {}", g.state);
    if let Some(r) = &g.reason {
        println!("  reason       {r}");
    }
    if let Some(pid) = g.pid {
        println!("  pid          {pid} (launcher)");
    }
    println!("  host uid     {}", g.host_uid);
    if let Some(s) = g.running_seconds {
        println!("  running for  {s} s");
    }
    println!("  starts       {}", g.starts);
    println!("  crashes      {}", g.crashes);
    if let Some(e) = &g.last_exit {
        println!("  last exit    {e}");
    }
    match (g.memory_limit_mib, g.oom_kills) {
        (Some(limit), 0) => println!("  memory       limit {limit} MiB"),
        (Some(limit), n) => println!(
            "  memory       limit {limit} MiB: HIT {n} time(s); the kernel killed a process in it each time (see `granary grain logs`)"
        ),
        (None, 0) => {}
        (None, n) => println!("  memory       limit hit {n} time(s)"),
    }
    println!("  connections  {}", g.connections);
    println!("  calls        {} in flight", g.calls_in_flight);
    if g.wake_locks.is_empty() {
        println!("  wake locks   none");
    } else {
        println!("  wake locks   {}", g.wake_locks.join("; "));
    }
}

pub(crate) fn grain(config: &Config, cmd: &GrainCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        GrainCommand::List { output } => {
            let grains = with_admin(config, |admin: admin::Client| async move {
                let response = super::grains(&admin)
                    .list_request()
                    .send()
                    .promise
                    .await
                    .map_err(remote)?;
                let list = response
                    .get()
                    .map_err(remote)?
                    .get_grains()
                    .map_err(remote)?;
                list.iter()
                    .map(grain_view)
                    .collect::<anyhow::Result<Vec<_>>>()
            })?;
            if output.json {
                print_json(&grains)?;
            } else {
                let rows: Vec<Vec<String>> = grains
                    .iter()
                    .map(|g| {
                        vec![
                            shown(&g.id),
                            g.state.clone(),
                            g.pid.map_or_else(|| "-".to_owned(), |p| p.to_string()),
                            g.host_uid.to_string(),
                            g.starts.to_string(),
                            g.crashes.to_string(),
                            g.reason.clone().unwrap_or_default(),
                        ]
                    })
                    .collect();
                table::print(
                    &[
                        "GRAIN", "STATE", "PID", "HOST UID", "STARTS", "CRASHES", "NOTE",
                    ],
                    &rows,
                );
            }
        }
        GrainCommand::Start { grain } => {
            let g = with_admin(config, |admin: admin::Client| async move {
                let mut req = super::grains(&admin).start_request();
                req.get().set_grain(grain.as_str());
                let response = req.send().promise.await.map_err(remote)?;
                grain_view(
                    response
                        .get()
                        .map_err(remote)?
                        .get_status()
                        .map_err(remote)?,
                )
            })?;
            println!("{} is {}", shown(&g.id), g.state);
        }
        GrainCommand::Quota { grain, size } => {
            let quota = parse_quota(size)?;
            with_admin(config, |admin: admin::Client| async move {
                let mut req = super::grains(&admin).set_quota_request();
                req.get().set_grain(grain.as_str());
                match quota {
                    Some(Some(b)) => req.get().set_bytes(b),
                    Some(None) => req.get().set_unlimited(true),
                    None => {}
                }
                req.send().promise.await.map_err(remote)?;
                Ok(())
            })?;
            match quota {
                Some(Some(b)) => println!("{grain}: quota {} MiB", b >> 20),
                Some(None) => println!("{grain}: no quota"),
                None => println!("{grain}: the default quota (storage.quota_mib)"),
            }
        }
        GrainCommand::Stop { grain } => {
            let was = with_admin(config, |admin: admin::Client| async move {
                let mut req = super::grains(&admin).stop_request();
                req.get().set_grain(grain.as_str());
                let response = req.send().promise.await.map_err(remote)?;
                Ok(response.get().map_err(remote)?.get_was_running())
            })?;
            if was {
                println!("stopped {grain}");
            } else {
                println!("{grain} was not running");
            }
        }
        GrainCommand::Status { grain, output } => {
            let g = with_admin(config, |admin: admin::Client| async move {
                let mut req = super::grains(&admin).status_request();
                req.get().set_grain(grain.as_str());
                let response = req.send().promise.await.map_err(remote)?;
                grain_view(
                    response
                        .get()
                        .map_err(remote)?
                        .get_status()
                        .map_err(remote)?,
                )
            })?;
            if output.json {
                print_json(&g)?;
            } else {
                print_status(&g);
            }
        }
        GrainCommand::Logs { grain, bytes } => {
            let log = with_admin(config, |admin: admin::Client| async move {
                let mut req = super::grains(&admin).logs_request();
                req.get().set_grain(grain.as_str());
                req.get().set_max_bytes(*bytes);
                let response = req.send().promise.await.map_err(remote)?;
                Ok(response
                    .get()
                    .map_err(remote)?
                    .get_log()
                    .map_err(remote)?
                    .to_vec())
            })?;
            std::io::stdout().write_all(&log)?;
        }
        GrainCommand::Connect {
            grain,
            service,
            user,
        } => connect(config, grain, service, user.as_deref())?,
        GrainCommand::Move { grain, to, output } => {
            let json = output.json;
            let report = with_admin(config, |admin: admin::Client| async move {
                let mut req = super::grains(&admin).move_request();
                req.get().set_grain(grain.as_str());
                req.get().set_to(to.as_str());
                req.get().set_progress(super::backup::printer(json));
                let response = req.send().promise.await.map_err(remote)?;
                text(response.get().map_err(remote)?.get_report_json())
            })?;
            let r: serde_json::Value = serde_json::from_str(&report)?;
            if json {
                print_json(&r)?;
            } else {
                let mib = |v: &serde_json::Value| v.as_u64().unwrap_or(0) as f64 / 1048576.0;
                let copied: f64 = r["rounds"]
                    .as_array()
                    .map_or(0.0, |a| a.iter().map(mib).sum());
                println!(
                    "{} moved from node {} to node {} (epoch {}): {:.1} MiB copied while it ran, {:.1} MiB while stopped, {} ms down",
                    r["grain"].as_str().unwrap_or(""),
                    r["from"].as_str().unwrap_or(""),
                    r["to"].as_str().unwrap_or(""),
                    r["epoch"],
                    copied,
                    mib(&r["final_bytes"]),
                    r["downtime_ms"],
                );
                if let Some(kept) = r["fenced_as"].as_str() {
                    println!("this node's copy is kept, fenced, at {kept}");
                }
                if let Some(w) = r["warning"].as_str() {
                    eprintln!("warning: {w}");
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// What the grain sends, to standard output; says when the grain ended it.
struct Stdout {
    ended: std::cell::RefCell<Option<tokio::sync::oneshot::Sender<()>>>,
}

impl byte_stream::Server for Stdout {
    async fn write(
        self: capnp::capability::Rc<Self>,
        params: byte_stream::WriteParams,
        _: byte_stream::WriteResults,
    ) -> Result<(), capnp::Error> {
        let bytes = params.get()?.get_bytes()?;
        let mut out = std::io::stdout().lock();
        out.write_all(bytes)
            .and_then(|()| out.flush())
            .map_err(|e| capnp::Error::failed(format!("standard output: {e}")))
    }

    async fn end(
        self: capnp::capability::Rc<Self>,
        _: byte_stream::EndParams,
        _: byte_stream::EndResults,
    ) -> Result<(), capnp::Error> {
        if let Some(tx) = self.ended.borrow_mut().take() {
            let _ = tx.send(());
        }
        Ok(())
    }
}

fn connect(config: &Config, grain: &str, service: &str, user: Option<&str>) -> anyhow::Result<()> {
    with_admin(config, |admin: admin::Client| async move {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let stdout: byte_stream::Client = capnp_rpc::new_client(Stdout {
            ended: std::cell::RefCell::new(Some(tx)),
        });
        let mut req = super::grains(&admin).connect_request();
        req.get().set_grain(grain);
        req.get().set_service(service);
        req.get().set_user(user.unwrap_or(""));
        req.get().set_client(stdout);
        let response = req.send().promise.await.map_err(remote)?;
        let upstream = response
            .get()
            .map_err(remote)?
            .get_upstream()
            .map_err(remote)?;
        // Standard input to the grain until it ends; the grain's answer to
        // standard output until the grain closes its side.
        let sending = granary_handoff::pump_to(tokio::io::stdin(), upstream);
        let (sent, ended) = futures::join!(sending, rx);
        sent.map_err(remote)?;
        ended.context("the daemon dropped the connection")?;
        Ok(())
    })
}

/// "2G", "512M", "1.5G": `Some(Some(bytes))` (powers of 1024); "none":
/// `Some(None)`; "default": `None`.
pub(crate) fn parse_quota(text: &str) -> anyhow::Result<Option<Option<u64>>> {
    let t = text.trim();
    if t.eq_ignore_ascii_case("none") {
        return Ok(Some(None));
    }
    if t.eq_ignore_ascii_case("default") {
        return Ok(None);
    }
    let bad = || anyhow::anyhow!("{text:?} is not a size: write e.g. 512M, 2G, none or default");
    let (number, unit) = t.split_at(t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len()));
    let shift = match unit
        .to_ascii_uppercase()
        .trim_end_matches("IB")
        .trim_end_matches('B')
    {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(bad()),
    };
    let n: f64 = number.trim().parse().map_err(|_| bad())?;
    let bytes = n * (1u64 << shift) as f64;
    if !(n.is_finite() && bytes >= 1.0 && bytes < i64::MAX as f64) {
        return Err(bad());
    }
    Ok(Some(Some(bytes as u64)))
}

#[cfg(test)]
mod quota_tests {
    use super::parse_quota;

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(parse_quota("2G").unwrap(), Some(Some(2 << 30)));
        assert_eq!(parse_quota("512MiB").unwrap(), Some(Some(512 << 20)));
        assert_eq!(parse_quota("1.5g").unwrap(), Some(Some(3 << 29)));
        assert_eq!(parse_quota("none").unwrap(), Some(None));
        assert_eq!(parse_quota("Default").unwrap(), None);
        for bad in ["-1G", "lots", "", "2X", "0", "0.5", "1e30G"] {
            assert!(parse_quota(bad).is_err(), "{bad}");
        }
    }
}
