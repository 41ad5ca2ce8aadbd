//! The address of a shared file as the gateway hands it to the chat
//! grain (`/<owner>/<slot>/<name>`, percent-encoded): any path is read or
//! refused without panicking, and a name it reads is one a slot could have
//! been given (no separators) that encodes back to an address reading the
//! same.

#![no_main]

use granary_xmpp::upload::parse_path;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    if let Some((owner, id, name)) = parse_path(path) {
        assert!(!name.contains('/') && !name.contains('\\'));
        assert!(!owner.is_empty() && !id.is_empty());
        let again = format!(
            "/{owner}/{id}/{}",
            granary_xmpp::upload::encode_segment(&name)
        );
        assert_eq!(parse_path(&again).map(|(_, _, n)| n), Some(name));
    }
});
