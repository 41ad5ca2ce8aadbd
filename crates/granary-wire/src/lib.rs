//! What the gateway reads from clients before it knows where a request or
//! connection goes: pure functions over bytes, no I/O, each fuzzed
//! (`fuzz/fuzz_targets/`).
//!
//! - [`http`]: the host a request names, the entry of a service table it
//!   matches and whose grain that is, git repository paths, HTTP Basic
//!   credentials (`http_route`).
//! - [`ssh`]: the git command an SSH client asks for, OpenSSH public key
//!   lines with their fingerprints (`ssh_command`, `ssh_public_key`).

pub mod http;
pub mod ssh;
