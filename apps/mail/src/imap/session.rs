//! One logged-in IMAP session: parse a command (with `imap-codec`, after
//! the extensions it lacks are taken off), run it against the store, and
//! write its responses, then whatever other sessions changed, then the
//! tagged result.

use std::sync::Arc;

use imap_codec::CommandCodec;
use imap_codec::decode::Decoder;
use imap_codec::imap_types::command::CommandBody;
use imap_codec::imap_types::extensions::enable::CapabilityEnable;
use imap_codec::imap_types::mailbox::Mailbox as ImapMailbox;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::framing::{Reader, tag_of};
use super::selected::Selected;
use super::text::utf7;
use super::{args, capabilities};
use crate::store::{Store, StoreError};

/// What the connection does after a command.
pub enum Next {
    Continue,
    Logout,
}

/// Extensions the client turned on with ENABLE or by using them.
#[derive(Debug, Default, Clone, Copy)]
pub struct Enabled {
    pub condstore: bool,
    pub qresync: bool,
    pub rev2: bool,
    pub utf8: bool,
}

pub struct Session {
    pub store: Arc<Store>,
    pub user: String,
    pub selected: Option<Selected>,
    pub enabled: Enabled,
    /// Responses of the command under way.
    pub out: Vec<u8>,
}

/// Runs blocking store work off the session's thread.
pub async fn blocking<T: Send + 'static>(
    store: &Arc<Store>,
    work: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    let store = store.clone();
    tokio::task::spawn_blocking(move || work(&store))
        .await
        .map_err(|e| StoreError::Refused(format!("internal error: {e}")))?
}

/// The tagged NO a store error answers.
pub fn no(tag: &str, e: &StoreError) -> String {
    let code = match e {
        StoreError::NoMailbox(_) => "[NONEXISTENT] ",
        StoreError::Exists(_) => "[ALREADYEXISTS] ",
        StoreError::Full => "[OVERQUOTA] ",
        StoreError::Refused(_) => "[CANNOT] ",
        _ => "[SERVERBUG] ",
    };
    format!("{tag} NO {code}{e}\r\n")
}

impl Session {
    pub fn new(store: Arc<Store>, user: String) -> Session {
        Session {
            store,
            user,
            selected: None,
            enabled: Enabled::default(),
            out: Vec::new(),
        }
    }

    pub fn line(&mut self, s: &str) {
        self.out.extend_from_slice(s.as_bytes());
    }

    /// A mailbox name as the client sent it, in UTF-8.
    pub fn name_of(&self, m: &ImapMailbox<'_>) -> String {
        match m {
            ImapMailbox::Inbox => "INBOX".to_owned(),
            ImapMailbox::Other(o) => self.name_from(o.as_ref()),
        }
    }

    pub fn name_from(&self, bytes: &[u8]) -> String {
        let text = String::from_utf8_lossy(bytes).into_owned();
        if self.enabled.utf8 {
            text
        } else {
            utf7::decode(&text).unwrap_or(text)
        }
    }

    /// Runs one command; its responses are in `self.out` when it returns.
    pub async fn command<R, W>(
        &mut self,
        bytes: Vec<u8>,
        reader: &mut Reader<R>,
        writer: &mut W,
    ) -> std::io::Result<Next>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let tag = tag_of(&bytes);
        let words: Vec<String> = String::from_utf8_lossy(&bytes[..bytes.len().min(64)])
            .split_whitespace()
            .take(3)
            .map(|w| w.to_ascii_uppercase())
            .collect();
        let name = words.get(1).map(String::as_str).unwrap_or("");
        if name == "LIST" || name == "LSUB" {
            let rest = &bytes[tag.len().min(bytes.len())..];
            let rest = rest.trim_ascii_start();
            let rest = &rest[name.len().min(rest.len())..];
            match args::parse(rest) {
                Some(a) => self.list(&tag, name == "LSUB", &a).await,
                None => self.line(&format!("{tag} BAD Invalid {name} arguments\r\n")),
            }
            self.sync(true).await;
            return Ok(Next::Continue);
        }
        let (search_return, bytes) = match args::split_search_return(&bytes) {
            Some((opts, rest)) => (Some(opts), rest),
            None => (None, bytes),
        };
        let command = match CommandCodec::default().decode(&bytes) {
            Ok((_, c)) => c,
            Err(_) => {
                self.line(&format!(
                    "{tag} BAD Unknown command or invalid arguments\r\n"
                ));
                return Ok(Next::Continue);
            }
        };
        let tag = command.tag.as_ref().to_owned();
        match command.body {
            CommandBody::Capability => {
                self.line(&format!("* CAPABILITY {}\r\n", capabilities()));
                self.ok(&tag, "CAPABILITY completed");
            }
            CommandBody::Noop | CommandBody::Check => {
                self.sync(true).await;
                self.ok(&tag, "NOOP completed");
            }
            CommandBody::Logout => {
                self.line("* BYE Granary IMAP logging out\r\n");
                self.ok(&tag, "LOGOUT completed");
                return Ok(Next::Logout);
            }
            CommandBody::Login { .. } | CommandBody::Authenticate { .. } => {
                self.line(&format!("{tag} BAD Already logged in\r\n"));
            }
            CommandBody::Enable { capabilities } => {
                let mut turned_on = Vec::new();
                for c in capabilities.as_ref() {
                    let name = match c {
                        CapabilityEnable::CondStore => "CONDSTORE".to_owned(),
                        CapabilityEnable::Utf8(_) => "UTF8=ACCEPT".to_owned(),
                        other => other.to_string().to_ascii_uppercase(),
                    };
                    let e = &mut self.enabled;
                    let known = match name.as_str() {
                        "CONDSTORE" => {
                            e.condstore = true;
                            true
                        }
                        "QRESYNC" => {
                            e.qresync = true;
                            e.condstore = true;
                            true
                        }
                        "UTF8=ACCEPT" => {
                            e.utf8 = true;
                            true
                        }
                        "IMAP4REV2" => {
                            e.rev2 = true;
                            e.utf8 = true;
                            true
                        }
                        _ => false,
                    };
                    if known {
                        turned_on.push(if name == "IMAP4REV2" {
                            "IMAP4rev2".to_owned()
                        } else {
                            name
                        });
                    }
                }
                if turned_on.is_empty() {
                    self.line("* ENABLED\r\n");
                } else {
                    self.line(&format!("* ENABLED {}\r\n", turned_on.join(" ")));
                }
                self.ok(&tag, "ENABLE completed");
            }
            CommandBody::Id { .. } => {
                self.line("* ID (\"name\" \"Granary\" \"vendor\" \"Granary\" \"support-url\" \"https://example.invalid/granary\")\r\n");
                self.ok(&tag, "ID completed");
            }
            CommandBody::Namespace => {
                self.line("* NAMESPACE ((\"\" \"/\")) NIL NIL\r\n");
                self.ok(&tag, "NAMESPACE completed");
            }
            CommandBody::Select {
                mailbox,
                parameters,
            } => {
                let name = self.name_of(&mailbox);
                self.select(&tag, &name, false, &parameters).await;
            }
            CommandBody::Examine {
                mailbox,
                parameters,
            } => {
                let name = self.name_of(&mailbox);
                self.select(&tag, &name, true, &parameters).await;
            }
            CommandBody::Unselect => {
                if self.selected.take().is_some() {
                    self.ok(&tag, "UNSELECT completed");
                } else {
                    self.line(&format!("{tag} BAD No mailbox selected\r\n"));
                }
            }
            CommandBody::Close => match self.selected.take() {
                Some(sel) => {
                    if !sel.read_only {
                        let id = sel.mailbox.id;
                        let _ = blocking(&self.store, move |s| s.expunge(id, None)).await;
                    }
                    self.ok(&tag, "CLOSE completed");
                }
                None => self.line(&format!("{tag} BAD No mailbox selected\r\n")),
            },
            CommandBody::Create { mailbox } => {
                let name = self.name_of(&mailbox);
                match blocking(&self.store, move |s| s.create_mailbox(&name)).await {
                    Ok(()) => self.ok(&tag, "CREATE completed"),
                    Err(e) => self.line(&no(&tag, &e)),
                }
            }
            CommandBody::Delete { mailbox } => {
                let name = self.name_of(&mailbox);
                if self
                    .selected
                    .as_ref()
                    .is_some_and(|s| s.mailbox.name == name)
                {
                    self.selected = None;
                }
                match blocking(&self.store, move |s| s.delete_mailbox(&name)).await {
                    Ok(()) => self.ok(&tag, "DELETE completed"),
                    Err(e) => self.line(&no(&tag, &e)),
                }
            }
            CommandBody::Rename { from, to } => {
                let (from, to) = (self.name_of(&from), self.name_of(&to));
                match blocking(&self.store, move |s| s.rename_mailbox(&from, &to)).await {
                    Ok(()) => self.ok(&tag, "RENAME completed"),
                    Err(e) => self.line(&no(&tag, &e)),
                }
            }
            CommandBody::Subscribe { mailbox } | CommandBody::Unsubscribe { mailbox } => {
                let on = name == "SUBSCRIBE";
                let mb = self.name_of(&mailbox);
                match blocking(&self.store, move |s| s.subscribe(&mb, on)).await {
                    Ok(()) => self.ok(&tag, "completed"),
                    Err(e) => self.line(&no(&tag, &e)),
                }
            }
            CommandBody::Status {
                mailbox,
                item_names,
            } => {
                let name = self.name_of(&mailbox);
                self.status(&tag, &name, &item_names).await;
            }
            CommandBody::Append {
                mailbox,
                flags,
                date,
                message,
            } => {
                let name = self.name_of(&mailbox);
                self.append(&tag, &name, &flags, date.as_ref(), message)
                    .await;
            }
            CommandBody::GetQuotaRoot { mailbox } => {
                let name = self.name_of(&mailbox);
                self.line("* QUOTAROOT ");
                let mut b = Vec::new();
                super::text::mailbox(&mut b, &name, self.enabled.utf8);
                self.out.extend_from_slice(&b);
                self.line(" \"\"\r\n");
                self.quota();
                self.ok(&tag, "GETQUOTAROOT completed");
            }
            CommandBody::GetQuota { root } => {
                if root.as_ref().is_empty() {
                    self.quota();
                    self.ok(&tag, "GETQUOTA completed");
                } else {
                    self.line(&format!("{tag} NO [NONEXISTENT] No such quota root\r\n"));
                }
            }
            CommandBody::SetQuota { .. } => {
                self.line(&format!(
                    "{tag} NO [NOPERM] The quota is the admin's (granary storage settings)\r\n"
                ));
            }
            CommandBody::Idle => return self.idle(&tag, reader, writer).await,
            body => {
                if self.selected.is_none() {
                    self.line(&format!("{tag} BAD No mailbox selected\r\n"));
                    return Ok(Next::Continue);
                }
                self.selected_command(&tag, body, search_return, writer)
                    .await?;
            }
        }
        Ok(Next::Continue)
    }

    pub fn ok(&mut self, tag: &str, text: &str) {
        self.line(&format!("{tag} OK {text}\r\n"));
    }

    /// Tells the client what other sessions and deliveries changed. With
    /// `expunges` false (during FETCH, STORE, SEARCH) nothing is sent.
    pub async fn sync(&mut self, expunges: bool) {
        if !expunges {
            return;
        }
        let Some(sel) = self.selected.as_ref() else {
            return;
        };
        let (id, since) = (sel.mailbox.id, sel.modseq);
        let Ok((mb, changed, expunged)) =
            blocking(&self.store, move |s| s.changes_since(id, since)).await
        else {
            return;
        };
        let e = self.enabled;
        if let Some(sel) = self.selected.as_mut() {
            let updates = sel.apply(
                mb.highest_modseq,
                &changed,
                &expunged,
                e.qresync,
                e.condstore,
            );
            self.out.extend_from_slice(&updates.lines);
        }
    }

    fn quota(&mut self) {
        let (used, limit) = self.store.usage().unwrap_or((0, 0));
        self.line(&format!(
            "* QUOTA \"\" (STORAGE {} {})\r\n",
            used / 1024,
            (limit / 1024).max(1)
        ));
    }

    /// IDLE: changes are pushed as they happen until the client says DONE.
    async fn idle<R, W>(
        &mut self,
        tag: &str,
        reader: &mut Reader<R>,
        writer: &mut W,
    ) -> std::io::Result<Next>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut changes = self.store.changes();
        changes.borrow_and_update();
        // The continuation first (clients expect it before any update),
        // then whatever changed while the client was not idling.
        self.line("+ idling\r\n");
        writer.write_all(&std::mem::take(&mut self.out)).await?;
        writer.flush().await?;
        self.sync(true).await;
        if !self.out.is_empty() {
            writer.write_all(&std::mem::take(&mut self.out)).await?;
            writer.flush().await?;
        }
        loop {
            tokio::select! {
                line = reader.line() => {
                    match line? {
                        None => return Ok(Next::Logout),
                        Some(Ok(l)) if l.trim_ascii().eq_ignore_ascii_case(b"DONE") => {
                            self.sync(true).await;
                            self.ok(tag, "IDLE terminated");
                            return Ok(Next::Continue);
                        }
                        Some(_) => {
                            self.line(&format!("{tag} BAD Expected DONE\r\n"));
                            return Ok(Next::Continue);
                        }
                    }
                }
                changed = changes.changed() => {
                    if changed.is_err() {
                        return Ok(Next::Logout);
                    }
                    changes.borrow_and_update();
                    self.sync(true).await;
                    if !self.out.is_empty() {
                        writer.write_all(&std::mem::take(&mut self.out)).await?;
                        writer.flush().await?;
                    }
                }
            }
        }
    }
}
