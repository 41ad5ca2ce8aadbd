//! Group chats (XEP-0045) end to end: each room is a grain of its own,
//! made when a user first joins it, with real clients (Python `slixmpp`
//! and its MUC plugin) for three users.

use granary_testkit::xmpp::XmppHost;

/// One room, three people: making it by joining, history on joining,
/// messages to everyone with the room's stanza-ids, the room's archive,
/// members-only and moderated rooms with affiliations and roles set by
/// the owner, self-pings (XEP-0410), nick changes, and the room's own
/// grain, which stops when idle and comes back on the next message
/// knowing who is in it and with its history. The idle timeout is short
/// (2 s), so the room may also stop and start between any two steps.
#[test]
fn three_people_share_a_room_grain() {
    let h = XmppHost::start(
        &["alice", "bob", "carol"],
        "[grains]\nidle_timeout = \"2s\"\n",
    );
    h.install_rooms();
    let script = r#"
import asyncio, json, os, subprocess, time
from granary_xmpp_test import Client, next_of, run
from slixmpp import JID
from slixmpp.exceptions import IqError, PresenceError
ROOM = "family@rooms." + os.environ["XMPP_DOMAIN"]
M = ("xep_0045", "xep_0004", "xep_0059", "xep_0313", "xep_0359", "xep_0199", "xep_0203", "xep_0410")

def watch(c):
    """Presences from rooms, as the MUC plugin sees them."""
    c.muc_presences = asyncio.Queue()
    c.add_event_handler("groupchat_presence", lambda p: c.muc_presences.put_nowait(p))
    c.subjects = asyncio.Queue()
    c.add_event_handler("groupchat_subject", lambda m: c.subjects.put_nowait(m))
    return c

def said(body):
    return lambda m: m["type"] == "groupchat" and m["body"] == body

async def main():
    alice = await watch(Client("alice", plugins=M)).online()
    bob = await watch(Client("bob", plugins=M)).online()
    carol = await watch(Client("carol", plugins=M)).online()
    muc = lambda c: c.plugin["xep_0045"]

    # Alice's join makes the room; she owns it.
    pres, subject, _, history = await muc(alice).join_muc_wait(ROOM, "Alice", timeout=30)
    assert pres["muc"]["affiliation"] == "owner", pres
    assert pres["muc"]["role"] == "moderator", pres
    assert {110, 100, 170} <= set(pres["muc"]["status_codes"]), pres
    assert history == [], history
    info = await alice.plugin["xep_0030"].get_info(jid=ROOM)
    feats = info["disco_info"]["features"]
    for f in ("http://jabber.org/protocol/muc", "urn:xmpp:mam:2", "muc_open", "muc_unmoderated", "muc_nonanonymous"):
        assert f in feats, (f, feats)
    assert ("conference", "text") in [(c, t) for c, t, _, _ in info["disco_info"]["identities"]], info
    # Clients find the service where they make group chats.
    items = await alice.plugin["xep_0030"].get_items(jid=os.environ["XMPP_DOMAIN"])
    assert "rooms." + os.environ["XMPP_DOMAIN"] in [str(i[0]) for i in items["disco_items"]["items"]], items
    service = await alice.plugin["xep_0030"].get_info(jid="rooms." + os.environ["XMPP_DOMAIN"])
    assert "http://jabber.org/protocol/muc" in service["disco_info"]["features"], service

    await muc(bob).join_muc_wait(ROOM, "Bob", timeout=30)
    got = await next_of(alice.muc_presences, lambda p: str(p["from"]) == ROOM + "/Bob")
    assert got["muc"]["jid"].bare == "bob@" + os.environ["XMPP_DOMAIN"], got
    alice.send_message(mto=ROOM, mbody="hello family", mtype="groupchat")
    m = await next_of(bob.messages, said("hello family"))
    assert str(m["from"]) == ROOM + "/Alice", m
    sid = m["stanza_id"]
    assert sid["by"] == ROOM and sid["id"], m
    # The sender gets it back too: the reflection says it was kept.
    echo = await next_of(alice.messages, said("hello family"))
    assert echo["stanza_id"]["id"] == sid["id"], echo

    # Carol, joining later, gets the history with its date, and the subject.
    alice.plugin["xep_0045"].set_subject(ROOM, "Sunday lunch")
    await next_of(bob.subjects, lambda m: m["subject"] == "Sunday lunch")
    _, subject, occupants, history = await muc(carol).join_muc_wait(ROOM, "Carol", maxstanzas=10, timeout=30)
    assert [h["body"] for h in history] == ["hello family"], history
    assert history[0]["delay"]["stamp"] is not None, history[0]
    assert subject["subject"] == "Sunday lunch", subject
    assert {str(p["from"]) for p in occupants} >= {ROOM + "/Alice", ROOM + "/Bob"}, occupants
    # Nicks are one person's.
    intruder = Client("carol", resource="second", plugins=M)
    await intruder.online()
    try:
        await muc(intruder).join_muc_wait(ROOM, "Bob", timeout=30)
        raise AssertionError("took a nick that is someone else's")
    except PresenceError as e:
        assert e.condition == "conflict", e

    # XEP-0410: joined clients are told so; another client is not.
    await carol.plugin["xep_0199"].send_ping(ROOM + "/Carol", timeout=20)
    try:
        await intruder.plugin["xep_0199"].send_ping(ROOM + "/Carol", timeout=20)
        raise AssertionError("a client that never joined was told it is in")
    except IqError as e:
        assert e.condition == "not-acceptable", e

    # The room's archive (XEP-0313 on the room).
    seen = []
    async for m in bob.plugin["xep_0313"].iterate(jid=JID(ROOM), rsm={"max": 5}):
        seen.append(m["mam_result"]["forwarded"]["stanza"]["body"])
    assert seen == ["hello family"], seen
    page = await bob.plugin["xep_0313"].retrieve(jid=JID(ROOM))
    assert [r["mam_result"]["forwarded"]["stanza"]["body"] for r in page["mam"]["results"]] == ["hello family"], page

    # Members only: Bob is made a member, Carol is not and has to go.
    await muc(alice).set_affiliation(ROOM, "member", jid="bob@" + os.environ["XMPP_DOMAIN"])
    form = await muc(alice).get_room_config(ROOM)
    form.set_values({"muc#roomconfig_membersonly": True})
    await muc(alice).set_room_config(ROOM, form)
    gone = await next_of(carol.muc_presences, lambda p: p["type"] == "unavailable" and str(p["from"]) == ROOM + "/Carol")
    assert 322 in gone["muc"]["status_codes"], gone
    info = await alice.plugin["xep_0030"].get_info(jid=ROOM)
    assert "muc_membersonly" in info["disco_info"]["features"], info
    try:
        await muc(carol).join_muc_wait(ROOM, "Carol", timeout=30)
        raise AssertionError("a non-member joined a members-only room")
    except PresenceError as e:
        assert e.condition == "registration-required", e
    members = await muc(bob).get_affiliation_list(ROOM, "member")
    assert [str(j) for j in members] == ["bob@" + os.environ["XMPP_DOMAIN"]], members
    await muc(alice).set_affiliation(ROOM, "member", jid="carol@" + os.environ["XMPP_DOMAIN"])
    await muc(carol).join_muc_wait(ROOM, "Carol", maxstanzas=0, timeout=30)

    # Moderated: Bob loses his voice, and his message is refused.
    form = await muc(alice).get_room_config(ROOM)
    form.set_values({"muc#roomconfig_moderatedroom": True})
    await muc(alice).set_room_config(ROOM, form)
    await muc(alice).set_role(ROOM, "Bob", "visitor")
    try:
        await muc(bob).set_role(ROOM, "Carol", "visitor")
        raise AssertionError("a visitor changed someone's role")
    except IqError as e:
        assert e.condition in ("not-allowed", "forbidden"), e
    bob.send_message(mto=ROOM, mbody="can I speak?", mtype="groupchat")
    err = await next_of(bob.messages, lambda m: m["type"] == "error")
    assert err["error"]["condition"] == "forbidden", err
    carol.send_message(mto=ROOM, mbody="members still speak", mtype="groupchat")
    await next_of(bob.messages, said("members still speak"))

    # A new nick keeps the role: Bob is still a visitor as Robert.
    assert await muc(bob).set_self_nick(ROOM, "Robert", timeout=30) == "Robert"
    moved = await next_of(alice.muc_presences, lambda p: p["type"] == "unavailable" and str(p["from"]) == ROOM + "/Bob")
    assert 303 in moved["muc"]["status_codes"] and moved["muc"]["item_nick"] == "Robert", moved
    robert = await next_of(alice.muc_presences, lambda p: p["type"] != "unavailable" and str(p["from"]) == ROOM + "/Robert")
    assert robert["muc"]["role"] == "visitor", robert

    # Bob leaves; everyone else sees it, and so does he.
    muc(bob).leave_muc(ROOM, "Robert")
    await next_of(alice.muc_presences, lambda p: p["type"] == "unavailable" and str(p["from"]) == ROOM + "/Robert")
    mine = await next_of(bob.muc_presences, lambda p: p["type"] == "unavailable" and str(p["from"]) == ROOM + "/Robert")
    assert 110 in mine["muc"]["status_codes"], mine
    # The room is a grain of its own: idle, it stops, and it keeps who is
    # in it.
    def room_state():
        out = subprocess.run([os.environ["GRANARY_BIN"], "--config", os.environ["GRANARY_CONFIG_FILE"], "grain", "status", "alice/room/family", "--json"], capture_output=True, text=True, check=True)
        return json.loads(out.stdout)["state"]
    deadline = time.monotonic() + 60
    while await asyncio.to_thread(room_state) != "stopped":
        assert time.monotonic() < deadline, "the room grain did not stop when idle"
        await asyncio.sleep(0.2)
    alice.send_message(mto=ROOM, mbody="still here?", mtype="groupchat")
    await next_of(carol.messages, said("still here?"))
    # A client that joins again from the same address (as after its own
    # server restarted) gets a whole join: the subject comes last.
    _, subject, occupants, history = await muc(carol).join_muc_wait(ROOM, "Carol", maxstanzas=20, timeout=30)
    assert subject["subject"] == "Sunday lunch", subject
    said_so_far = [m["body"] for m in history]
    assert said_so_far == ["hello family", "members still speak", "still here?"], said_so_far
    assert ROOM + "/Alice" in {str(p["from"]) for p in occupants}, occupants
    # Leaving (no nick change before): the room's answer reaches Carol.
    muc(carol).leave_muc(ROOM, "Carol")
    mine = await next_of(carol.muc_presences, lambda p: p["type"] == "unavailable" and str(p["from"]) == ROOM + "/Carol" and 110 in p["muc"]["status_codes"] and 322 not in p["muc"]["status_codes"])
    for c in (alice, bob, carol, intruder):
        c.disconnect()

run(main)
"#;
    let (ok, out) = h.python_with(
        script,
        &[
            (
                "GRANARY_BIN",
                granary_testkit::granary_bin().display().to_string(),
            ),
            (
                "GRANARY_CONFIG_FILE",
                h.daemon.config_path().display().to_string(),
            ),
        ],
    );
    assert!(ok, "{out}\n--- daemon log ---\n{}", h.daemon.log());
    // Its grain, dataset and all, is listed as one of Alice's.
    let list = h
        .daemon
        .granary(&["grain", "list", "--json"])
        .success()
        .stdout;
    let grains: serde_json::Value = serde_json::from_str(&list).unwrap();
    let room = grains
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["id"] == "alice-room--family")
        .unwrap_or_else(|| panic!("no room grain in {list}"));
    assert_eq!(room["kind"], "room", "{room}");
    assert_eq!(room["user"], "alice", "{room}");
    // Other users get no room grain of their own.
    assert!(
        !list.contains("bob-room"),
        "a room grain was made for every user: {list}"
    );
}

/// A group invite (`granary invite create --group`): the newcomer's
/// account is made by in-band registration with the token, they become a
/// member of the members-only room and find its invitation when they log
/// in, and its owner and members are in their contacts, both ways.
#[test]
fn a_group_invite_brings_a_friend_into_the_room() {
    let h = XmppHost::start(&["alice", "bob"], "");
    h.install_rooms();
    let setup = r#"
import asyncio, os
from granary_xmpp_test import Client, run
ROOM = "family@rooms." + os.environ["XMPP_DOMAIN"]

async def main():
    alice = await Client("alice", plugins=("xep_0045", "xep_0004")).online()
    muc = alice.plugin["xep_0045"]
    await muc.join_muc_wait(ROOM, "Alice", timeout=30)
    await muc.set_affiliation(ROOM, "member", jid="bob@" + os.environ["XMPP_DOMAIN"])
    form = await muc.get_room_config(ROOM)
    form.set_values({"muc#roomconfig_membersonly": True, "muc#roomconfig_roomname": "The family"})
    await muc.set_room_config(ROOM, form)
    alice.disconnect()

run(main)
"#;
    let (ok, out) = h.python(setup);
    assert!(ok, "{out}\n--- daemon log ---\n{}", h.daemon.log());

    // Mistakes are named.
    let none = h
        .daemon
        .granary(&["invite", "create", "--group", "nothing"])
        .failure();
    assert!(
        none.stderr.contains("no group chat named nothing"),
        "{}",
        none.stderr
    );
    let not_owner = h
        .daemon
        .granary(&["invite", "create", "--group", "family", "--for", "bob"])
        .failure();
    assert!(
        not_owner.stderr.contains("is alice's"),
        "{}",
        not_owner.stderr
    );

    let (link, uri, token) = h.invite(&["--group", "family"]);
    assert_eq!(
        uri,
        format!("xmpp:alice@chat.test?roster;preauth={token};ibr=y")
    );
    let port = h.daemon.https_addr().port();
    let page = std::process::Command::new("curl")
        .args(["-sS", "--cacert"])
        .arg(h.daemon.ca_file())
        .arg("--resolve")
        .arg(format!("chat.test:{port}:127.0.0.1"))
        .arg(&link)
        .output()
        .unwrap();
    let page = String::from_utf8(page.stdout).unwrap();
    assert!(
        page.contains("invites you to the group chat <strong>family</strong>"),
        "{page}"
    );

    let script = format!(
        "{}{}",
        granary_testkit::xmpp::NEWCOMER,
        r#"
ROOM = "family@rooms." + os.environ["XMPP_DOMAIN"]

async def main():
    bob = await Client("bob", plugins=("xep_0045",)).online()
    dave = Newcomer("dave", "dave's own passphrase", os.environ["TOKEN"])
    dave.register_plugin("xep_0045")
    dave.register_plugin("xep_0249")
    await dave.online()
    assert dave.registered.result() is True
    # The room's invitation waited for them.
    inv = await next_of(dave.messages, lambda m: "family@rooms" in (m["body"] or ""))
    assert str(inv["from"]) == ROOM, inv
    assert inv["groupchat_invite"]["jid"] == ROOM, inv
    # The owner and the members are contacts, both ways.
    await dave.get_roster()
    for who in ("alice", "bob"):
        item = dave.client_roster[who + "@" + os.environ["XMPP_DOMAIN"]]
        assert item["subscription"] == "both", (who, dave.client_roster)
    await bob.get_roster()
    assert bob.client_roster["dave@" + os.environ["XMPP_DOMAIN"]]["subscription"] == "both", bob.client_roster
    # And the members-only room lets them in.
    pres, _, _, _ = await dave.plugin["xep_0045"].join_muc_wait(ROOM, "Dave", timeout=30)
    assert pres["muc"]["affiliation"] == "member", pres
    await bob.plugin["xep_0045"].join_muc_wait(ROOM, "Bob", timeout=30)
    dave.send_message(mto=ROOM, mbody="hi all", mtype="groupchat")
    await next_of(bob.messages, lambda m: m["type"] == "groupchat" and m["body"] == "hi all")
    for c in (bob, dave):
        c.disconnect()

run(main)
"#
    );
    let (ok, out) = h.python_with(&script, &[("TOKEN", token)]);
    assert!(ok, "{out}\n--- daemon log ---\n{}", h.daemon.log());
    let list = h
        .daemon
        .granary(&["invite", "list", "--json"])
        .success()
        .stdout;
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(list[0]["kind"], "group", "{list}");
    assert_eq!(list[0]["group"], "family", "{list}");
    assert_eq!(list[0]["inviter"], "alice", "{list}");
    assert_eq!(list[0]["used_by"], serde_json::json!(["dave"]), "{list}");
}
