//! `granary tasks`: the command line of Taskwarrior sync.

use std::path::PathBuf;

use clap::Subcommand;

use super::Output;

/// `granary tasks`.
#[derive(Debug, Subcommand)]
pub(crate) enum TasksCommand {
    /// Taskwarrior 3 (TaskChampion sync): client ids, one per task list
    #[command(subcommand)]
    Client(TasksClientCommand),
    /// Taskwarrior 2.6 (taskd): issue a client certificate for USER and write it,
    /// its key, the CA and the .taskrc lines into DIR
    Cert {
        user: String,
        /// Where to write USER.key.pem, USER.cert.pem, ca.cert.pem and taskrc
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// What the certificate is for ("laptop")
        #[arg(long, default_value = "")]
        label: String,
    },
    /// The taskd certificates issued (one user's, or everyone's)
    Certs {
        user: Option<String>,
        #[command(flatten)]
        output: Output,
    },
    /// Refuse one of USER's taskd certificates from now on
    RevokeCert { user: String, id: i64 },
}

#[derive(Debug, Subcommand)]
pub(crate) enum TasksClientCommand {
    /// Make a client id for USER and print the client's sync settings (shown once)
    Add {
        user: String,
        /// What it is for ("phone and laptop")
        #[arg(long, default_value = "")]
        label: String,
    },
    /// The client ids made (one user's, or everyone's); never the ids themselves
    List {
        user: Option<String>,
        #[command(flatten)]
        output: Output,
    },
    /// Refuse one of USER's client ids from now on
    Revoke { user: String, id: i64 },
}
