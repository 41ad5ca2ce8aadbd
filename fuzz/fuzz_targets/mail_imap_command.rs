//! The mail grain's IMAP command handling: any command, with its literals,
//! run by a logged-in session against a real store with messages in it.
//! Nothing may panic and every command gets its tagged answer (or ends
//! the session with LOGOUT).

#![no_main]

use std::sync::{Arc, OnceLock};

use granary_mail::imap::framing::{Frame, Reader, literal_at_end};
use granary_mail::imap::session::{Next, Session};
use granary_mail::imap::args;
use granary_mail::store::Store;
use libfuzzer_sys::fuzz_target;

struct World {
    runtime: tokio::runtime::Runtime,
    store: Arc<Store>,
    _dir: tempfile::TempDir,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("mail")).unwrap());
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        World { runtime, store, _dir: dir }
    })
}

fuzz_target!(|data: &[u8]| {
    let _ = args::parse(data);
    let _ = args::split_search_return(data);
    let _ = literal_at_end(data);
    let w = world();
    if w.store.status(w.store.mailbox("INBOX").unwrap().id).map(|s| s.messages).unwrap_or(0) < 3 {
        for i in 0..3 {
            let m = format!("Subject: s{i}\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\r\npart\r\n--b--\r\n");
            let _ = w.store.append("INBOX", 0, &[], None, m.as_bytes());
        }
    }
    w.runtime.block_on(async {
        let mut session = Session::new(w.store.clone(), "alice".into());
        let mut input = b"s SELECT INBOX\r\n".to_vec();
        input.extend_from_slice(data);
        input.extend_from_slice(b"\r\n");
        let mut reader = Reader::new(&input[..]);
        let mut out: Vec<u8> = Vec::new();
        for _ in 0..16 {
            let frame = match reader.command(&mut out, 1 << 20).await {
                Ok(f) => f,
                Err(_) => break,
            };
            let Frame::Command(bytes) = frame else { break };
            match session.command(bytes, &mut reader, &mut out).await {
                Ok(Next::Continue) => {}
                _ => break,
            }
            out.extend_from_slice(&std::mem::take(&mut session.out));
        }
    });
});
