//! The grain's `taskd` service: one request from the gateway (which has
//! checked the client's certificate and credentials), the sync run on the
//! user's transaction log, one reply. What the sync adds to the log is
//! committed before the reply is sent.

use granary_wire::taskd::{MAX_REQUEST, Message, check_request, frame_len, reply};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::store::Store;
use crate::taskd;

/// Serves one connection from the gateway.
pub async fn serve(store: &Store, owner: &str, conn: granary_sdk::Accepted) {
    let mut stream = conn.stream;
    let answer = if conn.user != owner {
        reply(430, "Access denied", String::new())
    } else {
        match read_request(&mut stream).await {
            Ok(body) => handle(store, &body),
            Err(e) => reply(500, &e, String::new()),
        }
    };
    let _ = stream.write_all(&answer.encode()).await;
    let _ = stream.shutdown().await;
}

async fn read_request(stream: &mut tokio::net::UnixStream) -> Result<Vec<u8>, String> {
    let mut prefix = [0u8; 4];
    stream
        .read_exact(&mut prefix)
        .await
        .map_err(|_| "The request ended early".to_owned())?;
    let total = frame_len(prefix, MAX_REQUEST).map_err(|e| e.to_string())?;
    let mut body = vec![0u8; total - 4];
    stream
        .read_exact(&mut body)
        .await
        .map_err(|_| "The request ended early".to_owned())?;
    Ok(body)
}

/// Runs one request against the store: the reply to send.
pub fn handle(store: &Store, body: &[u8]) -> Message {
    let request = match Message::parse(body) {
        Ok(m) => m,
        Err(e) => return reply(500, &e, String::new()),
    };
    let credentials = match check_request(&request) {
        Ok(c) => c,
        Err(e) => return reply(e.code, &e.status, String::new()),
    };
    let synced = store.taskd_sync(|log| {
        match taskd::sync(log, &request.payload, credentials.init, || {
            uuid::Uuid::new_v4().to_string()
        }) {
            Ok(mut s) => (std::mem::take(&mut s.append), Ok(s)),
            Err(e) => (Vec::new(), Err(e)),
        }
    });
    match synced {
        Ok(Ok(s)) => {
            let status = if s.code == 200 { "Ok" } else { "No change" };
            reply(s.code, status, s.payload)
        }
        Ok(Err(e)) => reply(e.code, &e.status, String::new()),
        Err(e) => store_failed(&e),
    }
}

fn store_failed(e: &anyhow::Error) -> Message {
    granary_sdk::log::warn(&format!("taskd sync failed: {e:#}"));
    reply(500, "The task store failed; try again", String::new())
}
