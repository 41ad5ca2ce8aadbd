//! HTTP: the host a request names, which entry of the gateway's service
//! table it matches and whose grain that makes it, and who it says it is.
//!
//! The table itself (every HTTP service with its access rules) is the
//! gateway's; what is matched here is only what can be read from the
//! request line and headers, before anything is looked up.

use granary_model::UserName;

/// Where an entry's requests come in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostPattern {
    /// `<name>.<domain>`, a service host (`git.example.org`). Its name is a
    /// reserved user name, so it never shadows a user's subdomain.
    Service(&'static str),
    /// `<user>.<domain>`, one per user (`alice.example.org`).
    UserSubdomain,
    /// A host outside the domain that a user registered (a blog's own
    /// domain); the gateway asks whose it is.
    Registered,
}

/// Whose grain serves a request of an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OwnerIn {
    /// The first path segment names the owner (`/alice/site.git/...`).
    FirstSegment,
    /// The user subdomain names the owner.
    Subdomain,
    /// Whoever logs in is the owner: each user reaches their own grain.
    Login,
    /// The registered host's owner.
    Registration,
}

/// One entry of a service table, as far as routing sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pattern {
    /// The entry's name, for logs (`git`, `blog`, `blog-domain`).
    pub name: &'static str,
    pub host: HostPattern,
    pub owner: OwnerIn,
    /// The grain kind that serves it.
    pub kind: &'static str,
}

/// Whose grain a request goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    /// Named by the request (a valid user name).
    User(String),
    /// The user who logs in.
    Login,
    /// The owner of this registered host, to be looked up.
    Registered(String),
}

/// Where a request goes: the entry it matched, the grain kind, whose
/// grain, and the path the grain sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route<'t, T> {
    pub entry: &'t T,
    pub kind: &'static str,
    pub owner: Owner,
    pub path: String,
}

/// A user name as the rest of Granary accepts it (`granary_model::UserName`:
/// the one rule; names reserved after a user got them stay valid).
pub fn valid_user(name: &str) -> bool {
    UserName::existing(name).is_ok()
}

/// A repository name: 1 to 100 of `[A-Za-z0-9._-]`, not starting with '.'
/// or '-'.
pub fn valid_repo(name: &str) -> bool {
    (1..=100).contains(&name.len())
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// `/<owner>/<repo>.git[/...]` as (owner, repo), both valid.
pub fn repo_path(path: &str) -> Option<(&str, &str)> {
    let mut parts = path.strip_prefix('/')?.splitn(3, '/');
    let owner = parts.next()?;
    let repo = parts.next()?.strip_suffix(".git")?;
    (valid_user(owner) && valid_repo(repo)).then_some((owner, repo))
}

/// Matches a request's host (without port, any case) and path against a
/// service table, in order; `None` when no entry serves it.
pub fn route<'t, T: AsRef<Pattern>>(
    table: &'t [T],
    host: &str,
    path: &str,
    domain: &str,
) -> Option<Route<'t, T>> {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let sub = host
        .strip_suffix(domain)
        .and_then(|h| h.strip_suffix('.'))
        .filter(|s| !s.is_empty() && !s.contains('.'));
    let outside = host != domain && !host.ends_with(&format!(".{domain}"));
    for entry in table {
        let p = entry.as_ref();
        let host_matches = match p.host {
            HostPattern::Service(name) => sub == Some(name),
            // A reserved name is never a user's subdomain (it names a
            // service, or will).
            HostPattern::UserSubdomain => sub.is_some_and(|s| UserName::new(s).is_ok()),
            HostPattern::Registered => outside && !host.is_empty(),
        };
        if !host_matches {
            continue;
        }
        let owner = match p.owner {
            OwnerIn::FirstSegment => {
                let first = path.strip_prefix('/')?.split('/').next()?;
                if !valid_user(first) {
                    return None;
                }
                Owner::User(first.to_owned())
            }
            OwnerIn::Subdomain => Owner::User(sub.filter(|s| valid_user(s))?.to_owned()),
            OwnerIn::Login => Owner::Login,
            OwnerIn::Registration => Owner::Registered(host.clone()),
        };
        return Some(Route {
            entry,
            kind: p.kind,
            owner,
            path: path.to_owned(),
        });
    }
    None
}

/// The value of `name` in a query string (`a=1&service=x`),
/// percent-decoded; the first if there are several.
pub fn query_value(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(k)? == name)
            .then(|| percent_decode(v))
            .flatten()
    })
}

/// `%XX` escapes and `+` decoded; `None` for a malformed escape or
/// non-UTF-8.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// The host a request names: `:authority` (HTTP/2, absolute URIs) or the
/// `Host` header, without its port; `None` when neither is usable.
pub fn request_host(authority: Option<&str>, host_header: Option<&[u8]>) -> Option<String> {
    let raw = match authority {
        Some(a) => a.to_owned(),
        None => std::str::from_utf8(host_header?).ok()?.trim().to_owned(),
    };
    let name = match raw.rsplit_once(':') {
        Some((n, port)) if port.bytes().all(|b| b.is_ascii_digit()) => n,
        _ => raw.as_str(),
    };
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    ok.then(|| name.to_ascii_lowercase())
}

/// `Authorization: Basic <base64 of user:password>`, decoded.
pub fn basic_credentials(header: &[u8]) -> Option<(String, String)> {
    use base64::Engine;
    let text = std::str::from_utf8(header).ok()?;
    let (scheme, value) = text.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") || value.len() > 1024 {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(value.trim())
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, password) = decoded.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct E(Pattern);
    impl AsRef<Pattern> for E {
        fn as_ref(&self) -> &Pattern {
            &self.0
        }
    }

    fn table() -> Vec<E> {
        vec![
            E(Pattern {
                name: "git",
                host: HostPattern::Service("git"),
                owner: OwnerIn::FirstSegment,
                kind: "git",
            }),
            E(Pattern {
                name: "hello",
                host: HostPattern::Service("hello"),
                owner: OwnerIn::Login,
                kind: "hello",
            }),
            E(Pattern {
                name: "blog",
                host: HostPattern::UserSubdomain,
                owner: OwnerIn::Subdomain,
                kind: "blog",
            }),
            E(Pattern {
                name: "blog-domain",
                host: HostPattern::Registered,
                owner: OwnerIn::Registration,
                kind: "blog",
            }),
        ]
    }

    fn at(host: &str, path: &str) -> Option<(&'static str, Owner)> {
        let t = table();
        route(&t, host, path, "example.org").map(|r| (r.entry.0.name, r.owner))
    }

    #[test]
    fn service_hosts_route_by_path_or_login() {
        assert_eq!(
            at("git.example.org", "/alice/site.git/info/refs"),
            Some(("git", Owner::User("alice".into())))
        );
        assert_eq!(
            at("GIT.Example.org.", "/alice/x"),
            Some(("git", Owner::User("alice".into())))
        );
        assert_eq!(at("hello.example.org", "/"), Some(("hello", Owner::Login)));
        for (host, path) in [
            ("git.example.org", "/../site.git"),
            ("git.example.org", "/Alice/site.git"),
            ("git.example.org", "/al--ice/site.git"),
            ("git.example.org", ""),
            ("www.example.org", "/"),
            ("a.b.example.org", "/"),
            ("example.org", "/"),
        ] {
            assert_eq!(at(host, path), None, "{host}{path}");
        }
    }

    #[test]
    fn user_subdomains_and_registered_hosts() {
        assert_eq!(
            at("alice.example.org", "/posts/1.html"),
            Some(("blog", Owner::User("alice".into())))
        );
        assert_eq!(
            at("blog.alice.net", "/"),
            Some(("blog-domain", Owner::Registered("blog.alice.net".into())))
        );
        // A reserved name is never a user's subdomain.
        assert_eq!(at("mail.example.org", "/"), None);
    }

    #[test]
    fn repository_paths() {
        assert_eq!(
            repo_path("/alice/site.git/info/refs"),
            Some(("alice", "site"))
        );
        assert_eq!(repo_path("/alice/site.git"), Some(("alice", "site")));
        for bad in [
            "/alice/site",
            "/alice/.hidden.git",
            "alice/site.git",
            "/Alice/site.git",
            "/alice/-x.git",
        ] {
            assert_eq!(repo_path(bad), None, "{bad}");
        }
    }

    #[test]
    fn query_values_are_decoded() {
        assert_eq!(
            query_value("service=git%2Dreceive-pack", "service").as_deref(),
            Some("git-receive-pack")
        );
        assert_eq!(
            query_value("a=1&service=x", "service").as_deref(),
            Some("x")
        );
        assert_eq!(query_value("servicex=1", "service"), None);
        assert_eq!(query_value("service=%zz", "service"), None);
        assert_eq!(query_value("service=%", "service"), None);
    }

    #[test]
    fn hosts_and_credentials() {
        assert_eq!(
            request_host(None, Some(b"Git.Example.org:8443")).as_deref(),
            Some("git.example.org")
        );
        assert_eq!(request_host(Some("a.b"), None).as_deref(), Some("a.b"));
        assert_eq!(request_host(None, Some(b"bad host")), None);
        assert_eq!(request_host(None, None), None);
        assert_eq!(
            basic_credentials(b"Basic YWxpY2U6czNjcjN0OndpdGg6Y29sb25z"),
            Some(("alice".into(), "s3cr3t:with:colons".into()))
        );
        assert_eq!(basic_credentials(b"Bearer x"), None);
        assert_eq!(basic_credentials(b"Basic !!!"), None);
    }
}
