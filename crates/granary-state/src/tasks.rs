//! Taskwarrior sync credentials: TaskChampion client ids (kept as SHA-256
//! hashes, found by hash on every request) and taskd client certificates
//! (known by the SHA-256 of their DER, each with the key its client names).

use granary_model::UserName;
use rusqlite::{OptionalExtension, params};

use crate::audit::record;
use crate::users::user_id;
use crate::{QueryContext, StateError, Store};

/// A TaskChampion client id, as `granary tasks client list` shows it
/// (never the id itself: only its hash is kept).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TaskClient {
    pub id: i64,
    pub user: String,
    pub label: String,
    pub created_at: i64,
    pub last_used_at: Option<i64>,
}

/// A taskd client certificate.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TaskCert {
    pub id: i64,
    pub user: String,
    pub label: String,
    /// The key in the client's `taskd.credentials` (org/user/key).
    pub key: String,
    pub expires_at: i64,
    pub created_at: i64,
}

impl Store {
    /// Records a client id by its hash. Audited (the label, never the id).
    pub fn add_task_client(
        &self,
        user: &UserName,
        label: &str,
        hash: &[u8],
        actor: &str,
    ) -> Result<TaskClient, StateError> {
        let w = self.writer()?;
        let tx = w.begin().op("begin add task client")?;
        let uid = user_id(&tx, user)?;
        let (id, created_at): (i64, i64) = tx
            .query_row(
                "INSERT INTO task_clients (user_id, label, hash) VALUES (?1, ?2, ?3)
                 RETURNING id, created_at",
                params![uid, label, hash],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .op("insert task client")?;
        record(
            &tx,
            actor,
            "tasks.client.add",
            user.as_str(),
            &format!("id={id} label={label}"),
        )?;
        w.commit(tx, "commit add task client")?;
        Ok(TaskClient {
            id,
            user: user.to_string(),
            label: label.to_owned(),
            created_at,
            last_used_at: None,
        })
    }

    /// Whose client id hashes to `hash`: (user, credential id). Marks it
    /// used (at most once a minute, to keep writes off the hot path).
    pub fn task_client_by_hash(&self, hash: &[u8]) -> Result<Option<(String, i64)>, StateError> {
        let conn = self.conn();
        let found: Option<(String, i64)> = conn
            .query_row(
                "SELECT u.name, c.id FROM task_clients c JOIN users u ON u.id = c.user_id
                 WHERE c.hash = ?1 AND u.disabled_at IS NULL",
                [hash],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .op("find task client")?;
        if let Some((_, id)) = &found {
            conn.execute(
                "UPDATE task_clients SET last_used_at = unixepoch()
                 WHERE id = ?1 AND coalesce(last_used_at, 0) < unixepoch() - 60",
                [id],
            )
            .op("mark task client used")?;
            self.forget_captured(&conn);
        }
        Ok(found)
    }

    /// A user's client ids, oldest first; everyone's when `user` is `None`.
    pub fn task_clients(&self, user: Option<&UserName>) -> Result<Vec<TaskClient>, StateError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT c.id, u.name, c.label, c.created_at, c.last_used_at
                 FROM task_clients c JOIN users u ON u.id = c.user_id
                 WHERE ?1 IS NULL OR u.name = ?1 ORDER BY c.id",
            )
            .op("list task clients")?;
        let rows = stmt
            .query_map([user.map(|u| u.as_str())], |r| {
                Ok(TaskClient {
                    id: r.get(0)?,
                    user: r.get(1)?,
                    label: r.get(2)?,
                    created_at: r.get(3)?,
                    last_used_at: r.get(4)?,
                })
            })
            .op("list task clients")?;
        rows.collect::<Result<_, _>>().op("list task clients")
    }

    /// Removes one of `user`'s client ids. Audited.
    pub fn revoke_task_client(
        &self,
        user: &UserName,
        id: i64,
        actor: &str,
    ) -> Result<(), StateError> {
        let w = self.writer()?;
        let tx = w.begin().op("begin revoke task client")?;
        let uid = user_id(&tx, user)?;
        let n = tx
            .execute(
                "DELETE FROM task_clients WHERE user_id = ?1 AND id = ?2",
                params![uid, id],
            )
            .op("revoke task client")?;
        if n == 0 {
            return Err(StateError::Invalid(format!(
                "{user} has no task client {id} (see granary tasks client list {user})"
            )));
        }
        record(
            &tx,
            actor,
            "tasks.client.revoke",
            user.as_str(),
            &format!("id={id}"),
        )?;
        w.commit(tx, "commit revoke task client")
    }

    /// Records a taskd certificate issued to `user`. Audited.
    pub fn add_task_cert(
        &self,
        user: &UserName,
        label: &str,
        key: &str,
        fingerprint: &[u8],
        expires_at: i64,
        actor: &str,
    ) -> Result<TaskCert, StateError> {
        let w = self.writer()?;
        let tx = w.begin().op("begin add task certificate")?;
        let uid = user_id(&tx, user)?;
        let (id, created_at): (i64, i64) = tx
            .query_row(
                "INSERT INTO task_certs (user_id, label, key, fingerprint, expires_at)
                 VALUES (?1, ?2, ?3, ?4, ?5) RETURNING id, created_at",
                params![uid, label, key, fingerprint, expires_at],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .op("insert task certificate")?;
        record(
            &tx,
            actor,
            "tasks.cert.add",
            user.as_str(),
            &format!("id={id} label={label}"),
        )?;
        w.commit(tx, "commit add task certificate")?;
        Ok(TaskCert {
            id,
            user: user.to_string(),
            label: label.to_owned(),
            key: key.to_owned(),
            expires_at,
            created_at,
        })
    }

    /// The certificate whose DER hashes to `fingerprint`: (user, its id,
    /// its key).
    pub fn task_cert_by_fingerprint(
        &self,
        fingerprint: &[u8],
    ) -> Result<Option<(String, i64, String)>, StateError> {
        let conn = self.conn();
        conn.query_row(
            // An expired certificate is no one's, whoever checks its
            // dates (a cluster node does not check the issuer's chain).
            "SELECT u.name, c.id, c.key FROM task_certs c JOIN users u ON u.id = c.user_id
             WHERE c.fingerprint = ?1 AND c.expires_at > CAST(strftime('%s', 'now') AS INTEGER)
               AND u.disabled_at IS NULL",
            [fingerprint],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()
        .op("find task certificate")
    }

    /// A user's taskd certificates, oldest first; everyone's for `None`.
    pub fn task_certs(&self, user: Option<&UserName>) -> Result<Vec<TaskCert>, StateError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT c.id, u.name, c.label, c.key, c.expires_at, c.created_at
                 FROM task_certs c JOIN users u ON u.id = c.user_id
                 WHERE ?1 IS NULL OR u.name = ?1 ORDER BY c.id",
            )
            .op("list task certificates")?;
        let rows = stmt
            .query_map([user.map(|u| u.as_str())], |r| {
                Ok(TaskCert {
                    id: r.get(0)?,
                    user: r.get(1)?,
                    label: r.get(2)?,
                    key: r.get(3)?,
                    expires_at: r.get(4)?,
                    created_at: r.get(5)?,
                })
            })
            .op("list task certificates")?;
        rows.collect::<Result<_, _>>().op("list task certificates")
    }

    /// Revokes one of `user`'s taskd certificates (it is refused from then
    /// on, though the CA's signature on it stays valid). Audited.
    pub fn revoke_task_cert(
        &self,
        user: &UserName,
        id: i64,
        actor: &str,
    ) -> Result<(), StateError> {
        let w = self.writer()?;
        let tx = w.begin().op("begin revoke task certificate")?;
        let uid = user_id(&tx, user)?;
        let n = tx
            .execute(
                "DELETE FROM task_certs WHERE user_id = ?1 AND id = ?2",
                params![uid, id],
            )
            .op("revoke task certificate")?;
        if n == 0 {
            return Err(StateError::Invalid(format!(
                "{user} has no taskd certificate {id} (see granary tasks certs {user})"
            )));
        }
        record(
            &tx,
            actor,
            "tasks.cert.revoke",
            user.as_str(),
            &format!("id={id}"),
        )?;
        w.commit(tx, "commit revoke task certificate")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_are_found_by_hash_and_revoked() {
        let store = Store::open_in_memory().unwrap();
        let alice = UserName::new("alice").unwrap();
        store.add_user(&alice, "x", "test").unwrap();
        let c = store
            .add_task_client(&alice, "laptop", &[7; 32], "test")
            .unwrap();
        assert_eq!(
            store.task_client_by_hash(&[7; 32]).unwrap(),
            Some(("alice".to_owned(), c.id))
        );
        assert_eq!(store.task_client_by_hash(&[8; 32]).unwrap(), None);
        assert_eq!(store.task_clients(Some(&alice)).unwrap().len(), 1);
        let bob = UserName::new("bob").unwrap();
        store.add_user(&bob, "x", "test").unwrap();
        // Bob cannot revoke Alice's.
        assert!(store.revoke_task_client(&bob, c.id, "test").is_err());
        store.revoke_task_client(&alice, c.id, "test").unwrap();
        assert_eq!(store.task_client_by_hash(&[7; 32]).unwrap(), None);
    }

    #[test]
    fn certificates_are_found_by_fingerprint() {
        let store = Store::open_in_memory().unwrap();
        let alice = UserName::new("alice").unwrap();
        store.add_user(&alice, "x", "test").unwrap();
        let c = store
            .add_task_cert(&alice, "old laptop", "k-1", &[1; 32], i64::MAX, "test")
            .unwrap();
        assert_eq!(
            store.task_cert_by_fingerprint(&[1; 32]).unwrap(),
            Some(("alice".to_owned(), c.id, "k-1".to_owned()))
        );
        // One that expired (in 1970) lets nobody in.
        store
            .add_task_cert(&alice, "older", "k-0", &[2; 32], 99, "test")
            .unwrap();
        assert_eq!(store.task_cert_by_fingerprint(&[2; 32]).unwrap(), None);
        store.revoke_task_cert(&alice, c.id, "test").unwrap();
        assert_eq!(store.task_cert_by_fingerprint(&[1; 32]).unwrap(), None);
    }
}
