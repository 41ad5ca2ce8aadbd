//! The cluster's log of shared records as this node's state store sees
//! it: `granary_state::Ledger` over `granary_cluster`'s etcd log.

use std::future::Future;
use std::time::Duration;

use granary_cluster::{Coordinator, LEDGER_DEADLINE};

/// The shared log for a node's state store, which calls it from blocking
/// code: each call runs the etcd request on the daemon's runtime and waits.
pub(crate) struct EtcdLedger {
    coordinator: Coordinator,
    runtime: tokio::runtime::Handle,
}

impl EtcdLedger {
    /// Must be made on the runtime whose etcd connection it uses.
    pub(crate) fn new(coordinator: Coordinator) -> EtcdLedger {
        EtcdLedger {
            coordinator,
            runtime: tokio::runtime::Handle::current(),
        }
    }

    /// Runs `f` on the daemon's runtime (its timers too) and waits, at
    /// most `deadline` when given: a write holds the state database while
    /// it appends, so an etcd that stopped answering must not hold it long.
    fn wait<T, F: Future<Output = Result<T, granary_cluster::ClusterError>>>(
        &self,
        f: F,
        deadline: Option<Duration>,
    ) -> Result<T, String> {
        let run = async {
            match deadline {
                Some(d) => tokio::time::timeout(d, f)
                    .await
                    .map_err(|_| format!("etcd did not answer within {d:?}"))?
                    .map_err(|e| e.to_string()),
                None => f.await.map_err(|e| e.to_string()),
            }
        };
        // On a runtime worker, hand its other tasks on first; on a blocking
        // thread this runs as it is.
        tokio::task::block_in_place(|| self.runtime.block_on(run))
    }
}

impl granary_state::Ledger for EtcdLedger {
    fn id(&self) -> Result<String, String> {
        self.wait(
            async { self.coordinator.info().await.map(|i| i.id) },
            Some(LEDGER_DEADLINE),
        )
    }

    fn entries_after(&self, seq: u64) -> Result<Vec<(u64, Vec<u8>)>, String> {
        // Deadlines per page, in log_after.
        self.wait(self.coordinator.log_after(seq), None)
    }

    fn append(&self, seq: u64, entry: &[u8]) -> Result<bool, String> {
        self.wait(
            self.coordinator.log_append(seq, entry),
            Some(LEDGER_DEADLINE),
        )
        .map_err(|e| format!("{e} (if etcd took the change after all, every node applies it)"))
    }
}
