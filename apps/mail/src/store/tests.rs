use super::*;

fn open() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("mail")).unwrap();
    (dir, store)
}

const MSG: &[u8] = b"From: a@remote.example\r\nSubject: hello\r\n\r\nbody\r\n";

#[test]
fn a_delivery_is_stored_once_with_its_return_path() {
    let (_d, s) = open();
    let names: Vec<String> = s.mailboxes().unwrap().into_iter().map(|m| m.name).collect();
    assert_eq!(
        names,
        ["INBOX", "Archive", "Drafts", "Junk", "Sent", "Trash"]
    );
    assert_eq!(
        s.deliver("spool-1", "a@remote.example", MSG).unwrap(),
        Delivered::Stored {
            mailbox: "INBOX".into(),
            uid: 1
        }
    );
    assert_eq!(
        s.deliver("spool-1", "a@remote.example", MSG).unwrap(),
        Delivered::Duplicate
    );
    let inbox = s.mailbox("inbox").unwrap();
    let msgs = s.messages(inbox.id).unwrap();
    assert_eq!(msgs.len(), 1);
    let bytes = s.read_blob(msgs[0].blob).unwrap();
    assert!(bytes.starts_with(b"Return-Path: <a@remote.example>\r\nFrom:"));
    let st = s.status(inbox.id).unwrap();
    assert_eq!((st.messages, st.unseen, st.uidnext), (1, 1, 2));
    assert_eq!(s.delivery_counts().unwrap().0, 1);
}

#[test]
fn flags_copy_move_and_expunge_keep_uids_and_modseqs_straight() {
    let (_d, s) = open();
    for i in 0..3 {
        s.deliver(&format!("d{i}"), "", MSG).unwrap();
    }
    let inbox = s.mailbox("INBOX").unwrap();
    let before = s.mailbox_by_id(inbox.id).unwrap().highest_modseq;
    let (changed, refused) = s
        .store_flags(
            inbox.id,
            &[1, 2],
            FlagChange::Add,
            SEEN | DELETED,
            &["$Work".into()],
            None,
        )
        .unwrap();
    assert_eq!(changed.len(), 2);
    assert!(refused.is_empty());
    assert_eq!(
        flag_names(changed[0].flags, &changed[0].keywords),
        ["\\Seen", "\\Deleted", "$Work"]
    );
    // UNCHANGEDSINCE below the message's modseq refuses it.
    let (_, refused) = s
        .store_flags(inbox.id, &[1], FlagChange::Remove, SEEN, &[], Some(before))
        .unwrap();
    assert_eq!(refused, [1]);
    let (_, changed, _) = s.changes_since(inbox.id, before).unwrap();
    assert_eq!(changed.iter().map(|m| m.uid).collect::<Vec<_>>(), [1, 2]);
    let (validity, pairs) = s.copy(inbox.id, &[2, 3], "Archive", false).unwrap();
    assert_eq!(validity, s.mailbox("Archive").unwrap().uidvalidity);
    assert_eq!(pairs, [(2, 1), (3, 2)]);
    assert_eq!(s.expunge(inbox.id, Some(&[1])).unwrap(), [1]);
    assert_eq!(s.expunge(inbox.id, None).unwrap(), [2]);
    let (_, pairs) = s.copy(inbox.id, &[3], "Trash", true).unwrap();
    assert_eq!(pairs, [(3, 1)]);
    assert!(s.messages(inbox.id).unwrap().is_empty());
    let (_, _, expunged) = s.changes_since(inbox.id, before).unwrap();
    assert_eq!(expunged, [1, 2, 3]);
    // The shared file stays while a copy names it.
    let archive = s.mailbox("Archive").unwrap();
    let kept = s.messages(archive.id).unwrap();
    assert_eq!(
        s.read_blob(kept[0].blob).unwrap().len() as u32,
        kept[0].size
    );
}

#[test]
fn mailboxes_are_created_renamed_and_deleted_with_their_children() {
    let (_d, s) = open();
    s.create_mailbox("Projects/2026/Q4").unwrap();
    assert!(s.mailbox("Projects/2026").is_ok());
    assert!(matches!(
        s.create_mailbox("Projects"),
        Err(StoreError::Exists(_))
    ));
    s.rename_mailbox("Projects", "Work").unwrap();
    assert!(s.mailbox("Work/2026/Q4").is_ok());
    assert!(matches!(
        s.delete_mailbox("Work"),
        Err(StoreError::Refused(_))
    ));
    assert!(matches!(
        s.delete_mailbox("INBOX"),
        Err(StoreError::Refused(_))
    ));
    s.deliver("x", "", MSG).unwrap();
    s.rename_mailbox("INBOX", "Old").unwrap();
    let old = s.mailbox("Old").unwrap();
    assert_eq!(s.messages(old.id).unwrap().len(), 1);
    assert!(
        s.messages(s.mailbox("INBOX").unwrap().id)
            .unwrap()
            .is_empty()
    );
    for bad in ["", "/x", "a//b", "a*"] {
        assert!(s.create_mailbox(bad).is_err(), "{bad}");
    }
}

#[test]
fn a_reopened_store_keeps_everything_and_drops_staging_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mail");
    {
        let s = Store::open(&path).unwrap();
        s.deliver("a", "", MSG).unwrap();
        std::fs::write(path.join("tmp/leftover"), b"half").unwrap();
    }
    let s = Store::open(&path).unwrap();
    assert!(!path.join("tmp/leftover").exists());
    assert_eq!(s.deliver("a", "", MSG).unwrap(), Delivered::Duplicate);
    assert_eq!(
        s.status(s.mailbox("INBOX").unwrap().id).unwrap().messages,
        1
    );
    assert!(s.checkpoint().unwrap().contains("1 messages"));
}

#[test]
fn a_mailbox_made_again_never_gets_an_old_uidvalidity() {
    let (_d, s) = open();
    let mut seen = std::collections::HashSet::new();
    for m in s.mailboxes().unwrap() {
        assert!(seen.insert(m.uidvalidity));
    }
    for _ in 0..5 {
        s.create_mailbox("Projects").unwrap();
        let v = s.mailbox("Projects").unwrap().uidvalidity;
        assert!(seen.insert(v), "UIDVALIDITY {v} given twice");
        s.delete_mailbox("Projects").unwrap();
    }
}

#[test]
fn children_are_matched_with_their_parent_case() {
    let (_d, s) = open();
    s.create_mailbox("Work").unwrap();
    s.create_mailbox("work/old").unwrap();
    // `work/old` is not under `Work`: deleting and renaming Work leave it.
    s.rename_mailbox("Work", "Job").unwrap();
    assert!(s.mailbox("work/old").is_ok());
    s.create_mailbox("Work_x").unwrap();
    s.delete_mailbox("Job").unwrap();
    assert!(s.mailbox("Work_x").is_ok());
}

#[test]
fn a_deleted_message_number_is_never_given_again() {
    let (_d, s) = open();
    s.deliver("spool-1", "a@remote.example", MSG).unwrap();
    let inbox = s.mailbox("INBOX").unwrap();
    let first = s.messages(inbox.id).unwrap()[0].blob;
    s.store_flags(inbox.id, &[1], FlagChange::Add, DELETED, &[], None)
        .unwrap();
    s.expunge(inbox.id, None).unwrap();
    s.deliver("spool-2", "a@remote.example", MSG).unwrap();
    let second = s.messages(inbox.id).unwrap()[0].blob;
    assert!(second > first, "blob {first} given again");
}
