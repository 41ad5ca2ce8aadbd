//! Moving a grain with its data to another node, over the node link.
//!
//! The source node (the grain's owner) drives; the target answers each
//! step through [`Moves`], which the daemon implements (datasets and the
//! supervisor stay out of this crate). One link connection per step:
//!
//! ```text
//! → {"op":"move","grain":"alice-git","id":"<hex>","step":{"prepare":{"from":"n1"}}}
//! ← {"ok":true}
//! → {..,"step":"receive"}
//! ← {"ok":true}                          the target is ready for the stream
//! → [u32 BE length][bytes] … [u32 0]     the stream, in frames; 0 ends it
//!                                        (u32::MAX: a keepalive, no bytes)
//! ← {"ok":true,"size":N}                 applied: N bytes taken
//! → {..,"step":{"commit":{"from_epoch":E}}} | "activate" | "abort"
//! ← {"ok":true} | {"ok":false,"problem":{..}}
//! ```
//!
//! A node also asks another to run a move it cannot drive itself (the
//! grain's owner drives) or to drain itself; progress comes back line by
//! line, then the report:
//!
//! ```text
//! → {"op":"run","job":{"move":{"grain":"alice-git","to":"n2"}}} | {"op":"run","job":{"drain":{"node":"n1"}}}
//! ← {"ok":true,"progress":"{..}"} …
//! ← {"ok":true,"report":"{..}"} | {"ok":false,"problem":{..}}
//! ```
//!
//! The end frame is what tells a whole stream from one cut at an entry
//! boundary (a tar stream cut there can look complete); TLS carries the
//! integrity of every byte.

use std::io::{Read, Write};
use std::pin::Pin;
use std::time::Duration;

use granary_grains::Problem;
use granary_model::GrainId;
use granary_package::SigningKey;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;

use crate::link::{Answer, answer_line, open, read_line};

/// The largest frame a sender writes and a receiver takes.
const FRAME: usize = 256 << 10;
/// How long a stream may go without a frame.
const IDLE: Duration = Duration::from_secs(60);
/// A sender with nothing to send (walking a big unchanged tree) says it
/// is still there this often.
const KEEPALIVE: Duration = Duration::from_secs(10);
const KEEPALIVE_LEN: u32 = u32::MAX;
/// How often a node running a job for another says it still is.
const HEARTBEAT: Duration = Duration::from_secs(15);
/// How long a step may take: syncing a big dataset, fetching an app's
/// image, starting a grain, applying the rest of a stream.
const APPLIED: Duration = Duration::from_secs(600);

/// Writes one stream of a move, blocking (see [`send_stream`]).
pub type Producer = Box<dyn FnOnce(&mut dyn Write) -> Result<(), String> + Send>;

pub type MoveFuture<T> = Pin<Box<dyn std::future::Future<Output = Result<T, String>> + Send>>;

/// What a node does when another moves a grain to it (move `id`).
pub trait Moves: Send + Sync {
    /// Gets ready to take `grain` from node `from`: checks that nothing of
    /// it is here, fetches its app, makes an empty staging dataset.
    fn prepare(&self, grain: &GrainId, id: &str, from: &str, seen: u64) -> MoveFuture<()>;
    /// Whether node `from` has move `id` of `grain` under way here: asked
    /// before a stream is taken, so a refusal comes with its reason.
    fn expects(&self, grain: &GrainId, id: &str, from: &str) -> Result<(), String>;
    /// Applies one stream (full first, then incrementals) to the staging
    /// dataset, reading it to its end; the bytes read.
    fn receive(
        &self,
        grain: &GrainId,
        id: &str,
        from: &str,
        stream: Box<dyn Read + Send>,
    ) -> MoveFuture<u64>;
    /// Makes the staged data durable and puts it in place as the grain's
    /// dataset, marked as arriving: it may start only once the placement
    /// has switched here from `from_epoch`.
    fn commit(&self, grain: &GrainId, id: &str, from: &str, from_epoch: i64) -> MoveFuture<()>;
    /// The placement switched here: clears the mark and starts the grain.
    fn activate(&self, grain: &GrainId, id: &str, from: &str) -> MoveFuture<()>;
    /// The move failed before the switch: removes what it left here.
    fn abort(&self, grain: &GrainId, id: &str, from: &str) -> MoveFuture<()>;
    /// Whether this node takes a replica stream of `grain` from `from`
    /// (its owner), a delta from `base` (`None`: whole); `Err` says why not
    /// (another base: the sender then sends it whole).
    fn replica_ready(&self, grain: &GrainId, from: &str, base: Option<&str>) -> Result<(), String>;
    /// Applies a replica stream to this node's copy of `grain`, which is
    /// whole again (as of `label`) only once all of it applied.
    #[allow(clippy::too_many_arguments)] // one replica step's fields
    fn replica(
        &self,
        grain: &GrainId,
        from: &str,
        label: &str,
        base: Option<&str>,
        epoch: i64,
        stream: Box<dyn Read + Send>,
    ) -> MoveFuture<u64>;
    /// Runs a job node `from` asked for, here, as if asked here: progress
    /// reports (JSON) go to `progress`; the answer is the report (JSON).
    /// The job runs to its end even if the asking node goes away.
    fn run(&self, job: Job, from: &str, progress: mpsc::Sender<String>) -> MoveFuture<String>;
}

/// What one node asks another to do for it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Job {
    /// Move a grain the asked node owns to node `to`.
    Move { grain: String, to: String },
    /// Move every grain off the asked node, which is `node`.
    Drain { node: String },
    /// An admin's call on a grain the asked node runs.
    Grain { grain: String, call: GrainCall },
}

/// What an admin asks of a grain on another node ([`Job::Grain`]); the
/// report is JSON: nothing, whether it ran, its status, its log (hex).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum GrainCall {
    Start { answering: bool },
    Stop,
    Status,
    Logs { max_bytes: u64 },
    Snapshot { label: String },
    Snapshots,
    Prune,
    Rollback { snapshot: String },
    MailStatus,
    XmppStatus,
    XmppBefriend { jid: String, name: String },
    XmppRoomMembers,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Step {
    Prepare {
        from: String,
        /// How far the source has applied the shared records: the target
        /// catches up that far first (a grain made a moment ago).
        #[serde(default)]
        seen: u64,
    },
    Receive,
    /// A replication round's stream: the grain's data as of snapshot
    /// `label`, a delta from `base` (the copy the target holds) or whole.
    Replica {
        label: String,
        base: Option<String>,
        epoch: i64,
    },
    Commit {
        from_epoch: i64,
    },
    Activate,
    Abort,
}

/// A move id: 16 hex digits, so it fits in dataset and snapshot names.
pub fn new_id() -> String {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).expect("the OS gives random bytes");
    hex::encode(bytes)
}

fn valid_id(id: &str) -> bool {
    id.len() == 16 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Where the target node is and who it is: its link and pinned key.
pub struct Target<'a> {
    pub address: &'a str,
    pub key: &'a str,
}

async fn request<S: AsyncWrite + Unpin>(
    stream: &mut S,
    grain: &GrainId,
    id: &str,
    step: &Step,
) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(&crate::link::Request::Move {
        grain: grain.to_string(),
        id: id.to_owned(),
        step: step.clone(),
    })
    .expect("requests serialize");
    line.push(b'\n');
    stream.write_all(&line).await?;
    stream.flush().await
}

async fn answer<R: AsyncRead + Unpin>(
    stream: &mut BufReader<R>,
    within: Duration,
    address: &str,
) -> Result<Answer, String> {
    let line = tokio::time::timeout(within, read_line(stream))
        .await
        .map_err(|_| format!("node link to {address}: no answer within {within:?}"))?
        .map_err(|e| format!("node link to {address}: {e}"))?;
    let answer: Answer = serde_json::from_slice(&line)
        .map_err(|e| format!("node link to {address}: a bad answer: {e}"))?;
    if answer.ok {
        return Ok(answer);
    }
    Err(match answer.problem {
        Some(Problem::Host(why) | Problem::Busy(why)) => why,
        Some(other) => format!("{other:?}"),
        None => "refused without a reason".to_owned(),
    })
}

/// Asks the target to take one step of move `id` (any but `Receive`).
pub async fn step(
    target: &Target<'_>,
    key: &SigningKey,
    grain: &GrainId,
    id: &str,
    step: Step,
) -> Result<(), String> {
    let mut stream = open(target.address, target.key, key).await?;
    request(&mut stream, grain, id, &step)
        .await
        .map_err(|e| format!("node link to {}: {e}", target.address))?;
    answer(&mut stream, APPLIED, target.address).await.map(drop)
}

/// Sends one stream of move `id` to the target: `produce` writes it
/// (blocking, on a thread of its own), and every `FRAME` written is
/// reported to `sent` as it leaves. Returns the bytes the target applied.
pub async fn send_stream(
    target: &Target<'_>,
    key: &SigningKey,
    grain: &GrainId,
    id: &str,
    produce: Producer,
    sent: impl FnMut(u64),
) -> Result<u64, String> {
    send_step_stream(target, key, grain, id, Step::Receive, produce, sent).await
}

/// Sends one replica stream of `grain` (see [`Step::Replica`]).
pub async fn send_replica(
    target: &Target<'_>,
    key: &SigningKey,
    grain: &GrainId,
    step: Step,
    produce: Producer,
) -> Result<u64, String> {
    send_step_stream(target, key, grain, "", step, produce, |_| {}).await
}

async fn send_step_stream(
    target: &Target<'_>,
    key: &SigningKey,
    grain: &GrainId,
    id: &str,
    step: Step,
    produce: Producer,
    mut sent: impl FnMut(u64),
) -> Result<u64, String> {
    let io = |e: std::io::Error| format!("node link to {}: {e}", target.address);
    let mut stream = open(target.address, target.key, key).await?;
    request(&mut stream, grain, id, &step).await.map_err(io)?;
    answer(&mut stream, APPLIED, target.address).await?;
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(8);
    let writer = tokio::task::spawn_blocking(move || {
        let mut out = ChannelWriter {
            tx,
            buf: Vec::with_capacity(FRAME),
        };
        produce(&mut out)?;
        out.flush().map_err(|e| e.to_string())
    });
    let mut failed = None;
    loop {
        let chunk = match tokio::time::timeout(KEEPALIVE, rx.recv()).await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => break,
            Err(_) => Vec::new(),
        };
        let len = match chunk.is_empty() {
            true => KEEPALIVE_LEN,
            false => u32::try_from(chunk.len()).expect("frames are small"),
        };
        let frame = async {
            stream.write_all(&len.to_be_bytes()).await?;
            stream.write_all(&chunk).await?;
            stream.flush().await
        };
        match tokio::time::timeout(IDLE, frame).await {
            Ok(Ok(())) => sent(chunk.len() as u64),
            Ok(Err(e)) => {
                failed = Some(io(e));
                break;
            }
            Err(_) => {
                failed = Some(format!(
                    "node link to {}: the target stopped taking the stream",
                    target.address
                ));
                break;
            }
        }
    }
    if let Some(why) = failed {
        // The producer stops at its next write; not waited for, as it may
        // be walking a big unchanged tree.
        drop(rx);
        drop(writer);
        // The target may have said why it stopped (no room, a bad entry).
        let said = tokio::time::timeout(
            Duration::from_secs(5),
            answer(&mut stream, IDLE, target.address),
        )
        .await;
        return Err(match said {
            Ok(Err(reason)) => reason,
            _ => why,
        });
    }
    // Without the end frame the target never takes a cut stream as whole.
    writer.await.map_err(|e| e.to_string())??;
    stream.write_all(&0u32.to_be_bytes()).await.map_err(io)?;
    stream.flush().await.map_err(io)?;
    let done = answer(&mut stream, APPLIED, target.address).await?;
    Ok(done.size.unwrap_or(0))
}

/// Writes into a channel in frames, for [`send_stream`].
struct ChannelWriter {
    tx: mpsc::Sender<Vec<u8>>,
    buf: Vec<u8>,
}

impl Write for ChannelWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let n = bytes.len().min(FRAME - self.buf.len());
        self.buf.extend_from_slice(&bytes[..n]);
        if self.buf.len() == FRAME {
            self.flush()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(FRAME));
        self.tx.blocking_send(chunk).map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the node link closed")
        })
    }
}

/// What the link's frames become for a blocking reader.
enum Frame {
    Data(Vec<u8>),
    End,
    Failed(std::io::Error),
}

/// Reads the frames a [`ChannelWriter`]'s sender wrote, as one stream that
/// ends cleanly only at the end frame.
struct ChannelReader {
    rx: mpsc::Receiver<Frame>,
    buf: Vec<u8>,
    at: usize,
    ended: bool,
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.buf.len() {
            if self.ended {
                return Ok(0);
            }
            match self.rx.blocking_recv() {
                Some(Frame::Data(bytes)) => (self.buf, self.at) = (bytes, 0),
                Some(Frame::End) => self.ended = true,
                Some(Frame::Failed(e)) => return Err(e),
                None => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the stream ended without its end frame",
                    ));
                }
            }
        }
        let n = out.len().min(self.buf.len() - self.at);
        out[..n].copy_from_slice(&self.buf[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// The target's side of one step: answers on `stream`.
pub(crate) async fn serve_step<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: BufReader<S>,
    node: &str,
    moves: &dyn Moves,
    grain: &str,
    id: &str,
    step: Step,
) -> std::io::Result<()> {
    let refuse = |why: String| answer_line(Some(Problem::Host(why)), None);
    let replica = matches!(step, Step::Replica { .. });
    let grain = match GrainId::parse(grain) {
        Ok(g) if valid_id(id) || (replica && id.is_empty()) => g,
        _ => {
            stream
                .write_all(&refuse(format!("no move {id:?} of grain {grain:?}")))
                .await?;
            return stream.flush().await;
        }
    };
    tracing::debug!(grain = %grain, move_id = id, from = node, ?step, "move step asked");
    let done = match step {
        Step::Prepare { from, .. } if from != node => {
            Err(format!("node {node} asked to move a grain for node {from}"))
        }
        Step::Prepare { from, seen } => moves.prepare(&grain, id, &from, seen).await,
        Step::Receive => match moves.expects(&grain, id, node) {
            Ok(()) => {
                return receive(stream, |r| moves.receive(&grain, id, node, r)).await;
            }
            Err(why) => Err(why),
        },
        Step::Replica { label, base, epoch } => {
            match moves.replica_ready(&grain, node, base.as_deref()) {
                Ok(()) => {
                    return receive(stream, |r| {
                        moves.replica(&grain, node, &label, base.as_deref(), epoch, r)
                    })
                    .await;
                }
                Err(why) => Err(why),
            }
        }
        Step::Commit { from_epoch } => moves.commit(&grain, id, node, from_epoch).await,
        Step::Activate => moves.activate(&grain, id, node).await,
        Step::Abort => moves.abort(&grain, id, node).await,
    };
    let line = match done {
        Ok(()) => answer_line(None, None),
        Err(why) => refuse(why),
    };
    stream.write_all(&line).await?;
    stream.flush().await
}

/// The asked node's side of [`run`]: the job in a task of its own (it
/// outlives this link), its progress and report written back.
pub(crate) async fn serve_run<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: BufReader<S>,
    node: &str,
    moves: &dyn Moves,
    job: Job,
) -> std::io::Result<()> {
    match &job {
        Job::Grain { .. } => {
            tracing::debug!(from = node, ?job, "a grain call asked by another node")
        }
        _ => tracing::info!(from = node, ?job, "a job asked by another node"),
    }
    let (tx, mut rx) = mpsc::channel(64);
    let work = tokio::spawn(moves.run(job, node, tx));
    loop {
        // A line at least every HEARTBEAT, progress or not, so the asking
        // node tells a long quiet step from a node gone.
        let p = match tokio::time::timeout(HEARTBEAT, rx.recv()).await {
            Ok(Some(p)) => Some(p),
            Ok(None) => break,
            Err(_) => None,
        };
        let mut line = serde_json::to_vec(&Answer {
            ok: true,
            problem: None,
            size: None,
            progress: p,
            report: None,
        })
        .expect("answers serialize");
        line.push(b'\n');
        // The asking node went away: the job goes on without it.
        if stream.write_all(&line).await.is_err() || stream.flush().await.is_err() {
            break;
        }
    }
    let last = match work.await {
        Ok(Ok(report)) => Answer {
            ok: true,
            problem: None,
            size: None,
            progress: None,
            report: Some(report),
        },
        Ok(Err(why)) => Answer::refused(why),
        Err(e) => Answer::refused(format!("the job failed: {e}")),
    };
    let mut line = serde_json::to_vec(&last).expect("answers serialize");
    line.push(b'\n');
    stream.write_all(&line).await?;
    stream.flush().await
}

/// Asks the node at `target` to run `job`; each progress report (JSON)
/// goes to `progress` as it comes; the answer is the job's report (JSON).
pub async fn run(
    target: &Target<'_>,
    key: &SigningKey,
    job: Job,
    mut progress: impl FnMut(String),
) -> Result<String, String> {
    let mut stream = open(target.address, target.key, key).await?;
    let mut line =
        serde_json::to_vec(&crate::link::Request::Run { job }).expect("requests serialize");
    line.push(b'\n');
    let io = |e: std::io::Error| format!("node link to {}: {e}", target.address);
    stream.write_all(&line).await.map_err(io)?;
    stream.flush().await.map_err(io)?;
    loop {
        // A line comes at least every HEARTBEAT while the job runs.
        let a = answer(&mut stream, 4 * HEARTBEAT, target.address)
            .await
            .map_err(|e| match e.starts_with("node link to ") {
                true => format!("{e} (the job may still be running there)"),
                false => e,
            })?;
        match (a.progress, a.report) {
            (Some(p), _) => progress(p),
            (None, Some(report)) => return Ok(report),
            (None, None) => {}
        }
    }
}

async fn receive<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: BufReader<S>,
    apply: impl FnOnce(Box<dyn Read + Send>) -> MoveFuture<u64>,
) -> std::io::Result<()> {
    let (tx, rx) = mpsc::channel(8);
    let reader = ChannelReader {
        rx,
        buf: Vec::new(),
        at: 0,
        ended: false,
    };
    let applying = apply(Box::new(reader));
    stream.write_all(&answer_line(None, None)).await?;
    stream.flush().await?;
    let frames = async {
        loop {
            // Each read, a keepalive's too, within IDLE.
            let frame = async {
                let len = loop {
                    let len = tokio::time::timeout(IDLE, stream.read_u32())
                        .await
                        .map_err(|_| std::io::Error::other(format!("no frame for {IDLE:?}")))??;
                    if len != KEEPALIVE_LEN {
                        break len as usize;
                    }
                };
                if len > FRAME {
                    return Err(std::io::Error::other(format!(
                        "a frame of {len} bytes, more than {FRAME}"
                    )));
                }
                let mut bytes = vec![0; len];
                tokio::time::timeout(IDLE, stream.read_exact(&mut bytes))
                    .await
                    .map_err(|_| std::io::Error::other(format!("a frame cut for {IDLE:?}")))??;
                Ok(bytes)
            };
            let frame = match frame.await {
                Ok(bytes) if bytes.is_empty() => Frame::End,
                Ok(bytes) => Frame::Data(bytes),
                Err(e) => Frame::Failed(e),
            };
            let last = !matches!(frame, Frame::Data(_));
            // The applier gave up (its error is the answer): stop reading.
            if tx.send(frame).await.is_err() || last {
                return;
            }
        }
    };
    let (applied, ()) = tokio::join!(applying, frames);
    let line = match applied {
        Ok(size) => answer_line(None, Some(size)),
        Err(why) => answer_line(Some(Problem::Host(why)), None),
    };
    stream.write_all(&line).await?;
    stream.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reader(frames: Vec<Frame>) -> ChannelReader {
        let (tx, rx) = mpsc::channel(frames.len().max(1));
        for f in frames {
            tx.try_send(f).ok().unwrap();
        }
        ChannelReader {
            rx,
            buf: Vec::new(),
            at: 0,
            ended: false,
        }
    }

    #[test]
    fn a_stream_is_whole_only_with_its_end_frame() {
        let mut whole = String::new();
        reader(vec![
            Frame::Data(b"ab".to_vec()),
            Frame::Data(b"c".to_vec()),
            Frame::End,
        ])
        .read_to_string(&mut whole)
        .unwrap();
        assert_eq!(whole, "abc");
        let mut cut = Vec::new();
        let e = reader(vec![Frame::Data(b"ab".to_vec())])
            .read_to_end(&mut cut)
            .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
        let e = reader(vec![Frame::Failed(std::io::Error::other("reset"))])
            .read_to_end(&mut cut)
            .unwrap_err();
        assert_eq!(e.to_string(), "reset");
    }

    #[test]
    fn move_ids_fit_dataset_names() {
        let id = new_id();
        assert!(valid_id(&id), "{id}");
        assert!(!valid_id("../x"));
        assert_ne!(new_id(), id);
    }
}
