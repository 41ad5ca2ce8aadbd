//! Exports: a snapshot's stream cut into chunks, each encrypted, hashed and
//! written durably, with a journal so a cut-off export resumes at the last
//! whole chunk.
//!
//! A stream's chunks live in `streams/<grain>/<seq>-<snapshot>/`, beside
//! `journal.json` while it is being written. When the last chunk is
//! durable the stream enters the signed catalogue and the journal goes.
//! Resuming regenerates the stream from the same (held) snapshot and skips
//! every journaled chunk whose plaintext hash matches, so the media is not
//! written again; if the stream came out different, it starts over.

use std::io::{self, Write};

use granary_datasets::{Datasets, SendFormat};
use granary_package::SigningKey;
use serde::{Deserialize, Serialize};

use crate::catalogue::{
    CATALOGUE_FILE, Catalogue, ChunkEntry, GrainEntry, StreamEntry, StreamFormat,
};
use crate::crypt::Recipients;
use crate::progress::{Meter, Progress};
use crate::target::Target;
use crate::{BackupError, hex, now, sha256};

const JOURNAL: &str = "journal.json";
/// A journal is small: one line per chunk.
const MAX_JOURNAL_BYTES: u64 = 16 << 20;

/// Journals live on the target, which may be hostile: each carries an
/// HMAC-SHA256 (first line, hex) under a key derived from the node key, so
/// a resumed export only trusts chunk hashes this node wrote.
fn journal_key(node: &SigningKey) -> ring::hmac::Key {
    let secret = ring::digest::digest(
        &ring::digest::SHA256,
        &[b"granary export journal v1\n".as_slice(), node.pkcs8_der()].concat(),
    );
    ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_ref())
}

fn seal_journal(key: &ring::hmac::Key, journal: &Journal) -> Result<Vec<u8>, BackupError> {
    let json = serde_json::to_vec(journal).map_err(|e| BackupError::Other(e.to_string()))?;
    let tag = ring::hmac::sign(key, &json);
    Ok([hex(tag.as_ref()).as_bytes(), b"\n", &json].concat())
}

/// A journal this node wrote, with only the chunk names it gives them.
fn open_journal(key: &ring::hmac::Key, file: &[u8]) -> Option<Journal> {
    let split = file.iter().position(|b| *b == b'\n')?;
    let tag = crate::catalogue::unhex(std::str::from_utf8(&file[..split]).ok()?)?;
    let json = &file[split + 1..];
    ring::hmac::verify(key, json, &tag).ok()?;
    let journal: Journal = serde_json::from_slice(json).ok()?;
    let names_ok = journal
        .chunks
        .iter()
        .enumerate()
        .all(|(i, c)| c.file == format!("{i:08}.age"));
    (names_ok && granary_datasets::valid_label(&journal.snapshot)).then_some(journal)
}

/// What a target holds, opened for adding streams.
pub struct Exporter<'a> {
    target: &'a mut dyn Target,
    key: &'a SigningKey,
    recipients: &'a Recipients,
    chunk_bytes: usize,
    catalogue: Catalogue,
    journal_key: ring::hmac::Key,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Journal {
    snapshot: String,
    base: Option<String>,
    chunk_bytes: usize,
    chunks: Vec<ChunkEntry>,
}

/// An unfinished stream found on the target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub snapshot: String,
    pub base: Option<String>,
    pub chunks: usize,
}

/// How one stream went.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StreamReport {
    pub grain: String,
    pub snapshot: String,
    pub base: Option<String>,
    pub plain_bytes: u64,
    pub stored_bytes: u64,
    pub chunks: usize,
    /// Chunks already on the target from an export that was cut off.
    pub resumed_chunks: usize,
    pub seconds: f64,
}

/// Reads the catalogue a target holds; `None` when it holds none yet.
pub fn read_catalogue(
    target: &mut dyn Target,
) -> Result<Option<(Catalogue, granary_package::PublicKey)>, BackupError> {
    match target.read(
        CATALOGUE_FILE,
        crate::catalogue::MAX_CATALOGUE_BYTES as u64 + 256,
    )? {
        None => Ok(None),
        Some(bytes) => Catalogue::open(&bytes).map(Some),
    }
}

impl<'a> Exporter<'a> {
    /// Opens `target` for this node: a catalogue signed by another node is
    /// refused (one node per target; point another node elsewhere).
    pub fn open(
        target: &'a mut dyn Target,
        key: &'a SigningKey,
        recipients: &'a Recipients,
        chunk_bytes: usize,
    ) -> Result<Exporter<'a>, BackupError> {
        let catalogue = match read_catalogue(target)? {
            None => Catalogue::new(&key.public()),
            Some((mut cat, signer)) if signer == key.public() => {
                // What this export adds may need the newer format.
                cat.format = crate::catalogue::FORMAT;
                cat
            }
            Some((_, signer)) => {
                return Err(BackupError::Config(format!(
                    "{} holds the backups of another node (key {}); give this node its own directory or target",
                    target.describe(),
                    crate::catalogue::fingerprint(&signer)
                )));
            }
        };
        Ok(Exporter {
            journal_key: journal_key(key),
            target,
            key,
            recipients,
            chunk_bytes: chunk_bytes.max(4096),
            catalogue,
        })
    }

    pub fn catalogue(&self) -> &Catalogue {
        &self.catalogue
    }

    /// The snapshot the grain's last complete stream holds: the base of the
    /// next incremental, if the node still has it.
    pub fn last_snapshot(&self, grain: &str) -> Option<String> {
        self.catalogue
            .grains
            .get(grain)
            .and_then(|g| g.streams.last())
            .map(|s| s.snapshot.clone())
    }

    fn stream_dir(&self, grain: &str, snapshot: &str) -> String {
        let seq = self
            .catalogue
            .grains
            .get(grain)
            .map_or(0, |g| g.streams.len())
            + 1;
        format!("streams/{grain}/{seq:06}-{snapshot}")
    }

    /// An unfinished stream of `grain` that continues the catalogue (same
    /// base), if the target has one.
    pub fn pending(&mut self, grain: &str) -> Result<Option<Pending>, BackupError> {
        let last = self.last_snapshot(grain);
        for (name, _) in self.target.list(&format!("streams/{grain}"))? {
            let Some(dir) = name.strip_suffix(&format!("/{JOURNAL}")) else {
                continue;
            };
            let Some(bytes) = self.target.read(&name, MAX_JOURNAL_BYTES)? else {
                continue;
            };
            let Some(journal) = open_journal(&self.journal_key, &bytes) else {
                tracing::warn!(journal = %name, "an export journal this node did not write (or damaged); ignored");
                continue;
            };
            if dir == self.stream_dir(grain, &journal.snapshot) && journal.base == last {
                return Ok(Some(Pending {
                    snapshot: journal.snapshot,
                    base: journal.base,
                    chunks: journal.chunks.len(),
                }));
            }
        }
        Ok(None)
    }

    /// Streams `snapshot` of `grain` (incremental from `base`), records it
    /// in the catalogue with `meta`, and writes the catalogue.
    pub fn export(
        &mut self,
        grain: &str,
        meta: GrainEntry,
        snapshot: &str,
        base: Option<&str>,
        datasets: &dyn Datasets,
        progress: &mut (dyn FnMut(&Progress) + Send),
    ) -> Result<StreamReport, BackupError> {
        let started = std::time::Instant::now();
        let dir = self.stream_dir(grain, snapshot);
        let journal_name = format!("{dir}/{JOURNAL}");
        let previous: Option<Journal> = self
            .target
            .read(&journal_name, MAX_JOURNAL_BYTES)?
            .and_then(|b| open_journal(&self.journal_key, &b))
            .filter(|j: &Journal| {
                j.snapshot == snapshot
                    && j.base.as_deref() == base
                    && j.chunk_bytes == self.chunk_bytes
            });
        let format = match datasets.send_format() {
            SendFormat::Tree => StreamFormat::Tree,
            SendFormat::Zfs => StreamFormat::Zfs,
        };
        let view = datasets
            .view_snapshot(grain, snapshot)
            .map_err(|e| BackupError::Other(e.to_string()))?;
        // A tree stream reads the base snapshot's files too.
        let base_view = match (format, base) {
            (StreamFormat::Tree, Some(b)) => Some(
                datasets
                    .view_snapshot(grain, b)
                    .map_err(|e| BackupError::Other(e.to_string()))?,
            ),
            _ => None,
        };
        let base_path = base_view.as_ref().map(|v| v.path.as_path());
        let total = match format {
            StreamFormat::Tree => Some(crate::tree::changed_bytes(&view.path, base_path)?),
            StreamFormat::Zfs => None,
        };
        let mut attempt_journal = previous;
        let (journal, plain_bytes, plain_sha, resumed, tree_sha256) = loop {
            let resume = attempt_journal.take().map(|j| j.chunks).unwrap_or_default();
            let mut sealer = Sealer {
                journal_key: &self.journal_key,
                target: &mut *self.target,
                recipients: self.recipients,
                dir: &dir,
                journal: Journal {
                    snapshot: snapshot.to_owned(),
                    base: base.map(str::to_owned),
                    chunk_bytes: self.chunk_bytes,
                    chunks: Vec::new(),
                },
                resume,
                resumed: 0,
                diverged: false,
                meter: Meter::new(grain, "export", total),
                progress: &mut *progress,
            };
            let chunk_bytes = self.chunk_bytes;
            let view_path = view.path.as_path();
            // Three things at once: the stream is produced and cut on this
            // thread, chunks are encrypted, hashed and written on another,
            // and a tree stream's snapshot digest is taken on a third (see
            // `StreamEntry::tree_sha256` for why a zfs stream has none).
            let (streamed, sealed, digest) = std::thread::scope(|scope| {
                let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(1);
                let sealing = scope.spawn(|| sealer.run(rx));
                let digest = scope.spawn(|| match format {
                    StreamFormat::Tree => crate::tree::digest(view_path).map(Some),
                    StreamFormat::Zfs => Ok(None),
                });
                let mut writer = ChunkWriter {
                    tx,
                    chunk_bytes,
                    buf: Vec::with_capacity(chunk_bytes),
                    plain_bytes: 0,
                    sent: 0,
                };
                let streamed = stream_into(
                    &mut writer,
                    grain,
                    snapshot,
                    base,
                    datasets,
                    (view_path, base_path),
                    format,
                )
                .and_then(|()| writer.finish())
                .map(|()| (writer.plain_bytes, writer.sent));
                drop(writer);
                let sealed = sealing.join().unwrap_or_else(|_| {
                    Err(BackupError::Other("the chunk writer panicked".to_owned()))
                });
                let digest = digest
                    .join()
                    .unwrap_or_else(|_| Err(BackupError::Other("the digest panicked".to_owned())));
                (streamed, sealed, digest)
            });
            if sealer.diverged {
                tracing::warn!(
                    grain,
                    snapshot,
                    "the regenerated stream differs from the cut-off one; exporting it again from the start"
                );
                let names: Vec<String> = sealer
                    .resume
                    .iter()
                    .map(|c| format!("{dir}/{}", c.file))
                    .collect();
                for n in names {
                    self.target.remove(&n)?;
                }
                self.target.remove(&journal_name)?;
                continue;
            }
            // The sealer's error is the real one (the stream only saw its
            // channel close).
            sealed?;
            let (plain_bytes, sent) = streamed?;
            // Every chunk cut is in the journal, or the stream is not whole.
            if sealer.journal.chunks.len() != sent {
                return Err(BackupError::Other(format!(
                    "{sent} chunks were cut but {} sealed",
                    sealer.journal.chunks.len()
                )));
            }
            let tree_sha256 = digest?;
            let plain_sha = chain_hash(&sealer.journal.chunks);
            (sealer.progress)(&sealer.meter.now(true));
            break (
                sealer.journal,
                plain_bytes,
                plain_sha,
                sealer.resumed,
                tree_sha256,
            );
        };
        drop(view);
        let stored: u64 = journal.chunks.iter().map(|c| c.bytes).sum();
        let chunks = journal.chunks.len();
        let mut entry = meta;
        let old_streams = self
            .catalogue
            .grains
            .get(grain)
            .map(|g| g.streams.clone())
            .unwrap_or_default();
        entry.streams = old_streams;
        entry.streams.push(StreamEntry {
            snapshot: snapshot.to_owned(),
            base: base.map(str::to_owned),
            format,
            created: now(),
            dir: dir.clone(),
            plain_bytes,
            plain_sha256: plain_sha,
            tree_sha256,
            chunks: journal.chunks,
        });
        self.catalogue.grains.insert(grain.to_owned(), entry);
        self.catalogue.updated = now();
        let file = self.catalogue.sign(self.key)?;
        self.target.write(CATALOGUE_FILE, &file)?;
        self.target.remove(&journal_name)?;
        Ok(StreamReport {
            grain: grain.to_owned(),
            snapshot: snapshot.to_owned(),
            base: base.map(str::to_owned),
            plain_bytes,
            stored_bytes: stored,
            chunks,
            resumed_chunks: resumed,
            seconds: started.elapsed().as_secs_f64(),
        })
    }
}

/// Produces the stream of the snapshot into `out`.
fn stream_into(
    out: &mut ChunkWriter,
    grain: &str,
    snapshot: &str,
    base: Option<&str>,
    datasets: &dyn Datasets,
    (view, base_view): (&std::path::Path, Option<&std::path::Path>),
    format: StreamFormat,
) -> Result<(), BackupError> {
    match format {
        StreamFormat::Tree => {
            crate::tree::write_stream(view, base_view.map(|v| (v, base.unwrap_or_default())), out)
                .map(drop)
        }
        StreamFormat::Zfs => {
            let mut child = datasets
                .send(grain, snapshot, base)
                .map_err(|e| BackupError::Other(e.to_string()))?;
            let mut stdout = child.stdout.take().expect("piped");
            // 1 MiB reads through a 1 MiB pipe, not 8 KiB ones.
            let _ = nix::fcntl::fcntl(
                std::os::fd::AsRawFd::as_raw_fd(&stdout),
                nix::fcntl::FcntlArg::F_SETPIPE_SZ(1 << 20),
            );
            let copied = io::copy(&mut io::BufReader::with_capacity(1 << 20, &mut stdout), out);
            drop(stdout);
            if copied.is_err() {
                let _ = child.kill();
            }
            let status = child
                .wait_with_output()
                .map_err(|e| BackupError::Io(format!("zfs send: {e}")))?;
            copied.map_err(|e| BackupError::Io(format!("zfs send: {e}")))?;
            if !status.status.success() {
                return Err(BackupError::Other(format!(
                    "zfs send failed: {}",
                    String::from_utf8_lossy(&status.stderr).trim()
                )));
            }
            Ok(())
        }
    }
}

/// The SHA-256 a stream's `plain_sha256` holds: over the chunks'
/// plaintext SHA-256s in order (each chunk's is checked on its own).
pub(crate) fn chain_hash(chunks: &[ChunkEntry]) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for c in chunks {
        ctx.update(c.plain_sha256.as_bytes());
    }
    hex(ctx.finish().as_ref())
}

/// Cuts what is written into chunk-sized buffers for the [`Sealer`].
struct ChunkWriter {
    tx: std::sync::mpsc::SyncSender<Vec<u8>>,
    chunk_bytes: usize,
    buf: Vec<u8>,
    plain_bytes: u64,
    sent: usize,
}

impl ChunkWriter {
    fn send(&mut self) -> io::Result<()> {
        let full = std::mem::replace(&mut self.buf, Vec::with_capacity(self.chunk_bytes));
        self.sent += 1;
        self.tx
            .send(full)
            .map_err(|_| io::Error::other("the chunk writer stopped"))
    }

    /// Sends the last, partial chunk (an empty stream is one empty chunk).
    fn finish(&mut self) -> Result<(), BackupError> {
        if !self.buf.is_empty() || self.sent == 0 {
            self.send().map_err(|e| BackupError::Io(e.to_string()))?;
        }
        Ok(())
    }
}

impl Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(self.chunk_bytes - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        self.plain_bytes += n as u64;
        if self.buf.len() == self.chunk_bytes {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Hashes, encrypts and durably writes each chunk, then journals it.
struct Sealer<'w> {
    target: &'w mut dyn Target,
    journal_key: &'w ring::hmac::Key,
    recipients: &'w Recipients,
    dir: &'w str,
    journal: Journal,
    /// Chunks a cut-off export already wrote.
    resume: Vec<ChunkEntry>,
    resumed: usize,
    diverged: bool,
    meter: Meter,
    progress: &'w mut (dyn FnMut(&Progress) + Send),
}

/// A chunk on its way from the crypt stage to the store stage.
enum Sealed {
    /// Encrypted, to be hashed and written.
    Cipher {
        plain_len: usize,
        plain_sha256: String,
        cipher: Vec<u8>,
    },
    /// The same plaintext a cut-off export already wrote: kept if the media
    /// still has it whole, else encrypted and written here.
    Resume {
        plain: Vec<u8>,
        plain_sha256: String,
    },
    /// Not what the cut-off export wrote at this place.
    Diverged,
}

impl Sealer<'_> {
    /// Two stages on two threads, so both cores work: one hashes and
    /// encrypts chunk n+1 while the other hashes and writes chunk n. A chunk's
    /// content is synced before its name is; the stream's directory once
    /// at the end (the journal is checked against the media on resume, so
    /// it need not be synced chunk by chunk).
    fn run(&mut self, rx: std::sync::mpsc::Receiver<Vec<u8>>) -> Result<(), BackupError> {
        let recipients = self.recipients;
        let resumable: Vec<String> = self.resume.iter().map(|c| c.plain_sha256.clone()).collect();
        std::thread::scope(|scope| {
            // Rendezvous: at most one sealed chunk waits for the writer.
            let (tx, sealed) = std::sync::mpsc::sync_channel::<Result<Sealed, BackupError>>(0);
            let crypt = scope.spawn(move || {
                for (index, plain) in rx.into_iter().enumerate() {
                    let plain_sha256 = sha256(&plain);
                    let item = match resumable.get(index) {
                        Some(h) if *h == plain_sha256 => Ok(Sealed::Resume {
                            plain,
                            plain_sha256,
                        }),
                        Some(_) => Ok(Sealed::Diverged),
                        None => {
                            let sealed = recipients.encrypt(&plain);
                            let plain_len = plain.len();
                            // Not held while the writer is waited for.
                            drop(plain);
                            // The encrypted file's hash is taken by the
                            // writer, which otherwise waits on the disk.
                            sealed.map(|cipher| Sealed::Cipher {
                                plain_len,
                                plain_sha256,
                                cipher,
                            })
                        }
                    };
                    let last = matches!(item, Err(_) | Ok(Sealed::Diverged));
                    if tx.send(item).is_err() || last {
                        return;
                    }
                }
            });
            let mut result = Ok(());
            while let Ok(item) = sealed.recv() {
                if let Err(e) = item.and_then(|item| self.store(item)) {
                    result = Err(e);
                    break;
                }
            }
            // Its next send fails and it stops, dropping the producer's
            // channel in turn.
            drop(sealed);
            // A panic there must not pass for the stream's end.
            crypt
                .join()
                .map_err(|_| BackupError::Other("the chunk encrypter panicked".to_owned()))?;
            result?;
            self.target.sync_dir(self.dir)
        })
    }

    fn store(&mut self, item: Sealed) -> Result<(), BackupError> {
        let index = self.journal.chunks.len();
        let (entry, plain_len) = match item {
            Sealed::Diverged => {
                self.diverged = true;
                return Err(BackupError::Other("stream diverged".to_owned()));
            }
            Sealed::Resume {
                plain,
                plain_sha256,
            } => {
                let done = self.resume[index].clone();
                let name = format!("{}/{}", self.dir, done.file);
                // Anything but the journaled chunk, whole (missing, larger,
                // damaged: a crash can leave an older attempt's file under
                // the name), is written again over it.
                let present = self.target.read(&name, done.bytes).ok().flatten();
                if present.is_some_and(|b| done.check(&b).is_ok()) {
                    self.resumed += 1;
                    (done, plain.len())
                } else {
                    let cipher = self.recipients.encrypt(&plain)?;
                    let sha = sha256(&cipher);
                    (
                        self.write_chunk(index, &cipher, sha, plain_sha256)?,
                        plain.len(),
                    )
                }
            }
            Sealed::Cipher {
                plain_len,
                plain_sha256,
                cipher,
            } => {
                let sha = sha256(&cipher);
                (
                    self.write_chunk(index, &cipher, sha, plain_sha256)?,
                    plain_len,
                )
            }
        };
        self.journal.chunks.push(entry);
        let journal = seal_journal(self.journal_key, &self.journal)?;
        self.target
            .write_unsynced(&format!("{}/{JOURNAL}", self.dir), &journal)?;
        self.meter.add(plain_len as u64);
        self.meter.chunks(self.journal.chunks.len(), self.resumed);
        (self.progress)(&self.meter.now(false));
        Ok(())
    }

    fn write_chunk(
        &mut self,
        index: usize,
        cipher: &[u8],
        sha256: String,
        plain_sha256: String,
    ) -> Result<ChunkEntry, BackupError> {
        let file = format!("{index:08}.age");
        self.target
            .write_deferred(&format!("{}/{file}", self.dir), cipher)?;
        Ok(ChunkEntry {
            file,
            bytes: cipher.len() as u64,
            sha256,
            plain_sha256,
        })
    }
}
