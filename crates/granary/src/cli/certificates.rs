//! `granary certificates` (certificates from an ACME CA) and `granary
//! audit`.

use clap::{Args, Subcommand};

use super::Output;

/// `granary certificates`.
#[derive(Debug, Subcommand)]
pub(crate) enum CertificatesCommand {
    /// The ACME certificate: its names, expiry, next renewal and last error
    Status {
        #[command(flatten)]
        output: Output,
    },
    /// Order a new certificate now and wait for the outcome (however fresh
    /// the current one is, and whatever the backoff after failures)
    #[command(
        after_help = "Exit status: 0 issued, 1 the order failed (the current certificate stays in service)."
    )]
    Renew,
}

/// `granary audit`.
#[derive(Debug, Args)]
pub(crate) struct AuditArgs {
    /// Only this actor: admin (the CLI), daemon, web:USER (the web home)
    #[arg(long)]
    pub(crate) actor: Option<String>,
    /// Only this action, or the actions of a group (user matches user.add)
    #[arg(long)]
    pub(crate) action: Option<String>,
    /// Only subjects containing this
    #[arg(long)]
    pub(crate) subject: Option<String>,
    /// At most this many events (up to 1000)
    #[arg(long, default_value_t = 50)]
    pub(crate) limit: u32,
    /// Only events older than this id (the next page)
    #[arg(long, value_name = "ID")]
    pub(crate) before: Option<i64>,
    #[command(flatten)]
    pub(crate) output: Output,
}
