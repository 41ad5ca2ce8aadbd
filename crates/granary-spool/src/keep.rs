//! What a spool does on a cluster node so that a message it acknowledged
//! survives the loss of the node:
//!
//! - **Mirrored before committed.** With a [`Mirror`], a commit returns
//!   only once the entry is durable on another node too; when no node
//!   takes the copy, the commit fails and the MX answers 451 (the sender
//!   tries again later), so no 250 rests on one disk.
//! - **Kept after delivery.** A spool that [`Spool::keep_delivered`]
//!   does not remove a message its grains took: it settles it (kept, not
//!   delivered again) until the daemon sees a copy of each recipient's
//!   grain made after the delivery ([`Spool::forget`]), or a failover to
//!   a copy made before it ([`Spool::redeliver`]; the grain drops an id it
//!   already has).
//! - **Adopted after a node died.** The node that holds a dead node's
//!   copies puts them in its own spool ([`Spool::adopt`]) and delivers
//!   them under the same ids.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use crate::{Progress, Spool, SpoolError, Tracked, io, unix_now};

/// What [`Mirror::copy`] returns.
pub type MirrorFuture<'a> = Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>>;

/// Copies spool entries to another node.
pub trait Mirror: Send + Sync {
    /// Makes `bytes`, entry `id` of the spool called `spool`, durable on
    /// another node; an error when no node took it.
    fn copy(&self, spool: &'static str, id: String, bytes: Vec<u8>) -> MirrorFuture<'_>;
}

/// Told the id of each message a spool removes.
type OnRemove = Box<dyn Fn(&str) + Send + Sync>;

/// How a spool keeps what it took (see the module's text).
#[derive(Default)]
pub(crate) struct Keeping {
    mirror: OnceLock<(&'static str, Arc<dyn Mirror>)>,
    keep_delivered: AtomicBool,
    on_remove: OnceLock<OnRemove>,
}

/// A delivered message a spool keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settled {
    pub id: String,
    /// When it was received, and when its last recipient was done with,
    /// unix seconds (this node's clock).
    pub received_at: i64,
    pub at: i64,
    /// The users whose grains took it.
    pub delivered: Vec<String>,
    /// The failover (its time) it was last delivered again for.
    pub redelivered_for: Option<i64>,
}

impl Spool {
    /// Copies every entry committed from now on through `mirror` (as the
    /// spool called `name`) before the commit returns. Set once.
    pub fn mirror_to(&self, name: &'static str, mirror: Arc<dyn Mirror>) {
        let _ = self.keeping.mirror.set((name, mirror));
    }

    /// Keeps delivered messages, settled, until [`Spool::forget`].
    pub fn keep_delivered(&self, keep: bool) {
        self.keeping.keep_delivered.store(keep, Ordering::Relaxed);
    }

    /// Calls `f` with the id of each message removed from now on. Set once.
    pub fn on_remove(&self, f: impl Fn(&str) + Send + Sync + 'static) {
        let _ = self.keeping.on_remove.set(Box::new(f));
    }

    pub(crate) fn removed(&self, id: &str) {
        if let Some(f) = self.keeping.on_remove.get() {
            f(id);
        }
    }

    /// Copies entry `id`'s file through the mirror, if there is one.
    pub(crate) async fn mirror_entry(&self, id: &str) -> Result<(), SpoolError> {
        let Some((name, mirror)) = self.keeping.mirror.get() else {
            return Ok(());
        };
        let path = self.msg_path(id);
        let bytes = tokio::fs::read(&path).await.map_err(io("read", &path))?;
        mirror
            .copy(name, id.to_owned(), bytes)
            .await
            .map_err(SpoolError::NotMirrored)
    }

    /// Every recipient of `id` is done with: removed, or settled where
    /// delivered messages are kept and some grain took it. Blocking.
    pub(crate) fn finished(&self, id: &str) -> Result<(), SpoolError> {
        let keep = self.keeping.keep_delivered.load(Ordering::Relaxed);
        let progress = {
            let mut entries = self.entries();
            match entries.get_mut(id) {
                Some(t) if keep && !t.progress.delivered.is_empty() => {
                    t.progress.settled = Some(unix_now());
                    // Its failures were bounced just now.
                    t.progress.bounced = t.progress.failed.iter().map(|(u, _)| u.clone()).collect();
                    t.busy = false;
                    Some(t.progress.clone())
                }
                _ => None,
            }
        };
        match progress {
            Some(p) => self.save(id, &p),
            None => self.remove(id),
        }
    }

    fn save(&self, id: &str, p: &Progress) -> Result<(), SpoolError> {
        let saved = serde_json::to_vec(p).map_err(|e| SpoolError::Task(e.to_string()))?;
        granary_files::write_atomic(&self.state_path(id), &saved, 0o600)?;
        Ok(())
    }

    /// The delivered messages kept.
    pub fn settled(&self) -> Vec<Settled> {
        self.entries()
            .iter()
            .filter_map(|(id, t)| {
                Some(Settled {
                    id: id.clone(),
                    received_at: t.envelope.received_at,
                    at: t.progress.settled?,
                    delivered: t.progress.delivered.clone(),
                    redelivered_for: t.progress.redelivered_for,
                })
            })
            .collect()
    }

    /// Removes a kept message: its grains' data is safe. Blocking.
    pub fn forget(&self, id: &str) -> Result<(), SpoolError> {
        let settled = self
            .entries()
            .get(id)
            .is_some_and(|t| t.progress.settled.is_some());
        match settled {
            true => self.remove(id),
            false => Ok(()),
        }
    }

    /// Delivers a kept message again to `users` (their grains may have
    /// lost it in the failover at `failover`, unix seconds). Blocking.
    pub fn redeliver(&self, id: &str, users: &[String], failover: i64) -> Result<(), SpoolError> {
        let progress = {
            let mut entries = self.entries();
            let Some(t) = entries.get_mut(id) else {
                return Ok(());
            };
            t.progress.settled = None;
            t.progress.redelivered_for = Some(failover);
            t.progress.delivered.retain(|u| !users.contains(u));
            t.progress.next_attempt = 0;
            t.progress.clone()
        };
        self.save(id, &progress)?;
        self.wake.notify_one();
        Ok(())
    }

    /// Takes the entry file `file` (another node's, kept here as its copy)
    /// into this spool under its own id, to be delivered from here; the
    /// file is moved, so it must be on the spool's filesystem. Copied on
    /// through the mirror again, best effort. The id, `None` when this
    /// spool has it already.
    pub async fn adopt(self: &Arc<Self>, file: &Path) -> Result<Option<String>, SpoolError> {
        let spool = self.clone();
        let file = file.to_owned();
        let adopted = tokio::task::spawn_blocking(move || spool.adopt_file(&file))
            .await
            .map_err(|e| SpoolError::Task(e.to_string()))??;
        let Some(id) = adopted else { return Ok(None) };
        if let Err(e) = self.mirror_entry(&id).await {
            tracing::warn!(id, error = %e, "an adopted message is on this node only");
        }
        self.wake.notify_one();
        Ok(Some(id))
    }

    fn adopt_file(&self, file: &Path) -> Result<Option<String>, SpoolError> {
        let (envelope, offset) = crate::entry::read_envelope(file).map_err(io("read", file))?;
        let id = envelope.id.clone();
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(SpoolError::Task(format!(
                "{} holds no spool entry id",
                file.display()
            )));
        }
        if self.entries().contains_key(&id) {
            let _ = std::fs::remove_file(file);
            return Ok(None);
        }
        let size = std::fs::metadata(file)
            .map_err(io("read", file))?
            .len()
            .saturating_sub(offset);
        let path = self.msg_path(&id);
        std::fs::rename(file, &path).map_err(io("move into the spool", &path))?;
        granary_files::sync_dir(&self.dir.join("queue"))?;
        self.entries().insert(
            id.clone(),
            Tracked {
                envelope: Arc::new(envelope),
                offset,
                size,
                progress: Progress::default(),
                busy: false,
            },
        );
        Ok(Some(id))
    }
}
