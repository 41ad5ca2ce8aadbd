//! `Grains`: list, start, stop, status, logs and a diagnostic connection;
//! and removing grains for good when their user or app goes.

use std::rc::Rc;

use capnp::capability::Rc as CapRc;
use granary_grains::{AuthMethod, GrainId, GrainStatus, Identity, Peer, Start};
use granary_schema::admin_capnp::{self, grains};

use super::{Ctx, grain_failure, grain_ref};

pub(super) struct GrainsAdmin(pub(super) Rc<Ctx>);

pub(super) fn fill_status(mut out: admin_capnp::grain_status::Builder<'_>, s: &GrainStatus) {
    out.set_id(&s.id);
    out.set_user(&s.user);
    out.set_kind(&s.kind);
    out.set_host_uid(s.host_uid);
    out.set_state(&s.state);
    out.set_reason(s.reason.as_deref().unwrap_or(""));
    out.set_pid(s.pid.unwrap_or(0));
    out.set_starts(s.starts);
    out.set_crashes(s.crashes);
    out.set_last_exit(s.last_exit.as_deref().unwrap_or(""));
    out.set_running_seconds(s.running_seconds.unwrap_or(0));
    out.set_connections(s.connections as u32);
    out.set_calls_in_flight(s.calls_in_flight as u32);
    out.set_oom_kills(s.oom_kills);
    out.set_memory_limit(s.memory_limit.unwrap_or(0));
    let mut locks = out.init_wake_locks(s.wake_locks.len() as u32);
    for (i, why) in s.wake_locks.iter().enumerate() {
        locks.set(i as u32, why);
    }
}

/// Stops and destroys grains (`purge`), or refuses when any holds data.
/// `what` names the owner for the message ("user alice", "app git").
pub(super) async fn remove_grains(
    ctx: &Ctx,
    grains: Vec<granary_state::Grain>,
    purge: bool,
    what: &str,
) -> anyhow::Result<()> {
    if !purge {
        let with_data: Vec<String> = grains
            .iter()
            .filter(|g| ctx.datasets.has_data(&g.id).unwrap_or(true))
            .map(|g| format!("{}/{}", g.user, g.kind))
            .collect();
        anyhow::ensure!(
            with_data.is_empty(),
            "{what} has grains holding data ({}); add --purge to remove them (their final state is kept: a snapshot on zfs and btrfs, a moved copy in grains/.retired on plain)",
            with_data.join(", "),
        );
    }
    for g in grains {
        let id = GrainId::parse(&g.id)?;
        // Held first, so nothing restarts it while it goes; its grants'
        // live capabilities are cut.
        ctx.grains.hold(&id, "being removed").await?;
        // A final snapshot is kept where the backend has snapshots; the
        // data goes before the record, so a failure leaves an empty grain,
        // never a record-less dataset.
        let datasets = ctx.datasets.clone();
        let name = g.id.clone();
        let label = granary_datasets::timed_label("final");
        let retired = tokio::task::spawn_blocking(move || datasets.retire(&name, &label)).await?;
        match retired {
            Ok(Some(kept)) => {
                tracing::info!(grain = %g.id, snapshot = %kept, "final snapshot kept")
            }
            Ok(None) => {}
            Err(e) => {
                ctx.grains.release(&id).await?;
                anyhow::bail!("removing the data of {} failed: {e}", id.shown())
            }
        }
        let (s, actor) = (ctx.store.clone(), ctx.actor);
        let name = g.id.clone();
        tokio::task::spawn_blocking(move || s.delete_grain(&name, actor)).await??;
        // A grain made later under the same id starts with the default.
        if let Some(quotas) = ctx.datasets.quotas() {
            quotas.put(&g.id, granary_datasets::Quota::Default);
        }
        ctx.grains.forget(&id).await?;
        // Nor placed, nor copied, in the cluster any more.
        if let Some(member) = &ctx.info.cluster
            && let Err(e) = member.coordinator.forget_grain(&g.id).await
        {
            tracing::warn!(grain = %g.id, error = %e, "cannot drop a removed grain's placement");
        }
        tracing::info!(grain = %g.id, "grain destroyed");
    }
    Ok(())
}

impl grains::Server for GrainsAdmin {
    async fn list(
        self: CapRc<Self>,
        _: grains::ListParams,
        mut results: grains::ListResults,
    ) -> Result<(), capnp::Error> {
        let grains = self.0.grains.list().await.map_err(grain_failure)?;
        // The storage's own account of each dataset, in one look (ZFS).
        let datasets = self.0.datasets.clone();
        let spaces = tokio::task::spawn_blocking(move || datasets.spaces().unwrap_or_default())
            .await
            .unwrap_or_default();
        let mut list = results.get().init_grains(grains.len() as u32);
        for (i, g) in grains.iter().enumerate() {
            let mut out = list.reborrow().get(i as u32);
            if let Some(space) = spaces.get(&g.id) {
                out.set_dataset_bytes(space.used);
                out.set_quota_bytes(space.quota.unwrap_or(0));
            }
            fill_status(out, g);
        }
        Ok(())
    }

    async fn start(
        self: CapRc<Self>,
        params: grains::StartParams,
        mut results: grains::StartResults,
    ) -> Result<(), capnp::Error> {
        let id = grain_ref(params.get()?.get_grain()?)?;
        let grains = &self.0.grains;
        grains
            .start(&id, Start::Running)
            .await
            .map_err(grain_failure)?;
        let status = grains.status(&id).await.map_err(grain_failure)?;
        fill_status(results.get().init_status(), &status);
        Ok(())
    }

    async fn stop(
        self: CapRc<Self>,
        params: grains::StopParams,
        mut results: grains::StopResults,
    ) -> Result<(), capnp::Error> {
        let id = grain_ref(params.get()?.get_grain()?)?;
        let was = self.0.grains.stop(&id).await.map_err(grain_failure)?;
        results.get().set_was_running(was);
        Ok(())
    }

    async fn status(
        self: CapRc<Self>,
        params: grains::StatusParams,
        mut results: grains::StatusResults,
    ) -> Result<(), capnp::Error> {
        let id = grain_ref(params.get()?.get_grain()?)?;
        let status = self.0.grains.status(&id).await.map_err(grain_failure)?;
        fill_status(results.get().init_status(), &status);
        Ok(())
    }

    async fn logs(
        self: CapRc<Self>,
        params: grains::LogsParams,
        mut results: grains::LogsResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let id = grain_ref(p.get_grain()?)?;
        let max = p.get_max_bytes().min(4 << 20);
        let log = self.0.grains.logs(&id, max).await.map_err(grain_failure)?;
        results.get().set_log(&log);
        Ok(())
    }

    async fn connect(
        self: CapRc<Self>,
        params: grains::ConnectParams,
        mut results: grains::ConnectResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let id = grain_ref(p.get_grain()?)?;
        let service = p.get_service()?.to_str()?.to_owned();
        let client = p.get_client()?;
        let user = match p.get_user()?.to_str()? {
            "" => id.user().to_owned(),
            u => u.to_owned(),
        };
        let conn = self
            .0
            .grains
            .connect(
                &id,
                &service,
                Identity::new(&user, AuthMethod::Admin, 0),
                Peer::new("admin socket", "admin"),
            )
            .await
            .map_err(grain_failure)?;
        let broken = |e: std::io::Error| super::fail(format!("the grain connection: {e}"));
        conn.stream.set_nonblocking(true).map_err(broken)?;
        let keep = conn.keep;
        let stream = tokio::net::UnixStream::from_std(conn.stream).map_err(broken)?;
        let (read, write) = stream.into_split();
        tokio::task::spawn_local(async move {
            if let Err(e) = granary_handoff::pump_to(read, client).await {
                tracing::debug!(error = %e, "grain connection ended");
            }
            drop(keep);
        });
        let upstream: granary_schema::stream_capnp::byte_stream::Client =
            capnp_rpc::new_client(granary_handoff::ByteStreamWriter::new(write));
        results.get().set_upstream(upstream);
        Ok(())
    }

    async fn move_(
        self: CapRc<Self>,
        params: grains::MoveParams,
        mut results: grains::MoveResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let grain = grain_ref(p.get_grain()?)?.to_string();
        let to = p.get_to()?.to_str()?.to_owned();
        let job = granary_cluster::moves::Job::Move { grain, to };
        let report = run_job(&self.0, job, p.get_progress().ok()).await?;
        results.get().set_report_json(report);
        Ok(())
    }

    async fn drain(
        self: CapRc<Self>,
        params: grains::DrainParams,
        mut results: grains::DrainResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let node = p.get_node()?.to_str()?.to_owned();
        let job = granary_cluster::moves::Job::Drain { node };
        let report = run_job(&self.0, job, p.get_progress().ok()).await?;
        results.get().set_report_json(report);
        Ok(())
    }

    async fn set_quota(
        self: CapRc<Self>,
        params: grains::SetQuotaParams,
        _: grains::SetQuotaResults,
    ) -> Result<(), capnp::Error> {
        use granary_datasets::Quota;
        let p = params.get()?;
        let id = grain_ref(p.get_grain()?)?.to_string();
        let (quota, stored) = match (p.get_bytes(), p.get_unlimited()) {
            (_, true) => (Quota::Unlimited, Some(0)),
            (0, false) => (Quota::Default, None),
            (b, false) if b >= i64::MAX as u64 => {
                return Err(super::fail("that quota is larger than any disk"));
            }
            (b, false) if b < 1 << 20 => {
                return Err(super::fail(
                    "a quota under 1 MiB leaves the grain no room: give at least 1M",
                ));
            }
            (b, false) => (Quota::Bytes(b), Some(b)),
        };
        let actor = self.0.actor;
        let (datasets, store) = (self.0.datasets.clone(), self.0.store.clone());
        super::blocking(move || {
            if store.grain(&id).map_err(super::state_failure)?.is_none() {
                return Err(super::fail(format!("no grain {id}")));
            }
            let before = datasets.quotas().map_or(Quota::Default, |q| q.get(&id));
            // The dataset here first: it refuses a limit below its data,
            // and then nothing has changed.
            datasets.set_quota(&id, quota).map_err(super::fail)?;
            if let Err(e) = store.set_grain_quota(&id, stored, actor) {
                let _ = datasets.set_quota(&id, before);
                return Err(super::state_failure(e));
            }
            Ok(())
        })
        .await
    }
}

/// Runs a move or a drain (`daemon::moves::run`), its progress passed to
/// the CLI; the report, as JSON.
async fn run_job(
    ctx: &Ctx,
    job: granary_cluster::moves::Job,
    progress: Option<granary_schema::admin_capnp::progress::Client>,
) -> Result<String, capnp::Error> {
    let Some(member) = ctx.info.cluster.clone() else {
        return Err(super::fail(
            "this node is not in a cluster: grains move between the nodes of one",
        ));
    };
    let source = crate::daemon::moves::Source {
        member,
        grains: ctx.local_grains.clone(),
        datasets: ctx.datasets.clone(),
        records: std::sync::Arc::new(crate::daemon::ledger::NodeRecords {
            store: ctx.store.clone(),
            apps_dir: ctx.apps_dir.clone(),
        }),
    };
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    // In a task of its own: a CLI that goes away does not cut a move off
    // between its switch and its start.
    let work = tokio::task::spawn_local(crate::daemon::moves::run(source, job, tx, None));
    crate::daemon::backups::pump(rx, work, progress)
        .await
        .map_err(super::fail)?
        .map_err(super::fail)
}
