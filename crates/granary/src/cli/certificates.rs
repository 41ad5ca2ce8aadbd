//! `granary certificates`: certificates from an ACME CA.

use clap::Subcommand;

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
