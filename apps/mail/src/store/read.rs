//! Reading the index: a mailbox's messages, what changed since a modseq,
//! a mailbox's status, what is cached of a message.

use rusqlite::params;

use super::mailboxes::by_id;
use super::{DELETED, Mailbox, SEEN, Store, StoreError};

/// One message of a mailbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Msg {
    pub uid: u32,
    pub blob: i64,
    pub modseq: u64,
    pub flags: u32,
    /// Space-separated.
    pub keywords: String,
    /// Unix seconds.
    pub internaldate: i64,
    pub size: u32,
}

/// What STATUS and `granary mail status` show of a mailbox.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status {
    pub messages: u32,
    pub unseen: u32,
    pub deleted: u32,
    pub size: u64,
    pub uidnext: u32,
    pub uidvalidity: u32,
    pub highest_modseq: u64,
}

/// What a FETCH takes from the cache rather than the file.
#[derive(Debug, Clone, Default)]
pub struct Cached {
    pub envelope: String,
    pub bodystructure: String,
    pub body: String,
    pub sent_date: i64,
}

const MSG_COLUMNS: &str = "m.uid, m.blob_id, m.modseq, m.flags, m.keywords, m.internaldate, b.size";

fn msg(r: &rusqlite::Row<'_>) -> rusqlite::Result<Msg> {
    Ok(Msg {
        uid: r.get(0)?,
        blob: r.get(1)?,
        modseq: r.get::<_, i64>(2)? as u64,
        flags: r.get(3)?,
        keywords: r.get(4)?,
        internaldate: r.get(5)?,
        size: r.get(6)?,
    })
}

impl Store {
    /// The mailbox as it is now (uidnext, modseq).
    pub fn mailbox_by_id(&self, id: i64) -> Result<Mailbox, StoreError> {
        by_id(&self.db(), id)
    }

    /// Every message of a mailbox, by UID.
    pub fn messages(&self, mailbox: i64) -> Result<Vec<Msg>, StoreError> {
        let db = self.db();
        let mut stmt = db.prepare_cached(&format!(
            "SELECT {MSG_COLUMNS} FROM messages m JOIN blobs b ON b.id = m.blob_id
             WHERE m.mailbox_id = ?1 ORDER BY m.uid"
        ))?;
        let rows = stmt.query_map([mailbox], msg)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Messages changed (added or flags) after `modseq`, and UIDs expunged
    /// after it, with the mailbox as it is now.
    pub fn changes_since(
        &self,
        mailbox: i64,
        modseq: u64,
    ) -> Result<(Mailbox, Vec<Msg>, Vec<u32>), StoreError> {
        let db = self.db();
        let mb = by_id(&db, mailbox)?;
        let changed = {
            let mut stmt = db.prepare_cached(&format!(
                "SELECT {MSG_COLUMNS} FROM messages m JOIN blobs b ON b.id = m.blob_id
                 WHERE m.mailbox_id = ?1 AND m.modseq > ?2 ORDER BY m.uid"
            ))?;
            let rows = stmt.query_map(params![mailbox, modseq as i64], msg)?;
            rows.collect::<Result<Vec<_>, _>>()?
        };
        let expunged = {
            let mut stmt = db.prepare_cached(
                "SELECT uid FROM expunged WHERE mailbox_id = ?1 AND modseq > ?2 ORDER BY uid",
            )?;
            let rows = stmt.query_map(params![mailbox, modseq as i64], |r| r.get(0))?;
            rows.collect::<Result<Vec<u32>, _>>()?
        };
        Ok((mb, changed, expunged))
    }

    pub fn status(&self, mailbox: i64) -> Result<Status, StoreError> {
        let db = self.db();
        let mb = by_id(&db, mailbox)?;
        let (messages, unseen, deleted, size): (u32, u32, u32, i64) = db.query_row(
            "SELECT count(*),
                    coalesce(sum((m.flags & ?2) = 0), 0),
                    coalesce(sum((m.flags & ?3) != 0), 0),
                    coalesce(sum(b.size), 0)
             FROM messages m JOIN blobs b ON b.id = m.blob_id WHERE m.mailbox_id = ?1",
            params![mailbox, SEEN, DELETED],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )?;
        Ok(Status {
            messages,
            unseen,
            deleted,
            size: size as u64,
            uidnext: mb.uidnext,
            uidvalidity: mb.uidvalidity,
            highest_modseq: mb.highest_modseq,
        })
    }

    /// ENVELOPE, BODYSTRUCTURE, BODY and the sent date of a message.
    pub fn cached(&self, blob: i64) -> Result<Cached, StoreError> {
        let db = self.db();
        let mut stmt = db.prepare_cached(
            "SELECT envelope, bodystructure, body, sent_date FROM blobs WHERE id = ?1",
        )?;
        Ok(stmt.query_row([blob], |r| {
            Ok(Cached {
                envelope: r.get(0)?,
                bodystructure: r.get(1)?,
                body: r.get(2)?,
                sent_date: r.get(3)?,
            })
        })?)
    }

    /// The lowest UID that is not \Seen, and its message sequence number.
    pub fn first_unseen(&self, mailbox: i64) -> Result<Option<(u32, u32)>, StoreError> {
        let db = self.db();
        let uid: Option<u32> = db.query_row(
            "SELECT min(uid) FROM messages WHERE mailbox_id = ?1 AND (flags & ?2) = 0",
            params![mailbox, SEEN],
            |r| r.get(0),
        )?;
        let Some(uid) = uid else { return Ok(None) };
        let seq: u32 = db.query_row(
            "SELECT count(*) FROM messages WHERE mailbox_id = ?1 AND uid <= ?2",
            params![mailbox, uid],
            |r| r.get(0),
        )?;
        Ok(Some((uid, seq)))
    }

    /// Deliveries stored and the time of the newest.
    pub fn delivery_counts(&self) -> Result<(u64, i64), StoreError> {
        let db = self.db();
        let get = |name: &str| -> Result<i64, StoreError> {
            Ok(
                db.query_row("SELECT value FROM counters WHERE name = ?1", [name], |r| {
                    r.get(0)
                })?,
            )
        };
        Ok((get("deliveries")? as u64, get("last_delivery")?))
    }
}
