//! Invites: links that let a friend make an account (`granary invite
//! create`). Only a token's SHA-256 is kept. Redeeming one makes the
//! account, its first chat password and the record of the use in one
//! transaction, so a token is never spent without an account to show for
//! it, and never makes more accounts than it allows.

use granary_model::UserName;
use rusqlite::{OptionalExtension, params};

use crate::audit::record;
use crate::users::user_id;
use crate::{QueryContext, StateError, Store};

/// What an invite does besides making an account.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum InviteKind {
    /// A new user, nothing more.
    Account,
    /// A new user who becomes the inviter's contact, both ways.
    Contact,
    /// A new user who becomes a member of a group chat (the inviter's
    /// room) and the contact of its members.
    Group,
}

impl InviteKind {
    pub fn as_str(self) -> &'static str {
        match self {
            InviteKind::Account => "account",
            InviteKind::Contact => "contact",
            InviteKind::Group => "group",
        }
    }

    fn parse(s: &str) -> InviteKind {
        match s {
            "contact" => InviteKind::Contact,
            "group" => InviteKind::Group,
            _ => InviteKind::Account,
        }
    }
}

/// An invite as `granary invite list` shows it (never the token).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Invite {
    pub id: i64,
    pub kind: InviteKind,
    /// Who invites (a contact or group invite); `None` for an account
    /// invite.
    pub inviter: Option<String>,
    /// The group chat (room name) of a group invite.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub room: Option<String>,
    pub max_uses: i64,
    pub uses: i64,
    pub created_at: i64,
    pub expires_at: i64,
    pub revoked_at: Option<i64>,
    /// The accounts it made, in order.
    pub used_by: Vec<String>,
}

impl Invite {
    /// `valid`, `used`, `expired` or `revoked`, at `now`.
    pub fn status(&self, now: i64) -> &'static str {
        if self.revoked_at.is_some() {
            "revoked"
        } else if self.uses >= self.max_uses {
            "used"
        } else if self.expires_at <= now {
            "expired"
        } else {
            "valid"
        }
    }
}

/// A token that may be redeemed now: what the landing page and the
/// registration need to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidInvite {
    pub id: i64,
    pub kind: InviteKind,
    pub inviter: Option<String>,
    /// The inviter's chat domain when it is not Granary's own.
    pub inviter_domain: Option<String>,
    /// The group chat (room name) of a group invite.
    pub room: Option<String>,
}

/// The account a redemption made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redeemed {
    pub invite: ValidInvite,
    /// The new user's first `xmpp` app password.
    pub credential: i64,
}

/// Why a redemption made nothing.
#[derive(Debug, thiserror::Error)]
pub enum RedeemError {
    /// Unknown, expired, used up or revoked: all the same to the client.
    #[error("the invite is not valid")]
    NotValid,
    #[error("user {0} already exists")]
    NameTaken(String),
    #[error(transparent)]
    State(#[from] StateError),
}

/// What a redemption stores: the new user and their first chat password,
/// all hashed by the caller.
pub struct NewAccount<'a> {
    pub user: &'a UserName,
    /// The account password's argon2id hash (the password is not the
    /// device's: nobody holds it until it is set).
    pub account_hash: &'a str,
    /// The chat password's argon2id hash and SCRAM verifiers.
    pub xmpp_hash: &'a str,
    pub xmpp_scram: &'a str,
    /// The chat domain to put the user in, when it is an added one.
    pub chat_domain: Option<&'a str>,
}

const VALID: &str = "i.revoked_at IS NULL AND i.uses < i.max_uses AND i.expires_at > unixepoch()";

/// (A disabled user's invites are not valid while they are disabled.)
fn valid_invite(
    conn: &rusqlite::Connection,
    hash: &[u8],
) -> Result<Option<ValidInvite>, StateError> {
    conn.query_row(
        &format!(
            "SELECT i.id, i.kind, u.name, x.domain, i.room FROM invites i
             LEFT JOIN users u ON u.id = i.inviter_id
             LEFT JOIN xmpp_users x ON x.user_id = i.inviter_id
             WHERE i.hash = ?1 AND {VALID} AND u.disabled_at IS NULL"
        ),
        [hash],
        |r| {
            Ok(ValidInvite {
                id: r.get(0)?,
                kind: InviteKind::parse(&r.get::<_, String>(1)?),
                inviter: r.get(2)?,
                inviter_domain: r.get(3)?,
                room: Some(r.get::<_, String>(4)?).filter(|r| !r.is_empty()),
            })
        },
    )
    .optional()
    .op("find invite")
}

impl Store {
    /// Records an invite by its token's hash. Audited (never the token).
    /// `room` is the group chat of a group invite (`inviter` must own it).
    #[allow(clippy::too_many_arguments)]
    pub fn add_invite(
        &self,
        kind: InviteKind,
        inviter: Option<&UserName>,
        room: Option<&str>,
        hash: &[u8],
        expires_at: i64,
        max_uses: i64,
        actor: &str,
    ) -> Result<Invite, StateError> {
        if max_uses < 1 {
            return Err(StateError::Invalid(
                "an invite is good for at least one use".into(),
            ));
        }
        if (kind == InviteKind::Account) == inviter.is_some() {
            return Err(StateError::Invalid(
                "a contact or group invite has an inviter; an account invite has none".into(),
            ));
        }
        if (kind == InviteKind::Group) != room.is_some() {
            return Err(StateError::Invalid(
                "a group invite, and only that, names a group chat".into(),
            ));
        }
        let w = self.writer()?;
        let tx = w.begin().op("begin add invite")?;
        let inviter_id = inviter.map(|u| user_id(&tx, u)).transpose()?;
        if let Some(name) = room {
            let owns: bool = tx
                .query_row(
                    "SELECT EXISTS (SELECT 1 FROM grains WHERE kind = 'room' AND instance = ?1
                                                         AND user_id = ?2)",
                    params![name, inviter_id],
                    |r| r.get(0),
                )
                .op("find the group chat")?;
            if !owns {
                return Err(StateError::Invalid(format!(
                    "no group chat named {name} of {}'s",
                    inviter.map(UserName::as_str).unwrap_or("-")
                )));
            }
        }
        let (id, created_at): (i64, i64) = tx
            .query_row(
                "INSERT INTO invites (hash, kind, inviter_id, room, max_uses, expires_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6) RETURNING id, created_at",
                params![
                    hash,
                    kind.as_str(),
                    inviter_id,
                    room.unwrap_or(""),
                    max_uses,
                    expires_at
                ],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .op("insert invite")?;
        record(
            &tx,
            actor,
            "invite.create",
            inviter.map(UserName::as_str).unwrap_or("-"),
            &format!(
                "id={id} kind={} room={} uses={max_uses} expires_at={expires_at}",
                kind.as_str(),
                room.unwrap_or("-")
            ),
        )?;
        w.commit(tx, "commit add invite")?;
        Ok(Invite {
            id,
            kind,
            inviter: inviter.map(|u| u.to_string()),
            room: room.map(str::to_owned),
            max_uses,
            uses: 0,
            created_at,
            expires_at,
            revoked_at: None,
            used_by: Vec::new(),
        })
    }

    /// The invite whose token hashes to `hash`, if it may be used now.
    pub fn valid_invite(&self, hash: &[u8]) -> Result<Option<ValidInvite>, StateError> {
        valid_invite(&self.conn(), hash)
    }

    /// Spends one use of the invite and makes the account, in one
    /// transaction: either all of it happens or none.
    pub fn redeem_invite(
        &self,
        hash: &[u8],
        account: &NewAccount<'_>,
        actor: &str,
    ) -> Result<Redeemed, RedeemError> {
        let w = self.writer()?;
        let tx = w.begin().op("begin redeem invite")?;
        let invite = valid_invite(&tx, hash)?.ok_or(RedeemError::NotValid)?;
        let name = account.user.as_str();
        let inserted = tx.execute(
            "INSERT INTO users (name, password_hash) VALUES (?1, ?2)",
            params![name, account.account_hash],
        );
        match inserted {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                return Err(RedeemError::NameTaken(name.to_owned()));
            }
            other => other.op("insert user")?,
        };
        let uid = tx.last_insert_rowid();
        record(
            &tx,
            actor,
            "user.add",
            name,
            &format!("invite={}", invite.id),
        )?;
        let credential: i64 = tx
            .query_row(
                "INSERT INTO app_passwords (user_id, kind, label, password_hash, scram)
                 VALUES (?1, 'xmpp', 'invite', ?2, ?3) RETURNING id",
                params![uid, account.xmpp_hash, account.xmpp_scram],
                |r| r.get(0),
            )
            .op("insert app password")?;
        record(
            &tx,
            actor,
            "app-password.add",
            name,
            &format!("id={credential} kind=xmpp label=invite"),
        )?;
        if let Some(domain) = account.chat_domain {
            let added: bool = tx
                .query_row(
                    "SELECT EXISTS (SELECT 1 FROM xmpp_domains WHERE domain = ?1)",
                    [domain],
                    |r| r.get(0),
                )
                .op("find chat domain")?;
            if added {
                tx.execute(
                    "INSERT INTO xmpp_users (user_id, domain) VALUES (?1, ?2)",
                    params![uid, domain],
                )
                .op("place a chat address")?;
            }
        }
        tx.execute(
            "UPDATE invites SET uses = uses + 1 WHERE id = ?1",
            [invite.id],
        )
        .op("spend invite")?;
        tx.execute(
            "INSERT INTO invite_uses (invite_id, user) VALUES (?1, ?2)",
            params![invite.id, name],
        )
        .op("record invite use")?;
        record(&tx, actor, "invite.use", name, &format!("id={}", invite.id))?;
        w.commit(tx, "commit redeem invite")?;
        Ok(Redeemed { invite, credential })
    }

    /// A pre-authenticated subscription (XEP-0379): `user`, who already
    /// has an account here, asks `inviter` to be their contact with the
    /// token of a contact invite `inviter` made. Whether to make them
    /// contacts: the invite is `inviter`'s and may be used now (one use is
    /// spent and recorded), or `user` used it already (the same request
    /// again, as a client sends it after registering with the token).
    pub fn accept_contact_invite(
        &self,
        hash: &[u8],
        inviter: &str,
        user: &str,
        actor: &str,
    ) -> Result<bool, StateError> {
        let w = self.writer()?;
        let tx = w.begin().op("begin accept contact invite")?;
        let found: Option<(i64, bool, bool)> = tx
            .query_row(
                &format!(
                    "SELECT i.id, {VALID},
                            EXISTS (SELECT 1 FROM invite_uses WHERE invite_id = i.id AND user = ?3)
                     FROM invites i JOIN users u ON u.id = i.inviter_id
                     WHERE i.hash = ?1 AND i.kind = 'contact' AND u.name = ?2
                       AND u.disabled_at IS NULL"
                ),
                params![hash, inviter, user],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
            .op("find contact invite")?;
        let accepted = match found {
            Some((_, _, true)) => true,
            Some((id, true, false)) => {
                tx.execute("UPDATE invites SET uses = uses + 1 WHERE id = ?1", [id])
                    .op("spend invite")?;
                tx.execute(
                    "INSERT INTO invite_uses (invite_id, user) VALUES (?1, ?2)",
                    params![id, user],
                )
                .op("record invite use")?;
                record(&tx, actor, "invite.use", user, &format!("id={id} contact"))?;
                true
            }
            _ => false,
        };
        w.commit(tx, "commit accept contact invite")?;
        Ok(accepted)
    }

    /// Takes back a redemption whose account could not be finished (its
    /// grain records could not be made): the user goes (with their
    /// password; they have no grains) and the invite gets its use back.
    pub fn undo_redemption(
        &self,
        invite: i64,
        user: &UserName,
        actor: &str,
    ) -> Result<(), StateError> {
        let w = self.writer()?;
        let tx = w.begin().op("begin undo redemption")?;
        let uid = user_id(&tx, user)?;
        tx.execute("DELETE FROM xmpp_users WHERE user_id = ?1", [uid])
            .op("forget a chat address")?;
        tx.execute("DELETE FROM users WHERE id = ?1", [uid])
            .op("remove user")?;
        tx.execute(
            "UPDATE invites SET uses = uses - 1 WHERE id = ?1 AND uses > 0",
            [invite],
        )
        .op("give the use back")?;
        tx.execute(
            "DELETE FROM invite_uses WHERE invite_id = ?1 AND user = ?2",
            params![invite, user.as_str()],
        )
        .op("forget the use")?;
        record(
            &tx,
            actor,
            "invite.undo",
            user.as_str(),
            &format!("id={invite}"),
        )?;
        w.commit(tx, "commit undo redemption")
    }

    /// Every invite, newest first.
    pub fn invites(&self) -> Result<Vec<Invite>, StateError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT i.id, i.kind, u.name, i.max_uses, i.uses, i.created_at, i.expires_at,
                        i.revoked_at, i.room,
                        (SELECT group_concat(user, ' ') FROM
                            (SELECT user FROM invite_uses WHERE invite_id = i.id ORDER BY rowid))
                 FROM invites i LEFT JOIN users u ON u.id = i.inviter_id
                 ORDER BY i.id DESC",
            )
            .op("list invites")?;
        let rows = stmt
            .query_map([], |r| {
                let used: Option<String> = r.get(9)?;
                Ok(Invite {
                    id: r.get(0)?,
                    kind: InviteKind::parse(&r.get::<_, String>(1)?),
                    inviter: r.get(2)?,
                    max_uses: r.get(3)?,
                    uses: r.get(4)?,
                    created_at: r.get(5)?,
                    expires_at: r.get(6)?,
                    revoked_at: r.get(7)?,
                    room: Some(r.get::<_, String>(8)?).filter(|r| !r.is_empty()),
                    used_by: used
                        .map(|u| u.split(' ').map(str::to_owned).collect())
                        .unwrap_or_default(),
                })
            })
            .op("list invites")?;
        rows.collect::<Result<_, _>>().op("list invites")
    }

    /// Revokes an invite: its link stops working at once. Audited. `false`
    /// when there is no such invite or it was revoked already.
    pub fn revoke_invite(&self, id: i64, actor: &str) -> Result<bool, StateError> {
        let w = self.writer()?;
        let tx = w.begin().op("begin revoke invite")?;
        let n = tx
            .execute(
                "UPDATE invites SET revoked_at = unixepoch() WHERE id = ?1 AND revoked_at IS NULL",
                [id],
            )
            .op("revoke invite")?;
        if n > 0 {
            record(&tx, actor, "invite.revoke", "-", &format!("id={id}"))?;
        }
        w.commit(tx, "commit revoke invite")?;
        Ok(n > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state.db")).unwrap();
        (dir, store)
    }

    fn account<'a>(user: &'a UserName) -> NewAccount<'a> {
        NewAccount {
            user,
            account_hash: "x",
            xmpp_hash: "y",
            xmpp_scram: "",
            chat_domain: None,
        }
    }

    fn far() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
            + 3600
    }

    #[test]
    fn a_single_use_invite_makes_one_account() {
        let (_d, s) = store();
        let alice = UserName::new("alice").unwrap();
        s.add_user(&alice, "h", "test").unwrap();
        let inv = s
            .add_invite(
                InviteKind::Contact,
                Some(&alice),
                None,
                b"t1",
                far(),
                1,
                "test",
            )
            .unwrap();
        assert_eq!(inv.kind, InviteKind::Contact);
        let found = s.valid_invite(b"t1").unwrap().unwrap();
        assert_eq!(found.inviter.as_deref(), Some("alice"));
        let bob = UserName::new("bob").unwrap();
        let r = s.redeem_invite(b"t1", &account(&bob), "test").unwrap();
        assert_eq!(r.invite.id, inv.id);
        assert!(s.user(&bob).unwrap().is_some());
        // Spent: neither the lookup nor a second redemption finds it.
        assert!(s.valid_invite(b"t1").unwrap().is_none());
        let carol = UserName::new("carol").unwrap();
        assert!(matches!(
            s.redeem_invite(b"t1", &account(&carol), "test"),
            Err(RedeemError::NotValid)
        ));
        assert!(s.user(&carol).unwrap().is_none());
        let list = s.invites().unwrap();
        assert_eq!(list[0].used_by, vec!["bob".to_owned()]);
        assert_eq!(list[0].status(0), "used");
    }

    #[test]
    fn a_group_invite_names_a_room_its_inviter_owns() {
        let (_d, s) = store();
        let alice = UserName::new("alice").unwrap();
        let bob = UserName::new("bob").unwrap();
        s.add_user(&alice, "h", "test").unwrap();
        s.add_user(&bob, "h", "test").unwrap();
        s.install_app("room", "org.x.room", "1", "kind = 'room'", true, "test")
            .unwrap();
        let uids = crate::HostUid::FirstFreeIn(granary_model::UidRange {
            start: 9000,
            count: 10,
        });
        s.create_instance_grain(&alice, "room", "family", uids, 5, "test")
            .unwrap();
        // Not a room of the inviter's, or none at all.
        for (who, room) in [(&bob, "family"), (&alice, "nothing")] {
            assert!(matches!(
                s.add_invite(
                    InviteKind::Group,
                    Some(who),
                    Some(room),
                    b"g0",
                    far(),
                    1,
                    "test"
                ),
                Err(StateError::Invalid(_))
            ));
        }
        assert!(matches!(
            s.add_invite(
                InviteKind::Group,
                Some(&alice),
                None,
                b"g0",
                far(),
                1,
                "test"
            ),
            Err(StateError::Invalid(_))
        ));
        let inv = s
            .add_invite(
                InviteKind::Group,
                Some(&alice),
                Some("family"),
                b"g1",
                far(),
                2,
                "test",
            )
            .unwrap();
        assert_eq!(inv.room.as_deref(), Some("family"));
        let found = s.valid_invite(b"g1").unwrap().unwrap();
        assert_eq!(
            (found.kind, found.inviter.as_deref(), found.room.as_deref()),
            (InviteKind::Group, Some("alice"), Some("family"))
        );
        let carol = UserName::new("carol").unwrap();
        let r = s.redeem_invite(b"g1", &account(&carol), "test").unwrap();
        assert_eq!(r.invite.room.as_deref(), Some("family"));
        assert_eq!(s.invites().unwrap()[0].room.as_deref(), Some("family"));
    }

    #[test]
    fn two_redemptions_at_once_make_one_account() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let s = Store::open(&path).unwrap();
        s.add_invite(InviteKind::Account, None, None, b"race", far(), 1, "test")
            .unwrap();
        drop(s);
        let made: Vec<Result<(), String>> = std::thread::scope(|scope| {
            let runs: Vec<_> = ["bob", "carol"]
                .into_iter()
                .map(|name| {
                    let path = path.clone();
                    scope.spawn(move || {
                        // Each its own connection, as two daemons' would be.
                        let s = Store::open(&path).unwrap();
                        let user = UserName::new(name).unwrap();
                        match s.redeem_invite(b"race", &account(&user), "test") {
                            Ok(_) => Ok(()),
                            Err(e) => Err(e.to_string()),
                        }
                    })
                })
                .collect();
            runs.into_iter().map(|r| r.join().unwrap()).collect()
        });
        // One made its account; the other found the invite spent (not a
        // lock error: it waited for the first transaction).
        assert_eq!(made.iter().filter(|m| m.is_ok()).count(), 1, "{made:?}");
        assert!(
            made.iter()
                .any(|m| m.as_ref().err().map(String::as_str) == Some("the invite is not valid")),
            "{made:?}"
        );
        let s = Store::open(&path).unwrap();
        assert_eq!(s.invites().unwrap()[0].uses, 1);
    }

    #[test]
    fn an_undone_redemption_gives_the_use_back() {
        let (_d, s) = store();
        let inv = s
            .add_invite(InviteKind::Account, None, None, b"undo", far(), 1, "test")
            .unwrap();
        let bob = UserName::new("bob").unwrap();
        s.redeem_invite(b"undo", &account(&bob), "test").unwrap();
        s.undo_redemption(inv.id, &bob, "test").unwrap();
        assert!(s.user(&bob).unwrap().is_none());
        assert!(s.valid_invite(b"undo").unwrap().is_some());
        assert!(s.invites().unwrap()[0].used_by.is_empty());
    }

    #[test]
    fn an_existing_user_takes_a_contact_invite_once() {
        let (_d, s) = store();
        for name in ["alice", "bob", "carol"] {
            s.add_user(&UserName::new(name).unwrap(), "h", "test")
                .unwrap();
        }
        let alice = UserName::new("alice").unwrap();
        s.add_invite(
            InviteKind::Contact,
            Some(&alice),
            None,
            b"c",
            far(),
            1,
            "test",
        )
        .unwrap();
        // Only alice's, and only for a contact invite.
        assert!(!s.accept_contact_invite(b"c", "carol", "bob", "t").unwrap());
        assert!(s.accept_contact_invite(b"c", "alice", "bob", "t").unwrap());
        // Bob again (his client repeats it): still yes, nothing spent.
        assert!(s.accept_contact_invite(b"c", "alice", "bob", "t").unwrap());
        // Used up for anyone else.
        assert!(
            !s.accept_contact_invite(b"c", "alice", "carol", "t")
                .unwrap()
        );
        assert_eq!(s.invites().unwrap()[0].used_by, vec!["bob".to_owned()]);
    }

    #[test]
    fn a_taken_name_spends_nothing() {
        let (_d, s) = store();
        let alice = UserName::new("alice").unwrap();
        s.add_user(&alice, "h", "test").unwrap();
        s.add_invite(InviteKind::Account, None, None, b"t2", far(), 1, "test")
            .unwrap();
        assert!(matches!(
            s.redeem_invite(b"t2", &account(&alice), "test"),
            Err(RedeemError::NameTaken(_))
        ));
        assert!(s.valid_invite(b"t2").unwrap().is_some());
    }

    #[test]
    fn expired_and_revoked_invites_are_not_valid() {
        let (_d, s) = store();
        let old = s
            .add_invite(InviteKind::Account, None, None, b"old", 1, 1, "test")
            .unwrap();
        assert!(s.valid_invite(b"old").unwrap().is_none());
        assert_eq!(s.invites().unwrap()[0].status(2), "expired");
        let inv = s
            .add_invite(InviteKind::Account, None, None, b"rev", far(), 3, "test")
            .unwrap();
        assert!(s.revoke_invite(inv.id, "test").unwrap());
        assert!(!s.revoke_invite(inv.id, "test").unwrap());
        assert!(s.valid_invite(b"rev").unwrap().is_none());
        assert!(old.id < inv.id);
    }
}
