//! The etcd client as the coordinator uses it, with retries where the
//! request never reached a member.
//!
//! etcd-client balances requests over every endpoint and does not retry:
//! while one member of three is down, about a third of requests are sent
//! to it and fail at connect (etcd-client issue 39). Those failures,
//! UNAVAILABLE or a transport error, are retried on another pick, with a
//! short pause, up to eight times. A write whose answer was lost after
//! etcd applied it can be retried too; every write here is a
//! transaction comparing what it read, so a repeat is refused by its own
//! compare and the caller reads what is there, never applies twice.

use std::future::Future;
use std::time::Duration;

use etcd_client::{
    Client, GetOptions, GetResponse, LeaseGrantResponse, LeaseRevokeResponse,
    LeaseTimeToLiveResponse, PutOptions, PutResponse, Txn, TxnResponse,
};

/// gRPC's UNAVAILABLE (tonic's `Code` as a number).
const GRPC_UNAVAILABLE: i32 = 14;

fn retryable(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::TransportError(_) => true,
        etcd_client::Error::GRpcStatus(s) => i32::from(s.code()) == GRPC_UNAVAILABLE,
        _ => false,
    }
}

#[derive(Clone)]
pub(crate) struct Etcd(pub(crate) Client);

impl Etcd {
    async fn retry<T, Fut>(
        &self,
        mut call: impl FnMut(Client) -> Fut,
    ) -> Result<T, etcd_client::Error>
    where
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let mut attempt = 0u32;
        loop {
            match call(self.0.clone()).await {
                Err(e) if attempt < 8 && retryable(&e) => {
                    attempt += 1;
                    tracing::debug!(attempt, error = %e, "etcd request not delivered; retrying");
                    tokio::time::sleep(Duration::from_millis(20 * u64::from(attempt))).await;
                }
                other => return other,
            }
        }
    }

    pub(crate) async fn get(
        &self,
        key: impl Into<Vec<u8>>,
        options: Option<GetOptions>,
    ) -> Result<GetResponse, etcd_client::Error> {
        let key = key.into();
        self.retry(|mut c| {
            let (key, options) = (key.clone(), options.clone());
            async move { c.get(key, options).await }
        })
        .await
    }

    pub(crate) async fn put(
        &self,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
        options: Option<PutOptions>,
    ) -> Result<PutResponse, etcd_client::Error> {
        let (key, value) = (key.into(), value.into());
        self.retry(|mut c| {
            let (key, value, options) = (key.clone(), value.clone(), options.clone());
            async move { c.put(key, value, options).await }
        })
        .await
    }

    pub(crate) async fn txn(&self, txn: Txn) -> Result<TxnResponse, etcd_client::Error> {
        self.retry(|mut c| {
            let txn = txn.clone();
            async move { c.txn(txn).await }
        })
        .await
    }

    pub(crate) async fn lease_grant(
        &self,
        ttl: i64,
    ) -> Result<LeaseGrantResponse, etcd_client::Error> {
        self.retry(|mut c| async move { c.lease_grant(ttl, None).await })
            .await
    }

    pub(crate) async fn lease_revoke(
        &self,
        id: i64,
    ) -> Result<LeaseRevokeResponse, etcd_client::Error> {
        self.retry(|mut c| async move { c.lease_revoke(id).await })
            .await
    }

    pub(crate) async fn lease_time_to_live(
        &self,
        id: i64,
    ) -> Result<LeaseTimeToLiveResponse, etcd_client::Error> {
        self.retry(|mut c| async move { c.lease_time_to_live(id, None).await })
            .await
    }
}
