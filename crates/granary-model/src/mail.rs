//! Mail domains and addresses: one rule for what a mail domain is and how
//! an address a sender gives is matched against users, aliases and
//! catch-alls.

use std::fmt;

/// A domain Granary receives mail for: lowercase labels of letters,
/// digits and `-`, without the final dot (`localhost` is one, for demos).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MailDomain(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a mail domain (a name such as example.org: letters, digits, '-' and dots)")]
pub struct MailDomainError(pub String);

impl MailDomain {
    pub fn parse(text: &str) -> Result<MailDomain, MailDomainError> {
        let d = text.trim().trim_end_matches('.').to_ascii_lowercase();
        let ok = d.len() <= 253
            && d.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && !l.starts_with('-')
                    && !l.ends_with('-')
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if ok {
            Ok(MailDomain(d))
        } else {
            Err(MailDomainError(text.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for MailDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An address as a sender wrote it in `RCPT TO`, split and folded the way
/// Granary matches it: the domain lowercased, the local part lowercased
/// (Granary's user names and aliases are lowercase) and its `+tag`
/// separated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailAddress {
    /// The local part, lowercased, with any `+tag` still on.
    pub local: String,
    /// The local part without its `+tag`.
    pub base: String,
    pub domain: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a mail address (local@domain)")]
pub struct MailAddressError(pub String);

/// Role accounts of RFC 2142 and RFC 5321 §4.5.1 that every mail domain
/// has and that go to the configured postmaster.
pub const POSTMASTER_LOCALS: &[&str] = &["postmaster", "abuse"];

impl MailAddress {
    /// Splits `user+tag@Example.ORG`. A quoted local part or one longer
    /// than 64 octets is refused (no user or alias could match it).
    pub fn parse(text: &str) -> Result<MailAddress, MailAddressError> {
        let bad = || MailAddressError(text.to_owned());
        let (local, domain) = text.rsplit_once('@').ok_or_else(bad)?;
        if local.is_empty()
            || local.len() > 64
            || local.starts_with('"')
            || !local
                .bytes()
                .all(|b| b.is_ascii_graphic() && !b"()<>[]\\,;:@\"".contains(&b))
        {
            return Err(bad());
        }
        let domain = MailDomain::parse(domain).map_err(|_| bad())?;
        let local = local.to_ascii_lowercase();
        let base = local.split('+').next().unwrap_or("").to_owned();
        if base.is_empty() {
            return Err(bad());
        }
        Ok(MailAddress {
            local,
            base,
            domain: domain.0,
        })
    }

    /// `local@domain` as matched (tag kept).
    pub fn full(&self) -> String {
        format!("{}@{}", self.local, self.domain)
    }

    /// `base@domain` (tag dropped): how aliases are looked up.
    pub fn without_tag(&self) -> String {
        format!("{}@{}", self.base, self.domain)
    }

    /// Whether this is `postmaster@` or `abuse@` (any tag).
    pub fn is_role_account(&self) -> bool {
        POSTMASTER_LOCALS.contains(&self.base.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_fold_case_and_split_tags() {
        let a = MailAddress::parse("Alice+Lists@Example.ORG").unwrap();
        assert_eq!(a.local, "alice+lists");
        assert_eq!(a.base, "alice");
        assert_eq!(a.domain, "example.org");
        assert_eq!(a.without_tag(), "alice@example.org");
        assert!(
            MailAddress::parse("postmaster@example.org")
                .unwrap()
                .is_role_account()
        );
        for bad in [
            "alice",
            "@example.org",
            "alice@",
            "\"a b\"@example.org",
            "+x@example.org",
            "a b@example.org",
        ] {
            assert!(MailAddress::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn domains_are_lowercase_dns_names() {
        assert_eq!(
            MailDomain::parse("Example.org.").unwrap().as_str(),
            "example.org"
        );
        assert_eq!(
            MailDomain::parse("localhost").unwrap().as_str(),
            "localhost"
        );
        for bad in ["-a.org", "a..org", "a_b.org", ""] {
            assert!(MailDomain::parse(bad).is_err(), "{bad}");
        }
    }
}
