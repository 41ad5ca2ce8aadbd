//! The command line an SSH client asks the gateway to run: nothing may
//! panic, and only the two git commands for valid names come out.

#![no_main]

use granary_wire::http::{valid_repo, valid_user};
use granary_wire::ssh::git_command;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(c) = git_command(data) {
        assert!(c.service == "upload-pack" || c.service == "receive-pack");
        assert!(valid_user(&c.owner) && valid_repo(&c.repo));
    }
});
