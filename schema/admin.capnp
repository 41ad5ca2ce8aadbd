# The admin interface: what the `granary` CLI calls on the running daemon.
#
# Transport: one two-party Cap'n Proto RPC connection over the daemon's unix
# socket DATA_DIR/run/admin.sock. The socket is owner-only (mode 0600, in a
# 0700 directory), and the daemon also checks the peer's uid (SO_PEERCRED):
# only root and the daemon's own uid may connect. The bootstrap capability is
# an `Admin`.
#
# Errors: a failed call returns a Cap'n Proto exception whose description is a
# one-line message meant for the admin ("user alice already exists"). The CLI
# prints it as is and exits non-zero.
#
# Secrets: passwords cross this socket in clear (it never leaves the host);
# the daemon stores only argon2id hashes and never logs them. Generated
# passwords are returned once and cannot be retrieved again.

@0x977945cfdf9caa26;

using Stream = import "stream.capnp";
using Package = import "package.capnp";
using Services = import "services.capnp";

interface Admin {
  # The root: status, and one capability per concern. Calls on a
  # capability returned here are pipelined (`admin.users().add(...)` is one
  # round trip). Room for what comes next: mail, dav, xmpp, tasks, nodes,
  # each a method returning an interface of its own.

  status @0 () -> (status :Status);
  # Health, versions, counts and where things are.

  users @1 () -> (users :Users);
  apps @2 () -> (apps :Apps);
  grains @3 () -> (grains :Grains);
  grants @4 () -> (grants :Grants);
  snapshots @5 () -> (snapshots :Snapshots);
  backups @6 () -> (backups :Backups);
  git @7 () -> (git :Git);
  blog @8 () -> (blog :Blog);
  mail @9 () -> (mail :Mail);

  xmpp @11 () -> (xmpp :Xmpp);
  tasks @12 () -> (tasks :Tasks);
  invites @13 () -> (invites :Invites);
  certificates @14 () -> (certificates :Certificates);
  audit @15 (actor :Text, action :Text, subject :Text, before :Int64, limit :UInt32) -> (events :List(AuditEvent));
  # The audit log, newest first. Empty filters match everything; `action`
  # matches itself and the actions under it ("user" matches "user.add");
  # `subject` matches subjects containing it; `before` (an event id, 0 for
  # the newest) pages back; at most `limit` (1 to 1,000) events.

  doctor @10 () -> (checks :List(DoctorCheck));
  # Checks a deployment as the world sees it: every mail domain's DNS
  # records against live DNS (through the configured resolver), the
  # listeners, the certificate, the clock and the storage.
}

struct AuditEvent {
  id @0 :Int64;
  at @1 :Int64;        # Unix seconds.
  actor @2 :Text;      # "admin" (the CLI), "daemon", "web:alice", ...
  action @3 :Text;     # "user.add", "grant.revoke", ...
  subject @4 :Text;
  detail @5 :Text;     # Never a secret.
}

struct DoctorCheck {
  area @0 :Text;
  # dns, listeners, certificate, clock, storage.
  name @1 :Text;
  # What was checked, e.g. "DKIM ed-2026…._domainkey.example.org TXT".
  level @2 :Text;
  # ok, warn or fail.
  detail @3 :Text;
  fix @4 :Text;
  # What to do about it (empty when ok).
}

interface Users {
  # Accounts and their credentials: account passwords, per-device app
  # passwords, SSH keys.

  add @0 (name :Text, password :Text) -> (user :User, generatedPassword :Text);
  # Creates a user. An empty `password` asks the daemon to generate one,
  # which it returns in `generatedPassword` (empty otherwise). The name must
  # be a valid, unreserved user name; the password at least 12 characters.

  list @1 () -> (users :List(User));
  # All users, sorted by name.

  remove @2 (name :Text, purge :Bool) -> ();
  # Removes a user and their app passwords. Refused while any of their
  # grains holds data, unless `purge`: then each grain is stopped, a final
  # snapshot taken where the storage backend has snapshots, and its dataset
  # and record destroyed.

  setPassword @3 (name :Text, password :Text) -> (generatedPassword :Text);
  # Replaces a user's account password; empty `password` generates one.

  checkPassword @4 (name :Text, kind :Text, password :Text) -> (valid :Bool);
  # Would this login succeed? With an empty `kind`, checks the account
  # password; with a grain kind, also that kind's app passwords (what a
  # protocol client of that kind may log in with). Unknown users are simply
  # not valid.

  addAppPassword @5 (user :Text, kind :Text, label :Text) -> (appPassword :AppPassword, password :Text);
  # Issues a per-device password valid for one grain kind only. `password`
  # is shown once; only its hash is kept.

  listAppPasswords @6 (user :Text, kind :Text) -> (appPasswords :List(AppPassword));
  # A user's app passwords (never the secrets); `kind` filters when not empty.

  revokeAppPasswords @7 (user :Text, selector :RevokeSelector) -> (revoked :UInt32);
  # Revokes one app password by id (an error if the user has none with that
  # id), or all of one kind.

  addSshKey @8 (user :Text, key :Text, label :Text) -> (key :SshKey);
  # An OpenSSH public key line for git over SSH; a key belongs to one user.

  listSshKeys @9 (user :Text) -> (keys :List(SshKey));

  removeSshKey @10 (user :Text, id :Int64) -> (removed :Bool);

  setDisabled @11 (name :Text, disabled :Bool) -> (changed :Bool, stoppedGrains :UInt32);
  # Disables a user (or enables them again). While disabled, none of their
  # logins checks out: app passwords, SSH keys, Taskwarrior devices, the
  # web home (whose sessions end), and their invites are not valid. Their
  # running grains are stopped, on whichever node runs them, which ends
  # their open sessions. Their data, credentials and published pages are kept, and
  # mail to them is still accepted. `changed` is false when they already
  # were so.
}

interface Apps {
  install @0 (path :Text, replace :Bool) -> (app :App, grainsCreated :UInt32);
  # Installs a signed package file (`granary pack build`), or an unsigned
  # app directory (`granary-app.toml` and `image/`) in development mode.
  # A package's signature is verified first; its image is unpacked into
  # the content-addressed DATA_DIR/apps/KIND/SHA256. A grain record is
  # created for every user. Another app id (another signer) claiming an
  # installed kind is refused unless `replace`. The kind's running grains
  # are stopped when their image changes; they start again on next use.

  list @1 () -> (apps :List(App));

  remove @2 (kind :Text, purge :Bool) -> ();
  # Refused while its grains hold data, unless `purge` (as Users.remove).

  upgrade @3 (path :Text) -> (app :App, previousVersion :Text, restarted :UInt32, rolledBack :Bool, error :Text);
  # Installs a newer version (by the same signer) of an installed app from
  # a package file: stops the kind's running grains, points them at the new
  # image and starts them again. If one fails to start, everything goes
  # back to the previous version (`rolledBack`, with the failure in
  # `error`) and those grains are started on it.
}

interface Grains {
  # `grain` is `user/kind` or the grain id.

  list @0 () -> (grains :List(GrainStatus));

  start @1 (grain :Text) -> (status :GrainStatus);
  # Also clears a crash-loop hold.

  stop @2 (grain :Text) -> (wasRunning :Bool);
  # Graceful: the grain's shutdown call, SIGTERM, then SIGKILL.

  status @3 (grain :Text) -> (status :GrainStatus);

  logs @4 (grain :Text, maxBytes :UInt64) -> (log :Data);
  # The end of the grain's captured stdout and stderr.

  connect @5 (grain :Text, service :Text, user :Text, client :Stream.ByteStream) -> (upstream :Stream.ByteStream);
  # A connection to one of the grain's services as `user` (the grain's
  # owner when empty), authenticated as the admin (a development and
  # diagnostics tool: the CLI's stdin and stdout become the client). The
  # daemon writes the grain's bytes to `client`; the CLI writes its bytes
  # to `upstream` and ends it when its input ends.

  move @6 (grain :Text, to :Text, progress :Progress) -> (reportJson :Text);
  # Moves a grain this node runs to cluster node `to` with its data: a
  # pre-copy while it runs, then stopped, a final delta, the placement
  # switched with a new epoch, this node's copy fenced and the grain
  # started there. `reportJson` says what it took (bytes, downtime). A
  # grain another node runs is moved by that node, asked over the link.

  drain @7 (node :Text, progress :Progress) -> (reportJson :Text);
  # Marks node `node` drained and moves every grain it runs, each to the
  # live, undrained node with the most room that runs its app (asked of
  # that node over the link when it is not this one). `reportJson`: a
  # JSON array, one entry per grain, with its move report or its error.

  setQuota @8 (grain :Text, bytes :UInt64, unlimited :Bool) -> ();
  # The grain's dataset quota: `bytes`, none with `unlimited`, or back to
  # storage.quota_mib when both are unset. Kept with the grain (every
  # node applies it to any dataset of the grain it makes: starts,
  # rollbacks, moves, failovers, restores) and applied at once to its
  # dataset on this node; a limit below what the data takes is refused
  # there. Refused on plain storage, which has no quotas.
}

interface Grants {
  add @0 (from :Text, to :Text, capability :Text) -> (grant :Grant);
  # Lets grain `from` use `capability` (`<interface>[:<argument>]`) provided
  # by grain `to`. Both must belong to the same user, and `to`'s app must
  # offer the interface.

  list @1 () -> (grants :List(Grant));

  revoke @2 (id :Int64) -> ();
  # Cuts every live capability of the grant at once and invalidates its
  # sturdy tokens.
}

interface Snapshots {
  list @0 (grain :Text) -> (snapshots :List(Snapshot));

  create @1 (grain :Text, label :Text) -> (name :Text, report :Text, frozenMicros :UInt64);
  # A consistent snapshot: a running grain checkpoints (its
  # `prepareSnapshot`), is frozen, snapshotted and thawed. A grain that
  # never ran gets an empty dataset first. `label` empty makes
  # `manual-<unix time>`; manual snapshots are never pruned.

  rollback @2 (grain :Text, name :Text) -> (restarted :Bool);
  # Stops the grain, rolls its dataset back, starts it again if it ran.

  prune @3 (grain :Text) -> (deleted :List(Text));
  # Applies the retention grid now.
}

interface Backups {
  export @0 (dir :Text, target :Text, user :Text, grain :Text, progress :Progress) -> (reportJson :Text);
  # Exports grains (one, a user's, or all when both are empty) to directory
  # `dir` or the configured target named `target`: a consistent snapshot of
  # each, streamed incrementally from the target's last one, encrypted to
  # `backup.recipients`, chunked and signed. Resumes a cut-off export.
  # `reportJson` is a JSON array of per-stream reports.

  restore @1 (from :Text, grain :Text, identity :Data, as :Text, snapshot :Text, trust :List(Text), drill :Bool, progress :Progress) -> (reportJson :Text);
  # Restores `grain` (`user/kind`) from directory or target `from` with the
  # admin's age identity (held in memory for this call only), as user `as`
  # if given, at `snapshot` (else the latest), then starts it. With
  # `drill`, restores every grain (or `grain`) into scratch datasets,
  # compares the files with the export's digests and removes them.

  keys @2 () -> (nodeKey :Text, recipients :List(Text), targets :List(Text));
  # This node's public key (what a receiver allows and a restore trusts),
  # the configured recipients and targets.
}

interface Git {
  repo @0 (user :Text, repo :Text, create :Bool, visibility :Text) -> (public :Bool, created :Bool);
  # With `create`, makes an empty repository in the user's git grain
  # (started if needed; `created` is false when it existed). `visibility`
  # "public" (anyone may clone; only the owner pushes) or "private" sets it;
  # empty leaves it. Answers the visibility after.
}

interface Blog {
  domains @0 (user :Text, add :Text, remove :Text) -> (domains :List(Text));
  # Registers `add` and/or unregisters `remove` (either may be empty) as a
  # domain of the user's blog; answers the user's domains after. Its
  # certificate: DATA_DIR/tls/domains/<domain>/cert.pem and key.pem.
}

interface Progress {
  # Where a long operation reports; called at most a few times a second.
  update @0 (json :Text) -> ();
}

struct SshKey {
  id @0 :Int64;
  user @1 :Text;
  key @2 :Text;             # "type base64", without the comment.
  fingerprint @3 :Text;     # SHA256:...
  label @4 :Text;
  createdAt @5 :Int64;      # Unix seconds.
  lastUsedAt @6 :Int64;     # Unix seconds; 0 when never used.
}

struct Snapshot {
  name @0 :Text;
  createdAt @1 :Int64;   # Unix seconds.
}

struct App {
  kind @0 :Text;
  appId @1 :Text;
  version @2 :Text;
  devMode @3 :Bool;         # Installed unsigned from a directory.
  installedAt @4 :Int64;    # Unix seconds.
  services @5 :List(Text);
  offers @6 :List(Text);
  manifest @7 :Package.Manifest;
}

struct GrainStatus {
  id @0 :Text;
  user @1 :Text;
  kind @2 :Text;
  hostUid @3 :UInt32;
  state @4 :Text;           # stopped, starting, running, stopping, backoff, held
  reason @5 :Text;          # Why it is held or backing off; empty otherwise.
  pid @6 :UInt32;           # The launcher's pid while running, else 0.
  starts @7 :UInt64;        # Since the daemon started.
  crashes @8 :UInt64;
  lastExit @9 :Text;
  runningSeconds @10 :UInt64;
  connections @11 :UInt32;
  callsInFlight @12 :UInt32;
  wakeLocks @13 :List(Text); # The reasons the grain gave.
  oomKills @14 :UInt64;      # Times a process in it was killed at its memory limit.
  memoryLimit @15 :UInt64;   # Bytes; 0 when it has none.
  datasetBytes @16 :UInt64;  # What its dataset uses, where the storage says (ZFS); 0 otherwise.
  quotaBytes @17 :UInt64;    # Its dataset's quota there; 0: none or unknown.
}

struct Grant {
  id @0 :Int64;
  from @1 :Text;
  to @2 :Text;
  capability @3 :Text;
  createdAt @4 :Int64;
}

struct RevokeSelector {
  union {
    id @0 :Int64;
    kind @1 :Text;
  }
}

struct User {
  name @0 :Text;
  createdAt @1 :Int64;      # Unix seconds.
  appPasswords @2 :UInt32;  # How many app passwords the user has.
  disabledAt @3 :Int64;     # Unix seconds when disabled; 0 while enabled.
}

struct AppPassword {
  id @0 :Int64;
  user @1 :Text;
  kind @2 :Text;
  label @3 :Text;
  createdAt @4 :Int64;      # Unix seconds.
  lastUsedAt @5 :Int64;     # Unix seconds; 0 when never used.
}

struct Status {
  healthy @0 :Bool;
  version @1 :Text;          # Granary's version.
  schemaVersion @2 :UInt32;  # The state database's schema version.
  pid @3 :UInt32;
  uptimeSeconds @4 :UInt64;
  dataDir @5 :Text;
  domain @6 :Text;
  storageBackend @7 :Text;   # "plain", later "zfs" or "btrfs".
  caFile @8 :Text;           # The local CA's certificate; empty with admin-provided TLS files.
  listeners @9 :List(Listener);
  users @10 :UInt64;
  appPasswords @11 :UInt64;
  apps @12 :UInt64;
  grains @13 :UInt64;
  grants @14 :UInt64;
  sandbox @15 :Text;         # How grains are isolated on this host, e.g.
                             # "linux namespaces, seccomp, cgroup v1; grain uids 1500000000+1000000".
  loginSources @16 :UInt64;  # Addresses and ranges with failed logins remembered.
  refusedSources @17 :List(RefusedSource);
  # Addresses and ranges whose logins are refused unchecked now (too many
  # failures; each refusal within a day doubles the next, up to a day):
  # the 100 refused longest.
  refusedCount @18 :UInt64;  # All of them.
  cluster @19 :ClusterNode;  # This node's place in a cluster; unset without [cluster].
}

struct ClusterNode {
  node @0 :Text;             # This node's name.
  lease @1 :Text;            # "live", "lapsing" (not renewed for TTL/2: not to be trusted) or "lost".
  leaseTtlSecs @2 :UInt32;
  sinceRenewalMs @3 :UInt64; # Since the last renewal etcd confirmed.
  etcd @4 :List(Text);       # The etcd members this node talks to.
  replicateIntervalSecs @5 :UInt32;
  replicationLagging @6 :List(Text);
  # Grains this node runs whose newest copy on another node is more than 3
  # replication intervals old, as "alice-mail 250s": an alert (unhealthy).
  nodes @7 :List(NodeHealth);
  # Every member, as etcd says (empty when etcd does not answer in 2 s).
}

struct NodeHealth {
  name @0 :Text;
  state @1 :Text;           # "up", "drained", "stopped" (cleanly) or "down".
  leaseAgeSecs @2 :Int64;   # Since etcd saw its lease renewed; -1: no lease.
  grains @3 :UInt32;        # Grains placed on it.
  freeBytes @4 :UInt64;     # Room for data it reports; 0 while down.
}

struct RefusedSource {
  source @0 :Text;    # "203.0.113.7", "203.0.113.0/24", "2001:db8:1:2::/64".
  forSecs @1 :UInt64; # Until it may try again.
  strikes @2 :UInt32; # Refusals in a row.
}

struct Listener {
  name @0 :Text;     # "https", "ssh", later "smtp", "imap", "xmpp", ...
  address @1 :Text;  # The address actually bound, e.g. "127.0.0.1:8443".
}

interface Xmpp {
  # Chat: each user's chat grain.

  status @0 (user :Text) -> (status :UserXmppStatus);
  # The user's address, sessions, contacts and stored messages (starts
  # their grain).

  addDomain @1 (domain :Text, users :List(Text)) -> (added :Bool);
  # Serves another chat domain, and moves `users`' chat addresses into it
  # (their chat grains restart to take it). `added`: it was new.

  domains @2 () -> (primary :Text, domains :List(XmppDomain),
                    clientPort :UInt16, tlsPort :UInt16, serverPort :UInt16);
  # Granary's own domain (every user not moved elsewhere) and the added
  # ones; the ports of the xmpp, xmpps and xmpp-s2s listeners (0: off),
  # for the SRV records.
}

struct XmppDomain {
  domain @0 :Text;
  users @1 :List(Text);
  createdAt @2 :Int64;
}

struct UserXmppStatus {
  user @0 :Text;
  address @1 :Text;
  resources @2 :List(Text);
  # One per session (detached stream-managed ones included).
  contacts @3 :UInt64;
  archived @4 :UInt64;
  offline @5 :UInt64;
}

interface Tasks {
  # Taskwarrior sync: TaskChampion client ids (Taskwarrior 3, over HTTPS
  # at tasks.<domain>) and taskd client certificates (Taskwarrior 2.6,
  # the taskd listener). Each user's task lists live in their tasks grain.

  addClient @0 (user :Text, label :Text) -> (client :TaskClient, clientId :Text, url :Text);
  # A new client id, returned once: only its hash is kept. Every replica
  # given the same id (and the same encryption secret) shares one task
  # list. `url` is `sync.server.url`.

  clients @1 (user :Text) -> (clients :List(TaskClient));
  # One user's client ids; everyone's when `user` is empty.

  revokeClient @2 (user :Text, id :Int64) -> ();

  issueCert @3 (user :Text, label :Text) -> (cert :TaskCert, keyPem :Text, certPem :Text, caPem :Text, server :Text, credentials :Text);
  # A client key and certificate from the local CA, returned once (only
  # the certificate's fingerprint is kept); `server` is `taskd.server`
  # (host:port) and `credentials` `taskd.credentials` (org/user/key).

  certs @4 (user :Text) -> (certs :List(TaskCert));
  revokeCert @5 (user :Text, id :Int64) -> ();
}

struct TaskClient {
  id @0 :Int64;
  user @1 :Text;
  label @2 :Text;
  createdAt @3 :Int64;
  lastUsedAt @4 :Int64;
  # 0: never.
}

struct TaskCert {
  id @0 :Int64;
  user @1 :Text;
  label @2 :Text;
  key @3 :Text;
  expiresAt @4 :Int64;
  createdAt @5 :Int64;
}

interface Mail {
  # Mail: the domains this host receives mail for, aliases and catch-alls,
  # each user's mail grain, and the MX's inbound spool.

  addDomain @0 (domain :Text) -> (created :Bool);
  # Every user gets user@domain; `created` is false when it was there.

  removeDomain @1 (domain :Text) -> ();
  # Refused when it is not a mail domain. Its aliases go with it.

  domains @2 () -> (domains :List(MailDomain));

  setCatchAll @3 (domain :Text, user :Text) -> ();
  # Mail to addresses of `domain` nobody has goes to `user`; an empty
  # `user` refuses it again (550 at RCPT).

  addAlias @4 (address :Text, user :Text) -> (alias :MailAlias);
  # `address` (local@domain of a mail domain) delivers to `user`.

  removeAlias @5 (address :Text) -> ();

  aliases @6 (user :Text) -> (aliases :List(MailAlias));
  # One user's aliases; every alias when `user` is empty.

  status @7 (user :Text) -> (status :UserMailStatus);
  # The user's addresses, mailboxes and deliveries (starts their grain).

  spool @8 (outbound :Bool) -> (messages :List(SpooledMessage));
  # The inbound spool (or with `outbound`, the queue of mail for other
  # domains), oldest first.

  retry @9 (id :Text, outbound :Bool) -> (count :UInt32);
  # Tries `id` again now (every message when empty).

  deleteSpooled @10 (id :Text, outbound :Bool) -> ();
  # Removes a message from the spool without delivering it further.

  hold @11 (id :Text, outbound :Bool, hold :Bool) -> ();
  # Keeps `id` from being delivered until released (`hold` false).

  dkim @12 (domain :Text, rotate :Bool, activate :Bool, force :Bool) -> (keys :List(DkimKey));
  # The domain's DKIM selectors, newest first. `rotate` first makes a new
  # Ed25519 and RSA-2048 pair, pending: it signs once activated.
  # `activate` lets the pending pair sign, once DNS (through the
  # configured resolver) has its records, or regardless with `force`. The
  # older selectors stay published until retired, so mail signed with
  # them still verifies.

  retireDkim @13 (domain :Text, selector :Text) -> ();
  # Removes a selector that no longer signs.

  dnsRecords @14 (domain :Text) -> (records :List(DnsRecord));
  # Every DNS record the mail domain needs, as this host is configured.
}

struct DkimKey {
  selector @0 :Text;
  algorithm @1 :Text;
  # "ed25519" or "rsa".
  createdAt @2 :Int64;
  signing @3 :Bool;
  record @4 :Text;
  # The TXT value for SELECTOR._domainkey.DOMAIN.
  pending @5 :Bool;
}

struct DnsRecord {
  name @0 :Text;
  # Fully qualified, with the final dot.
  kind @1 :Text;
  # MX, TXT, SRV, CNAME.
  value @2 :Text;
  purpose @3 :Text;
}

struct MailDomain {
  domain @0 :Text;
  catchAll @1 :Text;
  aliases @2 :UInt32;
  createdAt @3 :Int64;
}

struct MailAlias {
  address @0 :Text;
  user @1 :Text;
  createdAt @2 :Int64;
}

struct UserMailStatus {
  user @0 :Text;
  addresses @1 :List(Text);
  mailboxes @2 :List(Services.MailboxStatus);
  lastDelivery @3 :Int64;
  deliveries @4 :UInt64;
  waiting @5 :UInt32;
  # Messages in the spool still waiting for this user's grain.
}

struct SpooledMessage {
  id @0 :Text;
  from @1 :Text;
  recipients @2 :List(SpooledRecipient);
  size @3 :UInt64;
  receivedAt @4 :Int64;
  client @5 :Text;
  attempts @6 :UInt32;
  nextAttempt @7 :Int64;
  lastError @8 :Text;
  held @9 :Bool;
}

struct SpooledRecipient {
  address @0 :Text;
  user @1 :Text;
  state @2 :Text;
  # waiting, delivered or failed.
}

interface Invites {
  # Invite links for friends (`granary invite`): opening one shows a page
  # with the apps to install and a QR code; the chat client then makes the
  # account with the token (XEP-0445, XEP-0401). Only a token's hash is
  # kept.

  create @0 (inviter :Text, expiresSecs :Int64, uses :UInt32, group :Text) -> (invite :Invite, token :Text, link :Text, uri :Text);
  # `inviter` empty: an account invite; a user: a contact invite (the new
  # user and the inviter become each other's contacts). `group` names a
  # group chat (a room): a group invite, from the room's owner (`inviter`
  # may be empty or must be the owner); the new user becomes a member and
  # the contact of its members. `link` is the
  # landing page, `uri` the xmpp: URI the page shows; both carry the token,
  # returned once.

  list @1 () -> (invites :List(Invite));
  # Every invite, newest first.

  revoke @2 (id :Int64) -> ();
}

struct Invite {
  id @0 :Int64;
  kind @1 :Text;
  # "account", "contact" or "group".
  inviter @2 :Text;
  # Empty for an account invite.
  maxUses @3 :UInt32;
  uses @4 :UInt32;
  createdAt @5 :Int64;
  expiresAt @6 :Int64;
  revokedAt @7 :Int64;
  # 0: not revoked.
  usedBy @8 :List(Text);
  status @9 :Text;
  # "valid", "used", "expired" or "revoked".
  group @10 :Text;
  # The room of a group invite; empty otherwise.
}

# The web home (`https://<domain>/`). The web code holds only a `WebGate`,
# on a socket pair of its own; it gets a user's authority (`Home`) by
# signing in as that user, and nothing else: no root `Admin`, no state.

interface WebGate {
  signIn @0 (user :Text, password :Text) -> (home :Home, second :SecondFactor);
  # The account password (never an app password). Wrong user or password:
  # an exception "wrong user name or password", the same either way. With
  # a second factor on, `home` is unset and `second` must be answered.
}

interface SecondFactor {
  code @0 (code :Text) -> (home :Home);
  # A TOTP code (6 digits, each step good once) or an unused recovery
  # code. Wrong: an exception "wrong code".
}

interface Home {
  # One user's authority, as the web home uses it. Ids of what belongs to
  # another user are answered as unknown (`found` false), never as theirs.

  whoami @0 () -> (user :Text, totp :Bool, recoveryLeft :UInt32, domain :Text, admin :Bool);
  # `admin`: the user is one of `web.admins`, and `admin()` answers.

  devices @1 () -> (devices :List(AppPassword));
  addDevice @2 (kind :Text, label :Text) -> (device :AppPassword, password :Text);
  # A new app password for one service; `password` is shown once.
  revokeDevice @3 (id :Int64) -> (found :Bool);

  grains @4 () -> (grains :List(HomeGrain));

  grants @5 () -> (grants :List(Grant));
  # Grants from or to this user's grains.
  revokeGrant @6 (id :Int64) -> (found :Bool);

  sshKeys @7 () -> (keys :List(SshKey));
  addSshKey @8 (key :Text, label :Text) -> (key :SshKey);
  removeSshKey @9 (id :Int64) -> (found :Bool);

  changePassword @10 (old :Text, new :Text) -> ();
  # Wrong `old`: an exception "wrong password".

  totpBegin @11 () -> (secret :Text, uri :Text);
  # A fresh secret (base32) and its otpauth:// URI; nothing is stored yet.
  totpEnable @12 (secret :Text, code :Text) -> (recoveryCodes :List(Text));
  # Stores `secret` (sealed) once `code` shows the app has it; the
  # recovery codes are returned once.
  totpDisable @13 (password :Text) -> ();

  invite @14 (expiresSecs :Int64) -> (link :Text, uri :Text);
  # A chat contact invite from this user.

  addTaskList @16 (label :Text) -> (client :TaskClient, clientId :Text, url :Text);
  # A Taskwarrior 3 sync client id for one task list; `clientId` is shown
  # once (only its hash is kept). Fails when the tasks app is not installed.
  taskLists @17 () -> (clients :List(TaskClient));
  revokeTaskList @18 (id :Int64) -> (found :Bool);

  admin @15 () -> (admin :Admin);
  # The admin interface the CLI has, for the admin pages: only to users in
  # `web.admins` (others: an exception "not an admin"). Asked again on
  # each request, so a changed password ends it too.
}

struct HomeGrain {
  id @0 :Text;
  kind @1 :Text;
  state @2 :Text;          # running, stopped, ...
  usedBytes @3 :UInt64;
  quotaBytes @4 :UInt64;   # 0: none.
  lastSnapshot @5 :Int64;  # Unix seconds; 0: none.
  lastBackup @6 :Int64;    # Unix seconds; 0: none.
}

interface Certificates {
  # Certificates from an ACME CA (`tls.acme`).

  acme @0 () -> (enabled :Bool, status :AcmeStatus);
  # enabled = false: certificates come from the local CA or the admin's
  # files (tls.cert), and status is unset.

  renew @1 () -> (request :UInt64);
  # Orders a new certificate now, however fresh the current one and
  # whatever the backoff after failures; the outcome shows in acme() once
  # its `answered` reaches `request`.
  # Fails when tls.acme is not set.
}

struct AcmeStatus {
  directory @0 :Text;        # The CA's directory URL.
  challenge @1 :Text;        # "http-01" or "tls-alpn-01".
  names @2 :List(Text);      # What the certificate is for.
  notAfter @3 :Int64;        # Expiry, Unix seconds; 0: none from the CA yet.
  renewAt @4 :Int64;         # Two thirds into its lifetime; 0 with none.
  issuedAt @5 :Int64;        # The last order that succeeded; 0: none.
  error @6 :Text;            # The last failure while it stands; empty after a success.
  failures @7 :UInt32;       # Failed orders in a row.
  nextAttempt @8 :Int64;     # When the next order is due.
  orders @9 :UInt64;         # Orders finished (issued or failed) since the daemon started.
  answered @10 :UInt64;      # The last renew() request an order answered.
  leftOut @11 :UInt32;       # Users whose subdomains did not fit (100 names at most).
}
