//! One spooled message on disk: `queue/<id>.msg` holds the envelope as one
//! JSON line, then the message exactly as it will be delivered; it is
//! written to a hidden temporary name, fsynced, renamed into place and the
//! directory fsynced before the sender is told 250. `queue/<id>.state`
//! holds the delivery progress once there is any (which users have it,
//! which failed, when to try again); it is replaced atomically.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use serde::{Deserialize, Serialize};

/// One recipient as the sender wrote it, and the user it reaches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recipient {
    pub address: String,
    pub user: String,
}

/// What the MX learned about a message besides its bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// Unique in this spool; also the id each grain deduplicates by.
    pub id: String,
    /// MAIL FROM; empty for a bounce.
    pub from: String,
    pub recipients: Vec<Recipient>,
    /// Unix seconds when it was accepted.
    pub received_at: i64,
    /// The sending client's address.
    pub client: String,
    /// What it said in HELO or EHLO.
    pub helo: String,
    /// The sender is who they say (SPF passed, or a local user): only
    /// then does a bounce go to another host (no backscatter to forged
    /// addresses).
    #[serde(default)]
    pub sender_verified: bool,
}

impl Envelope {
    /// The users this message goes to, each once, in recipient order, with
    /// the addresses that reached them.
    pub fn users(&self) -> Vec<(String, Vec<String>)> {
        let mut out: Vec<(String, Vec<String>)> = Vec::new();
        for r in &self.recipients {
            match out.iter_mut().find(|(u, _)| *u == r.user) {
                Some((_, addrs)) => addrs.push(r.address.clone()),
                None => out.push((r.user.clone(), vec![r.address.clone()])),
            }
        }
        out
    }
}

/// How far delivery of one message has come.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// Failed attempts so far.
    pub attempts: u32,
    /// Unix seconds of the next attempt (0: as soon as possible).
    pub next_attempt: i64,
    /// Users whose grain has the message durably.
    pub delivered: Vec<String>,
    /// Users it can never reach, with why.
    pub failed: Vec<(String, String)>,
    /// Why the last attempt did not finish.
    pub last_error: Option<String>,
    /// Held by the admin: not delivered until released.
    #[serde(default)]
    pub held: bool,
    /// The sender was told the message is delayed.
    #[serde(default)]
    pub warned: bool,
    /// In a spool that keeps delivered messages ([`crate::Spool::keep_delivered`]):
    /// when every recipient was done with, unix seconds. Kept, not
    /// delivered again, until [`crate::Spool::forget`] or
    /// [`crate::Spool::redeliver`].
    #[serde(default)]
    pub settled: Option<i64>,
    /// The users in `failed` whose sender was told already (bounced): a
    /// delivery again ([`crate::Spool::redeliver`]) does not tell twice.
    #[serde(default)]
    pub bounced: Vec<String>,
    /// The failover (its time) the last [`crate::Spool::redeliver`] was for.
    #[serde(default)]
    pub redelivered_for: Option<i64>,
}

/// The largest envelope line read back (a message has at most a few
/// hundred recipients).
const MAX_ENVELOPE: u64 = 1 << 20;

/// Reads the envelope of a spooled file; with the byte offset where the
/// message starts.
pub(crate) fn read_envelope(path: &Path) -> std::io::Result<(Envelope, u64)> {
    let file = File::open(path)?;
    let mut line = Vec::new();
    BufReader::new(file.take(MAX_ENVELOPE)).read_until(b'\n', &mut line)?;
    if line.last() != Some(&b'\n') {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "the envelope line is missing or too long",
        ));
    }
    let envelope: Envelope = serde_json::from_slice(&line[..line.len() - 1])
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    Ok((envelope, line.len() as u64))
}

/// The header block of a spooled message (up to the first empty line,
/// at most 64 KiB), for a bounce.
pub(crate) fn read_headers(path: &Path, offset: u64) -> std::io::Result<Vec<u8>> {
    use std::io::{Seek, SeekFrom};
    let mut file = File::open(path)?;
    file.seek(SeekFrom::Start(offset))?;
    let mut head = Vec::new();
    file.take(64 << 10).read_to_end(&mut head)?;
    let end = head
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 2)
        .or_else(|| head.windows(2).position(|w| w == b"\n\n").map(|p| p + 1))
        .unwrap_or(head.len());
    head.truncate(end);
    Ok(head)
}
