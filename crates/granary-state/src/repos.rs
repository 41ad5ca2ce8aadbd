//! Which git repositories their owners made public.

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
        let mut conn = self.conn();
        let tx = conn.transaction().op("begin set repo visibility")?;
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
        tx.commit().op("commit repo visibility")
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
}
