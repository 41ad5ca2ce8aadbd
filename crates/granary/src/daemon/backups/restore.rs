//! Restores onto this node (checked into a staging dataset, renamed into
//! place), and drills (restores into scratch datasets, compared, removed).

use granary_backup::catalogue::GrainEntry;
use granary_backup::crypt;
use granary_backup::restore::RestoreJob;
use granary_grains::{GrainId, Start};
use granary_model::UserName;
use granary_schema::admin_capnp::progress;
use tokio::sync::mpsc;

use super::{ACTOR, Backups, DrillResult, Place, RestoreReport, key_copy, msg};

/// `alice/git` for `alice-git`.
fn shown(id: &str) -> String {
    GrainId::parse(id).map_or_else(|_| id.to_owned(), |g| g.shown())
}

impl Backups {
    /// Restores one grain from `place` onto this node and starts it.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn restore(
        &self,
        place: Place,
        source: &GrainId,
        identity: Vec<u8>,
        as_user: Option<String>,
        snapshot: Option<String>,
        trust: Vec<String>,
        progress: Option<progress::Client>,
    ) -> Result<RestoreReport, String> {
        let _busy = self.busy.lock().await;
        let identity = crypt::Identity::parse(&identity).map_err(msg)?;
        let key = self.key().map_err(msg)?;
        let trusted = self.trusted(&key, &trust)?;
        let source_id = source.to_string();

        // The catalogue first: nothing on this node changes until the
        // backup is known to be ours and to hold the grain.
        let (config, p2) = (self.config.clone(), place.clone());
        let k2 = key_copy(&key)?;
        let sid = source_id.clone();
        let entry = tokio::task::spawn_blocking(move || -> Result<GrainEntry, String> {
            let (mut target, _) = Self::open(&p2, &config, &k2).map_err(msg)?;
            let (catalogue, _) =
                granary_backup::restore::open_trusted(target.as_mut(), &trusted).map_err(msg)?;
            catalogue.grains.get(&sid).cloned().ok_or_else(|| {
                format!(
                    "the backup holds no grain {sid}; it holds: {}",
                    catalogue
                        .grains
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })
        })
        .await
        .map_err(msg)??;

        // The app must be here: the same kind, signed by the same key.
        let store = self.store.clone();
        let kind = entry.kind.clone();
        let app = tokio::task::spawn_blocking(move || store.app(&kind))
            .await
            .map_err(msg)?
            .map_err(msg)?;
        let app = match app {
            Some(a) if a.app_id == entry.app_id => a,
            Some(a) => {
                return Err(format!(
                    "the {} app installed here is {} but the backup's is {}; install the backup's app (same signer) first",
                    entry.kind, a.app_id, entry.app_id
                ));
            }
            None => {
                return Err(format!(
                    "the {} app ({}, version {}) is not installed on this node; install it first: granary app install PACKAGE",
                    entry.kind, entry.app_id, entry.app_version
                ));
            }
        };
        let user = UserName::existing(as_user.as_deref().unwrap_or(&entry.user)).map_err(msg)?;
        let gid = GrainId::for_user(user.as_str(), &entry.kind).map_err(msg)?;
        let id = gid.to_string();

        // The owner and the grain record (as `user add` would make them).
        let (store, datasets, uids) = (self.store.clone(), self.datasets.clone(), self.uids);
        let (u2, i2, kind) = (user.clone(), id.clone(), entry.kind.clone());
        let (uid, user_created) = tokio::task::spawn_blocking(move || -> Result<(u32, bool), String> {
            let mut created = false;
            if store.user(&u2).map_err(msg)?.is_none() {
                // A user made here: the reservation applies.
                UserName::new(u2.as_str()).map_err(msg)?;
                // No password is known: the admin sets one afterwards.
                let unusable = granary_auth::generate_password().map_err(msg)?;
                let hash = granary_auth::hash_password(&unusable).map_err(msg)?;
                store.add_user(&u2, &hash, ACTOR).map_err(msg)?;
                created = true;
            }
            let grain = match store.grain(&i2).map_err(msg)? {
                Some(g) => g,
                None => store.create_grain(&i2, &u2, &kind, uids, ACTOR).map_err(msg)?,
            };
            if datasets.has_data(&i2).map_err(msg)? {
                return Err(format!(
                    "grain {} already holds data; restore it under another user (--as USER), or remove that data first",
                    shown(&i2)
                ));
            }
            Ok((grain.host_uid, created))
        })
        .await
        .map_err(msg)??;
        if user_created {
            crate::daemon::certificate::refresh(&self.store, self.local_ca.clone(), &self.domain)
                .await;
        }
        // Stopped and held while its data is put in place, so nothing
        // starts it on an empty dataset meanwhile; the start below clears
        // the hold.
        self.grains
            .hold(&gid, "its data is being restored")
            .await
            .map_err(msg)?;

        let (config, datasets) = (self.config.clone(), self.datasets.clone());
        let (tx, rx) = mpsc::channel(16);
        let (i2, sid, snap, e2) = (
            id.clone(),
            source_id.clone(),
            snapshot.clone(),
            entry.clone(),
        );
        let work = tokio::task::spawn_blocking(
            move || -> Result<granary_backup::restore::Restored, String> {
                let (mut target, _) = Self::open(&place, &config, &key).map_err(msg)?;
                let staging = granary_backup::staging_id("restore");
                let done = RestoreJob {
                    grain_id: &sid,
                    grain: &e2,
                    snapshot: snap.as_deref(),
                    identity: &identity,
                    datasets: datasets.as_ref(),
                    staging: &staging,
                    uid,
                }
                .run(target.as_mut(), &mut |p| {
                    let _ = tx.try_send(p.clone());
                })
                .map_err(msg)?;
                if let Err(e) = datasets.rename(&staging, &i2, uid) {
                    let _ = datasets.destroy(&staging);
                    return Err(msg(e));
                }
                Ok(done)
            },
        );
        let done = match super::pump(rx, work, progress).await {
            Ok(Ok(done)) => done,
            Ok(Err(e)) | Err(e) => {
                let _ = self.grains.release(&gid).await;
                return Err(e);
            }
        };

        // Metadata: the data's app version (an older one migrates on
        // start), and the grants whose other end exists here.
        let data_version = entry
            .data_version
            .clone()
            .unwrap_or_else(|| entry.app_version.clone());
        let (store, i2) = (self.store.clone(), id.clone());
        // Only grants between the restored grain and another grain of the
        // same owner come back (as the new owner's): a grant with another
        // user's grain needs that user's say.
        let (old_user, new_user) = (entry.user.clone(), user.to_string());
        let (from_id, to_id) = (source_id.clone(), id.clone());
        let map = move |g: &str| grant_end(g, &from_id, &to_id, &old_user, &new_user);
        let grants = entry.grants.clone();
        let detail = format!(
            "from={source_id} snapshot={} streams={} uid={uid}",
            done.snapshot, done.streams
        );
        let dv = data_version.clone();
        let recorded =
            tokio::task::spawn_blocking(move || -> Result<(Vec<String>, Vec<String>), String> {
                store.set_grain_app_version(&i2, &dv).map_err(msg)?;
                let live = store.live_grants().map_err(msg)?;
                let (mut restored, mut skipped) = (Vec::new(), Vec::new());
                for g in grants {
                    let (Some(from), Some(to)) = (map(&g.from), map(&g.to)) else {
                        skipped.push(format!(
                            "{} -> {} {} (another user's grain)",
                            g.from, g.to, g.capability
                        ));
                        continue;
                    };
                    let text = format!("{from} -> {to} {}", g.capability);
                    if live.iter().any(|l| {
                        l.from_grain == from && l.to_grain == to && l.capability == g.capability
                    }) {
                        restored.push(format!("{text} (already there)"));
                        continue;
                    }
                    let both = store.grain(&from).map_err(msg)?.is_some()
                        && store.grain(&to).map_err(msg)?.is_some();
                    if !both {
                        skipped.push(format!("{text} (the other grain is not on this node)"));
                        continue;
                    }
                    match store.add_grant(&from, &to, &g.capability, ACTOR) {
                        Ok(_) => restored.push(text),
                        Err(e) => skipped.push(format!("{text} ({e})")),
                    }
                }
                store
                    .record_event(ACTOR, "backup.restore", &i2, &detail)
                    .map_err(msg)?;
                Ok((restored, skipped))
            })
            .await
            .map_err(msg)
            .and_then(|r| r);
        let (restored, skipped) = match recorded {
            Ok(r) => r,
            Err(e) => {
                let _ = self.grains.release(&gid).await;
                return Err(e);
            }
        };

        let start = self.grains.start(&gid, Start::Answering).await;
        Ok(RestoreReport {
            grain: gid.shown(),
            from_grain: source.shown(),
            snapshot: done.snapshot,
            streams: done.streams,
            bytes: done.bytes,
            seconds: done.seconds,
            host_uid: uid,
            app_version: format!("{} (data {data_version})", app.version),
            user_created,
            grants_restored: restored,
            grants_skipped: skipped,
            started: start.is_ok(),
            start_error: start.err().map(msg),
        })
    }

    /// Restores every grain (or one) into scratch datasets (every chunk
    /// decrypted and checked; a tree stream's files compared with the
    /// export's digest), and removes the scratch data.
    pub(crate) async fn drill(
        &self,
        place: Place,
        grain: Option<GrainId>,
        identity: Vec<u8>,
        trust: Vec<String>,
        progress: Option<progress::Client>,
    ) -> Result<Vec<DrillResult>, String> {
        let _busy = self.busy.lock().await;
        let identity = crypt::Identity::parse(&identity).map_err(msg)?;
        let key = self.key().map_err(msg)?;
        let trusted = self.trusted(&key, &trust)?;
        let (config, datasets) = (self.config.clone(), self.datasets.clone());
        let only = grain.map(|g| g.to_string());
        let (tx, rx) = mpsc::channel(16);
        let work = tokio::task::spawn_blocking(move || -> Result<Vec<DrillResult>, String> {
            let (mut target, _) = Self::open(&place, &config, &key).map_err(msg)?;
            let (catalogue, _) =
                granary_backup::restore::open_trusted(target.as_mut(), &trusted).map_err(msg)?;
            let mut results = Vec::new();
            for (id, entry) in &catalogue.grains {
                if only.as_ref().is_some_and(|o| o != id) {
                    continue;
                }
                let staging = granary_backup::staging_id("drill");
                let r = RestoreJob {
                    grain_id: id,
                    grain: entry,
                    snapshot: None,
                    identity: &identity,
                    datasets: datasets.as_ref(),
                    staging: &staging,
                    uid: nix::unistd::geteuid().as_raw(),
                }
                .run(target.as_mut(), &mut |p| {
                    let _ = tx.try_send(p.clone());
                });
                if r.is_ok()
                    && let Err(e) = datasets.destroy(&staging)
                {
                    tracing::warn!(staging, error = %e, "cannot remove a drill's scratch dataset");
                }
                results.push(match r {
                    Ok(done) => DrillResult {
                        grain: id.clone(),
                        ok: true,
                        snapshot: Some(done.snapshot),
                        bytes: done.bytes,
                        seconds: done.seconds,
                        error: None,
                    },
                    Err(e) => DrillResult {
                        grain: id.clone(),
                        ok: false,
                        snapshot: None,
                        bytes: 0,
                        seconds: 0.0,
                        error: Some(e.to_string()),
                    },
                });
            }
            if results.is_empty() {
                return Err(match only {
                    Some(g) => format!("the backup holds no grain {g}"),
                    None => "the backup holds no grains".to_owned(),
                });
            }
            Ok(results)
        });
        let results = super::pump(rx, work, progress).await??;
        let (store, detail) = (
            self.store.clone(),
            results
                .iter()
                .map(|r| format!("{}={}", r.grain, if r.ok { "ok" } else { "failed" }))
                .collect::<Vec<_>>()
                .join(" "),
        );
        let _ = tokio::task::spawn_blocking(move || {
            store.record_event(ACTOR, "backup.drill", "-", &detail)
        })
        .await;
        Ok(results)
    }
}

/// Where one end of a restored grain's grant goes: the restored grain
/// itself to its new id; another grain of the same owner to the new
/// owner's grain of that kind; anything else (another user's grain) nowhere.
/// The owner is the grain id's owner exactly: `alice-b-git` is user
/// `alice-b`'s, never `alice`'s (a prefix match once mapped it to another
/// user's grain).
fn grant_end(
    end: &str,
    from_id: &str,
    to_id: &str,
    old_user: &str,
    new_user: &str,
) -> Option<String> {
    if end == from_id {
        return Some(to_id.to_owned());
    }
    let grain = GrainId::parse(end).ok()?;
    if grain.user() != old_user {
        return None;
    }
    GrainId::for_user(new_user, grain.kind())
        .ok()
        .map(|g| g.to_string())
}

#[cfg(test)]
mod tests {
    use super::grant_end;

    #[test]
    fn grants_follow_the_owner_exactly() {
        let end = |g: &str| grant_end(g, "alice-mail", "carol-mail", "alice", "carol");
        assert_eq!(end("alice-mail").as_deref(), Some("carol-mail"));
        assert_eq!(end("alice-dav").as_deref(), Some("carol-dav"));
        // Another user whose name starts like the owner's: not theirs.
        assert_eq!(end("alice-b-git"), None);
        assert_eq!(end("bob-dav"), None);
        assert_eq!(end("not a grain"), None);
    }
}
