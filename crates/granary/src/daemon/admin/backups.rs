//! `Backups`: export, restore and drill, and this node's backup keys. The
//! work is `daemon::backups`'; this is its face on the admin socket.

use std::rc::Rc;

use capnp::capability::Rc as CapRc;
use granary_grains::GrainId;
use granary_schema::admin_capnp::backups;

use super::{Ctx, fail};
use crate::daemon::backups::Place;

pub(super) struct BackupsAdmin(pub(super) Rc<Ctx>);

/// A directory given on the command line, or a configured target's name
/// (anything without a '/').
fn place(dir: &str, target: &str) -> Result<Place, capnp::Error> {
    match (dir, target) {
        ("", "") => Err(fail("say where: --to DIR or --target NAME")),
        (d, "") if d.contains('/') => Ok(Place::Dir(std::path::PathBuf::from(d))),
        (name, "") | ("", name) => Ok(Place::Named(name.to_owned())),
        _ => Err(fail("give either a directory or a target, not both")),
    }
}

fn non_empty(t: &str) -> Option<String> {
    Some(t.to_owned()).filter(|t| !t.is_empty())
}

/// An optional `user/kind` or grain id.
fn optional_grain(t: &str) -> Result<Option<GrainId>, capnp::Error> {
    non_empty(t)
        .map(|g| GrainId::from_reference(&g).map_err(fail))
        .transpose()
}

impl backups::Server for BackupsAdmin {
    async fn export(
        self: CapRc<Self>,
        params: backups::ExportParams,
        mut results: backups::ExportResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let place = place(p.get_dir()?.to_str()?, p.get_target()?.to_str()?)?;
        let user = non_empty(p.get_user()?.to_str()?);
        let grain = optional_grain(p.get_grain()?.to_str()?)?;
        let progress = p.get_progress().ok();
        // In a task of its own, so a CLI that goes away does not cut the
        // export off halfway.
        let backups = self.0.backups.clone();
        let report =
            tokio::task::spawn_local(
                async move { backups.export(place, user, grain, progress).await },
            )
            .await
            .map_err(fail)?
            .map_err(fail)?;
        results
            .get()
            .set_report_json(serde_json::to_string(&report).map_err(fail)?);
        Ok(())
    }

    async fn restore(
        self: CapRc<Self>,
        params: backups::RestoreParams,
        mut results: backups::RestoreResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let place = place(p.get_from()?.to_str()?, "")?;
        let grain = optional_grain(p.get_grain()?.to_str()?)?;
        let identity = p.get_identity()?.to_vec();
        let trust = p
            .get_trust()?
            .iter()
            .map(|t| Ok(t?.to_str()?.to_owned()))
            .collect::<Result<Vec<_>, capnp::Error>>()?;
        let progress = p.get_progress().ok();
        // Each in a task of its own, so a CLI that goes away does not cut
        // a restore off halfway (leaving its grain held).
        let backups = self.0.backups.clone();
        let json = if p.get_drill() {
            let report = tokio::task::spawn_local(async move {
                backups.drill(place, grain, identity, trust, progress).await
            })
            .await
            .map_err(fail)?
            .map_err(fail)?;
            serde_json::to_string(&report)
        } else {
            let grain =
                grain.ok_or_else(|| fail("name the grain to restore (--grain USER/KIND)"))?;
            let (as_user, snapshot) = (
                non_empty(p.get_as()?.to_str()?),
                non_empty(p.get_snapshot()?.to_str()?),
            );
            let report = tokio::task::spawn_local(async move {
                backups
                    .restore(place, &grain, identity, as_user, snapshot, trust, progress)
                    .await
            })
            .await
            .map_err(fail)?
            .map_err(fail)?;
            serde_json::to_string(&report)
        };
        results.get().set_report_json(json.map_err(fail)?);
        Ok(())
    }

    async fn keys(
        self: CapRc<Self>,
        _: backups::KeysParams,
        mut results: backups::KeysResults,
    ) -> Result<(), capnp::Error> {
        let (key, recipients, targets) = self.0.backups.describe().map_err(fail)?;
        let mut r = results.get();
        r.set_node_key(&key);
        let mut list = r.reborrow().init_recipients(recipients.len() as u32);
        for (i, x) in recipients.iter().enumerate() {
            list.set(i as u32, x);
        }
        let mut list = r.init_targets(targets.len() as u32);
        for (i, x) in targets.iter().enumerate() {
            list.set(i as u32, x);
        }
        Ok(())
    }
}
