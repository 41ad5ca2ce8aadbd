//! The chat grain: one user's XMPP account.
//!
//! - `xmpp` ([`session`]): the user's clients, handed over by the gateway
//!   after SASL; each connection is one resource (several at once), from
//!   the post-login stream restart on.
//! - `xmpp.deliver` ([`server::Deliver`]): stanzas from other users'
//!   grains, which the host routes here with the sender's address written
//!   by the host. Only the host may obtain it.
//! - `xmpp.route`, obtained from the host at start: where stanzas for
//!   other users go.
//! - The account ([`store`]): roster, pending subscription requests,
//!   offline messages, the message archive, vCard, PEP items and the block
//!   list, in SQLite at `/var/xmpp`.
//!
//! What is advertised is what is implemented: RFC 6120 and RFC 6121
//! (binding several resources, roster versioning, the subscription state
//! machine, presence broadcast and directed presence, offline messages),
//! XEP-0030, 0115 (the server's caps), 0199, 0280, 0313 with 0059, 0359,
//! 0198 with resumption, 0352, 0054, 0163 with 0084 and 0402, 0191, 0357
//! (push, to the app servers the admin names), 0363 (HTTP upload: the
//! grain's `http` service, at `upload.<domain>` through the gateway).
//!
//! The same binary run as `granary-xmpp room` is a group chat's grain
//! ([`room`]): one room, `name@rooms.<domain>`, with its own dataset.

pub mod account;
pub use granary_wire::jid;
pub mod mam;
pub mod ns;
pub mod pep;
pub mod presence;
pub mod push;
pub mod room;
pub mod server;
pub mod session;
pub mod store;
pub mod upload;

pub use granary_wire::stanza::{Element, Node};

#[cfg(test)]
mod tests;
