//! The MX's inbound spool.
//!
//! Nothing is acknowledged to a sending server before it is durable: the
//! MX receives a message into an [`Incoming`] (memory, spilling to
//! `incoming/` past 1 MiB), runs its checks, and [`Spool::commit`]s it:
//! the envelope and the message are written to a hidden file in `queue/`,
//! fsynced, renamed into place and the directory fsynced; only then does
//! the MX answer 250.
//!
//! The [`Deliverer`] hands each message to each recipient's mail grain
//! through [`granary_grains::Grains::deliver_mail`], which resolves once
//! the grain has it durably. The outbound queue is a second spool whose
//! deliverer has another [`Destination`]: other mail servers. A message leaves the spool only when every
//! recipient's grain acknowledged it (or can never take it). A grain that
//! cannot take it now is retried with a doubling backoff for the spool
//! lifetime, then the message is bounced. Each delivery carries the
//! entry's id and grains drop an id they already have, so a crash between
//! a grain's acknowledgement and the spool noting it never gives a
//! duplicate.
//!
//! On disk, under the spool directory (owner-only):
//! - `queue/<id>.msg`: the envelope as one JSON line, then the message;
//! - `queue/<id>.state`: delivery progress, once there is any;
//! - `incoming/`: messages being received that spilled out of memory
//!   (never acknowledged; emptied at start);
//! - `bounces/<id>.eml`: delivery status notifications for senders on
//!   other hosts when the deliverer has no outbound queue to send them
//!   through ([`Deliverer::bouncing_out`]; the daemon always gives one);
//! - `damaged/`: spooled files that could not be read back, kept for the
//!   admin and never deleted by Granary.

mod deliver;
mod dsn;
mod entry;
mod keep;

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::Serialize;

pub use deliver::{Deliverer, Destination, LocalUser, Outcome};
pub use entry::{Envelope, Progress, Recipient};
pub use keep::{Mirror, MirrorFuture, Settled};

/// What the spool needs to know of the configuration.
#[derive(Debug, Clone)]
pub struct SpoolSettings {
    /// How long a message may wait for a grain before it is bounced.
    pub lifetime: Duration,
    /// The first retry; each next one waits twice as long, up to
    /// `retry_max`.
    pub retry_first: Duration,
    pub retry_max: Duration,
    /// This host's name, for bounces.
    pub hostname: String,
    /// After this long undelivered, the sender is told once that the
    /// message is delayed (`None`: never).
    pub delay_warning: Option<Duration>,
}

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool: {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("spool: {0}")]
    File(#[from] granary_files::FileError),
    #[error("no message {0} in the spool (granary mail spool list)")]
    NoSuchEntry(String),
    #[error("message {0} is being delivered right now; try again in a moment")]
    Busy(String),
    #[error("spool: a task failed: {0}")]
    Task(String),
    #[error("spool: no other node keeps a copy: {0}")]
    NotMirrored(String),
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> SpoolError + 'a {
    move |source| SpoolError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// A spooled message as `granary mail spool list` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct SpooledMessage {
    pub id: String,
    pub from: String,
    pub recipients: Vec<RecipientState>,
    pub size: u64,
    pub received_at: i64,
    pub client: String,
    pub attempts: u32,
    /// Unix seconds; 0 while it is being delivered or due now.
    pub next_attempt: i64,
    pub last_error: Option<String>,
    /// Kept from delivery by the admin until released.
    pub held: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct RecipientState {
    pub address: String,
    pub user: String,
    /// "waiting", "delivered" or "failed".
    pub state: &'static str,
}

struct Tracked {
    envelope: Arc<Envelope>,
    /// Where the message starts in the `.msg` file, and its length.
    offset: u64,
    size: u64,
    progress: Progress,
    /// A delivery attempt is under way.
    busy: bool,
}

/// The spool. Shared by the MX (which commits) and the [`Deliverer`].
pub struct Spool {
    dir: PathBuf,
    settings: SpoolSettings,
    entries: Mutex<BTreeMap<String, Tracked>>,
    wake: tokio::sync::Notify,
    /// Where each entry is copied before a commit returns, and what this
    /// spool is called there; what keeps delivered entries and who hears
    /// of removals ([`keep`]).
    keeping: keep::Keeping,
}

/// Past this many bytes an [`Incoming`] message is written to a file.
const SPILL: usize = 1 << 20;

impl Spool {
    /// Opens (or makes) the spool under `dir`, owner-only and owned by
    /// `owner` (the daemon's uid), and loads what is queued. Blocking.
    pub fn open(dir: &Path, owner: u32, settings: SpoolSettings) -> Result<Arc<Spool>, SpoolError> {
        let uid = owner;
        for sub in ["", "queue", "incoming", "bounces"] {
            granary_files::ensure_private_dir(&dir.join(sub), uid)?;
        }
        // Half-received messages were never acknowledged.
        let incoming = dir.join("incoming");
        for e in std::fs::read_dir(&incoming).map_err(io("read", &incoming))? {
            let e = e.map_err(io("read", &incoming))?;
            let _ = std::fs::remove_file(e.path());
        }
        let queue = dir.join("queue");
        let mut entries = BTreeMap::new();
        let mut names: Vec<String> = std::fs::read_dir(&queue)
            .map_err(io("read", &queue))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        for name in &names {
            let path = queue.join(name);
            if name.starts_with('.') {
                // A commit that did not finish: never acknowledged.
                let _ = std::fs::remove_file(&path);
                continue;
            }
            let Some(id) = name.strip_suffix(".msg") else {
                if let Some(id) = name.strip_suffix(".state")
                    && !names.contains(&format!("{id}.msg"))
                {
                    let _ = std::fs::remove_file(&path);
                }
                continue;
            };
            let loaded = entry::read_envelope(&path).and_then(|(envelope, offset)| {
                let len = std::fs::metadata(&path)?.len();
                Ok((envelope, offset, len.saturating_sub(offset)))
            });
            let (envelope, offset, size) = match loaded {
                Ok(l) if l.0.id == id => l,
                Ok(_) | Err(_) => {
                    let damaged = dir.join("damaged");
                    granary_files::ensure_private_dir(&damaged, uid)?;
                    tracing::error!(file = %path.display(), moved_to = %damaged.display(), "a spooled message cannot be read back; moved aside");
                    std::fs::rename(&path, damaged.join(name)).map_err(io("move aside", &path))?;
                    continue;
                }
            };
            let state = queue.join(format!("{id}.state"));
            let progress = match std::fs::read(&state) {
                Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                    tracing::warn!(file = %state.display(), error = %e, "unreadable delivery progress; starting over (grains drop what they have)");
                    Progress::default()
                }),
                Err(_) => Progress::default(),
            };
            entries.insert(
                id.to_owned(),
                Tracked {
                    envelope: Arc::new(envelope),
                    offset,
                    size,
                    progress,
                    busy: false,
                },
            );
        }
        if !entries.is_empty() {
            tracing::info!(messages = entries.len(), "spooled mail to deliver");
        }
        Ok(Arc::new(Spool {
            dir: dir.to_path_buf(),
            settings,
            entries: Mutex::new(entries),
            wake: tokio::sync::Notify::new(),
            keeping: keep::Keeping::default(),
        }))
    }

    fn entries(&self) -> MutexGuard<'_, BTreeMap<String, Tracked>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn settings(&self) -> &SpoolSettings {
        &self.settings
    }

    fn msg_path(&self, id: &str) -> PathBuf {
        self.dir.join("queue").join(format!("{id}.msg"))
    }

    fn state_path(&self, id: &str) -> PathBuf {
        self.dir.join("queue").join(format!("{id}.state"))
    }

    /// A fresh entry id: 8 hex digits of the time, 8 random.
    pub fn new_id() -> String {
        // 64 random bits: two messages in one second never meet.
        let mut r = [0u8; 8];
        let _ = getrandom::fill(&mut r);
        format!("{:08x}{:016x}", unix_now() as u32, u64::from_le_bytes(r))
    }

    /// Starts receiving a message.
    pub fn incoming(self: &Arc<Self>) -> Incoming {
        Incoming {
            dir: self.dir.join("incoming"),
            buf: Vec::new(),
            file: None,
            len: 0,
        }
    }

    /// Makes `head` followed by `message` durable under `envelope.id`, then
    /// queues it for delivery. Returns once it is on disk (fsynced, file
    /// and directory): the caller may acknowledge it then.
    pub async fn commit(
        self: &Arc<Self>,
        envelope: Envelope,
        head: Vec<u8>,
        message: Vec<u8>,
    ) -> Result<(), SpoolError> {
        self.commit_as(envelope, head, message, false).await
    }

    /// [`Spool::commit`], but not delivered until [`Spool::resume`]d (or
    /// deleted): for a message that must be committed somewhere else too
    /// before the client is told 250. The pause is not kept across a
    /// restart (after a crash in between, the message is delivered).
    pub async fn commit_paused(
        self: &Arc<Self>,
        envelope: Envelope,
        head: Vec<u8>,
        message: Vec<u8>,
    ) -> Result<(), SpoolError> {
        self.commit_as(envelope, head, message, true).await
    }

    /// Lets a message committed paused be delivered.
    pub fn resume(&self, id: &str) {
        if let Some(t) = self.entries().get_mut(id) {
            t.progress.held = false;
        }
        self.wake.notify_one();
    }

    async fn commit_as(
        self: &Arc<Self>,
        envelope: Envelope,
        head: Vec<u8>,
        message: Vec<u8>,
        paused: bool,
    ) -> Result<(), SpoolError> {
        let spool = self.clone();
        let id = envelope.id.clone();
        let written =
            tokio::task::spawn_blocking(move || spool.write_entry(&envelope, &head, &message))
                .await
                .map_err(|e| SpoolError::Task(e.to_string()))??;
        // On another node too before anyone may count on it; an entry no
        // node would copy is not committed.
        if let Err(e) = self.mirror_entry(&id).await {
            let spool = self.clone();
            let _ = tokio::task::spawn_blocking(move || spool.unlink(&id)).await;
            return Err(e);
        }
        self.track(written, paused);
        Ok(())
    }

    fn write_entry(
        &self,
        envelope: &Envelope,
        head: &[u8],
        message: &[u8],
    ) -> Result<(Arc<Envelope>, u64, u64), SpoolError> {
        let queue = self.dir.join("queue");
        let tmp = queue.join(format!(".{}.tmp", envelope.id));
        let path = self.msg_path(&envelope.id);
        let mut line = serde_json::to_vec(envelope).map_err(|e| SpoolError::Task(e.to_string()))?;
        line.push(b'\n');
        let result = (|| -> Result<(), SpoolError> {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io("create", &tmp))?;
            f.write_all(&line).map_err(io("write", &tmp))?;
            f.write_all(head).map_err(io("write", &tmp))?;
            f.write_all(message).map_err(io("write", &tmp))?;
            f.sync_all().map_err(io("fsync", &tmp))?;
            std::fs::rename(&tmp, &path).map_err(io("rename into place", &path))?;
            if let Err(e) = granary_files::sync_dir(&queue) {
                // Not durable, so not acknowledged: the client sends it
                // again, and this copy must not be delivered as well.
                let _ = std::fs::remove_file(&path);
                return Err(e.into());
            }
            Ok(())
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result?;
        Ok((
            Arc::new(envelope.clone()),
            line.len() as u64,
            (head.len() + message.len()) as u64,
        ))
    }

    fn track(&self, (envelope, offset, size): (Arc<Envelope>, u64, u64), paused: bool) {
        self.entries().insert(
            envelope.id.clone(),
            Tracked {
                envelope,
                offset,
                size,
                progress: Progress {
                    held: paused,
                    ..Progress::default()
                },
                busy: false,
            },
        );
        if !paused {
            self.wake.notify_one();
        }
    }

    /// Every spooled message, oldest first.
    pub fn list(&self) -> Vec<SpooledMessage> {
        let mut out: Vec<SpooledMessage> = self
            .entries()
            .values()
            // Delivered, kept only until its grain's data is safe.
            .filter(|t| t.progress.settled.is_none())
            .map(|t| {
                let p = &t.progress;
                SpooledMessage {
                    id: t.envelope.id.clone(),
                    from: t.envelope.from.clone(),
                    recipients: t
                        .envelope
                        .recipients
                        .iter()
                        .map(|r| RecipientState {
                            address: r.address.clone(),
                            user: r.user.clone(),
                            state: if p.delivered.contains(&r.user) {
                                "delivered"
                            } else if p.failed.iter().any(|(u, _)| *u == r.user) {
                                "failed"
                            } else {
                                "waiting"
                            },
                        })
                        .collect(),
                    size: t.size,
                    received_at: t.envelope.received_at,
                    client: t.envelope.client.clone(),
                    attempts: p.attempts,
                    next_attempt: if t.busy { 0 } else { p.next_attempt },
                    last_error: p.last_error.clone(),
                    held: p.held,
                }
            })
            .collect();
        out.sort_by(|a, b| (a.received_at, &a.id).cmp(&(b.received_at, &b.id)));
        out
    }

    /// Messages still waiting for `user`'s grain.
    pub fn waiting_for(&self, user: &str) -> usize {
        self.entries()
            .values()
            .filter(|t| {
                t.envelope.recipients.iter().any(|r| r.user == user)
                    && !t.progress.delivered.iter().any(|u| u == user)
                    && !t.progress.failed.iter().any(|(u, _)| u == user)
            })
            .count()
    }

    /// Makes `id` (or every message) due now; how many.
    pub fn retry(&self, id: Option<&str>) -> Result<usize, SpoolError> {
        let mut entries = self.entries();
        let mut n = 0;
        for (key, t) in entries.iter_mut() {
            if id.is_none_or(|i| i == key) {
                t.progress.next_attempt = 0;
                n += 1;
            }
        }
        drop(entries);
        if let Some(i) = id
            && n == 0
        {
            return Err(SpoolError::NoSuchEntry(i.to_owned()));
        }
        self.wake.notify_one();
        Ok(n)
    }

    /// Holds `id` (no delivery until released) or releases it; the hold
    /// survives a restart. Blocking.
    pub fn hold(&self, id: &str, held: bool) -> Result<(), SpoolError> {
        let progress = {
            let mut entries = self.entries();
            let Some(t) = entries.get_mut(id) else {
                return Err(SpoolError::NoSuchEntry(id.to_owned()));
            };
            t.progress.held = held;
            if !held {
                t.progress.next_attempt = 0;
            }
            t.progress.clone()
        };
        let saved = serde_json::to_vec(&progress).map_err(|e| SpoolError::Task(e.to_string()))?;
        granary_files::write_atomic(&self.state_path(id), &saved, 0o600)?;
        self.wake.notify_one();
        Ok(())
    }

    /// Removes a message without delivering it any further. Blocking.
    pub fn delete(&self, id: &str) -> Result<(), SpoolError> {
        {
            let entries = self.entries();
            match entries.get(id) {
                None => return Err(SpoolError::NoSuchEntry(id.to_owned())),
                Some(t) if t.busy => return Err(SpoolError::Busy(id.to_owned())),
                Some(_) => {}
            }
        }
        self.remove(id)
    }

    /// Forgets `id` and removes its files.
    fn remove(&self, id: &str) -> Result<(), SpoolError> {
        self.unlink(id)?;
        self.entries().remove(id);
        self.removed(id);
        Ok(())
    }

    /// Removes `id`'s files.
    fn unlink(&self, id: &str) -> Result<(), SpoolError> {
        let msg = self.msg_path(id);
        match std::fs::remove_file(&msg) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("remove", &msg)(e)),
        }
        // Not fsynced: should the removal be lost in a crash, the message
        // is delivered again and every grain drops it as a duplicate.
        let _ = std::fs::remove_file(self.state_path(id));
        Ok(())
    }

    /// Wakes the deliverer (a message was committed or made due).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Marks every entry due at `now` busy and returns them, with when the
    /// next one not yet due will be.
    fn take_due(&self, now: i64) -> (Vec<String>, Option<i64>) {
        let mut due = Vec::new();
        let mut next: Option<i64> = None;
        for (id, t) in self.entries().iter_mut() {
            if t.busy || t.progress.held || t.progress.settled.is_some() {
                continue;
            }
            if t.progress.next_attempt <= now {
                t.busy = true;
                due.push(id.clone());
            } else {
                next =
                    Some(next.map_or(t.progress.next_attempt, |n| n.min(t.progress.next_attempt)));
            }
        }
        (due, next)
    }
}

/// A message being received: in memory up to 1 MiB, then in a file under
/// `incoming/` (removed when this is dropped).
pub struct Incoming {
    dir: PathBuf,
    buf: Vec<u8>,
    file: Option<(std::fs::File, PathBuf)>,
    len: u64,
}

impl Incoming {
    /// Bytes received so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends `bytes`.
    pub async fn write(&mut self, bytes: &[u8]) -> Result<(), SpoolError> {
        self.len += bytes.len() as u64;
        self.buf.extend_from_slice(bytes);
        if self.buf.len() >= SPILL {
            self.spill().await?;
        }
        Ok(())
    }

    async fn spill(&mut self) -> Result<(), SpoolError> {
        let buf = std::mem::take(&mut self.buf);
        let file = self.file.take();
        let dir = self.dir.clone();
        let (file, buf) = tokio::task::spawn_blocking(move || -> Result<_, SpoolError> {
            let (mut f, path) = match file {
                Some(f) => f,
                None => {
                    let path = dir.join(format!("{}.part", Spool::new_id()));
                    let f = std::fs::OpenOptions::new()
                        .read(true)
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .open(&path)
                        .map_err(io("create", &path))?;
                    (f, path)
                }
            };
            f.write_all(&buf).map_err(io("write", &path))?;
            let mut buf = buf;
            buf.clear();
            Ok(((f, path), buf))
        })
        .await
        .map_err(|e| SpoolError::Task(e.to_string()))??;
        self.file = Some(file);
        self.buf = buf;
        Ok(())
    }

    /// The whole message, in memory.
    pub async fn finish(mut self) -> Result<Vec<u8>, SpoolError> {
        let Some((file, path)) = self.file.take() else {
            return Ok(std::mem::take(&mut self.buf));
        };
        let tail = std::mem::take(&mut self.buf);
        tokio::task::spawn_blocking(move || {
            use std::io::{Read, Seek, SeekFrom};
            let mut f = file;
            let mut all = Vec::new();
            let result = f
                .seek(SeekFrom::Start(0))
                .and_then(|_| f.read_to_end(&mut all));
            let _ = std::fs::remove_file(&path);
            result.map_err(io("read back", &path))?;
            all.extend_from_slice(&tail);
            Ok(all)
        })
        .await
        .map_err(|e| SpoolError::Task(e.to_string()))?
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        if let Some((_, path)) = &self.file {
            let _ = std::fs::remove_file(path);
        }
    }
}

pub(crate) fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests;
