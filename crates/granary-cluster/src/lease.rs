//! A node's lease: while the node renews it, its `alive/<name>` record
//! exists and it may own running grains; once the renewals stop, etcd
//! drops the record when the TTL runs out and other nodes may take over.
//!
//! The node renews every TTL/6 and judges its lease conservatively. A
//! renewal counts from the moment its request was sent (etcd renewed it
//! no earlier), and the lease counts as live only for half its TTL after
//! that: a node cut off from etcd stops trusting its lease at TTL/2, well
//! before anyone else can see it expire at TTL. That gap is what
//! self-fencing runs in.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::Client;
use tokio::sync::watch;

/// How a node's lease stands, as the node itself sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LeaseState {
    /// Renewed within the last TTL/2.
    Live,
    /// Not renewed for TTL/2 or more: the node must act as if it had
    /// lost it (fence itself), though etcd may not have dropped it yet.
    Lapsing,
    /// etcd says it is gone (expired or revoked). Never live again: the
    /// node needs a new lease.
    Lost,
}

/// A lease this node holds and renews in the background until it is
/// released or dropped. Once etcd says it is gone, the node may take a new
/// one in its place ([`crate::Coordinator::retake_lease`]): everything
/// that holds this `NodeLease` then sees the new lease.
pub struct NodeLease {
    node: String,
    client: Client,
    held: Mutex<Arc<Held>>,
    /// Released on purpose (the daemon stopping): never taken again.
    released: std::sync::atomic::AtomicBool,
}

/// One etcd lease and its renewal task.
struct Held {
    id: i64,
    ttl: Duration,
    renewed: Arc<Mutex<Instant>>,
    renewals: Arc<AtomicU64>,
    lost: watch::Receiver<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Held {
    fn start(client: Client, id: i64, ttl: Duration, sent: Instant) -> Held {
        let renewed = Arc::new(Mutex::new(sent));
        let renewals = Arc::new(AtomicU64::new(0));
        let (lost_tx, lost) = watch::channel(false);
        let task = tokio::spawn(renew(
            client,
            id,
            ttl,
            Renewed {
                at: renewed.clone(),
                count: renewals.clone(),
            },
            lost_tx,
        ));
        Held {
            id,
            ttl,
            renewed,
            renewals,
            lost,
            task,
        }
    }

    fn renewed_at(&self) -> Instant {
        *self.renewed.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl NodeLease {
    pub(crate) fn start(
        client: Client,
        node: String,
        id: i64,
        ttl: Duration,
        sent: Instant,
    ) -> NodeLease {
        let held = Held::start(client.clone(), id, ttl, sent);
        NodeLease {
            node,
            client,
            held: Mutex::new(Arc::new(held)),
            released: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Puts a new lease in place of a lost one; `false` (nothing
    /// changed) when the lease was released meanwhile.
    pub(crate) fn replace(&self, id: i64, ttl: Duration, sent: Instant) -> bool {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        // Checked under the lock `release` sets it under.
        if self.is_released() {
            return false;
        }
        *held = Arc::new(Held::start(self.client.clone(), id, ttl, sent));
        true
    }

    /// No new lease is taken in place of this one from now on
    /// ([`NodeLease::release`] does this first too): a daemon about to
    /// rest calls it before it writes its rest mark, which a new lease
    /// would clear.
    pub fn forbid_retake(&self) {
        let _held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        self.released.store(true, Ordering::SeqCst);
    }

    /// Whether [`NodeLease::release`] or [`NodeLease::forbid_retake`] was
    /// called.
    pub fn is_released(&self) -> bool {
        self.released.load(Ordering::SeqCst)
    }

    fn held(&self) -> Arc<Held> {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// The etcd lease id.
    pub fn id(&self) -> i64 {
        self.held().id
    }

    /// The TTL etcd granted (it may round up what was asked).
    pub fn ttl(&self) -> Duration {
        self.held().ttl
    }

    /// How long since the last renewal that etcd confirmed was sent.
    pub fn since_renewal(&self) -> Duration {
        self.held().renewed_at().elapsed()
    }

    /// When this node stops trusting its lease unless it is renewed
    /// before: TTL/2 after the last confirmed renewal was sent.
    pub fn trusted_until(&self) -> Instant {
        let held = self.held();
        held.renewed_at() + held.ttl / 2
    }

    /// Renewals etcd confirmed since the lease was taken.
    pub fn renewals(&self) -> u64 {
        self.held().renewals.load(Ordering::Relaxed)
    }

    pub fn state(&self) -> LeaseState {
        let held = self.held();
        if *held.lost.borrow() {
            LeaseState::Lost
        } else if Instant::now() >= held.renewed_at() + held.ttl / 2 {
            LeaseState::Lapsing
        } else {
            LeaseState::Live
        }
    }

    pub fn is_live(&self) -> bool {
        self.state() == LeaseState::Live
    }

    /// Resolves when etcd reports the lease held now gone; never for a
    /// lease released on purpose, or replaced meanwhile.
    pub async fn lost(&self) {
        let mut rx = self.held().lost.clone();
        if rx.wait_for(|lost| *lost).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Stops renewing and revokes the lease, so `alive/<node>` goes at
    /// once rather than after the TTL: the clean way for a daemon to stop.
    pub async fn release(&self) -> Result<(), crate::ClusterError> {
        let held = {
            let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
            self.released.store(true, Ordering::SeqCst);
            held.clone()
        };
        held.task.abort();
        let mut client = self.client.clone();
        match client.lease_revoke(held.id).await {
            Ok(_) => Ok(()),
            // Already gone is what we wanted.
            Err(etcd_client::Error::GRpcStatus(s)) if i32::from(s.code()) == GRPC_NOT_FOUND => {
                Ok(())
            }
            Err(e) => Err(crate::ClusterError::etcd("revoking the node lease")(e)),
        }
    }
}

/// gRPC's NOT_FOUND (tonic's `Code` as a number): what etcd answers for a
/// lease it does not have.
const GRPC_NOT_FOUND: i32 = 5;

/// Where the renewal task records what etcd confirmed.
struct Renewed {
    at: Arc<Mutex<Instant>>,
    count: Arc<AtomicU64>,
}

impl Renewed {
    fn confirm(&self, sent: Instant) {
        let mut at = self.at.lock().unwrap_or_else(|e| e.into_inner());
        *at = (*at).max(sent);
        self.count.fetch_add(1, Ordering::Relaxed);
    }
}

/// Renews every TTL/6, so several renewals in a row may be late or lost
/// (an etcd leader election takes a second or two) before the node stops
/// trusting its lease at TTL/2. Each renewal waits at most TTL/6 for its
/// answer. A broken keep-alive stream (its etcd member died) is opened
/// again at once, on another pick of member, each try waiting at most
/// TTL/12, then with a short backoff: with one member of three gone, the
/// next renewal gets through well inside TTL/2. Stops for good when etcd
/// says the lease is gone, on the stream (no TTL left) or when opening it.
async fn renew(
    client: Client,
    id: i64,
    ttl: Duration,
    renewed: Renewed,
    lost: watch::Sender<bool>,
) {
    let every = (ttl / 6).max(Duration::from_millis(50));
    let open_within = (every / 2).max(Duration::from_millis(100));
    let gone = || {
        tracing::warn!(lease = id, "etcd says this node's lease has expired");
        let _ = lost.send(true);
    };
    let mut backoff = Duration::ZERO;
    loop {
        let mut c = client.clone();
        // Opening the stream sends a first renewal and reads its answer
        // (an answer of no TTL left is an error saying the lease is gone).
        let opened = Instant::now();
        match tokio::time::timeout(open_within, c.lease_keep_alive(id)).await {
            Ok(Ok((mut keeper, mut stream))) => {
                renewed.confirm(opened);
                backoff = Duration::ZERO;
                let mut last = opened;
                loop {
                    tokio::time::sleep_until((last + every).into()).await;
                    let sent = Instant::now();
                    last = sent;
                    if keeper.keep_alive().await.is_err() {
                        break;
                    }
                    match tokio::time::timeout(every, stream.message()).await {
                        Ok(Ok(Some(resp))) if resp.ttl() > 0 => renewed.confirm(sent),
                        Ok(Ok(Some(_))) => return gone(),
                        _ => break,
                    }
                }
            }
            Ok(Err(etcd_client::Error::LeaseKeepAliveError(e))) if e.contains("not found") => {
                return gone();
            }
            Ok(Err(e)) => {
                tracing::debug!(lease = id, error = %e, "cannot open the lease keep-alive")
            }
            Err(_) => tracing::debug!(lease = id, "opening the lease keep-alive timed out"),
        }
        tracing::debug!(lease = id, "lease keep-alive stream broke; reconnecting");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).clamp(Duration::from_millis(25), every);
    }
}
