//! Request paths: percent-decoded segment by segment, with anything that
//! could step outside a collection refused (`.`, `..`, an encoded `/` or
//! NUL, over-long names), then matched against the grain's layout:
//!
//! | path | resource |
//! |---|---|
//! | `/` | the root (answers `current-user-principal`) |
//! | `/principals/<user>/` | the user's principal |
//! | `/calendars/<user>/` | their calendar home |
//! | `/calendars/<user>/<name>/` | a calendar (`<owner>~<name>`: one shared with them) |
//! | `/calendars/<user>/<name>/<object>` | an event, a todo, a journal |
//! | `/addressbooks/<user>/...` | the same for address books and vCards |
//!
//! `<user>` must be the grain's owner: nothing else is served, so no href
//! reaches another user's data except through a grant.

use crate::store::Kind;

/// The longest segment accepted (a collection or object name).
pub const MAX_NAME: usize = 255;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Root,
    PrincipalsRoot,
    Principal,
    Home(Kind),
    Collection(Kind, CollectionRef),
    Object(Kind, CollectionRef, String),
}

/// A collection of the owner's, or one another user shared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CollectionRef {
    Own(String),
    Shared { owner: String, name: String },
}

impl CollectionRef {
    /// The path segment naming it in the owner's home.
    pub fn segment(&self) -> String {
        match self {
            CollectionRef::Own(n) => n.clone(),
            CollectionRef::Shared { owner, name } => format!("{owner}~{name}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path is not valid")]
    Invalid,
    #[error("not found")]
    NotFound,
}

/// Decodes a path into segments; the bool says whether it ended in '/'.
pub fn segments(path: &str) -> Result<(Vec<String>, bool), PathError> {
    let path = path.split(['?', '#']).next().unwrap_or("");
    let Some(rest) = path.strip_prefix('/') else {
        return Err(PathError::Invalid);
    };
    let trailing = rest.is_empty() || rest.ends_with('/');
    let mut out = Vec::new();
    for raw in rest.split('/') {
        if raw.is_empty() {
            continue;
        }
        let decoded = percent_encoding::percent_decode_str(raw)
            .decode_utf8()
            .map_err(|_| PathError::Invalid)?;
        if decoded == "."
            || decoded == ".."
            || decoded.len() > MAX_NAME
            || decoded
                .chars()
                .any(|c| c == '/' || c == '\\' || c.is_control())
        {
            return Err(PathError::Invalid);
        }
        out.push(decoded.into_owned());
    }
    Ok((out, trailing))
}

/// Whether `name` may name a collection the owner makes (`~` is for
/// shared ones; names starting with '.' are reserved).
pub fn valid_collection_name(name: &str) -> bool {
    !name.is_empty() && !name.starts_with('.') && !name.contains('~') && name.len() <= 128
}

/// Resolves a path for `owner`.
pub fn resolve(path: &str, owner: &str) -> Result<Target, PathError> {
    let (segs, _) = segments(path)?;
    let s: Vec<&str> = segs.iter().map(String::as_str).collect();
    let kind = |seg: &str| match seg {
        "calendars" => Some(Kind::Calendar),
        "addressbooks" => Some(Kind::AddressBook),
        _ => None,
    };
    let collection = |seg: &str| match seg.split_once('~') {
        Some((o, n)) if !o.is_empty() && !n.is_empty() => Ok(CollectionRef::Shared {
            owner: o.to_owned(),
            name: n.to_owned(),
        }),
        Some(_) => Err(PathError::NotFound),
        None => Ok(CollectionRef::Own(seg.to_owned())),
    };
    match s.as_slice() {
        [] => Ok(Target::Root),
        ["principals"] => Ok(Target::PrincipalsRoot),
        ["principals", u] if *u == owner => Ok(Target::Principal),
        [k, u] if *u == owner => kind(k).map(Target::Home).ok_or(PathError::NotFound),
        [k, u, c] if *u == owner => {
            let k = kind(k).ok_or(PathError::NotFound)?;
            Ok(Target::Collection(k, collection(c)?))
        }
        [k, u, c, o] if *u == owner => {
            let k = kind(k).ok_or(PathError::NotFound)?;
            Ok(Target::Object(k, collection(c)?, (*o).to_owned()))
        }
        _ => Err(PathError::NotFound),
    }
}

/// Percent-encodes one segment for an href: only what a path segment may
/// not hold (RFC 3986 pchar), so a client gets back the href it used.
pub fn encode(segment: &str) -> String {
    const SET: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~')
        .remove(b'!')
        .remove(b'$')
        .remove(b'&')
        .remove(b'\'')
        .remove(b'(')
        .remove(b')')
        .remove(b'*')
        .remove(b'+')
        .remove(b',')
        .remove(b';')
        .remove(b'=')
        .remove(b':')
        .remove(b'@');
    percent_encoding::utf8_percent_encode(segment, SET).to_string()
}

/// The href of a target of `owner`'s.
pub fn href(owner: &str, target: &Target) -> String {
    let o = encode(owner);
    match target {
        Target::Root => "/".into(),
        Target::PrincipalsRoot => "/principals/".into(),
        Target::Principal => format!("/principals/{o}/"),
        Target::Home(k) => format!("/{}/{o}/", k.home_segment()),
        Target::Collection(k, c) => format!("/{}/{o}/{}/", k.home_segment(), encode(&c.segment())),
        Target::Object(k, c, n) => format!(
            "/{}/{o}/{}/{}",
            k.home_segment(),
            encode(&c.segment()),
            encode(n)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_the_layout_for_the_owner_only() {
        assert_eq!(resolve("/", "bob"), Ok(Target::Root));
        assert_eq!(resolve("/principals/bob/", "bob"), Ok(Target::Principal));
        assert_eq!(
            resolve("/calendars/bob/", "bob"),
            Ok(Target::Home(Kind::Calendar))
        );
        assert_eq!(
            resolve("/calendars/bob/alice~family/x%20y.ics", "bob"),
            Ok(Target::Object(
                Kind::Calendar,
                CollectionRef::Shared {
                    owner: "alice".into(),
                    name: "family".into()
                },
                "x y.ics".into()
            ))
        );
        assert_eq!(
            resolve("/calendars/alice/family/", "bob"),
            Err(PathError::NotFound)
        );
        assert_eq!(
            resolve("/principals/alice/", "bob"),
            Err(PathError::NotFound)
        );
    }

    #[test]
    fn refuses_traversal() {
        for p in [
            "/calendars/bob/../alice/x",
            "/calendars/bob/%2e%2e/x",
            "/calendars/bob/a%2fb/",
            "/calendars/bob/a%00b/",
            "/calendars/bob/%2E/",
            "relative",
            "/calendars/bob/a%5c..%5cb/",
        ] {
            assert_eq!(resolve(p, "bob"), Err(PathError::Invalid), "{p}");
        }
    }

    #[test]
    fn hrefs_round_trip() {
        let t = Target::Object(
            Kind::AddressBook,
            CollectionRef::Own("work stuff".into()),
            "ä b.vcf".into(),
        );
        let h = href("bob", &t);
        assert_eq!(resolve(&h, "bob"), Ok(t));
    }
}
