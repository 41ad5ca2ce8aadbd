//! The command line: one definition that clap turns into parsing, help, the
//! man pages and the shell completions.

mod certificates;
mod cluster;
mod invite;
mod mail;
mod tasks;
mod user;
mod xmpp;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

pub(crate) use certificates::{AuditArgs, CertificatesCommand};
pub(crate) use cluster::{ClusterCommand, NodeCommand};
pub(crate) use invite::InviteCommand;
pub(crate) use mail::{
    MailAliasCommand, MailCommand, MailDkimCommand, MailDomainCommand, MailSpoolCommand,
};
pub(crate) use tasks::{TasksClientCommand, TasksCommand};
pub(crate) use user::UserCommand;
pub(crate) use xmpp::{XmppCommand, XmppDomainCommand};

#[derive(Debug, Parser)]
#[command(
    name = "granary",
    version,
    about = "Self-hosted mail, calendars, chat, git, tasks and blogs, one isolated grain per user and service",
    long_about = "Granary runs each user's services (mail, CalDAV/CardDAV, XMPP, git, Taskwarrior \
sync, a static blog) as isolated grains behind one TLS gateway.\n\n\
Start the daemon with `granary serve` (or try it with `granary demo`); the other commands \
talk to the running daemon over its admin socket, DATA_DIR/run/admin.sock.",
    propagate_version = true
)]
pub(crate) struct Cli {
    /// Data directory [default: $GRANARY_HOME, the config's data_dir, or ./granary-data]
    #[arg(long, global = true, env = "GRANARY_HOME", value_name = "DIR")]
    pub(crate) home: Option<PathBuf>,

    /// Configuration file (TOML); `granary config default` prints a commented one
    #[arg(long, global = true, env = "GRANARY_CONFIG", value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,

    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Run the daemon in the foreground (stop it with SIGTERM or Ctrl-C)
    Serve,
    /// Run the daemon with the built-in apps and a demo user, and print how to connect
    Demo,
    /// Show whether the daemon is running and healthy
    #[command(after_help = "Exit status: 0 healthy, 1 unhealthy or error, 3 not running.")]
    Status {
        #[command(flatten)]
        output: Output,
    },
    /// Check this deployment as the world sees it: DNS records of every mail domain, listeners, certificate, clock, storage
    #[command(after_help = "Exit status: 0 when nothing failed (warnings allowed), 1 otherwise.")]
    Doctor {
        #[command(flatten)]
        output: Output,
    },
    /// Manage users
    #[command(subcommand)]
    User(UserCommand),
    /// Several nodes as one cluster on etcd: start one, issue join tokens
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// The cluster's members: join this node, list them, remove one
    #[command(subcommand)]
    Node(NodeCommand),
    /// Manage per-device passwords for protocol clients (IMAP, DAV, XMPP, git, ...)
    #[command(subcommand, name = "app-password")]
    AppPassword(AppPasswordCommand),
    /// Install, list and remove apps
    #[command(subcommand)]
    App(AppCommand),
    /// Inspect, start, stop and talk to grains (one per user per app)
    #[command(subcommand)]
    Grain(GrainCommand),
    /// Let one grain use a capability another grain provides
    #[command(subcommand)]
    Grant(GrantCommand),
    /// List, take, roll back to and prune a grain's snapshots (zfs, btrfs)
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Git repositories: create them, make them public or private
    #[command(subcommand)]
    Git(GitCommand),
    /// Users' SSH public keys, for git over SSH
    #[command(subcommand, name = "ssh-key")]
    SshKey(SshKeyCommand),
    /// Blogs: the domains a user's blog answers on besides USER.<domain>
    #[command(subcommand)]
    Blog(BlogCommand),
    /// Mail: domains, aliases, each user's mailboxes, the inbound spool
    #[command(subcommand)]
    Mail(MailCommand),
    /// Chat (XMPP): each user's chat account
    #[command(subcommand)]
    Xmpp(XmppCommand),
    /// Invite links: friends open one on their phone and the chat app makes their account
    #[command(subcommand)]
    Invite(InviteCommand),
    /// Tasks: Taskwarrior sync (client ids for Taskwarrior 3, certificates for 2.6)
    #[command(subcommand)]
    Tasks(TasksCommand),
    /// Certificates from an ACME CA (tls.acme): their state, and ordering one now
    #[command(subcommand)]
    Certificates(CertificatesCommand),
    /// The audit log, newest first: who did what to what, filtered
    Audit(certificates::AuditArgs),
    /// Encrypted backups: export, verify, drill, receive from other nodes
    #[command(subcommand)]
    Backup(BackupCommand),
    /// Restore a grain from a backup onto this node and start it
    Restore {
        /// A backup directory, or the name of a [[backup.targets]] entry
        #[arg(long, value_name = "DIR|TARGET")]
        from: String,
        /// The grain in the backup, USER/KIND
        #[arg(long)]
        grain: String,
        /// The age identity file whose public key backups are encrypted to
        #[arg(long, value_name = "FILE")]
        identity: std::path::PathBuf,
        /// Restore it as this user's grain instead (created if missing)
        #[arg(long = "as", value_name = "USER")]
        as_user: Option<String>,
        /// The snapshot to restore [default: the latest]
        #[arg(long)]
        snapshot: Option<String>,
        /// Also trust backups signed by this node key (64 hex digits)
        #[arg(long, value_name = "KEY")]
        trust: Vec<String>,
        #[command(flatten)]
        output: Output,
    },
    /// Build, sign, verify and inspect app packages (no daemon needed)
    #[command(subcommand)]
    Pack(PackCommand),
    /// Check or print configuration files
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Print a shell completion script to standard output
    Completions {
        /// The shell to complete for
        shell: clap_complete::Shell,
    },
    /// Write man pages for granary and every subcommand into a directory
    Man {
        /// Directory to write the pages into (created if missing)
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

#[derive(Debug, Args, Clone, Copy)]
pub(crate) struct Output {
    /// Print JSON instead of a table
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Debug, Subcommand)]
pub(crate) enum AppPasswordCommand {
    /// Issue a new app password for one grain kind; it is shown once
    Add {
        user: String,
        /// The grain kind it is valid for: mail, dav, xmpp, git, tasks, ...
        #[arg(long, value_name = "KIND")]
        kind: String,
        /// A name for the device or client, e.g. "laptop thunderbird"
        #[arg(long, default_value = "")]
        label: String,
        #[command(flatten)]
        output: Output,
    },
    /// List a user's app passwords (never the passwords themselves)
    List {
        user: String,
        /// Only those of this grain kind
        #[arg(long, value_name = "KIND")]
        kind: Option<String>,
        #[command(flatten)]
        output: Output,
    },
    /// Revoke one app password by id, or all of a kind
    #[command(group(clap::ArgGroup::new("which").required(true).args(["id", "kind"])))]
    Revoke {
        user: String,
        /// The id shown by `granary app-password list`
        #[arg(long)]
        id: Option<i64>,
        /// Revoke every app password of this grain kind
        #[arg(long, value_name = "KIND")]
        kind: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum AppCommand {
    /// Install a signed package, or an unsigned app directory in development mode
    Install {
        /// A package (`granary pack build`), or a directory with
        /// granary-app.toml and image/ (unsigned, development mode)
        path: PathBuf,
        /// Let this app take over a kind another signer's app provides
        #[arg(long)]
        replace: bool,
        #[command(flatten)]
        output: Output,
    },
    /// Upgrade an installed app to a newer package by the same signer; rolls back if it fails to start
    Upgrade {
        /// The package file
        file: PathBuf,
    },
    /// List installed apps
    List {
        #[command(flatten)]
        output: Output,
    },
    /// Remove an app; refused while its grains hold data
    Remove {
        kind: String,
        /// Also stop and destroy every grain of this app and its data
        #[arg(long)]
        purge: bool,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum GrainCommand {
    /// List every grain with its state
    List {
        #[command(flatten)]
        output: Output,
    },
    /// Start a grain (also clears a crash-loop hold)
    Start {
        /// USER/KIND, e.g. alice/git, or the grain id
        grain: String,
    },
    /// Stop a grain gracefully
    Stop {
        /// USER/KIND or the grain id
        grain: String,
    },
    /// Set a grain's dataset quota (zfs, btrfs): 2G, 512M, none, or default
    Quota {
        /// USER/KIND or the grain id
        grain: String,
        /// A size with K, M, G or T (powers of 1024), "none", or "default"
        /// (storage.quota_mib)
        size: String,
    },
    /// Show one grain's state, restarts, wake locks and connections
    Status {
        /// USER/KIND or the grain id
        grain: String,
        #[command(flatten)]
        output: Output,
    },
    /// Print the end of a grain's captured output
    Logs {
        /// USER/KIND or the grain id
        grain: String,
        /// How much of the end to show
        #[arg(long, default_value_t = 64 * 1024, value_name = "BYTES")]
        bytes: u64,
    },
    /// Connect standard input and output to one of a grain's services
    Connect {
        /// USER/KIND or the grain id
        grain: String,
        /// The service, as the app's manifest names it
        service: String,
        /// Connect as this user [default: the grain's owner]
        #[arg(long, value_name = "USER")]
        user: Option<String>,
    },
    /// Move a grain this node runs, with its data, to another cluster node
    ///
    /// Copied while it runs, then stopped for the last changes only; its
    /// placement switches with a new epoch and this node's copy is kept
    /// aside, never started again. Progress goes to standard error.
    Move {
        /// USER/KIND or the grain id
        grain: String,
        /// The node to move it to
        #[arg(long, value_name = "NODE")]
        to: String,
        #[command(flatten)]
        output: Output,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum SnapshotCommand {
    /// List a grain's snapshots, oldest first
    List {
        /// USER/KIND or the grain id
        grain: String,
        #[command(flatten)]
        output: Output,
    },
    /// Take a consistent snapshot now (checkpoint, freeze, snapshot, thaw)
    Create {
        /// USER/KIND or the grain id
        grain: String,
        /// A name for it [default: manual-UNIX_TIME]
        #[arg(long)]
        label: Option<String>,
    },
    /// Stop the grain, roll its data back to a snapshot, start it again
    Rollback {
        /// USER/KIND or the grain id
        grain: String,
        /// The snapshot's name, as `granary snapshot list` shows it
        snapshot: String,
    },
    /// Delete the automatic snapshots the retention grid does not keep
    Prune {
        /// USER/KIND or the grain id
        grain: String,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum BlogCommand {
    /// A user's custom domains (add, remove, list)
    #[command(subcommand)]
    Domain(BlogDomainCommand),
}

#[derive(Debug, Subcommand)]
pub(crate) enum BlogDomainCommand {
    /// Serve USER's blog on DOMAIN too; its certificate goes in
    /// DATA_DIR/tls/domains/DOMAIN/cert.pem and key.pem
    Add { user: String, domain: String },
    /// Stop serving USER's blog on DOMAIN
    Remove { user: String, domain: String },
    /// USER's blog domains
    List { user: String },
}

#[derive(Debug, Subcommand)]
pub(crate) enum SshKeyCommand {
    /// Add a public key (an OpenSSH .pub file, or - for standard input)
    Add {
        user: String,
        /// The public key file [default: standard input]
        file: Option<std::path::PathBuf>,
        /// A name for it [default: the key's comment]
        #[arg(long)]
        label: Option<String>,
    },
    /// List a user's keys
    List {
        user: String,
        #[command(flatten)]
        output: Output,
    },
    /// Remove a key by the id `list` shows
    Remove { user: String, id: i64 },
}

#[derive(Debug, Subcommand)]
pub(crate) enum GitCommand {
    /// Create an empty repository in USER's git grain (a push creates one
    /// too)
    Create {
        user: String,
        /// The repository's name, with or without .git
        repo: String,
        /// Make it public at once
        #[arg(long)]
        public: bool,
    },
    /// Make a repository public (anyone may clone; only its owner pushes)
    /// or private again
    Visibility {
        user: String,
        repo: String,
        #[arg(value_parser = ["public", "private"])]
        visibility: String,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum BackupCommand {
    /// Export grains to a directory or a configured target: a consistent
    /// snapshot each, incremental from the last export there, encrypted,
    /// chunked and signed; resumes an export that was cut off
    Export {
        /// A directory (removable media, a mount)
        #[arg(long, value_name = "DIR", conflicts_with = "target")]
        to: Option<std::path::PathBuf>,
        /// A [[backup.targets]] entry of the config
        #[arg(long, value_name = "NAME")]
        target: Option<String>,
        /// Only this user's grains
        #[arg(long, conflicts_with = "grain")]
        user: Option<String>,
        /// Only this grain (USER/KIND)
        #[arg(long)]
        grain: Option<String>,
        #[command(flatten)]
        output: Output,
    },
    /// Check a backup's signature and every chunk's hash (no secret key,
    /// no daemon needed)
    Verify {
        /// The backup directory, or a configured target's name
        #[arg(value_name = "DIR|TARGET")]
        place: String,
        #[command(flatten)]
        output: Output,
    },
    /// Restore every grain of a backup (or one) into scratch space, compare
    /// the files with what was exported, and remove them
    Drill {
        /// A backup directory, or the name of a [[backup.targets]] entry
        #[arg(long, value_name = "DIR|TARGET")]
        from: String,
        /// The age identity file whose public key backups are encrypted to
        #[arg(long, value_name = "FILE")]
        identity: std::path::PathBuf,
        /// Only this grain (USER/KIND)
        #[arg(long)]
        grain: Option<String>,
        /// Also trust backups signed by this node key (64 hex digits)
        #[arg(long, value_name = "KEY")]
        trust: Vec<String>,
        #[command(flatten)]
        output: Output,
    },
    /// Make an age identity for backups: the secret goes to FILE (keep it
    /// off this host), the public key to put in backup.recipients is printed
    Keygen {
        #[arg(long, value_name = "FILE")]
        out: std::path::PathBuf,
    },
    /// Print this node's key: what a receiving node allows and what another
    /// node passes to --trust to restore this node's backups
    Key,
    /// Receive other nodes' backups over TLS (runs in the foreground)
    Receive {
        /// Address to listen on, e.g. 0.0.0.0:7443 (port 0 picks one)
        #[arg(long, value_name = "ADDR")]
        listen: String,
        /// Where to keep them (one directory per sending node)
        #[arg(long, value_name = "DIR")]
        dir: std::path::PathBuf,
        /// A sending node's key (`granary backup key` there); repeat for more
        #[arg(long, value_name = "KEY", required = true)]
        allow: Vec<String>,
        /// Largest file accepted, in MiB
        #[arg(long, default_value_t = 1100)]
        max_file_mib: u64,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum GrantCommand {
    /// Grant grain FROM the capability CAP provided by grain TO
    Add {
        /// The grain that will use the capability (USER/KIND)
        #[arg(long, value_name = "GRAIN")]
        from: String,
        /// The grain that provides it (USER/KIND)
        #[arg(long, value_name = "GRAIN")]
        to: String,
        /// <interface>[:<argument>], e.g. git.read:site
        #[arg(long, value_name = "CAP")]
        cap: String,
        #[command(flatten)]
        output: Output,
    },
    /// List live grants
    List {
        #[command(flatten)]
        output: Output,
    },
    /// Revoke a grant: live capabilities are cut at once, tokens stop working
    Revoke {
        /// The id shown by `granary grant list`
        id: i64,
    },
}

#[derive(Debug, Args, Clone)]
pub(crate) struct KeyArg {
    /// The signing key [default: $GRANARY_PACK_KEY, else ~/.config/granary/pack.key]
    #[arg(long, env = "GRANARY_PACK_KEY", value_name = "FILE")]
    pub(crate) key: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum PackCommand {
    /// Make an Ed25519 signing key (owner-only); the app id derives from it
    Keygen {
        #[command(flatten)]
        key: KeyArg,
    },
    /// Write a commented package definition into a directory
    Init {
        /// Where to write granary-package.toml
        dir: PathBuf,
    },
    /// Build and sign a package from a definition
    Build {
        /// The package definition (TOML)
        definition: PathBuf,
        /// The package file to write
        #[arg(short, long, value_name = "FILE")]
        out: PathBuf,
        /// Carry an image for this architecture (x86_64, aarch64); repeat
        /// for one image each. `{arch}` in the definition's host paths names
        /// it; another architecture's programs must be static. Without it:
        /// one image, for this host
        #[arg(long = "target", value_name = "ARCH")]
        targets: Vec<String>,
        #[command(flatten)]
        key: KeyArg,
        #[command(flatten)]
        output: Output,
    },
    /// Check a package's signature and contents; exits 0 only if it would install
    Verify { file: PathBuf },
    /// Show a package's manifest, files, sizes, signer and app id
    Inspect {
        file: PathBuf,
        #[command(flatten)]
        output: Output,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum ConfigCommand {
    /// Check a configuration file and print the settings it resolves to
    Check { file: PathBuf },
    /// Print the full default configuration, commented
    Default,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_command_has_help() {
        fn walk(cmd: &clap::Command, path: &str) {
            for sub in cmd.get_subcommands() {
                let path = format!("{path} {}", sub.get_name());
                assert!(sub.get_about().is_some(), "`{path}` has no help text");
                walk(sub, &path);
            }
        }
        walk(&Cli::command(), "granary");
    }
}
