//! Mail addressing: the domains this host receives mail for, aliases,
//! catch-alls, and the one lookup the MX makes at RCPT time.

use rusqlite::{OptionalExtension, params};

use crate::audit::record;
use crate::{QueryContext, StateError, Store};
use granary_model::{MailAddress, MailDomain, UserName};

/// One mail domain, as `granary mail domain list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MailDomainInfo {
    pub domain: String,
    /// Who gets mail to addresses nobody has, if anyone.
    pub catch_all: Option<String>,
    pub aliases: i64,
    pub created_at: i64,
}

/// An extra address of a user.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MailAlias {
    /// `local@domain`, lowercase.
    pub address: String,
    pub user: String,
    pub created_at: i64,
}

/// Where mail to an address goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MailRoute {
    /// To this user's mail grain.
    User(String),
    /// The domain is ours but nobody has the address.
    Unknown,
    /// Not one of our mail domains.
    NotLocal,
}

impl Store {
    /// Adds a mail domain; whether it was new. Audited.
    pub fn add_mail_domain(&self, domain: &MailDomain, actor: &str) -> Result<bool, StateError> {
        let w = self.writer()?;
        let tx = w.begin().op("begin add mail domain")?;
        let n = tx
            .execute(
                "INSERT OR IGNORE INTO mail_domains (domain) VALUES (?1)",
                [domain.as_str()],
            )
            .op("insert mail domain")?;
        if n > 0 {
            record(&tx, actor, "mail.domain.add", domain.as_str(), "")?;
        }
        w.commit(tx, "commit add mail domain")?;
        Ok(n > 0)
    }

    /// Removes a mail domain and its aliases; whether it existed.
    pub fn remove_mail_domain(&self, domain: &MailDomain, actor: &str) -> Result<bool, StateError> {
        let w = self.writer()?;
        let tx = w.begin().op("begin remove mail domain")?;
        let n = tx
            .execute(
                "DELETE FROM mail_domains WHERE domain = ?1",
                [domain.as_str()],
            )
            .op("delete mail domain")?;
        if n > 0 {
            record(&tx, actor, "mail.domain.remove", domain.as_str(), "")?;
        }
        w.commit(tx, "commit remove mail domain")?;
        Ok(n > 0)
    }

    /// Every mail domain, sorted.
    pub fn mail_domains(&self) -> Result<Vec<MailDomainInfo>, StateError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT d.domain, u.name, d.created_at,
                        (SELECT count(*) FROM mail_aliases a WHERE a.domain = d.domain)
                 FROM mail_domains d LEFT JOIN users u ON u.id = d.catch_all_user_id
                 ORDER BY d.domain",
            )
            .op("list mail domains")?;
        let rows = stmt
            .query_map([], |r| {
                Ok(MailDomainInfo {
                    domain: r.get(0)?,
                    catch_all: r.get(1)?,
                    created_at: r.get(2)?,
                    aliases: r.get(3)?,
                })
            })
            .op("list mail domains")?;
        rows.collect::<Result<_, _>>().op("list mail domains")
    }

    /// Sends mail to unknown addresses of `domain` to `user`, or refuses it
    /// again (`None`).
    pub fn set_catch_all(
        &self,
        domain: &MailDomain,
        user: Option<&UserName>,
        actor: &str,
    ) -> Result<(), StateError> {
        let w = self.writer()?;
        let tx = w.begin().op("begin set catch-all")?;
        let uid = user.map(|u| crate::users::user_id(&tx, u)).transpose()?;
        let n = tx
            .execute(
                "UPDATE mail_domains SET catch_all_user_id = ?2 WHERE domain = ?1",
                params![domain.as_str(), uid],
            )
            .op("set catch-all")?;
        if n == 0 {
            return Err(no_domain(domain));
        }
        let who = user.map(UserName::as_str).unwrap_or("");
        record(&tx, actor, "mail.catch-all", domain.as_str(), who)?;
        w.commit(tx, "commit set catch-all")
    }

    /// Gives `user` the extra address `address`. Refused when the domain is
    /// not a mail domain, or the address is already somebody's (a user's
    /// own name or another alias).
    pub fn add_mail_alias(
        &self,
        address: &MailAddress,
        user: &UserName,
        actor: &str,
    ) -> Result<MailAlias, StateError> {
        let w = self.writer()?;
        let tx = w.begin().op("begin add mail alias")?;
        let uid = crate::users::user_id(&tx, user)?;
        let domain_known: bool = tx
            .query_row(
                "SELECT 1 FROM mail_domains WHERE domain = ?1",
                [&address.domain],
                |_| Ok(()),
            )
            .optional()
            .op("find mail domain")?
            .is_some();
        if !domain_known {
            return Err(StateError::Invalid(format!(
                "{} is not one of this host's mail domains; add it first with `granary mail domain add {}`",
                address.domain, address.domain
            )));
        }
        let owner: Option<String> = tx
            .query_row(
                "SELECT name FROM users WHERE name = ?1",
                [&address.local],
                |r| r.get(0),
            )
            .optional()
            .op("find user by address")?;
        if let Some(owner) = owner {
            return Err(StateError::Conflict(format!(
                "{} is user {owner}'s own address",
                address.full()
            )));
        }
        match tx.execute(
            "INSERT INTO mail_aliases (local, domain, user_id) VALUES (?1, ?2, ?3)",
            params![address.local, address.domain, uid],
        ) {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                return Err(StateError::Conflict(format!(
                    "alias {} already exists",
                    address.full()
                )));
            }
            other => other.op("insert mail alias")?,
        };
        record(&tx, actor, "mail.alias.add", &address.full(), user.as_str())?;
        let created_at = tx
            .query_row(
                "SELECT created_at FROM mail_aliases WHERE local = ?1 AND domain = ?2",
                params![address.local, address.domain],
                |r| r.get(0),
            )
            .op("read mail alias")?;
        w.commit(tx, "commit add mail alias")?;
        Ok(MailAlias {
            address: address.full(),
            user: user.to_string(),
            created_at,
        })
    }

    /// Removes an alias; whether it existed.
    pub fn remove_mail_alias(
        &self,
        address: &MailAddress,
        actor: &str,
    ) -> Result<bool, StateError> {
        let w = self.writer()?;
        let tx = w.begin().op("begin remove mail alias")?;
        let n = tx
            .execute(
                "DELETE FROM mail_aliases WHERE local = ?1 AND domain = ?2",
                params![address.local, address.domain],
            )
            .op("delete mail alias")?;
        if n > 0 {
            record(&tx, actor, "mail.alias.remove", &address.full(), "")?;
        }
        w.commit(tx, "commit remove mail alias")?;
        Ok(n > 0)
    }

    /// Aliases, of one user or of everyone, sorted by address.
    pub fn mail_aliases(&self, user: Option<&UserName>) -> Result<Vec<MailAlias>, StateError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT a.local || '@' || a.domain, u.name, a.created_at
                 FROM mail_aliases a JOIN users u ON u.id = a.user_id
                 WHERE ?1 IS NULL OR u.name = ?1
                 ORDER BY a.domain, a.local",
            )
            .op("list mail aliases")?;
        let rows = stmt
            .query_map([user.map(UserName::as_str)], |r| {
                Ok(MailAlias {
                    address: r.get(0)?,
                    user: r.get(1)?,
                    created_at: r.get(2)?,
                })
            })
            .op("list mail aliases")?;
        rows.collect::<Result<_, _>>().op("list mail aliases")
    }

    /// Where mail to `address` goes. In order: an alias (with its `+tag`,
    /// then without), `postmaster@` and `abuse@` to `postmaster`, the user
    /// whose name is the local part, the domain's catch-all.
    pub fn route_mail(
        &self,
        address: &MailAddress,
        postmaster: Option<&str>,
    ) -> Result<MailRoute, StateError> {
        self.route(address, postmaster, true)
    }

    /// Who may send as `address`: the user it reaches by name, `+tag`, an
    /// alias or (for the postmaster) `postmaster@`/`abuse@`; never through
    /// a catch-all, which would let its user send as anyone at the domain.
    pub fn address_owner(
        &self,
        address: &MailAddress,
        postmaster: Option<&str>,
    ) -> Result<Option<String>, StateError> {
        Ok(match self.route(address, postmaster, false)? {
            MailRoute::User(u) => Some(u),
            MailRoute::Unknown | MailRoute::NotLocal => None,
        })
    }

    fn route(
        &self,
        address: &MailAddress,
        postmaster: Option<&str>,
        with_catch_all: bool,
    ) -> Result<MailRoute, StateError> {
        let conn = self.conn();
        let catch_all: Option<Option<String>> = conn
            .query_row(
                "SELECT u.name FROM mail_domains d LEFT JOIN users u ON u.id = d.catch_all_user_id
                 WHERE d.domain = ?1",
                [&address.domain],
                |r| r.get(0),
            )
            .optional()
            .op("find mail domain")?;
        let Some(catch_all) = catch_all else {
            return Ok(MailRoute::NotLocal);
        };
        for local in [&address.local, &address.base] {
            let alias: Option<String> = conn
                .query_row(
                    "SELECT u.name FROM mail_aliases a JOIN users u ON u.id = a.user_id
                     WHERE a.local = ?1 AND a.domain = ?2",
                    params![local, address.domain],
                    |r| r.get(0),
                )
                .optional()
                .op("find mail alias")?;
            if let Some(user) = alias {
                return Ok(MailRoute::User(user));
            }
        }
        let user_exists = |name: &str| -> Result<bool, StateError> {
            Ok(conn
                .query_row("SELECT 1 FROM users WHERE name = ?1", [name], |_| Ok(()))
                .optional()
                .op("find user")?
                .is_some())
        };
        if address.is_role_account() {
            return Ok(match postmaster {
                Some(p) if user_exists(p)? => MailRoute::User(p.to_owned()),
                _ => MailRoute::Unknown,
            });
        }
        if user_exists(&address.base)? {
            return Ok(MailRoute::User(address.base.clone()));
        }
        Ok(match catch_all.filter(|_| with_catch_all) {
            Some(user) => MailRoute::User(user),
            None => MailRoute::Unknown,
        })
    }
}

fn no_domain(domain: &MailDomain) -> StateError {
    StateError::Invalid(format!(
        "{domain} is not one of this host's mail domains (granary mail domain list)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(a: &str) -> MailAddress {
        MailAddress::parse(a).unwrap()
    }

    #[test]
    fn addresses_route_to_users_aliases_postmaster_and_catch_all() {
        let s = Store::open_in_memory().unwrap();
        let alice = UserName::new("alice").unwrap();
        let bob = UserName::new("bob").unwrap();
        for u in [&alice, &bob] {
            s.add_user(u, "hash", "t").unwrap();
        }
        let d = MailDomain::parse("example.org").unwrap();
        assert_eq!(
            s.route_mail(&addr("alice@example.org"), None).unwrap(),
            MailRoute::NotLocal
        );
        assert!(s.add_mail_domain(&d, "t").unwrap());
        assert!(!s.add_mail_domain(&d, "t").unwrap());
        let route = |a: &str| s.route_mail(&addr(a), Some("bob")).unwrap();
        assert_eq!(
            route("Alice+News@Example.org"),
            MailRoute::User("alice".into())
        );
        assert_eq!(route("carol@example.org"), MailRoute::Unknown);
        assert_eq!(
            route("postmaster@example.org"),
            MailRoute::User("bob".into())
        );
        assert_eq!(route("abuse+x@example.org"), MailRoute::User("bob".into()));
        s.add_mail_alias(&addr("sales@example.org"), &alice, "t")
            .unwrap();
        assert_eq!(
            route("sales+q3@example.org"),
            MailRoute::User("alice".into())
        );
        let e = s
            .add_mail_alias(&addr("bob@example.org"), &alice, "t")
            .unwrap_err();
        assert!(e.to_string().contains("bob's own address"), "{e}");
        let e = s
            .add_mail_alias(&addr("sales@example.org"), &bob, "t")
            .unwrap_err();
        assert!(matches!(e, StateError::Conflict(_)), "{e}");
        let e = s
            .add_mail_alias(&addr("x@other.org"), &bob, "t")
            .unwrap_err();
        assert!(
            e.to_string().contains("granary mail domain add other.org"),
            "{e}"
        );
        s.set_catch_all(&d, Some(&bob), "t").unwrap();
        assert_eq!(route("carol@example.org"), MailRoute::User("bob".into()));
        // Senders: by name, tag and alias, never by the catch-all.
        let owner = |a: &str| s.address_owner(&addr(a), Some("bob")).unwrap();
        assert_eq!(owner("carol@example.org"), None);
        assert_eq!(owner("alice+x@example.org").as_deref(), Some("alice"));
        assert_eq!(owner("sales@example.org").as_deref(), Some("alice"));
        assert_eq!(owner("postmaster@example.org").as_deref(), Some("bob"));
        assert_eq!(owner("alice@other.org"), None);
        assert_eq!(
            s.mail_domains().unwrap()[0].catch_all.as_deref(),
            Some("bob")
        );
        assert_eq!(s.mail_aliases(Some(&alice)).unwrap().len(), 1);
        assert!(
            s.remove_mail_alias(&addr("sales@example.org"), "t")
                .unwrap()
        );
        assert!(s.remove_mail_domain(&d, "t").unwrap());
        assert_eq!(route("alice@example.org"), MailRoute::NotLocal);
    }
}
