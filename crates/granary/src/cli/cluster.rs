//! `granary cluster` and `granary node`: several nodes as one Granary.
//! These talk to etcd directly (the `[cluster]` section of the config),
//! so they work before any daemon runs and whichever node is down.

use clap::Subcommand;

use super::Output;

/// `granary cluster`.
#[derive(Debug, Subcommand)]
pub(crate) enum ClusterCommand {
    /// Make the etcd named in [cluster] hold a new Granary cluster (once)
    Init,
    /// Print a single-use token another node joins with (`granary node join`)
    Token {
        /// How long the token may be used
        #[arg(long, default_value = "1h", value_parser = parse_ttl)]
        ttl: std::time::Duration,
    },
}

/// `granary node`.
#[derive(Debug, Subcommand)]
pub(crate) enum NodeCommand {
    /// Make this node a member, as [cluster] describes it; reads the join
    /// token from the first line of standard input
    Join,
    /// Every member: whether it is up, its lease, architectures, capacity and grains
    List {
        #[command(flatten)]
        output: Output,
    },
    /// Stop placing new grains on a node and move every grain it runs to
    /// the others, with their data; survives its restarts
    ///
    /// Each grain goes to the live, undrained node with the most room that
    /// runs its app, two at a time, as `granary grain move` moves one.
    /// Progress goes to standard error.
    Drain {
        name: String,
        /// Only stop placing new grains there; leave its grains running
        #[arg(long)]
        no_move: bool,
        #[command(flatten)]
        output: crate::cli::Output,
    },
    /// What this node held of grains other nodes took over while it was
    /// away: where its data of each is kept, and each file written here
    /// after the copy that was promoted (to recover by hand)
    Reconcile {
        #[command(flatten)]
        output: Output,
    },
    /// Let a drained node take new grains again
    Undrain { name: String },
    /// Remove a member whose daemon is stopped and that owns no grains
    Remove {
        name: String,
        /// Also drop the placement of the grains it still owns (their data
        /// stays on its disks; they start afresh elsewhere)
        #[arg(long)]
        force: bool,
    },
}

fn parse_ttl(text: &str) -> Result<std::time::Duration, String> {
    granary_config::parse_duration(text).map_err(|e| e.0)
}
