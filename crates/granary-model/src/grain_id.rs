//! Grain ids: `<user>-<kind>`, one per user per installed app.
//!
//! The one rule for what a grain id is. It is readable and unambiguous
//! because a kind never contains `-`: the last `-` splits the owner from
//! the kind. Datasets, cgroups, log directories and backup catalogues are
//! named by it, so a valid id is also a safe path component and cgroup name.

use std::fmt;

use crate::{GrainKind, UserName};

/// A checked grain id: a valid user name, `-`, a valid grain kind.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(transparent)]
pub struct GrainId(String);

/// Why a string is not a grain id; the message names it and says the form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{text:?} is not a grain: name it USER/KIND (for example alice/git) or by its id USER-KIND"
)]
pub struct GrainIdError {
    text: String,
}

impl GrainId {
    /// `user`'s grain of `kind`.
    pub fn of(user: &UserName, kind: &GrainKind) -> GrainId {
        GrainId(format!("{user}-{kind}"))
    }

    /// Checks an id (`alice-git`).
    pub fn parse(id: &str) -> Result<GrainId, GrainIdError> {
        let bad = || GrainIdError {
            text: id.to_owned(),
        };
        let (user, kind) = id.rsplit_once('-').ok_or_else(bad)?;
        let user = UserName::existing(user).map_err(|_| bad())?;
        let kind = GrainKind::new(kind).map_err(|_| bad())?;
        Ok(GrainId::of(&user, &kind))
    }

    /// What an admin types: `alice/git`, or the id itself.
    pub fn from_reference(reference: &str) -> Result<GrainId, GrainIdError> {
        match reference.split_once('/') {
            Some((user, kind)) => {
                let bad = || GrainIdError {
                    text: reference.to_owned(),
                };
                let user = UserName::existing(user).map_err(|_| bad())?;
                let kind = GrainKind::new(kind).map_err(|_| bad())?;
                Ok(GrainId::of(&user, &kind))
            }
            None => GrainId::parse(reference),
        }
    }

    /// `user`'s grain of `kind`, from unchecked text (the gateway's route
    /// has checked both already; anything else is refused here).
    pub fn for_user(user: &str, kind: &str) -> Result<GrainId, GrainIdError> {
        GrainId::from_reference(&format!("{user}/{kind}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The owner's part.
    pub fn user(&self) -> &str {
        self.0.rsplit_once('-').map_or("", |(u, _)| u)
    }

    /// The kind's part.
    pub fn kind(&self) -> &str {
        self.0.rsplit_once('-').map_or("", |(_, k)| k)
    }

    /// How admins see it: `alice/git`.
    pub fn shown(&self) -> String {
        format!("{}/{}", self.user(), self.kind())
    }
}

impl fmt::Display for GrainId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for GrainId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::ops::Deref for GrainId {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

/// Whether `name` may name a dataset, a cgroup or a log directory: a grain
/// id, or one of the datasets crate's scratch names (which start with a
/// digit, so they never collide with a grain). 1 to 64 of `a-z`, `0-9` and
/// `-`, not starting with `-`.
pub fn valid_resource_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_through_every_form() {
        let id = GrainId::parse("mary-jane-git").unwrap();
        assert_eq!((id.user(), id.kind()), ("mary-jane", "git"));
        assert_eq!(id.shown(), "mary-jane/git");
        assert_eq!(GrainId::from_reference("mary-jane/git").unwrap(), id);
        assert_eq!(GrainId::from_reference("mary-jane-git").unwrap(), id);
        assert_eq!(GrainId::for_user("mary-jane", "git").unwrap(), id);
        assert!(valid_resource_name(id.as_str()));
    }

    #[test]
    fn malformed_ids_are_refused() {
        for bad in [
            "",
            "alice",
            "alice-",
            "-git",
            "Alice-git",
            "alice-git-",
            "../x",
            "alice/git/x",
            "alice-Git",
            "alice-git2-x y",
        ] {
            assert!(GrainId::from_reference(bad).is_err(), "{bad:?}");
        }
        let e = GrainId::from_reference("nope").unwrap_err().to_string();
        assert!(e.contains("\"nope\"") && e.contains("USER/KIND"), "{e}");
    }

    #[test]
    fn dataset_names_cover_grains_and_scratch() {
        assert!(valid_resource_name("0restore-ab12"));
        for bad in ["", "-x", "a/b", "A", &"a".repeat(65)] {
            assert!(!valid_resource_name(bad), "{bad:?}");
        }
    }
}
