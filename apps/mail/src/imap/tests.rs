//! A session driven over a socket pair against a real store: what the
//! end-to-end tests do with real clients, checked here line by line.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::store::Store;

struct Client {
    r: BufReader<tokio::net::unix::OwnedReadHalf>,
    w: tokio::net::unix::OwnedWriteHalf,
}

impl Client {
    /// Sends `line` and reads up to the tagged answer (its tag is the first
    /// word); returns everything read.
    async fn cmd(&mut self, line: &str) -> String {
        let tag = line.split(' ').next().unwrap().to_owned();
        self.w
            .write_all(format!("{line}\r\n").as_bytes())
            .await
            .unwrap();
        self.until(&format!("{tag} ")).await
    }

    async fn until(&mut self, prefix: &str) -> String {
        let mut all = String::new();
        loop {
            let mut l = String::new();
            let Ok(n) =
                tokio::time::timeout(Duration::from_secs(10), self.r.read_line(&mut l)).await
            else {
                panic!("no {prefix:?} within 10 s; got so far:\n{all}{l}");
            };
            let n = n.unwrap();
            assert!(n > 0, "closed; got so far:\n{all}");
            all.push_str(&l);
            if l.starts_with(prefix) {
                return all;
            }
        }
    }
}

async fn session(store: &Arc<Store>) -> Client {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let accepted = granary_sdk::Accepted {
        service: "imap".into(),
        user: "alice".into(),
        method: granary_sdk::AuthMethod::AppPassword,
        credential_id: 1,
        peer_address: "127.0.0.1:1".into(),
        protocol: "imaps".into(),
        server_name: "localhost".into(),
        stream: theirs,
    };
    tokio::spawn(super::serve(accepted, store.clone()));
    let (r, w) = ours.into_split();
    let mut c = Client {
        r: BufReader::new(r),
        w,
    };
    let greeting = c.until("* OK").await;
    assert!(
        greeting.contains("[CAPABILITY IMAP4rev1 IMAP4rev2"),
        "{greeting}"
    );
    c
}

fn store() -> (tempfile::TempDir, Arc<Store>) {
    let dir = tempfile::tempdir().unwrap();
    let s = Arc::new(Store::open(&dir.path().join("mail")).unwrap());
    (dir, s)
}

fn message(i: u32) -> Vec<u8> {
    format!(
        "From: Sender {i} <s{i}@remote.example>\r\nTo: alice@example.org\r\nSubject: note {i}\r\n\
Date: Tue, 14 Nov 2023 22:13:20 +0000\r\nMessage-ID: <{i}@remote.example>\r\n\r\nbody number {i}\r\n"
    )
    .into_bytes()
}

#[tokio::test]
async fn select_fetch_search_store_and_expunge() {
    let (_d, s) = store();
    for i in 1..=3 {
        s.deliver(&format!("d{i}"), "x@remote.example", &message(i))
            .unwrap();
    }
    let mut c = session(&s).await;
    let r = c.cmd("a SELECT INBOX").await;
    assert!(r.contains("* 3 EXISTS\r\n"), "{r}");
    assert!(r.contains("[UIDNEXT 4]"), "{r}");
    assert!(r.contains("a OK [READ-WRITE] SELECT completed"), "{r}");
    let r = c.cmd("b FETCH 1:* (UID FLAGS RFC822.SIZE ENVELOPE)").await;
    assert!(r.contains("* 2 FETCH (UID 2 FLAGS () RFC822.SIZE"), "{r}");
    assert!(r.contains("\"note 2\""), "{r}");
    let r = c
        .cmd("c UID FETCH 3 (BODY.PEEK[HEADER.FIELDS (SUBJECT)] BODY.PEEK[TEXT])")
        .await;
    assert!(
        r.contains("BODY[HEADER.FIELDS (SUBJECT)] {19}\r\nSubject: note 3\r\n\r\n"),
        "{r}"
    );
    assert!(r.contains("BODY[TEXT] {15}\r\nbody number 3\r\n"), "{r}");
    let r = c.cmd("d FETCH 1 (BODY[]<0.10>)").await;
    assert!(r.contains("BODY[]<0> {10}\r\nReturn-Pat"), "{r}");
    assert!(r.contains("FLAGS (\\Seen)"), "{r}");
    let r = c.cmd("e SEARCH UNSEEN SUBJECT \"note\"").await;
    assert!(r.contains("* SEARCH 2 3\r\n"), "{r}");
    let r = c
        .cmd("f UID SEARCH RETURN (MIN MAX COUNT) OR FROM s1 BODY \"number 3\"")
        .await;
    assert!(
        r.contains("* ESEARCH (TAG \"f\") UID MIN 1 MAX 3 COUNT 2\r\n"),
        "{r}"
    );
    let r = c.cmd("g STORE 2 +FLAGS (\\Deleted $Work)").await;
    assert!(
        r.contains("* 2 FETCH (UID 2 FLAGS (\\Deleted $Work))"),
        "{r}"
    );
    let r = c.cmd("h EXPUNGE").await;
    assert!(r.contains("* 2 EXPUNGE\r\n"), "{r}");
    let r = c.cmd("i UID MOVE 3 Archive").await;
    assert!(r.contains("[COPYUID "), "{r}");
    assert!(r.contains("* 2 EXPUNGE\r\n"), "{r}");
    let r = c
        .cmd("j STATUS Archive (MESSAGES SIZE HIGHESTMODSEQ)")
        .await;
    assert!(r.contains("* STATUS \"Archive\" (MESSAGES 1 SIZE "), "{r}");
    let r = c.cmd("k LIST \"\" *").await;
    assert!(
        r.contains("* LIST (\\HasNoChildren \\Junk) \"/\" \"Junk\""),
        "{r}"
    );
    let r = c
        .cmd("l LIST (SPECIAL-USE) \"\" * RETURN (STATUS (MESSAGES))")
        .await;
    assert!(!r.contains("\"INBOX\""), "{r}");
    assert!(r.contains("* STATUS \"Archive\" (MESSAGES 1)"), "{r}");
    let r = c.cmd("m LOGOUT").await;
    assert!(r.contains("* BYE"), "{r}");
}

#[tokio::test]
async fn a_second_session_sees_changes_through_idle() {
    let (_d, s) = store();
    s.deliver("d1", "", &message(1)).unwrap();
    let mut phone = session(&s).await;
    let mut laptop = session(&s).await;
    phone.cmd("a SELECT INBOX").await;
    laptop.cmd("a SELECT INBOX").await;
    phone.w.write_all(b"b IDLE\r\n").await.unwrap();
    phone.until("+ ").await;
    laptop.cmd("b STORE 1 +FLAGS (\\Flagged)").await;
    let r = phone.until("* 1 FETCH").await;
    assert!(r.contains("\\Flagged"), "{r}");
    s.deliver("d2", "", &message(2)).unwrap();
    phone.until("* 2 EXISTS").await;
    laptop.cmd("c STORE 1 +FLAGS (\\Deleted)").await;
    laptop.cmd("d EXPUNGE").await;
    phone.until("* 1 EXPUNGE").await;
    phone.w.write_all(b"DONE\r\n").await.unwrap();
    let r = phone.until("b ").await;
    assert!(r.contains("b OK IDLE terminated"), "{r}");
    let r = phone.cmd("c FETCH 1:* (UID)").await;
    assert!(r.contains("* 1 FETCH (UID 2)"), "{r}");
}

#[tokio::test]
async fn literals_append_and_condstore() {
    let (_d, s) = store();
    let mut c = session(&s).await;
    let msg = message(9);
    c.w.write_all(format!("a APPEND Drafts (\\Draft) {{{}}}\r\n", msg.len()).as_bytes())
        .await
        .unwrap();
    c.until("+ ").await;
    c.w.write_all(&msg).await.unwrap();
    c.w.write_all(b"\r\n").await.unwrap();
    let r = c.until("a ").await;
    assert!(r.contains("a OK [APPENDUID "), "{r}");
    let r = c.cmd("b ENABLE QRESYNC").await;
    assert!(r.contains("* ENABLED QRESYNC"), "{r}");
    let r = c.cmd("c SELECT Drafts (CONDSTORE)").await;
    assert!(r.contains("[HIGHESTMODSEQ "), "{r}");
    let r = c.cmd("d FETCH 1 (FLAGS) (CHANGEDSINCE 1)").await;
    assert!(r.contains("FLAGS (\\Draft) MODSEQ ("), "{r}");
    let r = c
        .cmd("e STORE 1 (UNCHANGEDSINCE 1) +FLAGS.SILENT (\\Seen)")
        .await;
    assert!(r.contains("e OK [MODIFIED 1]"), "{r}");
    let r = c.cmd("f APPEND Nowhere {3+}\r\nabc").await;
    assert!(r.contains("f NO [TRYCREATE]"), "{r}");
    let r = c.cmd("g FETCH 1 (BINARY.SIZE[1] BODYSTRUCTURE)").await;
    assert!(r.contains("BINARY.SIZE[1] 15"), "{r}");
    let r = c.cmd("h GETQUOTAROOT INBOX").await;
    assert!(r.contains("* QUOTA \"\" (STORAGE "), "{r}");
    let r = c.cmd("i LOGIN a b").await;
    assert!(r.contains("i BAD"), "{r}");
    let r = c.cmd("j FETCH 1 (FLAGS").await;
    assert!(r.contains("j BAD"), "{r}");
}
