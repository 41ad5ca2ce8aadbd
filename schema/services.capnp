# Typed interfaces grains offer each other, through capabilities the owner
# granted (`Host.request`, `Grain.offer`). The descriptor prefix names the
# interface: "mail.deliver", "xmpp.route", "git.read", "notify".
#
# Status: `Notify` is offered by the example app (`apps/hello`) and used
# through grants in the grain tests; `GitRepoRead` by the git app (the blog
# uses it); `MailDelivery` by the mail app (the host's MX uses it);
# `XmppRouter` arrives with the chat app.

@0xa1b4c9e6f0d27c35;

using Stream = import "stream.capnp";

interface MailDelivery {
  # "mail.deliver": how the host's MX reaches a user's mail grain. A server
  # route: it exists because the mail app is installed, not by a grant, and
  # only the host holds it (the requester is the host).

  deliver @0 (envelope :Envelope) -> (message :Stream.ByteStream);
  # Start a delivery; write the RFC 5322 message to `message`, then `end`
  # it. `end` resolves only once the message is durable in the recipient's
  # mailbox (file and index fsynced), so the host can drop its spooled copy
  # then and not before. A grain that already stored a delivery with this
  # `envelope.id` takes the bytes and resolves `end` without storing a
  # second copy. `end` fails with an "overloaded" exception when the
  # mailbox cannot take the message now (storage full): the host retries.

  status @1 () -> (status :MailStatus);
  # What `granary mail status` shows.
}

struct Envelope {
  id @0 :Text;
  # The host's spool entry id: the same message delivered twice (the host
  # restarted before it saw `end` resolve) has the same id.
  from @1 :Text;
  # MAIL FROM (empty: a bounce).
  to @2 :List(Text);
  # RCPT TO addresses that belong to this grain's owner, as the sender
  # wrote them (aliases, +tags).
}

struct MailStatus {
  mailboxes @0 :List(MailboxStatus);
  lastDelivery @1 :Int64;
  # Unix seconds of the newest delivery; 0 when none yet.
  deliveries @2 :UInt64;
  # Deliveries stored since the grain's store was made.
}

struct MailboxStatus {
  name @0 :Text;
  specialUse @1 :Text;
  # "\\Junk", "\\Sent", ...; empty for none.
  messages @2 :UInt32;
  unseen @3 :UInt32;
  bytes @4 :UInt64;
}

interface XmppRouter {
  # Two ends, one interface:
  # - "xmpp.route": what a chat grain gets from its host (no grant needed:
  #   the route exists because the chat app is installed). `from` is the
  #   sender's full JID, of which the host keeps only the resource: it
  #   writes `<owner>@<domain>/<resource>` itself. The host finds the
  #   recipient's grain by the localpart of `to` and starts it if needed.
  # - "xmpp.deliver": what the host gets from the recipient's chat grain
  #   (offered to the host only). `from` is the address the host stamped.

  route @0 (from :Text, to :Text, stanza :Text) -> ();
  # `stanza` is the XML element in the jabber:client namespace; the
  # recipient takes `from` and `to` from the call, never from the element.
  # Fails with "<condition>: <text>" (an RFC 6120 stanza error condition,
  # e.g. "item-not-found: no such user") when it cannot be delivered.

  status @1 () -> (resources :List(Text), contacts :UInt64, archived :UInt64, offline :UInt64);
  # "xmpp.deliver" only: the account's sessions (their resources), roster
  # size, archived and offline messages, for `granary xmpp status`.

  befriend @2 (jid :Text, name :Text) -> ();
  # "xmpp.deliver" only: makes `jid` the account's contact with a
  # subscription both ways (an invite the user made was redeemed by
  # `jid`); `name` is the roster name when the contact has none yet.
  # A room grain makes `jid` a member and sends it an invitation.

  members @3 () -> (jids :List(Text));
  # "xmpp.deliver" of a room grain only: the bare addresses of its owner,
  # admins and members (a group invite befriends the newcomer with them).
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

interface DavCollection {
  # "dav.calendar.read:<name>", "dav.calendar.write:<name>",
  # "dav.addressbook.read:<name>", "dav.addressbook.write:<name>": one
  # calendar or address book of the provider's DAV grain, shared with
  # another user's DAV grain, which shows it in its owner's home. Only the
  # named collection is reachable; writes only through a `.write` grant.

  info @0 () -> (collection :SharedCollection);

  request @1 (request :DavRequest) -> (response :DavResponse);
  # A WebDAV request on the collection (`path` empty) or one of its
  # objects (`path` the object's name). Hrefs in the answer start with
  # `base`, the collection's path as the holder's client sees it.
}

struct SharedCollection {
  kind @0 :Text;          # "calendar" or "addressbook"
  displayName @1 :Text;
  color @2 :Text;
  description @3 :Text;
  components @4 :List(Text);  # VEVENT, VTODO, ... (calendars)
  writable @5 :Bool;
  syncToken @6 :Text;
}

struct DavRequest {
  method @0 :Text;
  path @1 :Text;
  base @2 :Text;
  headers @3 :List(DavHeader);
  body @4 :Data;
}

struct DavResponse {
  status @0 :UInt16;
  headers @1 :List(DavHeader);
  body @2 :Data;
}

struct DavHeader {
  name @0 :Text;
  value @1 :Text;
}
