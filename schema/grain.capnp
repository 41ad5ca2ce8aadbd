# What an app serves to the host: the bootstrap capability a grain offers on
# its end of the host channel (fd 3, see `host.capnp` for the other
# direction).
#
# Served by every app through `granary-sdk`; called by the host
# (`granary-supervisor`).
#
# Only the host holds this capability. Grains never see each other's `Grain`;
# what one grain may use of another arrives as a capability the host
# obtained through `offer` and wrapped in a revocable membrane.

@0xf3d9868dab21a777;

using Stream = import "stream.capnp";

interface Grain {
  accept @0 (service :Text, identity :Identity, peer :Peer, handoff :Handoff) -> (upstream :Stream.ByteStream);
  # A client connection for one of the services the app's manifest offers
  # ("http", "imap", "submission", "smtp-delivery", "xmpp-c2s", "git",
  # "taskchampion", ...). The gateway has already terminated TLS and
  # authenticated the client: `identity` says who it is; the grain never sees
  # a password.
  #
  # How the bytes travel is `handoff`:
  # - `socket`: the plaintext end of a socketpair, sent over the host-only
  #   unix socket beside this RPC channel with SCM_RIGHTS, tagged with this
  #   token. `upstream` is left null.
  # - `stream`: the host writes the client's bytes to `upstream` (returned
  #   here) and the grain writes its replies to the `stream` it was given.
  # Measured (granary-supervisor's handoff benchmark): `socket` costs
  # nothing over a direct socket (10.1 vs 10.3 us for a 1 KiB round trip),
  # `stream` 4.2x that, so whole-connection protocols use `socket`; `stream`
  # remains for where a descriptor cannot be passed.

  offer @1 (descriptor :Text, requester :GrainRef) -> (cap :Capability);
  # Asked by the host when another grain requested a capability this grain
  # provides and the owner has granted the route. `descriptor` is
  # `<interface>[:<argument>]`, e.g. "git.read:site" (read the repository
  # named site) or "notify:site". The grain returns an object implementing
  # the interface that descriptor names (see `services.capnp`), or throws if
  # it has nothing by that name. The host wraps what it returns; the grain
  # may assume `requester` is who the owner granted.

  prepareSnapshot @2 () -> (report :Text);
  # Flush and reach a consistent on-disk state: the host freezes the grain's
  # cgroup right after this returns, snapshots its dataset, and thaws it.
  # `report` is a one-line human summary ("checkpointed 3 mailboxes").

  shutdown @3 (graceMillis :UInt32) -> ();
  # Stop accepting, finish or abandon work within `graceMillis`, then
  # return. The host sends SIGTERM after that, then SIGKILL.
}

struct Handoff {
  union {
    socket @0 :UInt64;
    # Token of the descriptor sent on the side socket.
    stream @1 :Stream.ByteStream;
    # Where the grain writes bytes for the client.
  }
}

struct Identity {
  user @0 :Text;
  # The authenticated user's name; empty for anonymous access (e.g. cloning
  # a public repository, mail arriving from the internet).
  method @1 :AuthMethod;
  credentialId @2 :Int64;
  # Which app password or SSH key authenticated the client (0 when none),
  # so the app can show per-device activity.
}

enum AuthMethod {
  anonymous @0;
  password @1;
  appPassword @2;
  sshKey @3;
  clientSecret @4;
  # Taskwarrior 3's client id.
  admin @5;
  # The host's admin, through `granary grain connect` on the admin socket.
}

struct Peer {
  address @0 :Text;
  # The client's address and port as the gateway saw it.
  protocol @1 :Text;
  # The wire protocol the gateway spoke ("https", "imaps", ...).
  tlsVersion @2 :Text;
  serverName @3 :Text;
  # SNI, or the Host header for HTTP.
}

struct GrainRef {
  id @0 :Text;
  owner @1 :Text;
  kind @2 :Text;
}
