# What the host gives a grain: the bootstrap capability on the host's end of
# the grain's channel (fd 3 inside the grain).
#
# Served by `granary-supervisor` (one object per running grain); wrapped for
# apps by `granary-sdk`'s `Host`.
#
# Every call is made by exactly one grain, so the host always knows who is
# asking; nothing in these messages can claim another identity.

@0xceef9073d32ea5d8;

interface Host {
  info @0 () -> (grain :GrainInfo);
  # Who this grain is.

  request @1 (descriptor :Text) -> (cap :Capability);
  # A capability another grain provides, by descriptor
  # (`<interface>[:<argument>]`, e.g. "git.read:site"). Succeeds only if the
  # owner granted this grain that route; the host then obtains the
  # capability from the providing grain's `Grain.offer` (starting that grain
  # if needed) and returns it wrapped in a membrane: revoking the grant cuts
  # it at once, and every call through it is counted for the audit log. With
  # no grant the call fails and reveals nothing about the other grain.

  save @2 (cap :Capability, label :Text) -> (token :Data);
  # A sturdy reference to a capability obtained with `request`, valid across
  # restarts of the daemon and of either grain, until the grant is revoked
  # or the token dropped. The host keeps only a hash of the token.

  restore @3 (token :Data) -> (cap :Capability);
  # The capability a token stands for (wrapped in a fresh membrane).

  drop @4 (token :Data) -> ();
  # Forget a token.

  stayAwake @5 (reason :Text) -> (lock :WakeLock);
  # Keep this grain running while the lock is held, even when idle (e.g. a
  # mail grain retrying deliveries). The owner can see the reason.

  log @6 (level :LogLevel, message :Text) -> ();
  # Structured logging into the grain's log, beside its stdout and stderr.

  grants @7 () -> (routes :List(Route));
  # The live grants this grain holds: what it may request, and from whom
  # (a calendar another user shared with this grain's owner shows up
  # here). Nothing about grants held by other grains.

  requestFrom @8 (descriptor :Text, provider :Text) -> (cap :Capability);
  # `request` from one provider (its grain id, as `grants` lists it), for
  # when several grains provide the same descriptor.
}

struct Route {
  descriptor @0 :Text;
  providerId @1 :Text;
  providerOwner @2 :Text;
  providerKind @3 :Text;
}

interface WakeLock {
  # Held to keep the grain up; released when the last reference is dropped.
}

struct GrainInfo {
  id @0 :Text;
  owner @1 :Text;
  kind @2 :Text;
  appId @3 :Text;
  appVersion @4 :Text;
}

enum LogLevel {
  error @0;
  warn @1;
  info @2;
  debug @3;
}
