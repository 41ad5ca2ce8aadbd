//! Exports: one consistent snapshot per grain, streamed incrementally
//! from the target's last one.

use std::collections::HashSet;

use granary_backup::catalogue::GrainEntry;
use granary_backup::crypt;
use granary_backup::export::{Exporter, StreamReport};
use granary_datasets::Datasets;
use granary_grains::GrainId;
use granary_schema::admin_capnp::progress;
use tokio::sync::mpsc;

use super::{ACTOR, Backups, GrainExport, Place, ProgressTx, msg};

impl Backups {
    /// Exports the selected grains to `place`; one grain failing does not
    /// stop the others.
    pub(crate) async fn export(
        &self,
        place: Place,
        user: Option<String>,
        grain: Option<GrainId>,
        progress: Option<progress::Client>,
    ) -> Result<Vec<GrainExport>, String> {
        let _busy = self.busy.lock().await;
        let recipients = crypt::Recipients::parse(&self.config.recipients).map_err(msg)?;
        let grains = self.metadata(user, grain).await?;
        let key = self.key().map_err(msg)?;
        let (config, datasets) = (self.config.clone(), self.datasets.clone());
        let grains_api = self.grains.clone();
        let runtime = tokio::runtime::Handle::current();
        let (tx, rx) = mpsc::channel(16);
        let work = tokio::task::spawn_blocking(move || -> Result<Vec<GrainExport>, String> {
            let snapshot = |grain: &str, label: &str| -> Result<(), String> {
                let id = GrainId::parse(grain).map_err(msg)?;
                runtime
                    .block_on(grains_api.snapshot(&id, label))
                    .map(drop)
                    .map_err(msg)
            };
            let (mut target, place_name) = Self::open(&place, &config, &key).map_err(msg)?;
            let tag = granary_backup::hold_tag(&place_name);
            let mut exporter = Exporter::open(
                target.as_mut(),
                &key,
                &recipients,
                config.chunk_bytes as usize,
            )
            .map_err(msg)?;
            let mut results = Vec::new();
            for (id, meta) in grains {
                let r = export_one(
                    &mut exporter,
                    &id,
                    meta,
                    datasets.as_ref(),
                    &tag,
                    &snapshot,
                    &tx,
                );
                if let Err(e) = &r {
                    tracing::warn!(grain = %id, error = %e, "backup export failed");
                }
                results.push(GrainExport {
                    grain: id,
                    error: r.as_ref().err().cloned(),
                    stream: r.ok(),
                });
            }
            Ok(results)
        });
        let results = super::pump(rx, work, progress).await??;
        let (store, detail) = (
            self.store.clone(),
            results
                .iter()
                .map(|r| {
                    format!(
                        "{}={}",
                        r.grain,
                        if r.error.is_some() { "failed" } else { "ok" }
                    )
                })
                .collect::<Vec<_>>()
                .join(" "),
        );
        let _ = tokio::task::spawn_blocking(move || {
            store.record_event(ACTOR, "backup.export", "-", &detail)
        })
        .await;
        Ok(results)
    }
}

/// One grain's export: resume its unfinished stream if the target has one
/// (and the snapshot is still here), else a new consistent snapshot,
/// incremental from the target's last one if this node still has it.
fn export_one(
    exporter: &mut Exporter<'_>,
    id: &str,
    meta: GrainEntry,
    datasets: &dyn Datasets,
    tag: &str,
    snapshot_grain: &dyn Fn(&str, &str) -> Result<(), String>,
    tx: &ProgressTx,
) -> Result<StreamReport, String> {
    let here: HashSet<String> = datasets
        .list_snapshots(id)
        .map_err(msg)?
        .into_iter()
        .map(|s| s.name)
        .collect();
    let pending = exporter
        .pending(id)
        .map_err(msg)?
        .filter(|p| here.contains(&p.snapshot) && p.base.as_ref().is_none_or(|b| here.contains(b)));
    let (snapshot, base) = match pending {
        Some(p) => {
            tracing::info!(grain = id, snapshot = %p.snapshot, chunks = p.chunks, "resuming a cut-off export");
            (p.snapshot, p.base)
        }
        None => {
            // The tag's digits keep two targets' snapshots in one second apart.
            let stem = format!(
                "{}-{}",
                granary_datasets::timed_label("backup"),
                &tag[tag.len() - 6..]
            );
            // Two exports to one target within a second: number them.
            let label = std::iter::once(stem.clone())
                .chain((2..).map(|n| format!("{stem}-{n}")))
                .find(|l| !here.contains(l))
                .expect("an unused label");
            snapshot_grain(id, &label)?;
            let base = exporter.last_snapshot(id).filter(|b| here.contains(b));
            if base.is_none() && exporter.last_snapshot(id).is_some() {
                tracing::warn!(
                    grain = id,
                    "the last exported snapshot is gone from this node; exporting a full stream"
                );
            }
            (label, base)
        }
    };
    datasets.hold(id, &snapshot, tag).map_err(msg)?;
    let exported = exporter.export(id, meta, &snapshot, base.as_deref(), datasets, &mut |p| {
        let _ = tx.try_send(p.clone());
    });
    let report = match exported {
        Ok(r) => r,
        Err(e) => {
            // Kept only if the next export can resume from it; otherwise
            // every failed round would leave a held snapshot behind.
            let resumable = exporter
                .pending(id)
                .ok()
                .flatten()
                .is_some_and(|p| p.snapshot == snapshot);
            if !resumable {
                let _ = datasets.release(id, &snapshot, tag);
                let _ = datasets.delete_snapshot(id, &snapshot);
            }
            return Err(msg(e));
        }
    };
    // The new snapshot is the next base; the old one may go.
    if let Some(b) = &base {
        datasets.release(id, b, tag).map_err(msg)?;
        if b.starts_with("backup-")
            && let Err(e) = datasets.delete_snapshot(id, b)
        {
            tracing::debug!(grain = id, snapshot = %b, error = %e, "old backup base kept (another target holds it)");
        }
    }
    Ok(report)
}
