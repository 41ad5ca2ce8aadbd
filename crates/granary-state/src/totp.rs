//! The web sign-in's second factor: each user's sealed TOTP secret, the
//! newest step accepted, and recovery codes (as SHA-256), each good once.

use granary_model::UserName;
use rusqlite::{OptionalExtension, params};

use crate::audit::record;
use crate::users::user_id;
use crate::{QueryContext, StateError, Store};

/// A user's second factor as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Totp {
    /// The secret, sealed by the caller (`granary_auth::totp::seal`).
    pub sealed: Vec<u8>,
    /// The newest time step accepted; only later ones are.
    pub last_step: i64,
    /// Recovery codes not yet used.
    pub recovery_left: u32,
}

impl Store {
    /// `user`'s second factor, if they turned it on.
    pub fn totp(&self, user: &UserName) -> Result<Option<Totp>, StateError> {
        self.conn()
            .query_row(
                "SELECT t.sealed, t.last_step,
                        (SELECT count(*) FROM totp_recovery r
                          WHERE r.user_id = t.user_id AND r.used_at IS NULL)
                   FROM totp t JOIN users u ON u.id = t.user_id WHERE u.name = ?1",
                [user.as_str()],
                |r| {
                    Ok(Totp {
                        sealed: r.get(0)?,
                        last_step: r.get(1)?,
                        recovery_left: r.get::<_, i64>(2)? as u32,
                    })
                },
            )
            .optional()
            .op("read totp")
    }

    /// Turns the second factor on (or replaces it) with `sealed` and the
    /// hashes of fresh recovery codes, dropping any older codes.
    pub fn set_totp(
        &self,
        user: &UserName,
        sealed: &[u8],
        first_step: i64,
        recovery_hashes: &[[u8; 32]],
        actor: &str,
    ) -> Result<(), StateError> {
        let w = self.writer()?;
        let tx = w.begin().op("begin set totp")?;
        let uid = user_id(&tx, user)?;
        tx.execute(
            "INSERT INTO totp (user_id, sealed, last_step) VALUES (?1, ?2, ?3)
             ON CONFLICT (user_id) DO UPDATE SET sealed = excluded.sealed,
                 last_step = excluded.last_step, created_at = unixepoch()",
            params![uid, sealed, first_step],
        )
        .op("set totp")?;
        tx.execute("DELETE FROM totp_recovery WHERE user_id = ?1", [uid])
            .op("drop recovery codes")?;
        for h in recovery_hashes {
            tx.execute(
                "INSERT INTO totp_recovery (user_id, hash) VALUES (?1, ?2)",
                params![uid, h.as_slice()],
            )
            .op("add recovery code")?;
        }
        record(&tx, actor, "totp.enable", user.as_str(), "")?;
        w.commit(tx, "commit set totp")
    }

    /// Turns the second factor off; `false` when it was not on.
    pub fn clear_totp(&self, user: &UserName, actor: &str) -> Result<bool, StateError> {
        let w = self.writer()?;
        let tx = w.begin().op("begin clear totp")?;
        let uid = user_id(&tx, user)?;
        let n = tx
            .execute("DELETE FROM totp WHERE user_id = ?1", [uid])
            .op("clear totp")?;
        tx.execute("DELETE FROM totp_recovery WHERE user_id = ?1", [uid])
            .op("drop recovery codes")?;
        if n > 0 {
            record(&tx, actor, "totp.disable", user.as_str(), "")?;
        }
        w.commit(tx, "commit clear totp")?;
        Ok(n > 0)
    }

    /// Spends time step `step`: `true` only if it is later than every step
    /// accepted before (so two sign-ins racing with one code: one wins).
    pub fn spend_totp_step(&self, user: &UserName, step: i64) -> Result<bool, StateError> {
        let w = self.writer()?;
        let tx = w.begin().op("begin spend totp step")?;
        let uid = user_id(&tx, user)?;
        let n = tx
            .execute(
                "UPDATE totp SET last_step = ?2 WHERE user_id = ?1 AND last_step < ?2",
                params![uid, step],
            )
            .op("spend totp step")?;
        w.commit(tx, "commit spend totp step")?;
        Ok(n == 1)
    }

    /// Spends the recovery code whose SHA-256 is `hash`: `true` if it was
    /// one of `user`'s and not used before.
    pub fn spend_recovery_code(
        &self,
        user: &UserName,
        hash: &[u8; 32],
        actor: &str,
    ) -> Result<bool, StateError> {
        let w = self.writer()?;
        let tx = w.begin().op("begin spend recovery code")?;
        let uid = user_id(&tx, user)?;
        let n = tx
            .execute(
                "UPDATE totp_recovery SET used_at = unixepoch()
                  WHERE user_id = ?1 AND hash = ?2 AND used_at IS NULL",
                params![uid, hash.as_slice()],
            )
            .op("spend recovery code")?;
        if n == 1 {
            record(&tx, actor, "totp.recovery-code", user.as_str(), "")?;
        }
        w.commit(tx, "commit spend recovery code")?;
        Ok(n == 1)
    }
}

#[cfg(test)]
mod tests {
    use crate::test_support::*;

    #[test]
    fn steps_and_recovery_codes_are_good_once() {
        let store = store();
        let alice = name("alice");
        store.add_user(&alice, "h", "t").unwrap();
        assert!(store.totp(&alice).unwrap().is_none());
        store
            .set_totp(&alice, b"sealed", 10, &[[1; 32], [2; 32]], "t")
            .unwrap();
        let t = store.totp(&alice).unwrap().unwrap();
        assert_eq!(
            (t.sealed.as_slice(), t.last_step, t.recovery_left),
            (&b"sealed"[..], 10, 2)
        );
        assert!(!store.spend_totp_step(&alice, 10).unwrap());
        assert!(store.spend_totp_step(&alice, 11).unwrap());
        assert!(!store.spend_totp_step(&alice, 11).unwrap());
        assert!(store.spend_recovery_code(&alice, &[1; 32], "t").unwrap());
        assert!(!store.spend_recovery_code(&alice, &[1; 32], "t").unwrap());
        assert!(!store.spend_recovery_code(&alice, &[9; 32], "t").unwrap());
        assert_eq!(store.totp(&alice).unwrap().unwrap().recovery_left, 1);
        assert!(store.clear_totp(&alice, "t").unwrap());
        assert!(!store.clear_totp(&alice, "t").unwrap());
        assert!(!store.spend_recovery_code(&alice, &[2; 32], "t").unwrap());
    }
}
