//! Grain kinds: the short name of what a grain does (`mail`, `git`, ...).
//! Each installed app claims one kind; app passwords are issued per kind.

use std::fmt;
use std::str::FromStr;

/// A validated grain kind: 1 to 16 of `a-z` and `0-9`, starting with a letter.
/// The built-in kinds are listed in [`GrainKind::BUILT_IN`], but installed
/// apps may bring others.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(transparent)]
pub struct GrainKind(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "grain kind {kind:?} is not valid: use 1 to 16 lowercase letters and digits, starting with a letter (for example mail, dav, xmpp, git, tasks, blog)"
)]
pub struct GrainKindError {
    kind: String,
}

impl GrainKind {
    /// The kinds of Granary's own apps.
    pub const BUILT_IN: &'static [&'static str] =
        &["mail", "dav", "xmpp", "room", "git", "tasks", "blog"];

    pub fn new(kind: &str) -> Result<Self, GrainKindError> {
        let ok = !kind.is_empty()
            && kind.len() <= 16
            && kind.as_bytes()[0].is_ascii_lowercase()
            && kind
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        if ok {
            Ok(Self(kind.to_owned()))
        } else {
            Err(GrainKindError {
                kind: kind.to_owned(),
            })
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for GrainKind {
    type Err = GrainKindError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl fmt::Display for GrainKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_kinds_are_valid() {
        for kind in GrainKind::BUILT_IN {
            assert_eq!(GrainKind::new(kind).unwrap().as_str(), *kind);
        }
    }

    #[test]
    fn rejects_malformed_kinds() {
        for kind in ["", "Mail", "2fa", "git-http", "a/b", "abcdefghijklmnopq"] {
            assert!(GrainKind::new(kind).is_err(), "{kind:?}");
        }
    }
}
