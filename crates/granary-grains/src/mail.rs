//! What the host's MX asks of a user's mail grain (`services.capnp`'s
//! `MailDelivery`, a server route): store this message, and how is the
//! mailbox.

use serde::{Deserialize, Serialize};

/// One message for one grain, read from the host's spool.
#[derive(Debug)]
pub struct MailDelivery {
    /// The spool entry's id. A grain that already stored a delivery with
    /// this id acknowledges it without storing it again.
    pub id: String,
    /// MAIL FROM; empty for a bounce.
    pub from: String,
    /// The recipients, as the sender wrote them, that belong to this
    /// grain's owner.
    pub to: Vec<String>,
    /// The message (RFC 5322), positioned at its first byte; read to its
    /// end.
    pub message: std::fs::File,
    /// Its length in bytes.
    pub size: u64,
}

/// A user's mail store, as `granary mail status` shows it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MailStatus {
    pub mailboxes: Vec<MailboxStatus>,
    /// Unix seconds of the newest delivery, if any.
    pub last_delivery: Option<i64>,
    pub deliveries: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MailboxStatus {
    pub name: String,
    /// `\Sent`, `\Junk`, ...; empty for none.
    pub special_use: String,
    pub messages: u32,
    pub unseen: u32,
    pub bytes: u64,
}

/// A user's chat account, as `granary xmpp status` shows it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct XmppStatus {
    /// One per session (detached stream-managed ones included).
    pub resources: Vec<String>,
    pub contacts: u64,
    pub archived: u64,
    pub offline: u64,
}

/// One stanza between a chat grain and another server (`xmpp-s2s`): the
/// addresses as the host has checked them (the local side always stamped
/// by the host), the stanza as XML in `jabber:client`.
#[derive(Debug, Clone)]
pub struct XmppStanza {
    pub from: String,
    pub to: String,
    pub stanza: String,
}
