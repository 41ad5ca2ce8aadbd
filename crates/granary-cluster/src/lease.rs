//! A node's lease: while the node renews it, its `alive/<name>` record
//! exists and it may own running grains; once the renewals stop, etcd
//! drops the record when the TTL runs out and other nodes may take over.
//!
//! The node judges its own lease conservatively. A renewal counts from
//! the moment its request was sent (etcd renewed it no earlier), and the
//! lease counts as live only for half its TTL after that: a node cut off
//! from etcd stops trusting its lease at TTL/2, well before anyone else
//! can see it expire at TTL. That gap is what self-fencing runs in.

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
/// released or dropped.
pub struct NodeLease {
    node: String,
    id: i64,
    ttl: Duration,
    renewed: Arc<Mutex<Instant>>,
    lost: watch::Receiver<bool>,
    client: Client,
    task: tokio::task::JoinHandle<()>,
}

impl NodeLease {
    pub(crate) fn start(
        client: Client,
        node: String,
        id: i64,
        ttl: Duration,
        sent: Instant,
    ) -> NodeLease {
        let renewed = Arc::new(Mutex::new(sent));
        let (lost_tx, lost) = watch::channel(false);
        let task = tokio::spawn(renew(client.clone(), id, ttl, renewed.clone(), lost_tx));
        NodeLease {
            node,
            id,
            ttl,
            renewed,
            lost,
            client,
            task,
        }
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// The etcd lease id.
    pub fn id(&self) -> i64 {
        self.id
    }

    /// The TTL etcd granted (it may round up what was asked).
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// How long since the last renewal that etcd confirmed.
    pub fn since_renewal(&self) -> Duration {
        self.renewed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .elapsed()
    }

    pub fn state(&self) -> LeaseState {
        if *self.lost.borrow() {
            LeaseState::Lost
        } else if self.since_renewal() >= self.ttl / 2 {
            LeaseState::Lapsing
        } else {
            LeaseState::Live
        }
    }

    pub fn is_live(&self) -> bool {
        self.state() == LeaseState::Live
    }

    /// Resolves when etcd reports the lease gone.
    pub async fn lost(&self) {
        let mut rx = self.lost.clone();
        let _ = rx.wait_for(|lost| *lost).await;
    }

    /// Stops renewing and revokes the lease, so `alive/<node>` goes at
    /// once rather than after the TTL: the clean way for a daemon to stop.
    pub async fn release(&self) -> Result<(), crate::ClusterError> {
        self.task.abort();
        let mut client = self.client.clone();
        match client.lease_revoke(self.id).await {
            Ok(_) => Ok(()),
            // Already gone is what we wanted.
            Err(etcd_client::Error::GRpcStatus(s)) if s.message().contains("lease not found") => {
                Ok(())
            }
            Err(e) => Err(crate::ClusterError::etcd("revoking the node lease")(e)),
        }
    }
}

impl Drop for NodeLease {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Renews every TTL/3; reconnects the keep-alive stream when it fails;
/// stops for good when etcd answers that the lease has no TTL left.
async fn renew(
    client: Client,
    id: i64,
    ttl: Duration,
    renewed: Arc<Mutex<Instant>>,
    lost: watch::Sender<bool>,
) {
    let every = ttl / 3;
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut c = client.clone();
        if let Ok((mut keeper, mut stream)) = c.lease_keep_alive(id).await {
            loop {
                let sent = Instant::now();
                if keeper.keep_alive().await.is_err() {
                    break;
                }
                match tokio::time::timeout(every, stream.message()).await {
                    Ok(Ok(Some(resp))) if resp.ttl() > 0 => {
                        *renewed.lock().unwrap_or_else(|e| e.into_inner()) = sent;
                        backoff = Duration::from_millis(100);
                    }
                    Ok(Ok(Some(_))) => {
                        tracing::warn!(lease = id, "etcd says this node's lease has expired");
                        let _ = lost.send(true);
                        return;
                    }
                    _ => break,
                }
                tokio::time::sleep(every.saturating_sub(sent.elapsed())).await;
            }
        }
        tracing::debug!(lease = id, "lease keep-alive stream broke; reconnecting");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(every.max(Duration::from_millis(100)));
    }
}
