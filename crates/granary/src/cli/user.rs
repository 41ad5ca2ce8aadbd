//! `granary user`: accounts.

use clap::Subcommand;

use super::Output;

#[derive(Debug, Subcommand)]
pub(crate) enum UserCommand {
    /// Add a user; prints a generated password unless one is given on standard input
    Add {
        /// Lowercase letters, digits and '-', starting with a letter
        name: String,
        /// Read the password from the first line of standard input instead of generating one
        #[arg(long)]
        password_stdin: bool,
        #[command(flatten)]
        output: Output,
    },
    /// List users
    List {
        #[command(flatten)]
        output: Output,
    },
    /// Remove a user and their app passwords; refused while their grains hold data
    Remove {
        name: String,
        /// Also stop and destroy the user's grains and their data (after a
        /// final snapshot where the storage backend has snapshots)
        #[arg(long)]
        purge: bool,
    },
    /// Disable a user: none of their logins works, their running grains
    /// stop; their data, credentials and mail are kept
    Disable { name: String },
    /// Enable a disabled user again
    Enable { name: String },
    /// Set a new account password; prints a generated one unless one is given on standard input
    Passwd {
        name: String,
        /// Read the password from the first line of standard input instead of generating one
        #[arg(long)]
        password_stdin: bool,
    },
    /// Check a password read from standard input; exits 0 if it is valid, 1 if not
    CheckPassword {
        name: String,
        /// Also accept the user's app passwords of this grain kind
        #[arg(long, value_name = "KIND")]
        kind: Option<String>,
    },
}
