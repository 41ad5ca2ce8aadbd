//! IMAP for the user's own clients (IMAP4rev1 and IMAP4rev2).
//!
//! The gateway terminated TLS, checked the app password and handed the
//! connection over: the session starts logged in as the grain's owner.
//! The greeting carries the capabilities; the gateway reads it and puts
//! them in its tagged OK to the client's LOGIN or AUTHENTICATE, so the
//! list lives here only.
//!
//! Commands are parsed with `imap-codec` after [`args`] takes off what its
//! 2.0.0-alpha.10 does not know yet (LIST-EXTENDED, SEARCH RETURN); the
//! framing of lines and literals is [`framing`]'s, so LITERAL+, APPEND
//! limits and IDLE are handled in one place.

pub mod args;
pub mod fetch;
pub mod framing;
pub mod mailboxes;
mod messages;
pub mod search;
pub mod selected;
pub mod session;
pub mod text;

use std::sync::Arc;

use granary_sdk::Accepted;
use tokio::io::AsyncWriteExt;

use crate::store::Store;
use framing::{Frame, Reader};
use session::{Next, Session};

/// The largest message APPEND takes (APPENDLIMIT).
pub const MAX_APPEND: u64 = 50 << 20;

/// What a logged-in client may use.
pub fn capabilities() -> String {
    format!(
        "IMAP4rev1 IMAP4rev2 LITERAL+ ENABLE IDLE NAMESPACE ID UIDPLUS MOVE UNSELECT \
         CONDSTORE QRESYNC SPECIAL-USE LIST-EXTENDED LIST-STATUS CHILDREN STATUS=SIZE \
         ESEARCH SORT QUOTA QUOTA=RES-STORAGE APPENDLIMIT={MAX_APPEND} BINARY UTF8=ACCEPT"
    )
}

/// Serves one handed-over connection until LOGOUT or the client goes.
pub async fn serve(conn: Accepted, store: Arc<Store>) {
    let (read, mut write) = conn.stream.into_split();
    let mut reader = Reader::new(read);
    let mut session = Session::new(store, conn.user);
    let greeting = format!(
        "* OK [CAPABILITY {}] Granary IMAP ready for {}\r\n",
        capabilities(),
        session.user
    );
    if write.write_all(greeting.as_bytes()).await.is_err() {
        return;
    }
    loop {
        let frame = match reader.command(&mut write, MAX_APPEND).await {
            Ok(f) => f,
            Err(_) => return,
        };
        let next = match frame {
            Frame::Closed => return,
            Frame::TooLong => {
                let _ = write.write_all(b"* BYE Line too long\r\n").await;
                return;
            }
            Frame::TooBig { tag } => {
                let line =
                    format!("{tag} NO [TOOBIG] Messages are limited to {MAX_APPEND} bytes\r\n");
                if write.write_all(line.as_bytes()).await.is_err() {
                    return;
                }
                continue;
            }
            Frame::Command(bytes) => match session.command(bytes, &mut reader, &mut write).await {
                Ok(n) => n,
                Err(_) => return,
            },
        };
        let out = std::mem::take(&mut session.out);
        if write.write_all(&out).await.is_err() {
            return;
        }
        if matches!(next, Next::Logout) {
            let _ = write.shutdown().await;
            return;
        }
    }
}

#[cfg(test)]
mod tests;
