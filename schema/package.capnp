# An app's manifest: what the app is, which grain kind it claims, what it
# serves and how to run it.
#
# Inside a package the manifest travels as `granary-app.toml` (the same
# fields, snake_case; `granary_model::Manifest` parses and checks it), so
# that admins can read what they install and the signature covers exactly
# what they read. This is the same type where it crosses an RPC boundary
# (`Admin.App.manifest`).

@0x802004fb60a93c04;

struct Manifest {
  id @0 :Text;
  # `k` and 32 hex digits of the SHA-256 of the signer's Ed25519 public key
  # (or the id an unsigned development app chose).
  version @1 :Text;
  # Upgrades must raise it (numeric-aware: 1.10 > 1.9).
  kind @2 :Text;
  # The grain kind it provides; one installed app per kind.
  perUser @3 :Bool;
  title @4 :Text;
  exec @5 :List(Text);
  # The program inside the image and its arguments.
  env @6 :List(Text);
  # KEY=value pairs added to the app's environment.
  services @7 :List(Text);
  # Connection services it accepts ("http", "imap", "git", ...).
  offers @8 :List(Text);
  # Interfaces it offers other grains ("notify", "git.read", ...).
  requests @9 :List(Text);
  # Interfaces it may ask other grains for, once granted.
  migrate @10 :List(Text);
  # Run in the grain's sandbox before the app starts on data of another
  # version; empty for none.
  idleTimeoutSeconds @11 :UInt64;
  # 0: the host's default.
  limits @12 :Limits;
}

struct Limits {
  # 0 everywhere means the host's default.
  memoryMib @0 :UInt64;
  pids @1 :UInt64;
  cpuWeight @2 :UInt32;
}
