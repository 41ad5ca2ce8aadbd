//! User names: one name that works as an e-mail local part, an XMPP local
//! part, a DNS label (`alice.example.org` serves Alice's blog) and a path
//! component.

use std::fmt;
use std::str::FromStr;

/// Longest accepted user name. DNS allows 63 octets per label; we keep well
/// below so that `<user>-<kind>` style derived names still fit.
pub(crate) const MAX_LEN: usize = 32;

/// Names that would collide with a service host name (`git.example.org`), a
/// mail role account (RFC 2142) or something an admin would not expect a
/// user to own.
pub const RESERVED_USER_NAMES: &[&str] = &[
    "abuse",
    "admin",
    "administrator",
    "api",
    "autoconfig",
    "autodiscover",
    "blog",
    "caldav",
    "carddav",
    "conference",
    "dav",
    "ftp",
    "git",
    "granary",
    "hello",
    "hostmaster",
    "imap",
    "imaps",
    "info",
    "localhost",
    "mail",
    "mailer-daemon",
    "mta-sts",
    "muc",
    "mx",
    "noc",
    "no-reply",
    "noreply",
    "ns",
    "ns1",
    "ns2",
    "pop",
    "pop3",
    "postmaster",
    "proxy",
    "pubsub",
    "rooms",
    "root",
    "security",
    "smtp",
    "ssh",
    "static",
    "submission",
    "support",
    "system",
    "tasks",
    "upload",
    "webmaster",
    "www",
    "xmpp",
];

/// A validated user name: 1 to 32 of `a-z`, `0-9` and `-`, starting with a
/// letter, not ending with `-`, without `--`, and not reserved.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(transparent)]
pub struct UserName(String);

/// Why a string is not a usable user name. The message says what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UserNameError {
    #[error("user name is empty")]
    Empty,
    #[error("user name {name:?} is longer than {MAX_LEN} characters")]
    TooLong { name: String },
    #[error(
        "user name {name:?} may only contain lowercase letters a-z, digits and '-', and must start with a letter"
    )]
    BadCharacter { name: String },
    #[error("user name {name:?} may not end with '-' or contain '--'")]
    BadHyphen { name: String },
    #[error(
        "user name {name:?} is reserved (it names a service or a role account); choose another"
    )]
    Reserved { name: String },
}

impl UserName {
    /// Checks `name` and wraps it. Upper case is an error rather than being
    /// folded silently, so that what the admin typed is what users log in with.
    pub fn new(name: &str) -> Result<Self, UserNameError> {
        let owned = || name.to_owned();
        if name.is_empty() {
            return Err(UserNameError::Empty);
        }
        if name.len() > MAX_LEN {
            return Err(UserNameError::TooLong { name: owned() });
        }
        let bytes = name.as_bytes();
        let allowed = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-';
        if !bytes[0].is_ascii_lowercase() || !bytes.iter().all(allowed) {
            return Err(UserNameError::BadCharacter { name: owned() });
        }
        if name.ends_with('-') || name.contains("--") {
            return Err(UserNameError::BadHyphen { name: owned() });
        }
        if RESERVED_USER_NAMES.contains(&name) {
            return Err(UserNameError::Reserved { name: owned() });
        }
        Ok(Self(name.to_owned()))
    }

    /// A name as users already have it: the syntax rule only. Reserving a
    /// name is a rule for making users; a user made before their name was
    /// reserved keeps working (logins, grains, removal).
    pub fn existing(name: &str) -> Result<Self, UserNameError> {
        match Self::new(name) {
            Err(UserNameError::Reserved { name }) => Ok(Self(name)),
            other => other,
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for UserName {
    type Err = UserNameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl fmt::Display for UserName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for UserName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        for name in ["alice", "bob2", "mary-jane", "a", "x1-2-3"] {
            assert_eq!(UserName::new(name).unwrap().as_str(), name);
        }
        assert!(UserName::new(&"a".repeat(MAX_LEN)).is_ok());
    }

    #[test]
    fn rejects_what_breaks_dns_mail_or_xmpp() {
        use UserNameError::*;
        type Expectation = fn(&UserNameError) -> bool;
        let cases: &[(&str, Expectation)] = &[
            ("", |e| matches!(e, Empty)),
            ("Alice", |e| matches!(e, BadCharacter { .. })),
            ("1alice", |e| matches!(e, BadCharacter { .. })),
            ("-alice", |e| matches!(e, BadCharacter { .. })),
            ("al.ice", |e| matches!(e, BadCharacter { .. })),
            ("al ice", |e| matches!(e, BadCharacter { .. })),
            ("al@ice", |e| matches!(e, BadCharacter { .. })),
            ("al_ice", |e| matches!(e, BadCharacter { .. })),
            ("alïce", |e| matches!(e, BadCharacter { .. })),
            ("../x", |e| matches!(e, BadCharacter { .. })),
            ("alice-", |e| matches!(e, BadHyphen { .. })),
            ("xn--p1ai", |e| matches!(e, BadHyphen { .. })),
            ("git", |e| matches!(e, Reserved { .. })),
            ("postmaster", |e| matches!(e, Reserved { .. })),
            ("www", |e| matches!(e, Reserved { .. })),
        ];
        for (name, expected) in cases {
            let err = UserName::new(name).unwrap_err();
            assert!(expected(&err), "{name:?} gave {err:?}");
        }
        let long = "a".repeat(MAX_LEN + 1);
        assert!(matches!(
            UserName::new(&long),
            Err(UserNameError::TooLong { .. })
        ));
    }

    #[test]
    fn every_reserved_name_would_otherwise_be_valid() {
        // A reserved entry that could never be a user name anyway is dead
        // weight and hides typos in the list.
        for name in RESERVED_USER_NAMES {
            assert!(
                matches!(UserName::new(name), Err(UserNameError::Reserved { .. })),
                "{name}"
            );
        }
    }

    #[test]
    fn names_reserved_later_stay_usable_for_existing_users() {
        assert!(UserName::new("hello").is_err());
        assert_eq!(UserName::existing("hello").unwrap().as_str(), "hello");
        assert!(UserName::existing("Hello").is_err());
    }

    #[test]
    fn error_messages_name_the_input() {
        let err = UserName::new("Bob").unwrap_err().to_string();
        assert!(err.contains("\"Bob\""), "{err}");
    }
}
