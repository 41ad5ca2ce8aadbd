//! The HTTP service table: every HTTP app the gateway serves is one entry
//! here, its host pattern, whose grain a request goes to, the grain kind,
//! and its access rules. A new HTTP app is an app plus an entry.
//!
//! Entries are matched in order (`granary_wire::http::route`). Service
//! hosts (`git.`, `hello.`, later `dav.`, `tasks.`) come before user
//! subdomains; their names are reserved user names, so no user's
//! subdomain can shadow them (a test checks).

use granary_wire::http::{HostPattern, OwnerIn, Pattern, repo_path};

/// Host names under the domain that Granary's services answer on, over
/// HTTPS and the other listeners: every service host of the table, and
/// those of protocols to come. Each is a reserved user name, and each gets
/// its own name in the local CA's certificate.
pub const SERVICE_HOSTS: &[&str] = &[
    "git", "hello", "dav", "mail", "xmpp", "tasks", "upload", "www",
];

/// Who may use an entry, and as whom its grain sees them.
#[derive(Debug, Clone, Copy)]
pub enum Access {
    /// Anyone, anonymously: the grain is told no identity (a site).
    Public,
    /// Each user reaches their own grain (the owner is whoever logs in),
    /// with HTTP Basic and an app password of `password_kind`.
    Own { password_kind: &'static str },
    /// The owner reads and writes with an app password of
    /// `password_kind`; anyone, logged in or not, may read a resource the
    /// owner made public. Everyone else is refused the same way whether or
    /// not the resource exists.
    OwnerOrPublicRead {
        password_kind: &'static str,
        /// The resource a path names (a repository), or `None` when the
        /// path is not one of this app's.
        resource: fn(&str) -> Option<&str>,
        /// Whether a request writes.
        writes: fn(path: &str, query: &str) -> bool,
    },
    /// Each user reaches their own grain with a bearer secret made for
    /// one device (`granary tasks client add`), sent in `header`. The
    /// gateway keeps only its hash; unknown secrets count as failed
    /// logins of the client's address.
    ClientSecret { header: &'static str },
}

impl Access {
    /// The app-password kind that authenticates, if any.
    pub fn password_kind(&self) -> Option<&'static str> {
        match self {
            Access::Public | Access::ClientSecret { .. } => None,
            Access::Own { password_kind } | Access::OwnerOrPublicRead { password_kind, .. } => {
                Some(password_kind)
            }
        }
    }
}

/// One HTTP service.
#[derive(Debug, Clone, Copy)]
pub struct HttpService {
    pub pattern: Pattern,
    pub access: Access,
    /// What a client is asked for when it must log in (`WWW-Authenticate`
    /// realm, and the text of the 401).
    pub login_prompt: &'static str,
    /// For a public entry whose addresses carry their own secret: the
    /// shape a path must have (checked before any grain is started) and
    /// the one 404 text for a bad path, a missing owner and anything the
    /// grain does not have, so nobody learns which users exist.
    pub secret_paths: Option<SecretPaths>,
}

/// See [`HttpService::secret_paths`].
#[derive(Debug, Clone, Copy)]
pub struct SecretPaths {
    pub shape: fn(&str) -> bool,
    pub not_found: &'static str,
}

/// `/<owner>/<slot>/<name>`: a slot id of at least 32 URL-safe characters
/// (a chat grain's upload slot) and a name.
fn upload_path(path: &str) -> bool {
    let mut parts = path.strip_prefix('/').unwrap_or("").splitn(3, '/');
    let (Some(owner), Some(slot), Some(name)) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    !owner.is_empty()
        && slot.len() >= 32
        && slot.len() <= 64
        && slot
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        && !name.is_empty()
        && !name.contains('/')
}

impl AsRef<Pattern> for HttpService {
    fn as_ref(&self) -> &Pattern {
        &self.pattern
    }
}

/// git smart HTTP: a push is `git-receive-pack`, by path or by the
/// `service` of the ref advertisement.
fn git_writes(path: &str, query: &str) -> bool {
    path.ends_with("/git-receive-pack")
        || granary_wire::http::query_value(query, "service").as_deref() == Some("git-receive-pack")
}

fn git_repository(path: &str) -> Option<&str> {
    repo_path(path).map(|(_, repo)| repo)
}

/// Every HTTP service, in the order they are matched.
pub const HTTP_SERVICES: &[HttpService] = &[
    // git.<domain>/<owner>/<repo>.git: the owner's git grain.
    HttpService {
        pattern: Pattern {
            name: "git",
            host: HostPattern::Service("git"),
            owner: OwnerIn::FirstSegment,
            kind: "git",
        },
        access: Access::OwnerOrPublicRead {
            password_kind: "git",
            resource: git_repository,
            writes: git_writes,
        },
        login_prompt: "git",
        secret_paths: None,
    },
    // hello.<domain>: the example app, each user their own grain.
    HttpService {
        pattern: Pattern {
            name: "hello",
            host: HostPattern::Service("hello"),
            owner: OwnerIn::Login,
            kind: "hello",
        },
        access: Access::Own {
            password_kind: "hello",
        },
        login_prompt: "hello",
        secret_paths: None,
    },
    // dav.<domain>: calendars and contacts (CalDAV, CardDAV), each user
    // their own grain; what others share with them arrives through grants.
    HttpService {
        pattern: Pattern {
            name: "dav",
            host: HostPattern::Service("dav"),
            owner: OwnerIn::Login,
            kind: "dav",
        },
        access: Access::Own {
            password_kind: "dav",
        },
        login_prompt: "calendars and contacts",
        secret_paths: None,
    },
    // tasks.<domain>: Taskwarrior 3 (TaskChampion sync), each user their
    // own grain, each device by the client id it was given.
    HttpService {
        pattern: Pattern {
            name: "tasks",
            host: HostPattern::Service("tasks"),
            owner: OwnerIn::Login,
            kind: "tasks",
        },
        access: Access::ClientSecret {
            header: "x-client-id",
        },
        login_prompt: "Taskwarrior",
        secret_paths: None,
    },
    // upload.<domain>/<owner>/<slot>/<name>: files shared in chat
    // (XEP-0363), kept in the owner's chat grain. The slot in the address
    // is the secret (192 random bits); the grain refuses anything else.
    HttpService {
        pattern: Pattern {
            name: "upload",
            host: HostPattern::Service("upload"),
            owner: OwnerIn::FirstSegment,
            kind: "xmpp",
        },
        access: Access::Public,
        login_prompt: "",
        secret_paths: Some(SecretPaths {
            shape: upload_path,
            not_found: "No such file.\n",
        }),
    },
    // <user>.<domain>: the user's blog, public.
    HttpService {
        pattern: Pattern {
            name: "blog",
            host: HostPattern::UserSubdomain,
            owner: OwnerIn::Subdomain,
            kind: "blog",
        },
        access: Access::Public,
        login_prompt: "",
        secret_paths: None,
    },
    // A domain a user registered for their blog (`granary blog domain add`).
    HttpService {
        pattern: Pattern {
            name: "blog-domain",
            host: HostPattern::Registered,
            owner: OwnerIn::Registration,
            kind: "blog",
        },
        access: Access::Public,
        login_prompt: "",
        secret_paths: None,
    },
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_service_host_is_reserved_and_certified() {
        for s in HTTP_SERVICES {
            if let HostPattern::Service(name) = s.pattern.host {
                assert!(
                    SERVICE_HOSTS.contains(&name),
                    "{name} is not in SERVICE_HOSTS"
                );
            }
        }
        for name in SERVICE_HOSTS {
            assert!(
                granary_model::RESERVED_USER_NAMES.contains(name),
                "{name}.<domain> must be a reserved user name, or a user could shadow it"
            );
        }
    }

    #[test]
    fn entries_that_authenticate_name_a_valid_kind_and_prompt() {
        for s in HTTP_SERVICES {
            granary_model::GrainKind::new(s.pattern.kind).unwrap();
            if let Some(kind) = s.access.password_kind() {
                granary_model::GrainKind::new(kind).unwrap();
                assert!(!s.login_prompt.is_empty(), "{}", s.pattern.name);
            }
        }
    }

    #[test]
    fn upload_paths_have_a_slot() {
        let slot = "A".repeat(32);
        assert!(upload_path(&format!("/alice/{slot}/cat.png")));
        assert!(!upload_path(&format!("/alice/{slot}/")));
        assert!(!upload_path("/alice/short/cat.png"));
        assert!(!upload_path(&format!("/alice/{slot}/a/b")));
        assert!(!upload_path("/alice/"));
    }

    #[test]
    fn git_reads_and_writes() {
        assert!(git_writes("/alice/site.git/git-receive-pack", ""));
        assert!(git_writes(
            "/alice/site.git/info/refs",
            "service=git-receive-pack"
        ));
        assert!(!git_writes(
            "/alice/site.git/info/refs",
            "service=git-upload-pack"
        ));
        // As http-backend reads it: decoded.
        assert!(git_writes(
            "/alice/site.git/info/refs",
            "service=git%2Dreceive-pack"
        ));
        assert_eq!(git_repository("/alice/site.git/info/refs"), Some("site"));
        assert_eq!(git_repository("/alice/site"), None);
    }
}
