//! Copies of other nodes' spool entries, over the node link: before a
//! node answers 250 for a message, its spool entry is copied here (and
//! made durable) with [`copy_entry`]; once the message is safe (delivered
//! and in a copy of its grain's data, or sent on), the node asks every
//! live node to drop its copy with [`release_entries`]. A node that dies
//! leaves its copies with the node that took them, which delivers them.

use std::sync::Arc;
use std::time::Duration;

use granary_package::SigningKey;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};

use granary_grains::Problem;

use crate::link::{Answer, answer_line, open, read_line};

/// The spools whose entries are copied.
pub const SPOOLS: [&str; 2] = ["spool", "outbound"];

/// The largest entry copied (far above what the MX accepts).
const MAX_ENTRY: u64 = 256 << 20;
/// How long a copy may take to be made durable there.
const KEPT_WITHIN: Duration = Duration::from_secs(30);

/// Where a node keeps other nodes' spool copies (the daemon's data dir).
pub trait SpoolCopies: Send + Sync {
    /// Keeps `bytes` as entry `id` of node `origin`'s spool `spool`,
    /// durably, before it returns. Blocking.
    fn keep(&self, origin: &str, spool: &str, id: &str, bytes: &[u8]) -> Result<(), String>;
    /// Drops the copies of `ids` of `origin`'s `spool` it has. Blocking.
    fn release(&self, origin: &str, spool: &str, ids: &[String]);
}

/// The two requests, as the link carries them.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "do", rename_all = "kebab-case")]
pub(crate) enum SpoolRequest {
    /// `size` bytes follow: the entry's file.
    Copy {
        spool: String,
        id: String,
        size: u64,
    },
    Release {
        spool: String,
        ids: Vec<String>,
    },
}

fn valid(spool: &str, id: &str) -> bool {
    SPOOLS.contains(&spool)
        && !id.is_empty()
        && id.len() <= 64
        && id.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The serving side of a [`SpoolRequest`] from node `node`.
pub(crate) async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: BufReader<S>,
    node: &str,
    copies: &Arc<dyn SpoolCopies>,
    request: SpoolRequest,
) -> std::io::Result<()> {
    let refused = match request {
        SpoolRequest::Copy { spool, id, size } => {
            if !valid(&spool, &id) || size > MAX_ENTRY {
                // The sender checks this first; one that did not is cut off.
                Some(format!("no spool entry {spool}/{id} of {size} bytes"))
            } else {
                let mut bytes = Vec::with_capacity(size.min(1 << 20) as usize);
                let got = crate::link::copy_body(&mut stream, &mut bytes, size).await?;
                if got != size {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("the spool copy ended after {got} of {size} bytes"),
                    ));
                }
                let (copies, origin) = (copies.clone(), node.to_owned());
                let kept =
                    tokio::task::spawn_blocking(move || copies.keep(&origin, &spool, &id, &bytes))
                        .await
                        .map_err(std::io::Error::other)?;
                kept.err()
            }
        }
        SpoolRequest::Release { spool, ids } => {
            let ids: Vec<String> = ids.into_iter().filter(|i| valid(&spool, i)).collect();
            let (copies, origin) = (copies.clone(), node.to_owned());
            tokio::task::spawn_blocking(move || copies.release(&origin, &spool, &ids))
                .await
                .map_err(std::io::Error::other)?;
            None
        }
    };
    let line = answer_line(refused.map(Problem::Host), None);
    stream.write_all(&line).await?;
    stream.flush().await
}

async fn ask(
    address: &str,
    node_key: &str,
    key: &SigningKey,
    request: SpoolRequest,
    body: &[u8],
) -> Result<(), String> {
    let io = |e: std::io::Error| format!("node link to {address}: {e}");
    let mut stream = open(address, node_key, key).await?;
    let mut line =
        serde_json::to_vec(&crate::link::Request::Spool { request }).expect("requests serialize");
    line.push(b'\n');
    stream.write_all(&line).await.map_err(io)?;
    stream.write_all(body).await.map_err(io)?;
    stream.flush().await.map_err(io)?;
    let line = tokio::time::timeout(KEPT_WITHIN, read_line(&mut stream))
        .await
        .map_err(|_| format!("node link to {address}: no answer within {KEPT_WITHIN:?}"))?
        .map_err(io)?;
    let answer: Answer = serde_json::from_slice(&line)
        .map_err(|e| format!("node link to {address}: a bad answer: {e}"))?;
    match answer.ok {
        true => Ok(()),
        false => Err(format!(
            "node link to {address}: {}",
            answer
                .problem
                .map_or("refused without a reason".to_owned(), |p| format!("{p:?}"))
        )),
    }
}

/// Copies entry `id` of this node's `spool` (its file's `bytes`) to the
/// node at `address`; `Ok` once it is durable there.
pub async fn copy_entry(
    address: &str,
    node_key: &str,
    key: &SigningKey,
    spool: &str,
    id: &str,
    bytes: &[u8],
) -> Result<(), String> {
    let request = SpoolRequest::Copy {
        spool: spool.to_owned(),
        id: id.to_owned(),
        size: bytes.len() as u64,
    };
    if bytes.len() as u64 > MAX_ENTRY {
        return Err(format!(
            "{} bytes is more than a node keeps of a spool entry",
            bytes.len()
        ));
    }
    ask(address, node_key, key, request, bytes).await
}

/// Asks the node at `address` to drop its copies of `ids` of this node's
/// `spool`.
pub async fn release_entries(
    address: &str,
    node_key: &str,
    key: &SigningKey,
    spool: &str,
    ids: &[String],
) -> Result<(), String> {
    let request = SpoolRequest::Release {
        spool: spool.to_owned(),
        ids: ids.to_vec(),
    };
    ask(address, node_key, key, request, &[]).await
}
