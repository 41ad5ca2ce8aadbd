# A one-way byte stream with flow control, used for connection hand-off and
# for large payloads between grains.
#
# Used by `Admin.connectGrain` (the CLI's `granary grain connect`) and by
# the hand-off benchmark.

@0xbc785de24fea1a15;

interface ByteStream {
  write @0 (bytes :Data) -> ();
  # The caller keeps a bounded window of writes in flight (flow control is
  # the caller's: Debian's capnp 0.9 compiler lacks the standard
  # stream.capnp that `-> stream` needs). Chunks are at most 64 KiB.

  end @1 () -> ();
  # No more bytes. Resolves when the receiver has taken them all (for mail,
  # when they are durable).
}
