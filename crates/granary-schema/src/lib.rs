//! Rust types generated from the Cap'n Proto contracts in `schema/`.
//!
//! The `*_capnp.rs` files are generated, never edited by hand. After changing
//! a `.capnp` file, regenerate them with
//!
//! ```sh
//! GRANARY_REGENERATE_SCHEMA=1 cargo test -p granary-schema --test regenerate
//! ```
//!
//! Without that variable, the same test fails when the checked-in code
//! differs from what `capnp` generates, so the two cannot drift.

#![allow(unreachable_pub, clippy::all, clippy::pedantic)]

#[rustfmt::skip]
pub mod admin_capnp;
#[rustfmt::skip]
pub mod grain_capnp;
#[rustfmt::skip]
pub mod host_capnp;
#[rustfmt::skip]
pub mod package_capnp;
#[rustfmt::skip]
pub mod services_capnp;
#[rustfmt::skip]
pub mod stream_capnp;

/// The `.capnp` files this crate is generated from, relative to `schema/`.
pub const SCHEMA_FILES: &[&str] = &[
    "admin.capnp",
    "grain.capnp",
    "host.capnp",
    "package.capnp",
    "services.capnp",
    "stream.capnp",
];
