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
    /// The outbound queue: mail users sent to other domains, not yet delivered
    #[command(subcommand)]
    Queue(MailSpoolCommand),
    /// A mail domain's DKIM keys: list, rotate, retire
    #[command(subcommand)]
    Dkim(MailDkimCommand),
    /// Every DNS record DOMAIN needs (MX, SPF, DKIM, DMARC, MTA-STS, TLS-RPT, SRV), as zone-file lines
    Dns {
        domain: String,
        #[command(flatten)]
        output: Output,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum MailDkimCommand {
    /// DOMAIN's selectors, newest first, and which sign
    List {
        domain: String,
        #[command(flatten)]
        output: Output,
    },
    /// Make a new Ed25519 and RSA-2048 pair; it signs once activated (publish it first: granary mail dns)
    Rotate {
        domain: String,
        #[command(flatten)]
        output: Output,
    },
    /// Let DOMAIN's new keys sign, once DNS has their records
    Activate {
        domain: String,
        /// Activate even though DNS does not show the records yet
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        output: Output,
    },
    /// Remove SELECTOR, which no longer signs (then remove its DNS record)
    Retire { domain: String, selector: String },
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
    /// Every message, oldest first, with who still waits for it and why
    List {
        #[command(flatten)]
        output: Output,
    },
    /// Try delivering ID now (every message without one)
    Retry { id: Option<String> },
    /// Remove message ID without delivering it further
    Delete { id: String },
    /// Keep message ID from being delivered until released (survives restarts)
    Hold { id: String },
    /// Deliver a held message ID again
    Release { id: String },
}
