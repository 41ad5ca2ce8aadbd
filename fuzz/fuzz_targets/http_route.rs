//! The gateway's pre-routing parsers on arbitrary bytes: the Host header,
//! the route of a path, Basic credentials. Nothing may panic, and a route
//! only ever names valid users and repositories.

#![no_main]

use granary_wire::http::{Route, basic_credentials, request_host, route, valid_repo, valid_user};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = basic_credentials(data);
    if let Some(host) = request_host(None, Some(data)) {
        assert!(host.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.'));
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let (host, path) = text.split_once('/').unwrap_or((text, ""));
        let _ = request_host(Some(host), None);
        if let Route::Git { owner, repo } = route(host, &format!("/{path}"), "example.org") {
            assert!(valid_user(&owner) && valid_repo(&repo));
        }
    }
});
