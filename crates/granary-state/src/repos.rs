//! Git access: which repositories their owners made public, and users'
//! SSH keys.

use rusqlite::{OptionalExtension, params};

use crate::audit::record;
use crate::{QueryContext, StateError, Store};
use granary_model::UserName;

impl Store {
    /// Makes `repo` of `user` public or private again; audited.
    pub fn set_repo_public(
        &self,
        user: &UserName,
        repo: &str,
        public: bool,
        actor: &str,
    ) -> Result<(), StateError> {
        let w = self.writer()?;
        let tx = w.begin().op("begin set repo visibility")?;
        let uid = crate::users::user_id(&tx, user)?;
        if public {
            tx.execute(
                "INSERT OR IGNORE INTO public_repos (user_id, repo) VALUES (?1, ?2)",
                params![uid, repo],
            )
            .op("make repo public")?;
        } else {
            tx.execute(
                "DELETE FROM public_repos WHERE user_id = ?1 AND repo = ?2",
                params![uid, repo],
            )
            .op("make repo private")?;
        }
        let what = if public { "public" } else { "private" };
        record(
            &tx,
            actor,
            "git.visibility",
            &format!("{user}/{repo}"),
            what,
        )?;
        w.commit(tx, "commit repo visibility")
    }

    /// Whether `user` made `repo` public.
    pub fn repo_public(&self, user: &str, repo: &str) -> Result<bool, StateError> {
        self.conn()
            .query_row(
                "SELECT 1 FROM public_repos p JOIN users u ON u.id = p.user_id
                 WHERE u.name = ?1 AND p.repo = ?2",
                params![user, repo],
                |_| Ok(()),
            )
            .optional()
            .op("read repo visibility")
            .map(|r| r.is_some())
    }

    /// A user's public repositories, sorted.
    pub fn public_repos(&self, user: &UserName) -> Result<Vec<String>, StateError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT p.repo FROM public_repos p JOIN users u ON u.id = p.user_id
                 WHERE u.name = ?1 ORDER BY p.repo",
            )
            .op("list public repos")?;
        let rows = stmt
            .query_map([user.as_str()], |r| r.get(0))
            .op("list public repos")?;
        rows.collect::<Result<_, _>>().op("list public repos")
    }
}

/// One of a user's SSH keys.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SshKey {
    pub id: i64,
    pub user: String,
    /// `type base64`.
    pub key: String,
    pub fingerprint: String,
    pub label: String,
    pub created_at: i64,
    pub last_used_at: Option<i64>,
}

impl Store {
    /// Adds a key (already checked and normalised by the caller); a key
    /// belongs to one user only.
    pub fn add_ssh_key(
        &self,
        user: &UserName,
        key: &str,
        fingerprint: &str,
        label: &str,
        actor: &str,
    ) -> Result<SshKey, StateError> {
        let w = self.writer()?;
        let tx = w.begin().op("begin add ssh key")?;
        let uid = crate::users::user_id(&tx, user)?;
        match tx.execute(
            "INSERT INTO ssh_keys (user_id, key, fingerprint, label) VALUES (?1, ?2, ?3, ?4)",
            params![uid, key, fingerprint, label],
        ) {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                return Err(StateError::Conflict(format!(
                    "SSH key {fingerprint} is already registered"
                )));
            }
            other => other.op("insert ssh key")?,
        };
        let id = tx.last_insert_rowid();
        record(&tx, actor, "ssh_key.add", user.as_str(), fingerprint)?;
        let key = tx
            .query_row(
                &format!("{SSH_KEY_SELECT} WHERE k.id = ?1"),
                [id],
                ssh_key_from_row,
            )
            .op("read new ssh key")?;
        w.commit(tx, "commit add ssh key")?;
        Ok(key)
    }

    pub fn list_ssh_keys(&self, user: &UserName) -> Result<Vec<SshKey>, StateError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(&format!("{SSH_KEY_SELECT} WHERE u.name = ?1 ORDER BY k.id"))
            .op("list ssh keys")?;
        let rows = stmt
            .query_map([user.as_str()], ssh_key_from_row)
            .op("list ssh keys")?;
        rows.collect::<Result<_, _>>().op("list ssh keys")
    }

    /// Removes one of the user's keys; whether it was there.
    pub fn remove_ssh_key(
        &self,
        user: &UserName,
        id: i64,
        actor: &str,
    ) -> Result<bool, StateError> {
        let w = self.writer()?;
        let tx = w.begin().op("begin remove ssh key")?;
        let uid = crate::users::user_id(&tx, user)?;
        let n = tx
            .execute(
                "DELETE FROM ssh_keys WHERE id = ?1 AND user_id = ?2",
                params![id, uid],
            )
            .op("delete ssh key")?;
        if n > 0 {
            record(&tx, actor, "ssh_key.remove", user.as_str(), &id.to_string())?;
        }
        w.commit(tx, "commit remove ssh key")?;
        Ok(n > 0)
    }

    /// Which of `user`'s keys `key` is, if any; notes its use.
    pub fn check_ssh_key(&self, user: &str, key: &str) -> Result<Option<i64>, StateError> {
        let conn = self.conn();
        let id = conn
            .query_row(
                "UPDATE ssh_keys SET last_used_at = unixepoch()
                 WHERE key = ?1
                   AND user_id = (SELECT id FROM users WHERE name = ?2 AND disabled_at IS NULL)
                 RETURNING id",
                params![key, user],
                |r| r.get(0),
            )
            .optional()
            .op("check ssh key")?;
        self.forget_captured(&conn);
        Ok(id)
    }
}

impl Store {
    /// Registers `domain` for `user`'s blog; a domain has one owner.
    pub fn add_blog_domain(
        &self,
        user: &UserName,
        domain: &str,
        actor: &str,
    ) -> Result<(), StateError> {
        let w = self.writer()?;
        let tx = w.begin().op("begin add blog domain")?;
        let uid = crate::users::user_id(&tx, user)?;
        match tx.execute(
            "INSERT INTO blog_domains (domain, user_id) VALUES (?1, ?2)",
            params![domain, uid],
        ) {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                return Err(StateError::Conflict(format!(
                    "{domain} is already registered"
                )));
            }
            other => other.op("insert blog domain")?,
        };
        record(&tx, actor, "blog.domain.add", user.as_str(), domain)?;
        w.commit(tx, "commit add blog domain")
    }

    /// Unregisters one of `user`'s domains; whether it was theirs.
    pub fn remove_blog_domain(
        &self,
        user: &UserName,
        domain: &str,
        actor: &str,
    ) -> Result<bool, StateError> {
        let w = self.writer()?;
        let tx = w.begin().op("begin remove blog domain")?;
        let uid = crate::users::user_id(&tx, user)?;
        let n = tx
            .execute(
                "DELETE FROM blog_domains WHERE domain = ?1 AND user_id = ?2",
                params![domain, uid],
            )
            .op("delete blog domain")?;
        if n > 0 {
            record(&tx, actor, "blog.domain.remove", user.as_str(), domain)?;
        }
        w.commit(tx, "commit remove blog domain")?;
        Ok(n > 0)
    }

    pub fn blog_domains(&self, user: &UserName) -> Result<Vec<String>, StateError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT d.domain FROM blog_domains d JOIN users u ON u.id = d.user_id
                 WHERE u.name = ?1 ORDER BY d.domain",
            )
            .op("list blog domains")?;
        let rows = stmt
            .query_map([user.as_str()], |r| r.get(0))
            .op("list blog domains")?;
        rows.collect::<Result<_, _>>().op("list blog domains")
    }

    /// Whose blog `domain` is, if anyone's.
    pub fn blog_domain_owner(&self, domain: &str) -> Result<Option<String>, StateError> {
        self.conn()
            .query_row(
                "SELECT u.name FROM blog_domains d JOIN users u ON u.id = d.user_id WHERE d.domain = ?1",
                [domain],
                |r| r.get(0),
            )
            .optional()
            .op("read blog domain")
    }
}

const SSH_KEY_SELECT: &str =
    "SELECT k.id, u.name, k.key, k.fingerprint, k.label, k.created_at, k.last_used_at
    FROM ssh_keys k JOIN users u ON u.id = k.user_id";

fn ssh_key_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<SshKey> {
    Ok(SshKey {
        id: r.get(0)?,
        user: r.get(1)?,
        key: r.get(2)?,
        fingerprint: r.get(3)?,
        label: r.get(4)?,
        created_at: r.get(5)?,
        last_used_at: r.get(6)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn visibility_round_trips_and_goes_with_the_user() {
        let store = Store::open_in_memory().unwrap();
        let alice = UserName::new("alice").unwrap();
        store.add_user(&alice, "hash", "test").unwrap();
        assert!(!store.repo_public("alice", "site").unwrap());
        store.set_repo_public(&alice, "site", true, "test").unwrap();
        store.set_repo_public(&alice, "site", true, "test").unwrap();
        assert!(store.repo_public("alice", "site").unwrap());
        assert_eq!(store.public_repos(&alice).unwrap(), vec!["site".to_owned()]);
        store
            .set_repo_public(&alice, "site", false, "test")
            .unwrap();
        assert!(!store.repo_public("alice", "site").unwrap());
        assert!(
            store
                .set_repo_public(&UserName::new("nobody").unwrap(), "x", true, "t")
                .is_err()
        );
    }

    #[test]
    fn ssh_keys_belong_to_one_user() {
        let store = Store::open_in_memory().unwrap();
        let (alice, bob) = (
            UserName::new("alice").unwrap(),
            UserName::new("bob").unwrap(),
        );
        store.add_user(&alice, "hash", "test").unwrap();
        store.add_user(&bob, "hash", "test").unwrap();
        let k = store
            .add_ssh_key(&alice, "ssh-ed25519 AAAA", "SHA256:x", "laptop", "t")
            .unwrap();
        assert!(
            store
                .add_ssh_key(&bob, "ssh-ed25519 AAAA", "SHA256:x", "", "t")
                .is_err()
        );
        assert!(
            store
                .check_ssh_key("alice", "ssh-ed25519 AAAA")
                .unwrap()
                .is_some()
        );
        assert!(
            store
                .check_ssh_key("bob", "ssh-ed25519 AAAA")
                .unwrap()
                .is_none()
        );
        assert_eq!(
            store.list_ssh_keys(&alice).unwrap()[0].fingerprint,
            "SHA256:x"
        );
        assert!(!store.remove_ssh_key(&bob, k.id, "t").unwrap());
        assert!(store.remove_ssh_key(&alice, k.id, "t").unwrap());
        assert!(
            store
                .check_ssh_key("alice", "ssh-ed25519 AAAA")
                .unwrap()
                .is_none()
        );
    }
}
