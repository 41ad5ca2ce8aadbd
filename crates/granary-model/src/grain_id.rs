//! Grain ids: `<user>-<kind>`, one per user per installed app; and
//! `<user>-<kind>--<instance>` for one of several grains of a kind a user
//! owns (the chat rooms to come: `alice-room--family`).
//!
//! The one rule for what a grain id is. It is readable and unambiguous
//! because a kind never contains `-` and a user name never contains `--`:
//! the first `--` splits off the instance, then the last `-` splits the
//! owner from the kind. Datasets, cgroups, log directories and backup
//! catalogues are named by it, so a valid id is also a safe path component
//! and cgroup name (at most 64 characters in all).

use std::fmt;

use crate::{GrainKind, UserName};

/// A checked grain id: a valid user name, `-`, a valid grain kind.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(transparent)]
pub struct GrainId(String);

/// Why a string is not a grain id; the message names it and says the form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{text:?} is not a grain: name it USER/KIND (for example alice/git), USER/KIND/NAME for one of several, or by its id USER-KIND"
)]
pub struct GrainIdError {
    text: String,
}

impl GrainId {
    /// `user`'s grain of `kind`.
    pub fn of(user: &UserName, kind: &GrainKind) -> GrainId {
        GrainId(format!("{user}-{kind}"))
    }

    /// `user`'s grain of `kind` named `instance` (one of several), if the
    /// name is valid and the id fits.
    pub fn instance_of(
        user: &UserName,
        kind: &GrainKind,
        instance: &str,
    ) -> Result<GrainId, GrainIdError> {
        let id = format!("{user}-{kind}--{instance}");
        if !valid_instance(instance) || !valid_resource_name(&id) {
            return Err(GrainIdError { text: id });
        }
        Ok(GrainId(id))
    }

    /// Checks an id (`alice-git`, `alice-room--family`).
    pub fn parse(id: &str) -> Result<GrainId, GrainIdError> {
        let bad = || GrainIdError {
            text: id.to_owned(),
        };
        let (main, instance) = match id.split_once("--") {
            Some((main, instance)) => (main, Some(instance)),
            None => (id, None),
        };
        let (user, kind) = main.rsplit_once('-').ok_or_else(bad)?;
        let user = UserName::existing(user).map_err(|_| bad())?;
        let kind = GrainKind::new(kind).map_err(|_| bad())?;
        match instance {
            None => Ok(GrainId::of(&user, &kind)),
            Some(i) => GrainId::instance_of(&user, &kind, i).map_err(|_| bad()),
        }
    }

    /// What an admin types: `alice/git`, `alice/room/family`, or the id
    /// itself.
    pub fn from_reference(reference: &str) -> Result<GrainId, GrainIdError> {
        let bad = || GrainIdError {
            text: reference.to_owned(),
        };
        let mut parts = reference.split('/');
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some(_), None, _, _) => GrainId::parse(reference),
            (Some(user), Some(kind), instance, None) => {
                let user = UserName::existing(user).map_err(|_| bad())?;
                let kind = GrainKind::new(kind).map_err(|_| bad())?;
                match instance {
                    None => Ok(GrainId::of(&user, &kind)),
                    Some(i) => GrainId::instance_of(&user, &kind, i).map_err(|_| bad()),
                }
            }
            _ => Err(bad()),
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

    /// `user-kind`, without any instance.
    fn main_part(&self) -> &str {
        self.0.split_once("--").map_or(self.0.as_str(), |(m, _)| m)
    }

    /// The owner's part.
    pub fn user(&self) -> &str {
        self.main_part().rsplit_once('-').map_or("", |(u, _)| u)
    }

    /// The kind's part.
    pub fn kind(&self) -> &str {
        self.main_part().rsplit_once('-').map_or("", |(_, k)| k)
    }

    /// Which of several grains of its kind this is; `None` for a user's
    /// one grain of a kind.
    pub fn instance(&self) -> Option<&str> {
        self.0.split_once("--").map(|(_, i)| i)
    }

    /// How admins see it: `alice/git`, `alice/room/family`.
    pub fn shown(&self) -> String {
        match self.instance() {
            Some(i) => format!("{}/{}/{i}", self.user(), self.kind()),
            None => format!("{}/{}", self.user(), self.kind()),
        }
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

/// An instance name: 1 to 32 of `a-z`, `0-9` and single `-`s inside.
pub fn valid_instance(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--")
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
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
    fn instances_are_one_more_part() {
        let id = GrainId::parse("mary-jane-room--book-club").unwrap();
        assert_eq!(
            (id.user(), id.kind(), id.instance()),
            ("mary-jane", "room", Some("book-club"))
        );
        assert_eq!(id.shown(), "mary-jane/room/book-club");
        assert_eq!(
            GrainId::from_reference("mary-jane/room/book-club").unwrap(),
            id
        );
        assert_eq!(GrainId::from_reference(id.as_str()).unwrap(), id);
        assert!(valid_resource_name(id.as_str()));
        // A user's one grain of a kind has none.
        assert_eq!(GrainId::parse("alice-xmpp").unwrap().instance(), None);
        for bad in [
            "alice-room--",
            "alice-room---x",
            "alice-room--x-",
            "alice-room--X",
            "alice-room--a--b",
            "alice--room",
            "alice/room/",
            "alice/room/a/b",
            "alice/room/a--b",
        ] {
            assert!(GrainId::from_reference(bad).is_err(), "{bad:?}");
        }
        // The whole id fits a dataset name.
        let long = "a".repeat(32);
        assert!(GrainId::from_reference(&format!("bob/room/{long}")).is_ok());
        let user = "u".repeat(32);
        assert!(GrainId::from_reference(&format!("{user}/room/{long}")).is_err());
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
            "alice/git/x/y",
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
