//! What the gateway reads from clients before it knows where a request or
//! connection goes: pure functions over bytes, no I/O, each fuzzed
//! (`fuzz/fuzz_targets/`).
//!
//! - [`http`]: the host a request names, the entry of a service table it
//!   matches and whose grain that is, git repository paths, HTTP Basic
//!   credentials (`http_route`).
//! - [`ssh`]: the git command an SSH client asks for, OpenSSH public key
//!   lines with their fingerprints (`ssh_command`, `ssh_public_key`).
//! - [`imap`]: IMAP before login: LOGIN and AUTHENTICATE PLAIN with
//!   literals and SASL-IR, and the capabilities a grain's greeting offers
//!   (`imap_pre_login`).
//! - [`smtp`]: the MX's SMTP session, from greeting to the end of each
//!   message's data (`smtp_session`).
//! - [`scram`]: SCRAM-SHA-1 and SCRAM-SHA-256 for the XMPP logins to
//!   come: verifiers, the client's messages, the proof (`scram_client`).
//! - [`xmpp`]: an XMPP client's stream before login: the header,
//!   STARTTLS and the SASL elements (`xmpp_pre_auth`).
//! - [`stanza`]: an XMPP stream after login, cut into whole stanzas read
//!   into element trees, and elements written back (`xmpp_stanza`).

pub mod form;
pub mod http;
pub mod imap;
pub mod jid;
pub mod mta_sts;
pub mod s2s;
pub mod scram;
pub mod smtp;
pub mod ssh;
pub mod stanza;
pub mod taskd;
pub mod x509;
pub mod xmpp;
