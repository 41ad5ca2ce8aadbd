//! The gateway's pre-routing parsers on arbitrary bytes: the Host header,
//! the route through a service table, repository paths, Basic credentials.
//! Nothing may panic, and a route only ever names valid users.

#![no_main]

use granary_wire::http::{
    HostPattern, Owner, OwnerIn, Pattern, basic_credentials, repo_path, request_host, route,
    valid_repo, valid_user,
};
use libfuzzer_sys::fuzz_target;

struct Entry(Pattern);

impl AsRef<Pattern> for Entry {
    fn as_ref(&self) -> &Pattern {
        &self.0
    }
}

const TABLE: &[Entry] = &[
    Entry(Pattern { name: "git", host: HostPattern::Service("git"), owner: OwnerIn::FirstSegment, kind: "git" }),
    Entry(Pattern { name: "hello", host: HostPattern::Service("hello"), owner: OwnerIn::Login, kind: "hello" }),
    Entry(Pattern { name: "blog", host: HostPattern::UserSubdomain, owner: OwnerIn::Subdomain, kind: "blog" }),
    Entry(Pattern { name: "blog-domain", host: HostPattern::Registered, owner: OwnerIn::Registration, kind: "blog" }),
];

fuzz_target!(|data: &[u8]| {
    let _ = basic_credentials(data);
    if let Some(host) = request_host(None, Some(data)) {
        assert!(host.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.'));
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let (host, path) = text.split_once('/').unwrap_or((text, ""));
        let _ = request_host(Some(host), None);
        let path = format!("/{path}");
        if let Some((owner, repo)) = repo_path(&path) {
            assert!(valid_user(owner) && valid_repo(repo));
        }
        if let Some(r) = route(TABLE, host, &path, "example.org")
            && let Owner::User(u) = &r.owner
        {
            assert!(valid_user(u));
        }
    }
});
