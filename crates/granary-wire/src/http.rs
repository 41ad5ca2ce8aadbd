//! HTTP: the host a request names, where it goes, and who it says it is.

/// Where a request goes, decided from its host name and path alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `git.<domain>/<owner>/<repo>.git/...`: the owner's git grain.
    Git { owner: String, repo: String },
    /// `<owner>.<domain>`: the owner's blog grain (a public site).
    Blog { owner: String },
    /// No app serves this host.
    Unknown,
}

/// A user name as the rest of Granary accepts it (`granary_model::UserName`:
/// the one rule).
pub fn valid_user(name: &str) -> bool {
    granary_model::UserName::new(name).is_ok()
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

/// Routes by host (without port, any case) and path.
pub fn route(host: &str, path: &str, domain: &str) -> Route {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    if host.strip_prefix("git.") == Some(domain) {
        let mut parts = path.trim_start_matches('/').splitn(3, '/');
        let (Some(owner), Some(repo)) = (parts.next(), parts.next()) else {
            return Route::Unknown;
        };
        let Some(repo) = repo.strip_suffix(".git") else {
            return Route::Unknown;
        };
        if valid_user(owner) && valid_repo(repo) {
            return Route::Git {
                owner: owner.to_owned(),
                repo: repo.to_owned(),
            };
        }
    }
    if let Some(owner) = host.strip_suffix(&format!(".{domain}"))
        && valid_user(owner)
        && !SERVICE_HOSTS.contains(&owner)
    {
        return Route::Blog {
            owner: owner.to_owned(),
        };
    }
    Route::Unknown
}

/// Host names under the domain that belong to services, never to a user's
/// site (they are reserved user names too).
pub const SERVICE_HOSTS: &[&str] = &["git", "dav", "mail", "xmpp", "tasks", "www"];

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

    #[test]
    fn git_routes() {
        let d = "example.org";
        assert_eq!(
            route("git.example.org", "/alice/site.git/info/refs", d),
            Route::Git {
                owner: "alice".into(),
                repo: "site".into()
            }
        );
        assert_eq!(
            route("GIT.Example.org.", "/alice/site.git", d),
            Route::Git {
                owner: "alice".into(),
                repo: "site".into()
            }
        );
        for (host, path) in [
            ("git.example.org", "/alice/site/info/refs"),
            ("git.example.org", "/../site.git"),
            ("git.example.org", "/alice/.hidden.git"),
            ("git.example.org", "/Alice/site.git"),
            ("git.other.org", "/alice/site.git"),
            ("example.org", "/alice/site.git"),
            ("www.example.org", "/"),
            ("a.b.example.org", "/"),
        ] {
            assert_eq!(route(host, path, d), Route::Unknown, "{host}{path}");
        }
    }

    #[test]
    fn blog_routes() {
        assert_eq!(
            route("alice.example.org", "/posts/1.html", "example.org"),
            Route::Blog {
                owner: "alice".into()
            }
        );
        assert_eq!(
            route("Alice.Example.org", "/", "example.org"),
            Route::Blog {
                owner: "alice".into()
            }
        );
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
