//! `granary mail`: the command line of the mail concern.

use clap::Subcommand;

use super::Output;

#[derive(Debug, Subcommand)]
pub(crate) enum MailCommand {
    /// The domains this host receives mail for (every user gets USER@DOMAIN)
    #[command(subcommand)]
    Domain(MailDomainCommand),
    /// Extra addresses that deliver to a user
    #[command(subcommand)]
    Alias(MailAliasCommand),
    /// Send mail to unknown addresses of DOMAIN to USER (or, with --none, refuse it again)
    CatchAll {
        domain: String,
        /// Who gets it
        #[arg(required_unless_present = "none")]
        user: Option<String>,
        /// Refuse mail to unknown addresses again (550 at RCPT)
        #[arg(long, conflicts_with = "user")]
        none: bool,
    },
    /// A user's addresses, mailboxes, sizes and last delivery
    Status {
        user: String,
        #[command(flatten)]
        output: Output,
    },
    /// The inbound spool: mail accepted by the MX and not yet in every recipient's grain
    #[command(subcommand)]
    Spool(MailSpoolCommand),
}

#[derive(Debug, Subcommand)]
pub(crate) enum MailDomainCommand {
    /// Receive mail for DOMAIN (its MX record must point here)
    Add {
        domain: String,
        #[command(flatten)]
        output: Output,
    },
    /// Stop receiving mail for DOMAIN; its aliases are removed
    Remove { domain: String },
    /// Every mail domain, with its catch-all and alias count
    List {
        #[command(flatten)]
        output: Output,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum MailAliasCommand {
    /// Deliver mail to ADDRESS (local@domain) to USER
    Add {
        address: String,
        user: String,
        #[command(flatten)]
        output: Output,
    },
    /// Stop delivering mail to ADDRESS
    Remove { address: String },
    /// Aliases of USER (every alias without one)
    List {
        user: Option<String>,
        #[command(flatten)]
        output: Output,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum MailSpoolCommand {
    /// Every spooled message, oldest first, with who still waits for it and why
    List {
        #[command(flatten)]
        output: Output,
    },
    /// Try delivering ID now (every spooled message without one)
    Retry { id: Option<String> },
    /// Remove message ID from the spool without delivering it further
    Delete { id: String },
}
