//! `Snapshots`: list, take, roll back to and prune a grain's snapshots.

use std::rc::Rc;

use capnp::capability::Rc as CapRc;
use granary_schema::admin_capnp::snapshots;

use super::{Ctx, blocking, fail, grain_failure, grain_ref, state_failure};

pub(super) struct Snapshots(pub(super) Rc<Ctx>);

impl snapshots::Server for Snapshots {
    async fn list(
        self: CapRc<Self>,
        params: snapshots::ListParams,
        mut results: snapshots::ListResults,
    ) -> Result<(), capnp::Error> {
        let id = grain_ref(params.get()?.get_grain()?)?;
        let snaps = self.0.grains.snapshots(&id).await.map_err(grain_failure)?;
        let mut list = results.get().init_snapshots(snaps.len() as u32);
        for (i, s) in snaps.iter().enumerate() {
            let mut out = list.reborrow().get(i as u32);
            out.set_name(&s.name);
            out.set_created_at(s.created);
        }
        Ok(())
    }

    async fn create(
        self: CapRc<Self>,
        params: snapshots::CreateParams,
        mut results: snapshots::CreateResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let id = grain_ref(p.get_grain()?)?;
        let label = match p.get_label()?.to_str()? {
            "" => granary_datasets::timed_label("manual"),
            l if l.starts_with("auto-") => {
                return Err(fail("labels starting with auto- are the scheduler's"));
            }
            l => {
                if !granary_datasets::valid_label(l) {
                    return Err(fail(format!(
                        "snapshot label {l:?} must be 1 to 64 of A-Z, a-z, 0-9, '.', '_' and '-', not starting with '.' or '-'"
                    )));
                }
                l.to_owned()
            }
        };
        let taken = self
            .0
            .grains
            .snapshot(&id, &label)
            .await
            .map_err(grain_failure)?;
        let mut r = results.get();
        r.set_name(&taken.name);
        r.set_report(&taken.report);
        r.set_frozen_micros(taken.frozen_micros);
        Ok(())
    }

    async fn rollback(
        self: CapRc<Self>,
        params: snapshots::RollbackParams,
        mut results: snapshots::RollbackResults,
    ) -> Result<(), capnp::Error> {
        let actor = self.0.actor;
        let p = params.get()?;
        let id = grain_ref(p.get_grain()?)?;
        let name = p.get_name()?.to_str()?.to_owned();
        let restarted = self
            .0
            .grains
            .rollback(&id, &name)
            .await
            .map_err(grain_failure)?;
        let (store, detail) = (self.0.store.clone(), format!("snapshot={name}"));
        blocking(move || {
            store
                .record_event(actor, "grain.rollback", &id, &detail)
                .map_err(state_failure)
        })
        .await?;
        results.get().set_restarted(restarted);
        Ok(())
    }

    async fn prune(
        self: CapRc<Self>,
        params: snapshots::PruneParams,
        mut results: snapshots::PruneResults,
    ) -> Result<(), capnp::Error> {
        let id = grain_ref(params.get()?.get_grain()?)?;
        let deleted = self.0.grains.prune(&id).await.map_err(grain_failure)?;
        let mut list = results.get().init_deleted(deleted.len() as u32);
        for (i, d) in deleted.iter().enumerate() {
            list.set(i as u32, d);
        }
        Ok(())
    }
}
