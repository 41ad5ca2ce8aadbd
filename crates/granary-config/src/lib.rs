//! Configuration in two stages.
//!
//! 1. [`raw`]: the TOML file's shape. Unknown keys are errors; nothing here
//!    touches the file system or the environment.
//! 2. [`resolve`]: paths made absolute and checked, defaults filled in,
//!    environment consulted. Every error names the file, the key and the reason.
//!
//! With no file at all, [`Config::resolve`] of [`RawConfig::default`] gives the
//! embedded defaults that `granary serve` and `granary demo` run on. The same
//! defaults, commented, are [`DEFAULT_CONFIG_TOML`] (`granary config default`).

pub mod acme;
pub mod cluster;
pub mod listen;
pub mod mail;
pub mod raw;
pub mod resolve;
pub mod xmpp;

pub use acme::{Acme, AcmeChallenge};
pub use cluster::Cluster;
pub use listen::{LISTENERS, Listen, ListenerKind};
pub use mail::Mail;
pub use raw::RawConfig;
pub use resolve::{
    Backup, BackupPlace, BackupTarget, Config, ConfigError, DurationError, Environment, Gateway,
    Grains, LogFormat, Packages, Snapshots, StorageBackend, TlsSource, parse_duration,
};

/// The full default configuration, commented. A test checks that it parses to
/// exactly the built-in defaults.
pub const DEFAULT_CONFIG_TOML: &str = include_str!("default.toml");
