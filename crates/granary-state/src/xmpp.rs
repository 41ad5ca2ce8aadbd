//! Chat domains: the ones this host serves besides Granary's own, and
//! which users have their chat address in one of them.

use rusqlite::{OptionalExtension, params};

use crate::audit::record;
use crate::{QueryContext, StateError, Store};
use granary_model::{MailDomain, UserName};

/// One added chat domain, as `granary xmpp domain list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct XmppDomainInfo {
    pub domain: String,
    /// The users whose chat address is in it, sorted.
    pub users: Vec<String>,
    pub created_at: i64,
}

impl Store {
    /// Adds a chat domain (whether it was new) and moves `users`' chat
    /// addresses into it, in one transaction. Audited.
    pub fn add_xmpp_domain(
        &self,
        domain: &MailDomain,
        users: &[UserName],
        actor: &str,
    ) -> Result<bool, StateError> {
        let w = self.writer()?;
        let tx = w.begin().op("begin add chat domain")?;
        let n = tx
            .execute(
                "INSERT OR IGNORE INTO xmpp_domains (domain) VALUES (?1)",
                [domain.as_str()],
            )
            .op("insert chat domain")?;
        if n > 0 {
            record(&tx, actor, "xmpp.domain.add", domain.as_str(), "")?;
        }
        for user in users {
            let uid = crate::users::user_id(&tx, user)?;
            tx.execute(
                "INSERT INTO xmpp_users (user_id, domain) VALUES (?1, ?2)
                 ON CONFLICT (user_id) DO UPDATE SET domain = excluded.domain",
                params![uid, domain.as_str()],
            )
            .op("move a chat address")?;
            record(
                &tx,
                actor,
                "xmpp.domain.user",
                user.as_str(),
                &format!("domain={}", domain.as_str()),
            )?;
        }
        w.commit(tx, "commit add chat domain")?;
        Ok(n > 0)
    }

    /// Moves `users`' chat addresses back to Granary's own domain.
    /// Audited.
    pub fn reset_xmpp_domain(&self, users: &[UserName], actor: &str) -> Result<(), StateError> {
        let w = self.writer()?;
        let tx = w.begin().op("begin reset chat addresses")?;
        for user in users {
            let uid = crate::users::user_id(&tx, user)?;
            tx.execute("DELETE FROM xmpp_users WHERE user_id = ?1", [uid])
                .op("reset a chat address")?;
            record(&tx, actor, "xmpp.domain.user", user.as_str(), "domain=")?;
        }
        w.commit(tx, "commit reset chat addresses")
    }

    /// Every added chat domain with its users, sorted.
    pub fn xmpp_domains(&self) -> Result<Vec<XmppDomainInfo>, StateError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT d.domain, d.created_at, u.name
                 FROM xmpp_domains d
                 LEFT JOIN xmpp_users x ON x.domain = d.domain
                 LEFT JOIN users u ON u.id = x.user_id
                 ORDER BY d.domain, u.name",
            )
            .op("list chat domains")?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, Option<String>>(2)?,
                ))
            })
            .op("list chat domains")?;
        let mut out: Vec<XmppDomainInfo> = Vec::new();
        for row in rows {
            let (domain, created_at, user) = row.op("list chat domains")?;
            if out.last().is_none_or(|d| d.domain != domain) {
                out.push(XmppDomainInfo {
                    domain,
                    users: Vec::new(),
                    created_at,
                });
            }
            if let (Some(u), Some(last)) = (user, out.last_mut()) {
                last.users.push(u);
            }
        }
        Ok(out)
    }

    /// The added chat domains' names.
    pub fn xmpp_domain_names(&self) -> Result<Vec<String>, StateError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT domain FROM xmpp_domains ORDER BY domain")
            .op("list chat domains")?;
        let rows = stmt.query_map([], |r| r.get(0)).op("list chat domains")?;
        rows.collect::<Result<_, _>>().op("list chat domains")
    }

    /// The added chat domain `user`'s address is in; `None`: Granary's own
    /// domain (also for a user who does not exist).
    pub fn xmpp_domain_of(&self, user: &str) -> Result<Option<String>, StateError> {
        self.conn()
            .query_row(
                "SELECT x.domain FROM xmpp_users x JOIN users u ON u.id = x.user_id
                 WHERE u.name = ?1",
                [user],
                |r| r.get(0),
            )
            .optional()
            .op("look up a chat address")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domains_hold_the_users_moved_into_them() {
        let s = Store::open_in_memory().unwrap();
        let (alice, bob) = (
            UserName::new("alice").unwrap(),
            UserName::new("bob").unwrap(),
        );
        for u in [&alice, &bob] {
            s.add_user(u, "x", "test").unwrap();
        }
        let family = MailDomain::parse("family.test").unwrap();
        assert!(
            s.add_xmpp_domain(&family, std::slice::from_ref(&bob), "test")
                .unwrap()
        );
        assert!(!s.add_xmpp_domain(&family, &[], "test").unwrap());
        assert_eq!(
            s.xmpp_domain_of("bob").unwrap().as_deref(),
            Some("family.test")
        );
        assert_eq!(s.xmpp_domain_of("alice").unwrap(), None);
        let other = MailDomain::parse("other.test").unwrap();
        s.add_xmpp_domain(&other, std::slice::from_ref(&bob), "test")
            .unwrap();
        let list = s.xmpp_domains().unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!(list[0].domain, "family.test");
        assert!(list[0].users.is_empty());
        assert_eq!(list[1].users, ["bob"]);
        // An unknown user is refused and nothing is added.
        let ghost = UserName::new("ghost").unwrap();
        let third = MailDomain::parse("third.test").unwrap();
        assert!(s.add_xmpp_domain(&third, &[ghost], "test").is_err());
        assert_eq!(s.xmpp_domains().unwrap().len(), 2);
    }
}
