//! What the gateway reads from clients before it knows where a request or
//! connection goes: pure functions over bytes, no I/O, each fuzzed
//! (`fuzz/fuzz_targets/http_route.rs`).
//!
//! - [`http`]: the host a request names, the route it takes
//!   (`git.<domain>/<owner>/<repo>.git`), HTTP Basic credentials.

pub mod http;
