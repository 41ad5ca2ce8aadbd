//! Users and their account passwords.

use granary_model::UserName;
use rusqlite::{OptionalExtension, params};

use crate::audit::record;
use crate::{QueryContext, StateError, Store};

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct User {
    pub name: String,
    pub created_at: i64,
    pub app_passwords: u64,
    /// When the user was disabled (Unix seconds); `None` while enabled.
    pub disabled_at: Option<i64>,
}

/// What login checks need: the account hash and the app-password hashes of
/// one kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserCredentials {
    pub password_hash: String,
    /// `(id, hash)` of the user's app passwords for the asked kind.
    pub app_passwords: Vec<(i64, String)>,
}

/// The row id of user `name`, or [`StateError::NoSuchUser`].
pub(crate) fn user_id(conn: &rusqlite::Connection, name: &UserName) -> Result<i64, StateError> {
    conn.query_row(
        "SELECT id FROM users WHERE name = ?1",
        [name.as_str()],
        |r| r.get(0),
    )
    .optional()
    .op("find user")?
    .ok_or_else(|| StateError::NoSuchUser(name.to_string()))
}

const USER_COLUMNS: &str = "u.name, u.created_at,
    (SELECT count(*) FROM app_passwords a WHERE a.user_id = u.id), u.disabled_at";

fn user_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<User> {
    Ok(User {
        name: row.get(0)?,
        created_at: row.get(1)?,
        app_passwords: row.get::<_, i64>(2)? as u64,
        disabled_at: row.get(3)?,
    })
}

impl Store {
    /// Adds a user with an already-hashed password.
    pub fn add_user(
        &self,
        name: &UserName,
        password_hash: &str,
        actor: &str,
    ) -> Result<User, StateError> {
        let w = self.writer()?;
        let tx = w.begin().op("begin add user")?;
        let inserted = tx.execute(
            "INSERT INTO users (name, password_hash) VALUES (?1, ?2)",
            params![name.as_str(), password_hash],
        );
        match inserted {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                return Err(StateError::UserExists(name.to_string()));
            }
            other => other.op("insert user")?,
        };
        record(&tx, actor, "user.add", name.as_str(), "")?;
        let user = tx
            .query_row(
                &format!("SELECT {USER_COLUMNS} FROM users u WHERE u.name = ?1"),
                [name.as_str()],
                user_from_row,
            )
            .op("read new user")?;
        w.commit(tx, "commit add user")?;
        Ok(user)
    }

    pub fn user(&self, name: &UserName) -> Result<Option<User>, StateError> {
        self.conn()
            .query_row(
                &format!("SELECT {USER_COLUMNS} FROM users u WHERE u.name = ?1"),
                [name.as_str()],
                user_from_row,
            )
            .optional()
            .op("read user")
    }

    /// All users, by name.
    pub fn list_users(&self) -> Result<Vec<User>, StateError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {USER_COLUMNS} FROM users u ORDER BY u.name"
            ))
            .op("list users")?;
        let rows = stmt.query_map([], user_from_row).op("list users")?;
        rows.collect::<Result<_, _>>().op("list users")
    }

    /// Removes a user and their app passwords. Refused while the user still
    /// owns grains: their data must be dealt with first.
    pub fn remove_user(&self, name: &UserName, actor: &str) -> Result<(), StateError> {
        let w = self.writer()?;
        let tx = w.begin().op("begin remove user")?;
        let id = user_id(&tx, name)?;
        let grains: i64 = tx
            .query_row(
                "SELECT count(*) FROM grains WHERE user_id = ?1",
                [id],
                |r| r.get(0),
            )
            .op("count user grains")?;
        if grains > 0 {
            return Err(StateError::UserHasGrains {
                user: name.to_string(),
                grains: grains as u64,
            });
        }
        tx.execute("DELETE FROM users WHERE id = ?1", [id])
            .op("delete user")?;
        record(&tx, actor, "user.remove", name.as_str(), "")?;
        w.commit(tx, "commit remove user")
    }

    /// Replaces the account password hash.
    pub fn set_password_hash(
        &self,
        name: &UserName,
        password_hash: &str,
        actor: &str,
    ) -> Result<(), StateError> {
        let w = self.writer()?;
        let tx = w.begin().op("begin set password")?;
        let changed = tx
            .execute(
                "UPDATE users SET password_hash = ?2 WHERE name = ?1",
                params![name.as_str(), password_hash],
            )
            .op("update password")?;
        if changed == 0 {
            return Err(StateError::NoSuchUser(name.to_string()));
        }
        record(&tx, actor, "user.passwd", name.as_str(), "")?;
        w.commit(tx, "commit set password")
    }

    /// Disables (`true`) or enables a user: while disabled, none of their
    /// logins checks out. Whether anything changed (disabling a disabled
    /// user keeps the first time, and records nothing).
    pub fn set_user_disabled(
        &self,
        name: &UserName,
        disabled: bool,
        actor: &str,
    ) -> Result<bool, StateError> {
        let w = self.writer()?;
        let tx = w.begin().op("begin disable user")?;
        let id = user_id(&tx, name)?;
        let sql = if disabled {
            "UPDATE users SET disabled_at = unixepoch() WHERE id = ?1 AND disabled_at IS NULL"
        } else {
            "UPDATE users SET disabled_at = NULL WHERE id = ?1 AND disabled_at IS NOT NULL"
        };
        let changed = tx.execute(sql, [id]).op("disable user")? > 0;
        if changed {
            let action = if disabled {
                "user.disable"
            } else {
                "user.enable"
            };
            record(&tx, actor, action, name.as_str(), "")?;
        }
        w.commit(tx, "commit disable user")?;
        Ok(changed)
    }

    /// The disabled users and when each was disabled.
    pub fn disabled_users(&self) -> Result<Vec<(String, i64)>, StateError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT name, disabled_at FROM users WHERE disabled_at IS NOT NULL")
            .op("list disabled users")?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .op("list disabled users")?;
        rows.collect::<Result<_, _>>().op("list disabled users")
    }

    /// Whether user `name` exists and is disabled.
    pub fn is_disabled(&self, name: &str) -> Result<bool, StateError> {
        self.conn()
            .query_row(
                "SELECT disabled_at IS NOT NULL FROM users WHERE name = ?1",
                [name],
                |r| r.get(0),
            )
            .optional()
            .op("read user state")
            .map(|d| d.unwrap_or(false))
    }

    /// The hashes a login for `kind` may match: the account password and the
    /// user's app passwords of that kind. `None` when there is no such user,
    /// or they are disabled.
    pub fn credentials(
        &self,
        name: &UserName,
        kind: Option<&str>,
    ) -> Result<Option<UserCredentials>, StateError> {
        let conn = self.conn();
        let Some((id, password_hash)) = conn
            .query_row(
                "SELECT id, password_hash FROM users WHERE name = ?1 AND disabled_at IS NULL",
                [name.as_str()],
                |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)),
            )
            .optional()
            .op("read credentials")?
        else {
            return Ok(None);
        };
        let app_passwords = match kind {
            None => Vec::new(),
            Some(kind) => {
                let mut stmt = conn
                    .prepare(
                        "SELECT id, password_hash FROM app_passwords
                         WHERE user_id = ?1 AND kind = ?2 ORDER BY id",
                    )
                    .op("read app password hashes")?;
                stmt.query_map(params![id, kind], |r| Ok((r.get(0)?, r.get(1)?)))
                    .op("read app password hashes")?
                    .collect::<Result<_, _>>()
                    .op("read app password hashes")?
            }
        };
        Ok(Some(UserCredentials {
            password_hash,
            app_passwords,
        }))
    }
}

#[cfg(test)]
mod tests {
    use crate::StateError;
    use crate::test_support::*;

    #[test]
    fn add_get_list_remove() {
        let store = store();
        let bob = store.add_user(&name("bob"), "hash-b", "admin").unwrap();
        assert_eq!(bob.name, "bob");
        assert_eq!(bob.app_passwords, 0);
        assert!(bob.created_at > 1_600_000_000);
        store.add_user(&name("alice"), "hash-a", "admin").unwrap();
        let names: Vec<_> = store
            .list_users()
            .unwrap()
            .into_iter()
            .map(|u| u.name)
            .collect();
        assert_eq!(names, ["alice", "bob"]);

        store.remove_user(&name("bob"), "admin").unwrap();
        assert!(store.user(&name("bob")).unwrap().is_none());
        assert!(matches!(
            store.remove_user(&name("bob"), "admin"),
            Err(StateError::NoSuchUser(n)) if n == "bob"
        ));
    }

    #[test]
    fn duplicate_user_is_a_typed_error_and_writes_nothing() {
        let store = store_with_user("alice");
        let events_before = store.recent_events(100).unwrap().len();
        assert!(matches!(
            store.add_user(&name("alice"), "other", "admin"),
            Err(StateError::UserExists(n)) if n == "alice"
        ));
        assert_eq!(store.recent_events(100).unwrap().len(), events_before);
        assert_eq!(
            store
                .credentials(&name("alice"), None)
                .unwrap()
                .unwrap()
                .password_hash,
            "$argon2id$fake"
        );
    }

    #[test]
    fn set_password_hash_replaces_and_audits() {
        let store = store_with_user("alice");
        store
            .set_password_hash(&name("alice"), "new-hash", "admin")
            .unwrap();
        let creds = store.credentials(&name("alice"), None).unwrap().unwrap();
        assert_eq!(creds.password_hash, "new-hash");
        let last = &store.recent_events(1).unwrap()[0];
        assert_eq!(
            (last.action.as_str(), last.subject.as_str()),
            ("user.passwd", "alice")
        );
        assert!(matches!(
            store.set_password_hash(&name("nobody"), "h", "admin"),
            Err(StateError::NoSuchUser(_))
        ));
    }

    #[test]
    fn a_disabled_user_has_no_login_until_enabled() {
        let store = store_with_user("alice");
        let alice = name("alice");
        store
            .add_app_password_with_scram(&alice, "xmpp", "phone", "h", "v=1", "admin")
            .unwrap();
        store
            .add_ssh_key(&alice, "ssh-ed25519 AAAA", "SHA256:x", "laptop", "admin")
            .unwrap();
        assert!(store.set_user_disabled(&alice, true, "admin").unwrap());
        let last = &store.recent_events(1).unwrap()[0];
        assert_eq!(
            (last.action.as_str(), last.subject.as_str()),
            ("user.disable", "alice")
        );
        // Again: nothing changes, nothing is recorded.
        assert!(!store.set_user_disabled(&alice, true, "admin").unwrap());
        assert_eq!(store.recent_events(1).unwrap()[0].id, last.id);
        assert!(store.user(&alice).unwrap().unwrap().disabled_at.is_some());
        assert!(store.credentials(&alice, Some("xmpp")).unwrap().is_none());
        assert!(store.is_disabled("alice").unwrap());
        assert!(!store.is_disabled("nobody").unwrap());
        assert_eq!(store.disabled_users().unwrap()[0].0, "alice");
        assert!(
            store
                .check_ssh_key("alice", "ssh-ed25519 AAAA")
                .unwrap()
                .is_none()
        );
        // What they have is kept, and comes back when enabled.
        assert_eq!(store.list_app_passwords(&alice, None).unwrap().len(), 1);
        assert!(store.set_user_disabled(&alice, false, "admin").unwrap());
        assert!(store.user(&alice).unwrap().unwrap().disabled_at.is_none());
        assert!(!store.is_disabled("alice").unwrap());
        let creds = store.credentials(&alice, Some("xmpp")).unwrap().unwrap();
        assert_eq!(creds.app_passwords.len(), 1);
        assert_eq!(store.scram_verifiers(&alice, "xmpp").unwrap().len(), 1);
        assert!(
            store
                .check_ssh_key("alice", "ssh-ed25519 AAAA")
                .unwrap()
                .is_some()
        );
        assert!(matches!(
            store.set_user_disabled(&name("nobody"), true, "admin"),
            Err(StateError::NoSuchUser(_))
        ));
    }

    #[test]
    fn credentials_of_unknown_user_is_none() {
        assert!(
            store()
                .credentials(&name("ghost"), Some("git"))
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn removing_a_user_removes_their_app_passwords() {
        let store = store_with_user("alice");
        store
            .add_app_password(&name("alice"), "git", "laptop", "h1", "admin")
            .unwrap();
        store.remove_user(&name("alice"), "admin").unwrap();
        assert_eq!(store.counts().unwrap().app_passwords, 0);
    }
}
