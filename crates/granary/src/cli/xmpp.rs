//! `granary xmpp`: chat addresses and domains.

use clap::Subcommand;

use super::Output;

/// `granary xmpp`.
#[derive(Debug, Subcommand)]
pub(crate) enum XmppCommand {
    /// A user's chat address, sessions (one per device), contacts and stored messages
    Status {
        user: String,
        #[command(flatten)]
        output: Output,
    },
    /// Chat domains: Granary's own, and others users can have their address in
    #[command(subcommand)]
    Domain(XmppDomainCommand),
}

#[derive(Debug, Subcommand)]
pub(crate) enum XmppDomainCommand {
    /// Serve chat for DOMAIN too; with --user, move those users' addresses into it
    /// (their chat grains restart; Granary's own domain moves them back)
    Add {
        domain: String,
        /// A user whose chat address becomes USER@DOMAIN (repeat for more)
        #[arg(long = "user", value_name = "USER")]
        users: Vec<String>,
    },
    /// Every chat domain, its users, and the DNS records and certificate it needs
    List {
        #[command(flatten)]
        output: Output,
    },
}
