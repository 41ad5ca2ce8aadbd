//! Delivery from a spool to its [`Destination`] (users' mail grains for the
//! inbound spool, other mail servers for the outbound queue), with retries
//! and bounces.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use granary_grains::mail::MailDelivery;
use granary_grains::{GrainId, Grains, Problem};

use crate::entry::{Envelope, Progress, Recipient, read_headers};
use crate::{Spool, SpoolError, dsn, unix_now};

/// Which local user, if any, an address reaches (how a bounce to a sender
/// on this host is delivered).
pub type LocalUser =
    Arc<dyn Fn(String) -> Pin<Box<dyn Future<Output = Option<String>> + Send>> + Send + Sync>;

/// Deliveries under way at once.
const PARALLEL: usize = 8;

/// What one delivery to one destination came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The far side has it durably.
    Delivered,
    /// Not now (`x.y.z why`); try again later.
    Retry(String),
    /// Never (`x.y.z why`): bounce it.
    Failed(String),
}

/// Where a spool's messages go. Each recipient's `user` field names the
/// destination key: a local user for the inbound spool, the address
/// itself for the outbound queue; recipients with the same key go in one
/// delivery.
pub trait Destination: Send + Sync {
    /// Delivers `message` (`size` bytes from its current position) to
    /// `addresses`, all of which reach `key`; resolves once the far side
    /// has it durably, or says why not.
    fn deliver(
        &self,
        envelope: Arc<Envelope>,
        key: String,
        addresses: Vec<String>,
        message: std::fs::File,
        size: u64,
    ) -> Pin<Box<dyn Future<Output = Outcome> + Send + '_>>;
}

/// The inbound spool's destination: each user's mail grain.
struct ToGrains(Arc<dyn Grains>);

impl Destination for ToGrains {
    fn deliver(
        &self,
        envelope: Arc<Envelope>,
        user: String,
        addresses: Vec<String>,
        message: std::fs::File,
        size: u64,
    ) -> Pin<Box<dyn Future<Output = Outcome> + Send + '_>> {
        Box::pin(async move {
            let id = envelope.id.as_str();
            let grain = match GrainId::for_user(&user, "mail") {
                Ok(g) => g,
                Err(e) => return Outcome::Failed(format!("5.1.1 {e}")),
            };
            let mail = MailDelivery {
                id: envelope.id.clone(),
                from: envelope.from.clone(),
                to: addresses,
                message,
                size,
            };
            match self.0.deliver_mail(&grain, mail).await {
                Ok(()) => {
                    tracing::info!(id, user, bytes = size, "delivered");
                    Outcome::Delivered
                }
                Err(e) if e.problem == Problem::NoSuchGrain => {
                    tracing::warn!(id, user, "the recipient's mailbox no longer exists");
                    Outcome::Failed("5.1.1 the mailbox no longer exists".to_owned())
                }
                Err(e) => {
                    tracing::warn!(id, user, error = %e, "delivery failed; will retry");
                    Outcome::Retry(e.to_string())
                }
            }
        })
    }
}

/// Hands spooled messages to their destination until shut down.
pub struct Deliverer {
    spool: Arc<Spool>,
    destination: Arc<dyn Destination>,
    local_user: LocalUser,
    /// Where bounces for local senders are committed (the inbound spool).
    bounce_to: Arc<Spool>,
    /// Where bounces for senders on other hosts are committed (the
    /// outbound queue); without one they are kept in `bounces/`.
    bounce_out: Option<Arc<Spool>>,
}

/// What one attempt decided.
enum Decision {
    /// Some recipients still wait; the progress is saved.
    Later,
    /// As `Later`, and the sender is owed a delay notice for these
    /// (recipient key, why) now.
    Delayed {
        waiting: Vec<(String, String)>,
        offset: u64,
    },
    /// Nothing more to do: every recipient has it or never will.
    Finished {
        failed: Vec<(String, String)>,
        offset: u64,
    },
}

impl Deliverer {
    /// The inbound spool's deliverer: into users' mail grains.
    pub fn new(spool: Arc<Spool>, grains: Arc<dyn Grains>, local_user: LocalUser) -> Deliverer {
        Deliverer {
            bounce_to: spool.clone(),
            spool,
            destination: Arc::new(ToGrains(grains)),
            local_user,
            bounce_out: None,
        }
    }

    /// Sends bounces for senders on other hosts through `outbound`.
    pub fn bouncing_out(mut self, outbound: Arc<Spool>) -> Deliverer {
        self.bounce_out = Some(outbound);
        self
    }

    /// A deliverer of `spool` to `destination`; bounces for local senders
    /// go into `bounce_to` (the inbound spool, which puts them in the
    /// sender's grain).
    pub fn to(
        spool: Arc<Spool>,
        destination: Arc<dyn Destination>,
        local_user: LocalUser,
        bounce_to: Arc<Spool>,
    ) -> Deliverer {
        Deliverer {
            spool,
            destination,
            local_user,
            bounce_to,
            bounce_out: None,
        }
    }

    /// Delivers whatever is due, waking when a message is committed or
    /// made due and when the next retry is; ends on `shutdown` (a delivery
    /// cut off then is simply tried again after the restart).
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let this = Arc::new(self);
        let mut tasks = tokio::task::JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            let now = unix_now();
            let (due, next) = this.spool.take_due(now);
            let mut waiting = due.into_iter();
            loop {
                while tasks.len() >= PARALLEL {
                    tasks.join_next().await;
                }
                let Some(id) = waiting.next() else { break };
                let d = this.clone();
                tasks.spawn(async move { d.attempt(&id).await });
            }
            let sleep = next
                .map(|t| Duration::from_secs((t - now).clamp(1, 3600) as u64))
                .unwrap_or(Duration::from_secs(3600));
            tokio::select! {
                _ = this.spool.wake.notified() => {}
                _ = tokio::time::sleep(sleep) => {}
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                _ = &mut shutdown => break,
            }
        }
        tasks.shutdown().await;
    }

    /// One attempt at every recipient of `id` still waiting.
    async fn attempt(&self, id: &str) {
        let Some((envelope, offset, size, progress)) = self.spool.snapshot(id) else {
            return;
        };
        let path = self.spool.msg_path(id);
        let mut delivered = Vec::new();
        let mut failed = Vec::new();
        let mut temporary = None;
        for (user, addresses) in envelope.users() {
            if progress.delivered.contains(&user) || progress.failed.iter().any(|(u, _)| *u == user)
            {
                continue;
            }
            let file = match open_at(&path, offset).await {
                Ok(f) => f,
                Err(e) => {
                    tracing::error!(id, error = %e, "cannot read a spooled message");
                    temporary = Some(e.to_string());
                    break;
                }
            };
            match self
                .destination
                .deliver(envelope.clone(), user.clone(), addresses, file, size)
                .await
            {
                Outcome::Delivered => delivered.push(user),
                Outcome::Failed(why) => failed.push((user, why)),
                Outcome::Retry(why) => temporary = Some(why),
            }
        }
        let spool = self.spool.clone();
        let key = id.to_owned();
        let decided = tokio::task::spawn_blocking(move || {
            spool.record_attempt(&key, delivered, failed, temporary)
        })
        .await;
        match decided {
            Ok(Ok(Decision::Later)) => {}
            Ok(Ok(Decision::Delayed { waiting, offset })) => {
                if let Err(e) = self.notify(&envelope, &waiting, offset, true).await {
                    tracing::warn!(id, error = %e, "cannot send the delay notice");
                }
            }
            Ok(Ok(Decision::Finished { failed, offset })) => {
                if let Err(e) = self.finish(&envelope, &failed, offset).await {
                    tracing::error!(id, error = %e, "cannot bounce; keeping the message");
                    self.spool.release(id, Some(e.to_string()));
                }
            }
            Ok(Err(e)) => {
                tracing::error!(id, error = %e, "cannot record delivery progress");
                self.spool.release(id, Some(e.to_string()));
            }
            Err(e) => {
                tracing::error!(id, error = %e, "delivery bookkeeping failed");
                self.spool.release(id, Some(e.to_string()));
            }
        }
    }

    /// Bounces what failed (durably), then removes the message (or keeps
    /// it, settled, in a spool that keeps delivered messages).
    async fn finish(
        &self,
        envelope: &Envelope,
        failed: &[(String, String)],
        offset: u64,
    ) -> Result<(), SpoolError> {
        if !failed.is_empty() {
            self.bounce(envelope, failed, offset).await?;
        }
        let spool = self.spool.clone();
        let id = envelope.id.clone();
        tokio::task::spawn_blocking(move || spool.finished(&id))
            .await
            .map_err(|e| SpoolError::Task(e.to_string()))?
    }

    async fn bounce(
        &self,
        envelope: &Envelope,
        failed: &[(String, String)],
        offset: u64,
    ) -> Result<(), SpoolError> {
        self.notify(envelope, failed, offset, false).await
    }

    /// Tells the sender that `recipients` (key, why) failed, or with
    /// `delayed` that they are still being retried (RFC 3464).
    async fn notify(
        &self,
        envelope: &Envelope,
        failed: &[(String, String)],
        offset: u64,
        delayed: bool,
    ) -> Result<(), SpoolError> {
        if envelope.from.is_empty() {
            // Never bounce a bounce (RFC 5321 §6.1).
            tracing::warn!(id = envelope.id, "a bounce could not be delivered; dropped");
            return Ok(());
        }
        let path = self.spool.msg_path(&envelope.id);
        let headers = tokio::task::spawn_blocking(move || read_headers(&path, offset))
            .await
            .map_err(|e| SpoolError::Task(e.to_string()))?
            .map_err(|e| SpoolError::Task(format!("reading the headers back: {e}")))?;
        let recipients: Vec<(String, String)> = envelope
            .recipients
            .iter()
            .filter_map(|r| {
                failed
                    .iter()
                    .find(|(u, _)| *u == r.user)
                    .map(|(_, why)| (r.address.clone(), why.clone()))
            })
            .collect();
        let settings = self.spool.settings();
        let now = unix_now();
        let notice = if delayed {
            dsn::Notice::Delayed {
                until: envelope.received_at + settings.lifetime.as_secs() as i64,
            }
        } else {
            dsn::Notice::Failed
        };
        let message = dsn::build(
            &settings.hostname,
            envelope,
            &recipients,
            &headers,
            now,
            notice,
        );
        let id = Spool::new_id();
        match (self.local_user)(envelope.from.clone()).await {
            Some(user) => {
                let bounce = Envelope {
                    id: id.clone(),
                    from: String::new(),
                    recipients: vec![Recipient {
                        address: envelope.from.clone(),
                        user,
                    }],
                    received_at: now,
                    client: "local".to_owned(),
                    helo: settings.hostname.clone(),
                    sender_verified: true,
                };
                tracing::info!(id = envelope.id, bounce = id, "bounced to a local sender");
                self.bounce_to.commit(bounce, Vec::new(), message).await
            }
            None if self.bounce_out.is_some() && !envelope.sender_verified => {
                tracing::warn!(
                    id = envelope.id,
                    sender = envelope.from,
                    "not bounced: the sender was not verified (SPF), so the address may be forged"
                );
                Ok(())
            }
            None if self.bounce_out.is_some() => {
                let out = self.bounce_out.as_ref().expect("checked");
                let bounce = Envelope {
                    id: id.clone(),
                    from: String::new(),
                    recipients: vec![Recipient {
                        address: envelope.from.clone(),
                        user: envelope.from.to_ascii_lowercase(),
                    }],
                    received_at: now,
                    client: "local".to_owned(),
                    helo: settings.hostname.clone(),
                    sender_verified: true,
                };
                tracing::info!(
                    id = envelope.id,
                    bounce = id,
                    sender = envelope.from,
                    "bounced to a sender on another host"
                );
                out.commit(bounce, Vec::new(), message).await
            }
            None => {
                let path = self.spool.dir.join("bounces").join(format!("{id}.eml"));
                tracing::warn!(
                    id = envelope.id,
                    bounce = %path.display(),
                    sender = envelope.from,
                    "bounced; the notice to a sender on another host waits for outbound mail"
                );
                tokio::task::spawn_blocking(move || {
                    granary_files::write_atomic(&path, &message, 0o600)
                })
                .await
                .map_err(|e| SpoolError::Task(e.to_string()))??;
                Ok(())
            }
        }
    }
}

async fn open_at(path: &std::path::Path, offset: u64) -> std::io::Result<std::fs::File> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        use std::io::{Seek, SeekFrom};
        let mut f = std::fs::File::open(&path)?;
        f.seek(SeekFrom::Start(offset))?;
        Ok(f)
    })
    .await
    .map_err(std::io::Error::other)?
}

impl Spool {
    /// What one attempt needs of an entry.
    fn snapshot(&self, id: &str) -> Option<(Arc<Envelope>, u64, u64, Progress)> {
        self.entries()
            .get(id)
            .map(|t| (t.envelope.clone(), t.offset, t.size, t.progress.clone()))
    }

    /// Ends an attempt that could not be recorded: retry later.
    fn release(&self, id: &str, error: Option<String>) {
        let retry = self.backoff(1);
        if let Some(t) = self.entries().get_mut(id) {
            t.busy = false;
            t.progress.next_attempt = unix_now() + retry;
            if error.is_some() {
                t.progress.last_error = error;
            }
        }
    }

    /// Seconds to wait after the `attempts`th failed attempt.
    fn backoff(&self, attempts: u32) -> i64 {
        let s = &self.settings;
        let wait = s
            .retry_first
            .saturating_mul(1u32 << attempts.saturating_sub(1).min(20))
            .min(s.retry_max);
        wait.as_secs().max(1) as i64
    }

    /// Notes an attempt's outcome; saves the progress when the message
    /// stays. Blocking.
    fn record_attempt(
        &self,
        id: &str,
        delivered: Vec<String>,
        failed: Vec<(String, String)>,
        temporary: Option<String>,
    ) -> Result<Decision, SpoolError> {
        let now = unix_now();
        let mut notice = None;
        let progress = {
            let mut entries = self.entries();
            let Some(t) = entries.get_mut(id) else {
                return Ok(Decision::Later);
            };
            let p = &mut t.progress;
            p.delivered.extend(delivered);
            p.failed.extend(failed);
            let pending: Vec<String> = t
                .envelope
                .users()
                .into_iter()
                .map(|(u, _)| u)
                .filter(|u| !p.delivered.contains(u) && !p.failed.iter().any(|(f, _)| f == u))
                .collect();
            if pending.is_empty() {
                return Ok(Decision::Finished {
                    // Those told once are not told again.
                    failed: unbounced(p),
                    offset: t.offset,
                });
            }
            if temporary.is_some() {
                p.last_error = temporary;
            }
            // A message delivered again after a failover counts its age
            // from then.
            let since = p
                .redelivered_for
                .map_or(t.envelope.received_at, |r| r.max(t.envelope.received_at));
            let age = now - since;
            if age >= self.settings.lifetime.as_secs() as i64 {
                if p.redelivered_for.is_some() {
                    // Their grains had it once (a failover may have lost
                    // it since): no bounce says it never came.
                    tracing::warn!(id, users = ?pending, "gave up delivering again after a failover");
                    p.delivered.extend(pending);
                } else {
                    let why = format!(
                        "4.4.7 gave up after {} hours: {}",
                        age / 3600,
                        p.last_error
                            .as_deref()
                            .unwrap_or("the mailbox could not take it")
                    );
                    p.failed
                        .extend(pending.into_iter().map(|u| (u, why.clone())));
                }
                return Ok(Decision::Finished {
                    failed: unbounced(p),
                    offset: t.offset,
                });
            }
            p.attempts += 1;
            p.next_attempt = now + self.backoff(p.attempts);
            let owed = self
                .settings
                .delay_warning
                .filter(|w| !p.warned && age >= w.as_secs() as i64 && !t.envelope.from.is_empty());
            if owed.is_some() {
                p.warned = true;
                let why = p
                    .last_error
                    .clone()
                    .unwrap_or_else(|| "4.0.0 not delivered yet".to_owned());
                notice = Some((
                    pending.iter().map(|u| (u.clone(), why.clone())).collect(),
                    t.offset,
                ));
            }
            p.clone()
        };
        let saved = serde_json::to_vec(&progress).map_err(|e| SpoolError::Task(e.to_string()))?;
        let result = granary_files::write_atomic(&self.state_path(id), &saved, 0o600);
        if let Some(t) = self.entries().get_mut(id) {
            t.busy = false;
        }
        result?;
        Ok(match notice {
            Some((waiting, offset)) => Decision::Delayed { waiting, offset },
            None => Decision::Later,
        })
    }
}

/// The failures whose sender was not told yet.
fn unbounced(p: &crate::Progress) -> Vec<(String, String)> {
    p.failed
        .iter()
        .filter(|(u, _)| !p.bounced.contains(u))
        .cloned()
        .collect()
}
