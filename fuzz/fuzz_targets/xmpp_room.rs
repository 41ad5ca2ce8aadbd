//! A group chat's stanza handling (`apps/xmpp/src/room`): records of
//! `from NUL to NUL stanza`, separated by 0x1E, as the host would route
//! them, go through joins, leaves, messages, affiliations, roles, the
//! settings form and the archive against a real store without panicking;
//! after each, who is in the room in memory is who is in it on disk. What
//! the room sends is dropped after each record (there is no host).

#![no_main]

use std::rc::Rc;

use granary_xmpp::room::Room;
use granary_xmpp::room::store::RoomStore;
use libfuzzer_sys::fuzz_target;

thread_local! {
    static ROOM: (tempfile::TempDir, Rc<Room>) = {
        let dir = tempfile::tempdir().unwrap();
        let store = RoomStore::open(dir.path()).unwrap();
        (dir, Rc::new(Room::new(store, "family", "alice", "fuzz.test").unwrap()))
    };
}

fuzz_target!(|data: &[u8]| {
    ROOM.with(|(_, room)| {
        for record in data.split(|&b| b == 0x1e) {
            let mut parts = record.splitn(3, |&b| b == 0);
            let (Some(from), Some(to), Some(stanza)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let answer = room.deliver_routed(
                &String::from_utf8_lossy(from),
                &String::from_utf8_lossy(to),
                &String::from_utf8_lossy(stanza),
            );
            // No host here: what the room sends is dropped, so the room is
            // never too busy to look at the next input.
            room.discard_outbox();
            assert!(
                !answer.is_err_and(|e| e.starts_with("resource-constraint")),
                "a room with nothing waiting said it was busy"
            );
            let mut on_disk: Vec<(String, String)> = room
                .store
                .occupants()
                .unwrap()
                .into_iter()
                .map(|(full, nick, _)| (full, nick))
                .collect();
            let mut in_memory: Vec<(String, String)> = room
                .occupants
                .borrow()
                .iter()
                .flat_map(|(nick, o)| o.sessions.iter().map(|(f, _)| (f.clone(), nick.clone())))
                .collect();
            on_disk.sort();
            in_memory.sort();
            assert_eq!(on_disk, in_memory, "the room's occupants, in memory and on disk");
        }
    });
});
