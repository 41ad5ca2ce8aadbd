//! The cluster's log of shared records in etcd (the daemon gives it to
//! its state store as `granary_state::Ledger`): entry `n` is the key `log/<n, 20 digits>`, so keys sort as the
//! entries do. Appending entry `n + 1` is one transaction that creates its
//! key only if no node has, which is what makes writes from two nodes
//! take turns.

use std::time::Duration;

use etcd_client::{Compare, CompareOp, GetOptions, Txn, TxnOp};

use crate::{ClusterError, Coordinator};

/// How long an append to the shared log, or one page read of it, may take.
pub const LEDGER_DEADLINE: Duration = Duration::from_secs(3);

/// Entries read per request while catching up.
const PAGE: i64 = 256;

fn entry_key(coordinator: &Coordinator, n: u64) -> String {
    coordinator.key(&format!("log/{n:020}"))
}

fn seq_of(key: &[u8]) -> Option<u64> {
    let key = std::str::from_utf8(key).ok()?;
    key.rsplit_once("log/")?.1.parse().ok()
}

impl Coordinator {
    /// The log's entries after number `seq`, in order. Each page of
    /// [`PAGE`] entries must come within [`LEDGER_DEADLINE`], so a long
    /// catch-up on a slow link still progresses.
    pub async fn log_after(&self, seq: u64) -> Result<Vec<(u64, Vec<u8>)>, ClusterError> {
        // Just past every `log/` key: '/' + 1 is '0'.
        let end = self.key("log0");
        let mut entries = Vec::new();
        let mut from = seq + 1;
        loop {
            let etcd = self.c();
            let page = etcd.get(
                entry_key(self, from),
                Some(GetOptions::new().with_range(end.as_str()).with_limit(PAGE)),
            );
            let resp = tokio::time::timeout(LEDGER_DEADLINE, page)
                .await
                .map_err(|_| {
                    ClusterError::Changed(format!(
                        "etcd did not answer within {LEDGER_DEADLINE:?} reading the shared log"
                    ))
                })?
                .map_err(ClusterError::etcd("reading the shared log"))?;
            for kv in resp.kvs() {
                let n = seq_of(kv.key()).ok_or_else(|| ClusterError::Damaged {
                    key: String::from_utf8_lossy(kv.key()).into_owned(),
                    why: "a key in the shared log that is not an entry".into(),
                })?;
                entries.push((n, kv.value().to_vec()));
                from = n + 1;
            }
            if !resp.more() {
                return Ok(entries);
            }
        }
    }

    /// Appends `entry` as number `seq + 1` unless that number is taken;
    /// `Ok(false)` when another node's entry is there.
    pub async fn log_append(&self, seq: u64, entry: &[u8]) -> Result<bool, ClusterError> {
        let key = entry_key(self, seq + 1);
        match self
            .create_or_read(&key, entry, "appending to the shared log")
            .await?
        {
            None => Ok(true),
            // Taken. If by this very entry (an append retried after its
            // answer was lost), it is ours.
            Some(theirs) => Ok(theirs == entry),
        }
    }

    /// Writes `value` at `key` if nothing is there; `None` when it did,
    /// else what is there, read in the same transaction.
    async fn create_or_read(
        &self,
        key: &str,
        value: &[u8],
        doing: &'static str,
    ) -> Result<Option<Vec<u8>>, ClusterError> {
        let txn = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key, value, None)])
            .or_else([TxnOp::get(key, None)]);
        let resp = self.c().txn(txn).await.map_err(ClusterError::etcd(doing))?;
        if resp.succeeded() {
            return Ok(None);
        }
        let theirs = resp.op_responses().into_iter().find_map(|r| match r {
            etcd_client::TxnOpResponse::Get(g) => g.kvs().first().map(|kv| kv.value().to_vec()),
            _ => None,
        });
        Ok(Some(theirs.unwrap_or_default()))
    }

    /// The host uid range every node's grains run in (`jail.uid_range`):
    /// grains' uids are picked from the shared records, so one range serves
    /// the whole cluster. The first node to ask records `mine`; the answer
    /// is the cluster's range, which the caller compares with its own.
    pub async fn uid_range(&self, mine: &str) -> Result<String, ClusterError> {
        let key = self.key("uid_range");
        let theirs = self
            .create_or_read(&key, mine.as_bytes(), "reading the cluster's uid range")
            .await?;
        Ok(match theirs {
            None => mine.to_owned(),
            Some(theirs) => String::from_utf8_lossy(&theirs).into_owned(),
        })
    }

    /// Watches the log for new entries.
    pub async fn watch_log(&self) -> Result<LogWatch, ClusterError> {
        let prefix = self.key("log/");
        let mut client = self.client();
        let stream = client
            .watch(
                prefix.as_str(),
                Some(etcd_client::WatchOptions::new().with_prefix()),
            )
            .await
            .map_err(ClusterError::etcd("watching the shared log"))?;
        Ok(LogWatch { stream })
    }
}

/// A watch on the shared log ([`Coordinator::watch_log`]).
pub struct LogWatch {
    stream: etcd_client::WatchStream,
}

impl LogWatch {
    /// Resolves when entries were appended since the last call, or with an
    /// error when the watch broke (make a new one).
    pub async fn changed(&mut self) -> Result<(), ClusterError> {
        loop {
            match self.stream.message().await {
                Ok(Some(resp)) if !resp.events().is_empty() => return Ok(()),
                Ok(Some(resp)) if resp.canceled() => {
                    return Err(ClusterError::Changed(format!(
                        "etcd ended the watch: {}",
                        resp.cancel_reason()
                    )));
                }
                Ok(Some(_)) => continue,
                Ok(None) => return Err(ClusterError::Changed("the etcd watch ended".to_owned())),
                Err(e) => return Err(ClusterError::etcd("watching the shared log")(e)),
            }
        }
    }
}
