//! Reading backups back: `verify` (no secret needed), and restoring a
//! grain's chain of streams into a staging dataset that only becomes the
//! grain's once every byte is checked.

use std::io::{self, Read};

use granary_datasets::Datasets;
use granary_package::PublicKey;
use serde::Serialize;

use crate::catalogue::{Catalogue, ChunkDamage, GrainEntry, StreamEntry, StreamFormat};
use crate::crypt::Identity;
use crate::export::read_catalogue;
use crate::progress::{Meter, Progress};
use crate::target::Target;
use crate::{BackupError, sha256};

/// Opens a target's catalogue for reading, requiring a trusted signer:
/// anyone can encrypt to a public recipient, so the signature is what says
/// the backup is ours.
pub fn open_trusted(
    target: &mut dyn Target,
    trusted: &[PublicKey],
) -> Result<(Catalogue, PublicKey), BackupError> {
    let (catalogue, signer) = read_catalogue(target)?.ok_or_else(|| {
        BackupError::Config(format!(
            "{} holds no Granary backup (no catalogue)",
            target.describe()
        ))
    })?;
    if !trusted.contains(&signer) {
        return Err(BackupError::Integrity(format!(
            "the backup in {} is signed by node key {}, which this node does not trust; if you made it, pass --trust {}",
            target.describe(),
            crate::catalogue::fingerprint(&signer),
            signer.hex()
        )));
    }
    Ok((catalogue, signer))
}

#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub signer: String,
    pub grains: usize,
    pub streams: usize,
    pub chunks: usize,
    pub bytes: u64,
}

/// Checks the catalogue's signature and every chunk's size and SHA-256.
/// Needs no secret key. Any problem is an [`BackupError::Integrity`]
/// naming the files.
pub fn verify(
    target: &mut dyn Target,
    progress: &mut dyn FnMut(&Progress),
) -> Result<VerifyReport, BackupError> {
    let (catalogue, signer) = read_catalogue(target)?.ok_or_else(|| {
        BackupError::Config(format!(
            "{} holds no Granary backup (no catalogue)",
            target.describe()
        ))
    })?;
    let total: u64 = catalogue
        .grains
        .values()
        .flat_map(|g| &g.streams)
        .flat_map(|s| &s.chunks)
        .map(|c| c.bytes)
        .sum();
    let mut report = VerifyReport {
        signer: signer.hex(),
        grains: catalogue.grains.len(),
        streams: 0,
        chunks: 0,
        bytes: 0,
    };
    let mut problems = Vec::new();
    for (id, grain) in &catalogue.grains {
        let mut meter = Meter::new(id, "verify", Some(total));
        for stream in &grain.streams {
            report.streams += 1;
            for c in &stream.chunks {
                let name = format!("{}/{}", stream.dir, c.file);
                match target.read(&name, c.bytes)? {
                    None => problems.push(format!("{name}: missing")),
                    Some(bytes) => {
                        if let Err(problem) = c.check(&bytes) {
                            problems.push(format!("{name}: {problem}"));
                        }
                    }
                }
                report.chunks += 1;
                report.bytes += c.bytes;
                meter.add(c.bytes);
                if let Some(p) = meter.tick() {
                    progress(&p);
                }
            }
        }
        progress(&meter.now(true));
    }
    if problems.is_empty() {
        Ok(report)
    } else {
        let n = problems.len();
        problems.truncate(10);
        Err(BackupError::Integrity(format!(
            "{n} chunk(s) failed verification:\n  {}",
            problems.join("\n  ")
        )))
    }
}

/// The streams to apply for `snapshot` (the latest when `None`).
pub fn chain<'c>(
    grain: &'c GrainEntry,
    snapshot: Option<&str>,
) -> Result<&'c [StreamEntry], BackupError> {
    let end = match snapshot {
        None => grain.streams.len(),
        Some(s) => {
            grain
                .streams
                .iter()
                .position(|x| x.snapshot == s)
                .ok_or_else(|| {
                    BackupError::Config(format!(
                        "the backup has no snapshot {s:?} of this grain; it has: {}",
                        grain
                            .streams
                            .iter()
                            .map(|x| x.snapshot.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                })?
                + 1
        }
    };
    if end == 0 {
        return Err(BackupError::Config(
            "the backup holds no stream of this grain".to_owned(),
        ));
    }
    // From the last full stream at or before the wanted one.
    let start = grain.streams[..end]
        .iter()
        .rposition(|s| s.base.is_none())
        .ok_or_else(|| BackupError::Integrity("the chain has no full stream".to_owned()))?;
    Ok(&grain.streams[start..end])
}

type Fetched = Result<Vec<u8>, BackupError>;

/// How many chunks are decrypted at once: decryption and hashing, not the
/// disk, set a restore's pace.
fn crypt_workers() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().clamp(1, 2))
}

/// Reads a stream's chunks in order on this thread and hands chunk `i` to
/// worker `i % n` (its `to_workers`), which decrypts and checks it; the
/// reader takes the plaintexts back in the same rotation, so they arrive
/// in order, with at most a chunk and its plaintext per worker in memory.
fn fetch_chunks(
    target: &mut dyn Target,
    stream: &StreamEntry,
    to_workers: Vec<std::sync::mpsc::SyncSender<(String, usize, Fetched)>>,
) {
    for (i, c) in stream.chunks.iter().enumerate() {
        let name = format!("{}/{}", stream.dir, c.file);
        let cipher = target.read(&name, c.bytes).and_then(|r| {
            r.ok_or_else(|| BackupError::Integrity(format!("chunk {name} is missing")))
        });
        let failed = cipher.is_err();
        if to_workers[i % to_workers.len()]
            .send((name, i, cipher))
            .is_err()
            || failed
        {
            return;
        }
    }
}

/// One worker: decrypts each chunk it is given and checks the plaintext
/// against the signed catalogue. The encrypted file's own SHA-256 is not
/// taken again (`backup verify` checks it without a key): a chunk that
/// fails its authenticated decryption or whose plaintext differs is
/// refused either way, and hashing both doubled the work.
fn open_chunks(
    identity: &Identity,
    stream: &StreamEntry,
    from_reader: std::sync::mpsc::Receiver<(String, usize, Fetched)>,
    to_restore: std::sync::mpsc::SyncSender<Fetched>,
) {
    for (name, i, cipher) in from_reader {
        let c = &stream.chunks[i];
        let damaged = |problem: ChunkDamage| {
            BackupError::Integrity(format!("chunk {name}: {problem}; nothing was restored"))
        };
        let chunk = cipher.and_then(|cipher| {
            c.check_size(&cipher).map_err(damaged)?;
            let plain = identity.decrypt(&cipher).map_err(|e| {
                // A damaged header can read as "no key matches": the
                // file's hash (taken only now, on failure) tells damage
                // from a wrong key file.
                if let Err(problem) = c.check(&cipher) {
                    return damaged(problem);
                }
                match e {
                    BackupError::Integrity(why) => BackupError::Integrity(format!(
                        "chunk {name} fails its authentication, {why} (changed or damaged); nothing was restored"
                    )),
                    other => other,
                }
            })?;
            drop(cipher);
            if sha256(&plain) != c.plain_sha256 {
                return Err(BackupError::Integrity(format!(
                    "chunk {name} decrypts to other data than was exported"
                )));
            }
            Ok(plain)
        });
        let failed = chunk.is_err();
        if to_restore.send(chunk).is_err() || failed {
            return;
        }
    }
}

/// Decrypted plaintext of one stream, as the fetcher delivers it.
struct StreamReader<'r> {
    /// The workers' outputs, chunk `i` from `rx[i % rx.len()]`.
    rx: Vec<std::sync::mpsc::Receiver<Fetched>>,
    stream: &'r StreamEntry,
    received: usize,
    buf: Vec<u8>,
    pos: usize,
    meter: &'r mut Meter,
    progress: &'r mut dyn FnMut(&Progress),
    error: Option<BackupError>,
}

impl StreamReader<'_> {
    fn load(&mut self) -> Result<bool, BackupError> {
        if self.received == self.stream.chunks.len() {
            if crate::export::chain_hash(&self.stream.chunks) != self.stream.plain_sha256 {
                return Err(BackupError::Integrity(format!(
                    "stream {} does not add up to what was exported",
                    self.stream.dir
                )));
            }
            return Ok(false);
        }
        let plain = self.rx[self.received % self.rx.len()]
            .recv()
            .map_err(|_| BackupError::Other("the chunk reader stopped".to_owned()))??;
        self.received += 1;
        self.meter.add(plain.len() as u64);
        self.meter.chunks(self.received, 0);
        if let Some(p) = self.meter.tick() {
            (self.progress)(&p);
        }
        self.buf = plain;
        self.pos = 0;
        Ok(true)
    }
}

impl Read for StreamReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.buf.len() {
            match self.load() {
                Ok(true) => {}
                Ok(false) => return Ok(0),
                Err(e) => {
                    let msg = e.to_string();
                    self.error = Some(e);
                    return Err(io::Error::other(msg));
                }
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// What a restore into staging produced.
#[derive(Debug, Clone, Serialize)]
pub struct Restored {
    pub snapshot: String,
    pub streams: usize,
    pub bytes: u64,
    /// The restored files' digest, when the stream carried one to check
    /// (tree streams).
    pub tree_sha256: Option<String>,
    pub seconds: f64,
}

/// Restoring one grain's chain up to `snapshot` (the latest when `None`)
/// into the new dataset `staging`, owned by `uid`.
#[derive(Clone, Copy)]
pub struct RestoreJob<'a> {
    pub grain_id: &'a str,
    pub grain: &'a GrainEntry,
    pub snapshot: Option<&'a str>,
    pub identity: &'a Identity,
    pub datasets: &'a dyn Datasets,
    pub staging: &'a str,
    pub uid: u32,
}

impl RestoreJob<'_> {
    /// Runs it, checking a tree stream's result file by file against the
    /// digest taken at export. On any error the staging dataset is
    /// destroyed: nothing half-restored is left.
    pub fn run(
        &self,
        target: &mut dyn Target,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<Restored, BackupError> {
        let result = self.restore(target, progress);
        if result.is_err()
            && let Err(e) = self.datasets.destroy(self.staging)
        {
            tracing::warn!(staging = self.staging, error = %e, "cannot remove the staging dataset of a failed restore");
        }
        result
    }

    fn restore(
        &self,
        target: &mut dyn Target,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<Restored, BackupError> {
        let RestoreJob {
            grain_id,
            grain,
            snapshot,
            identity,
            datasets,
            staging,
            uid,
        } = *self;
        let started = std::time::Instant::now();
        let streams = chain(grain, snapshot)?;
        let total: u64 = streams.iter().map(|s| s.plain_bytes).sum();
        let mut meter = Meter::new(grain_id, "restore", Some(total));
        let ds = |e: granary_datasets::DatasetError| BackupError::Other(e.to_string());
        let format = streams[0].format;
        if format == StreamFormat::Tree {
            datasets.create(staging, uid).map_err(ds)?;
        }
        for stream in streams {
            if stream.format != format {
                return Err(BackupError::Integrity(
                    "a grain's streams change format".to_owned(),
                ));
            }
            let (applied, reader_error) = std::thread::scope(|scope| {
                let (mut to_workers, mut from_workers) = (Vec::new(), Vec::new());
                let mut workers = Vec::new();
                for _ in 0..crypt_workers() {
                    // Hand-offs, not queues: a worker holds at most the
                    // chunk it opens and the plaintext it waits to give.
                    let (to_worker, worker_in) = std::sync::mpsc::sync_channel(0);
                    let (worker_out, from_worker) = std::sync::mpsc::sync_channel(0);
                    workers.push(
                        scope.spawn(move || open_chunks(identity, stream, worker_in, worker_out)),
                    );
                    to_workers.push(to_worker);
                    from_workers.push(from_worker);
                }
                let target = &mut *target;
                let fetcher = scope.spawn(move || fetch_chunks(target, stream, to_workers));
                let mut reader = StreamReader {
                    rx: from_workers,
                    stream,
                    received: 0,
                    buf: Vec::new(),
                    pos: 0,
                    meter: &mut meter,
                    progress: &mut *progress,
                    error: None,
                };
                let applied = match format {
                    StreamFormat::Tree => {
                        let r = crate::tree::apply_stream(
                            &mut reader,
                            &datasets.path(staging),
                            Some(uid),
                        )
                        .map(drop);
                        // The tar reader may stop before the end (padding):
                        // drain it, so the whole stream is checked too.
                        r.and_then(|()| {
                            io::copy(&mut reader, &mut io::sink())
                                .map(drop)
                                .map_err(|e| BackupError::Io(e.to_string()))
                        })
                    }
                    StreamFormat::Zfs => datasets.receive(staging, &mut reader).map_err(ds),
                };
                let mut error = reader.error.take();
                drop(reader);
                let _ = fetcher.join();
                // A worker's panic fails the restore (and the staging
                // dataset is destroyed) instead of unwinding through it.
                for w in workers {
                    if w.join().is_err() && error.is_none() {
                        error = Some(BackupError::Other(
                            "a chunk decrypting thread panicked".to_owned(),
                        ));
                    }
                }
                (applied, error)
            });
            if let Some(e) = reader_error {
                return Err(e);
            }
            applied?;
        }
        // A ZFS stream carries the old node's uids: re-owned, on the same
        // walk as the digest when there is one to check.
        let owner = match format {
            StreamFormat::Zfs => {
                datasets.create(staging, uid).map_err(ds)?;
                Some(uid)
            }
            StreamFormat::Tree => None,
        };
        progress(&meter.now(true));
        let last = streams.last().expect("a chain is never empty");
        let root = datasets.path(staging);
        let digest = match (&last.tree_sha256, owner) {
            (Some(_), owner) => Some(crate::tree::digest_owning(&root, owner)?),
            (None, Some(uid)) => {
                crate::tree::hand_over(&root, uid)?;
                None
            }
            (None, None) => {
                return Err(BackupError::Integrity(format!(
                    "the catalogue has no digest for the tree stream of {grain_id}'s snapshot {}",
                    last.snapshot
                )));
            }
        };
        if digest.is_some() && digest != last.tree_sha256 {
            return Err(BackupError::Integrity(format!(
                "the restored files of {grain_id} differ from the snapshot {} that was exported",
                last.snapshot
            )));
        }
        Ok(Restored {
            snapshot: last.snapshot.clone(),
            streams: streams.len(),
            bytes: total,
            tree_sha256: digest,
            seconds: started.elapsed().as_secs_f64(),
        })
    }
}
