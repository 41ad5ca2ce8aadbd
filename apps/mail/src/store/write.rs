//! Changing the store: deliveries, APPEND, flags, COPY and MOVE, EXPUNGE.

use std::io::Write;
use std::path::{Path, PathBuf};

use rusqlite::{OptionalExtension, Transaction, params};

use super::mailboxes::{by_id, by_name};
use super::read::Msg;
use super::{DELETED, Store, StoreError, unix_now};
use crate::junk;
use crate::mime::Analysed;

/// What a delivery did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivered {
    Stored {
        mailbox: String,
        uid: u32,
    },
    /// A delivery with this id was stored before.
    Duplicate,
}

/// How STORE changes flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlagChange {
    Set,
    Add,
    Remove,
}

/// Deliveries remembered for deduplication (well past the host's spool
/// lifetime).
const REMEMBER_DELIVERIES: i64 = 30 * 86_400;

/// The next modseq of a mailbox, taken.
fn bump_modseq(tx: &Transaction<'_>, mailbox: i64) -> Result<u64, StoreError> {
    Ok(tx.query_row(
        "UPDATE mailboxes SET highest_modseq = highest_modseq + 1 WHERE id = ?1
         RETURNING highest_modseq",
        [mailbox],
        |r| r.get::<_, i64>(0),
    )? as u64)
}

/// The next UID of a mailbox, taken.
fn take_uid(tx: &Transaction<'_>, mailbox: i64) -> Result<u32, StoreError> {
    Ok(tx.query_row(
        "UPDATE mailboxes SET uidnext = uidnext + 1 WHERE id = ?1 RETURNING uidnext - 1",
        [mailbox],
        |r| r.get(0),
    )?)
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(StoreError::io("fsync", dir))
}

/// Removes every message of `mailbox` (or those with `uids`), recording
/// the expunges; returns the blobs no message names any more (their files
/// go once the transaction is committed).
pub(super) fn release_messages(
    tx: &Transaction<'_>,
    mailbox: i64,
    uids: Option<&[u32]>,
) -> Result<Vec<i64>, StoreError> {
    let rows: Vec<(i64, u32, i64)> = {
        let mut stmt =
            tx.prepare_cached("SELECT id, uid, blob_id FROM messages WHERE mailbox_id = ?1")?;
        let rows = stmt.query_map([mailbox], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        rows.collect::<Result<Vec<_>, _>>()?
    };
    let wanted: Option<std::collections::HashSet<u32>> = uids.map(|u| u.iter().copied().collect());
    let doomed: Vec<&(i64, u32, i64)> = rows
        .iter()
        .filter(|(_, uid, _)| wanted.as_ref().is_none_or(|w| w.contains(uid)))
        .collect();
    if doomed.is_empty() {
        return Ok(Vec::new());
    }
    let modseq = bump_modseq(tx, mailbox)?;
    let mut freed = Vec::new();
    for (id, uid, blob) in doomed {
        tx.execute("DELETE FROM messages WHERE id = ?1", [id])?;
        tx.execute(
            "INSERT INTO expunged (mailbox_id, uid, modseq) VALUES (?1, ?2, ?3)",
            params![mailbox, uid, modseq as i64],
        )?;
        let refs: i64 = tx.query_row(
            "UPDATE blobs SET refs = refs - 1 WHERE id = ?1 RETURNING refs",
            [blob],
            |r| r.get(0),
        )?;
        if refs <= 0 {
            tx.execute("DELETE FROM blobs WHERE id = ?1", [blob])?;
            freed.push(*blob);
        }
    }
    Ok(freed)
}

/// Moves every message of `from` to `to` (renaming INBOX).
pub(super) fn move_all(tx: &Transaction<'_>, from: i64, to: i64) -> Result<(), StoreError> {
    let uids: Vec<u32> = {
        let mut stmt = tx.prepare("SELECT uid FROM messages WHERE mailbox_id = ?1 ORDER BY uid")?;
        let rows = stmt.query_map([from], |r| r.get(0))?;
        rows.collect::<Result<_, _>>()?
    };
    copy_rows(tx, from, &uids, to, true)?;
    Ok(())
}

/// Copies (or moves) `uids` of `from` into `to`: `(old uid, new uid)`.
fn copy_rows(
    tx: &Transaction<'_>,
    from: i64,
    uids: &[u32],
    to: i64,
    remove: bool,
) -> Result<Vec<(u32, u32)>, StoreError> {
    let mut pairs = Vec::new();
    if uids.is_empty() {
        return Ok(pairs);
    }
    let modseq = bump_modseq(tx, to)?;
    for &uid in uids {
        let row: Option<(i64, u32, String, i64)> = tx
            .query_row(
                "SELECT blob_id, flags, keywords, internaldate FROM messages
                 WHERE mailbox_id = ?1 AND uid = ?2",
                params![from, uid],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()?;
        let Some((blob, flags, keywords, date)) = row else {
            continue;
        };
        let new = take_uid(tx, to)?;
        tx.execute(
            "INSERT INTO messages (mailbox_id, uid, blob_id, modseq, flags, keywords, internaldate)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![to, new, blob, modseq as i64, flags, keywords, date],
        )?;
        tx.execute("UPDATE blobs SET refs = refs + 1 WHERE id = ?1", [blob])?;
        pairs.push((uid, new));
    }
    if remove {
        let moved: Vec<u32> = pairs.iter().map(|(o, _)| *o).collect();
        // Every blob is still named by its copy: nothing is freed.
        release_messages(tx, from, Some(&moved))?;
    }
    Ok(pairs)
}

impl Store {
    /// Removes the files of blobs no message names any more.
    pub(super) fn remove_blob_files(&self, blobs: &[i64]) {
        for b in blobs {
            let _ = std::fs::remove_file(self.blob_path(*b));
        }
    }

    /// Writes `bytes` to a temporary file and fsyncs it.
    fn stage(&self, bytes: &[&[u8]]) -> Result<PathBuf, StoreError> {
        let mut name = [0u8; 8];
        let _ = getrandom::fill(&mut name);
        let path = self
            .dir
            .join("tmp")
            .join(format!("{:016x}", u64::from_le_bytes(name)));
        let result = (|| {
            let mut f = std::fs::File::create(&path).map_err(StoreError::io("create", &path))?;
            for b in bytes {
                f.write_all(b).map_err(StoreError::io("write", &path))?;
            }
            f.sync_all().map_err(StoreError::io("fsync", &path))
        })();
        if let Err(e) = result {
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        Ok(path)
    }

    /// Names a staged file as a new blob inside `tx`: the row, then the
    /// file renamed into place and its directory fsynced.
    fn put_blob(
        &self,
        tx: &Transaction<'_>,
        staged: &Path,
        size: usize,
        a: &Analysed,
    ) -> Result<i64, StoreError> {
        tx.execute(
            "INSERT INTO blobs (size, refs, envelope, bodystructure, body, sent_date)
             VALUES (?1, 0, ?2, ?3, ?4, ?5)",
            params![
                size as i64,
                a.envelope,
                a.bodystructure,
                a.body,
                a.sent_date
            ],
        )?;
        let blob = tx.last_insert_rowid();
        let path = self.blob_path(blob);
        let dir = path.parent().expect("blob paths have a directory");
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(StoreError::io("create", dir))?;
            sync_dir(&self.dir.join("msg"))?;
        }
        std::fs::rename(staged, &path).map_err(StoreError::io("rename", &path))?;
        sync_dir(dir)?;
        Ok(blob)
    }

    fn insert_message(
        &self,
        tx: &Transaction<'_>,
        mailbox: i64,
        blob: i64,
        flags: u32,
        keywords: &str,
        internaldate: i64,
    ) -> Result<u32, StoreError> {
        let uid = take_uid(tx, mailbox)?;
        let modseq = bump_modseq(tx, mailbox)?;
        tx.execute(
            "INSERT INTO messages (mailbox_id, uid, blob_id, modseq, flags, keywords, internaldate)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                mailbox,
                uid,
                blob,
                modseq as i64,
                flags,
                keywords,
                internaldate
            ],
        )?;
        tx.execute("UPDATE blobs SET refs = refs + 1 WHERE id = ?1", [blob])?;
        Ok(uid)
    }

    /// Stores a message the host delivered (spool entry `id`): into INBOX,
    /// or Junk when the user's junk filter says so. Durable on return.
    pub fn deliver(&self, id: &str, from: &str, message: &[u8]) -> Result<Delivered, StoreError> {
        if self
            .db()
            .query_row("SELECT 1 FROM deliveries WHERE id = ?1", [id], |_| Ok(()))
            .optional()?
            .is_some()
        {
            return Ok(Delivered::Duplicate);
        }
        let from: String = from
            .chars()
            .filter(|c| !c.is_control() && *c != '>')
            .collect();
        let return_path = format!("Return-Path: <{from}>\r\n");
        let mut whole = Vec::with_capacity(return_path.len() + message.len());
        whole.extend_from_slice(return_path.as_bytes());
        whole.extend_from_slice(message);
        let analysed = crate::mime::analyse(&whole);
        let staged = self.stage(&[&whole])?;
        let now = unix_now();
        let result = (|| {
            let mut db = self.db();
            let tx = db.transaction()?;
            // A duplicate may have arrived while this one was staged.
            if tx
                .query_row("SELECT 1 FROM deliveries WHERE id = ?1", [id], |_| Ok(()))
                .optional()?
                .is_some()
            {
                return Ok(Delivered::Duplicate);
            }
            let spam = junk::is_spam(&tx, &analysed.tokens)?;
            // Junk is the mailbox with the \Junk role, whatever the user
            // renamed it to; without one, spam goes to INBOX marked $Junk.
            let junk = if spam {
                tx.query_row(
                    "SELECT name FROM mailboxes WHERE special_use = '\\Junk' ORDER BY id LIMIT 1",
                    [],
                    |r| r.get::<_, String>(0),
                )
                .optional()?
            } else {
                None
            };
            let name = junk.as_deref().unwrap_or("INBOX");
            let keywords = if spam { "$Junk" } else { "" };
            let mailbox =
                by_name(&tx, name)?.ok_or_else(|| StoreError::NoMailbox(name.to_owned()))?;
            let blob = self.put_blob(&tx, &staged, whole.len(), &analysed)?;
            let uid = self.insert_message(&tx, mailbox.id, blob, 0, keywords, now)?;
            tx.execute(
                "INSERT INTO deliveries (id, at) VALUES (?1, ?2)",
                params![id, now],
            )?;
            tx.execute(
                "DELETE FROM deliveries WHERE at < ?1",
                [now - REMEMBER_DELIVERIES],
            )?;
            tx.execute(
                "UPDATE counters SET value = value + 1 WHERE name = 'deliveries'",
                [],
            )?;
            tx.execute(
                "UPDATE counters SET value = ?1 WHERE name = 'last_delivery'",
                [now],
            )?;
            tx.commit()?;
            Ok(Delivered::Stored {
                mailbox: name.to_owned(),
                uid,
            })
        })();
        let _ = std::fs::remove_file(&staged);
        if result.is_ok() {
            self.changed();
        }
        result
    }

    /// APPEND: stores `message` in `mailbox`; its UIDVALIDITY and the new
    /// UID.
    pub fn append(
        &self,
        mailbox: &str,
        flags: u32,
        keywords: &[String],
        internaldate: Option<i64>,
        message: &[u8],
    ) -> Result<(u32, u32), StoreError> {
        let analysed = crate::mime::analyse(message);
        let staged = self.stage(&[message])?;
        let result = (|| {
            let mut db = self.db();
            let tx = db.transaction()?;
            let mb =
                by_name(&tx, mailbox)?.ok_or_else(|| StoreError::NoMailbox(mailbox.to_owned()))?;
            let blob = self.put_blob(&tx, &staged, message.len(), &analysed)?;
            let uid = self.insert_message(
                &tx,
                mb.id,
                blob,
                flags,
                &keywords.join(" "),
                internaldate.unwrap_or_else(unix_now),
            )?;
            tx.commit()?;
            Ok((mb.uidvalidity, uid))
        })();
        let _ = std::fs::remove_file(&staged);
        if result.is_ok() {
            self.changed();
        }
        result
    }

    /// STORE: changes flags of `uids`. With `unchanged_since`, a message
    /// whose modseq is above it is left alone and listed as modified.
    /// Returns the messages changed (as they are now) and those refused.
    pub fn store_flags(
        &self,
        mailbox: i64,
        uids: &[u32],
        change: FlagChange,
        flags: u32,
        keywords: &[String],
        unchanged_since: Option<u64>,
    ) -> Result<(Vec<Msg>, Vec<u32>), StoreError> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let mut changed = Vec::new();
        let mut refused = Vec::new();
        let mut modseq = None;
        for &uid in uids {
            let row: Option<(i64, u32, String, i64)> = tx
                .query_row(
                    "SELECT id, flags, keywords, modseq FROM messages
                     WHERE mailbox_id = ?1 AND uid = ?2",
                    params![mailbox, uid],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
                )
                .optional()?;
            let Some((id, old_flags, old_keywords, old_modseq)) = row else {
                continue;
            };
            if unchanged_since.is_some_and(|u| old_modseq as u64 > u) {
                refused.push(uid);
                continue;
            }
            let mut kw: Vec<String> = old_keywords.split_whitespace().map(str::to_owned).collect();
            let new_flags = match change {
                FlagChange::Set => {
                    kw = keywords.to_vec();
                    flags
                }
                FlagChange::Add => {
                    for k in keywords {
                        if !kw.iter().any(|x| x.eq_ignore_ascii_case(k)) {
                            kw.push(k.clone());
                        }
                    }
                    old_flags | flags
                }
                FlagChange::Remove => {
                    kw.retain(|x| !keywords.iter().any(|k| k.eq_ignore_ascii_case(x)));
                    old_flags & !flags
                }
            };
            let new_keywords = kw.join(" ");
            if new_flags == old_flags && new_keywords == old_keywords {
                continue;
            }
            let m = match modseq {
                Some(m) => m,
                None => {
                    let m = bump_modseq(&tx, mailbox)?;
                    modseq = Some(m);
                    m
                }
            };
            tx.execute(
                "UPDATE messages SET flags = ?2, keywords = ?3, modseq = ?4 WHERE id = ?1",
                params![id, new_flags, new_keywords, m as i64],
            )?;
            changed.push(uid);
        }
        let rows = rows_for(&tx, mailbox, &changed)?;
        // Junk and not-junk marks (Thunderbird's Junk/NonJunk, $Junk and
        // $NotJunk elsewhere) train the filter too.
        if change != FlagChange::Remove {
            let marked = |names: &[&str]| {
                keywords
                    .iter()
                    .any(|k| names.iter().any(|n| k.eq_ignore_ascii_case(n)))
            };
            let verdict = if marked(&["$Junk", "Junk"]) {
                Some(junk::Verdict::Spam)
            } else if marked(&["$NotJunk", "NotJunk", "NonJunk"]) {
                Some(junk::Verdict::Ham)
            } else {
                None
            };
            if let Some(v) = verdict {
                for m in &rows {
                    let bytes = self.read_blob(m.blob)?;
                    junk::train(&tx, m.blob, &crate::mime::tokens(&bytes), v)?;
                }
            }
        }
        tx.commit()?;
        drop(db);
        if !rows.is_empty() {
            self.changed();
        }
        Ok((rows, refused))
    }

    /// COPY, or MOVE with `remove`: `(UIDVALIDITY of the target, (old,
    /// new) UIDs)`. Moving into Junk trains the junk filter on spam, out
    /// of Junk (anywhere but Trash) on ham.
    pub fn copy(
        &self,
        from: i64,
        uids: &[u32],
        to: &str,
        remove: bool,
    ) -> Result<(u32, Vec<(u32, u32)>), StoreError> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let target = by_name(&tx, to)?.ok_or_else(|| StoreError::NoMailbox(to.to_owned()))?;
        let source = by_id(&tx, from)?;
        let pairs = copy_rows(&tx, from, uids, target.id, remove)?;
        let verdict = match (source.special_use.as_str(), target.special_use.as_str()) {
            (s, "\\Junk") if s != "\\Junk" => Some(junk::Verdict::Spam),
            ("\\Junk", t) if t != "\\Junk" && t != "\\Trash" => Some(junk::Verdict::Ham),
            // Archived, or filed from INBOX into a folder: wanted mail.
            (_, "\\Archive") => Some(junk::Verdict::Ham),
            ("", "") if source.name == "INBOX" => Some(junk::Verdict::Ham),
            _ => None,
        };
        if let Some(v) = verdict {
            for (_, new) in &pairs {
                let blob: i64 = tx.query_row(
                    "SELECT blob_id FROM messages WHERE mailbox_id = ?1 AND uid = ?2",
                    params![target.id, new],
                    |r| r.get(0),
                )?;
                let bytes = self.read_blob(blob)?;
                junk::train(&tx, blob, &crate::mime::tokens(&bytes), v)?;
            }
        }
        tx.commit()?;
        drop(db);
        if !pairs.is_empty() {
            self.changed();
        }
        Ok((target.uidvalidity, pairs))
    }

    /// EXPUNGE: removes messages flagged \Deleted (only those in `uids`
    /// when given); their UIDs.
    pub fn expunge(&self, mailbox: i64, uids: Option<&[u32]>) -> Result<Vec<u32>, StoreError> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let deleted: Vec<u32> = {
            let mut stmt = tx.prepare(
                "SELECT uid FROM messages WHERE mailbox_id = ?1 AND (flags & ?2) != 0 ORDER BY uid",
            )?;
            let rows = stmt.query_map(params![mailbox, DELETED], |r| r.get(0))?;
            rows.collect::<Result<_, _>>()?
        };
        let doomed: Vec<u32> = match uids {
            Some(only) => deleted.into_iter().filter(|u| only.contains(u)).collect(),
            None => deleted,
        };
        let freed = release_messages(&tx, mailbox, Some(&doomed))?;
        tx.commit()?;
        drop(db);
        self.remove_blob_files(&freed);
        if !doomed.is_empty() {
            self.changed();
        }
        Ok(doomed)
    }
}

/// The rows of `uids` as they are in `tx`.
fn rows_for(tx: &Transaction<'_>, mailbox: i64, uids: &[u32]) -> Result<Vec<Msg>, StoreError> {
    let mut out = Vec::new();
    let mut stmt = tx.prepare_cached(
        "SELECT m.uid, m.blob_id, m.modseq, m.flags, m.keywords, m.internaldate, b.size
         FROM messages m JOIN blobs b ON b.id = m.blob_id WHERE m.mailbox_id = ?1 AND m.uid = ?2",
    )?;
    for uid in uids {
        if let Some(m) = stmt
            .query_row(params![mailbox, uid], |r| {
                Ok(Msg {
                    uid: r.get(0)?,
                    blob: r.get(1)?,
                    modseq: r.get::<_, i64>(2)? as u64,
                    flags: r.get(3)?,
                    keywords: r.get(4)?,
                    internaldate: r.get(5)?,
                    size: r.get(6)?,
                })
            })
            .optional()?
        {
            out.push(m);
        }
    }
    Ok(out)
}
