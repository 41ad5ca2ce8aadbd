//! The mail grain: one user's mail.
//!
//! - `mail.deliver` ([`deliver`]): the host's MX hands over each message
//!   for this user; it is stored (file and index fsynced) before the call
//!   resolves, into INBOX or, when the user's junk filter says so, Junk.
//! - `imap` ([`imap`]): the user's mail clients, handed over by the
//!   gateway after it checked their app password.
//! - The store ([`store`]) lives in the grain's dataset at `/var/mail`.

pub mod deliver;
pub mod imap;
pub mod junk;
pub mod mime;
pub mod store;
