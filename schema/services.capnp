# Typed interfaces grains offer each other, through capabilities the owner
# granted (`Host.request`, `Grain.offer`). The descriptor prefix names the
# interface: "mail.deliver", "xmpp.route", "git.read", "notify".
#
# Status: `Notify` is offered by the example app (`apps/hello`) and used
# through grants in the grain tests; the others arrive with the apps that
# serve them (mail, XMPP, git).

@0xa1b4c9e6f0d27c35;

using Stream = import "stream.capnp";

interface MailDelivery {
  # "mail.deliver": hand a message to a user's mail grain.

  deliver @0 (envelope :Envelope) -> (message :Stream.ByteStream);
  # Start a delivery; write the RFC 5322 message to `message`, then `end`
  # it. `end` resolves only once the message is durable in the recipient's
  # mailbox, so the gateway can acknowledge the sending server then and not
  # before.
}

struct Envelope {
  from @0 :Text;
  # MAIL FROM (may be empty: a bounce).
  to @1 :List(Text);
  # RCPT TO addresses that belong to this grain's owner.
  receivedFrom @2 :Text;
  # For the Received header: peer address and HELO name.
}

interface XmppRouter {
  # "xmpp.route": pass a stanza to another user's XMPP grain on this host.

  route @0 (from :Text, to :Text, stanza :Text) -> ();
  # Full JIDs as the gateway authenticated them; `stanza` is the XML
  # element. Fails if the recipient does not exist or refuses the sender.
}

interface GitRepoRead {
  # "git.read:<repo>": read one repository of the owner's git grain.

  resolve @0 (ref :Text) -> (commit :Text);
  # A ref ("HEAD", "refs/heads/main") to a commit id.

  export @1 (commit :Text, sink :FileSink) -> ();
  # Every file of the commit's tree, written to `sink` one by one, then
  # `sink.done`.
}

interface FileSink {
  file @0 (path :Text, mode :UInt32, data :Data) -> ();
  # A regular file (mode 0o644 or 0o755); `path` is relative, '/'-separated
  # and never contains "." or ".." components.
  done @1 (commit :Text) -> ();
}

interface Notify {
  # "notify:<subject>": be told that something changed.

  changed @0 (subject :Text, revision :Text) -> ();
  # e.g. subject "site", revision the new commit id.
}

interface Ping {
  # "ping": check a route and measure it. Every app may offer it.

  ping @0 () -> ();
}
