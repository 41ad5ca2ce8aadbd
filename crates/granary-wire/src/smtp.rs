//! The MX's SMTP session, sans-IO: bytes in, [`Event`]s out.
//!
//! Commands are parsed with `smtp-proto`; the session keeps the RFC 5321
//! state (greeting, EHLO, the transaction, DATA or BDAT), the limits, and
//! the replies. It never decides who a recipient is or whether a message
//! is accepted: it asks its driver ([`Event::Recipient`],
//! [`Event::Sender`], [`Event::MessageEnd`]) and the driver answers with
//! [`Session::recipient_verdict`], [`Session::sender_verdict`] and
//! [`Session::message_done`]. The driver writes replies as they come and
//! flushes them whenever the session wants more input, which is what
//! PIPELINING asks of a server.
//!
//! Submission ([`Limits::submission`]): AUTH PLAIN and AUTH LOGIN are
//! offered once TLS is on, never before; MAIL needs a login. The session
//! decodes the SASL exchange and hands the driver [`Event::Auth`]; the
//! driver checks the password and answers [`Session::auth_verdict`].
//!
//! STARTTLS: the session answers 220 and returns [`Event::StartTls`]
//! having consumed exactly the STARTTLS line. Whatever else the driver
//! has buffered was sent in clear before the handshake and must be
//! thrown away; after the handshake it calls [`Session::tls_started`] and
//! the session starts over (RFC 3207 §4.2).

pub mod headers;

use std::borrow::Cow;

use base64::Engine;
use smtp_proto::request::receiver::{BdatReceiver, DataReceiver};
use smtp_proto::{Error as ParseError, Request};

/// The longest command line taken (RFC 5321 asks for 512; extensions
/// make lines longer).
pub const MAX_LINE: usize = 4096;
/// Commands refused in a row before the session gives up.
const MAX_ERRORS: u32 = 10;

/// What the driver configures.
#[derive(Debug, Clone)]
pub struct Limits {
    /// The host's name, for the greeting and EHLO.
    pub hostname: String,
    pub max_message_bytes: u64,
    pub max_recipients: usize,
    /// Whether STARTTLS is offered (the listener has a certificate and the
    /// session is not under TLS yet).
    pub starttls: bool,
    /// A submission listener: AUTH is offered under TLS and MAIL needs it.
    pub submission: bool,
}

/// Failed AUTH attempts in one session before it is closed.
const MAX_AUTH_FAILURES: u32 = 3;

/// A password on its way to the driver; never shown by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// One SMTP reply: a code, an enhanced status code (RFC 3463) and lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// `x.y.z`, or empty (greeting, EHLO).
    pub status: &'static str,
    pub lines: Vec<String>,
}

impl Reply {
    pub fn new(code: u16, status: &'static str, text: impl Into<String>) -> Reply {
        Reply {
            code,
            status,
            lines: vec![text.into()],
        }
    }

    /// Whether it is a 2xx or 3xx.
    pub fn positive(&self) -> bool {
        self.code < 400
    }

    /// Appends the reply in wire form: `250-...` lines then `250 ...`.
    /// Text is cut at CR or LF so nothing a driver passes can start a line.
    pub fn write(&self, out: &mut Vec<u8>) {
        let n = self.lines.len().max(1);
        for i in 0..n {
            let text = self.lines.get(i).map(String::as_str).unwrap_or("");
            let text = text.split(['\r', '\n']).next().unwrap_or("");
            let sep = if i + 1 == n { ' ' } else { '-' };
            let line = if self.status.is_empty() {
                format!("{}{sep}{text}\r\n", self.code)
            } else {
                format!("{}{sep}{} {text}\r\n", self.code, self.status)
            };
            out.extend_from_slice(line.as_bytes());
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write(&mut out);
        out
    }
}

/// What the session wants done next.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// Nothing more can be done with the input given: flush the replies
    /// written so far and read more.
    NeedMore,
    /// Write this reply.
    Reply(Reply),
    /// Write this 220, flush, discard all other buffered input, do the TLS
    /// handshake, then call [`Session::tls_started`].
    StartTls(Reply),
    /// MAIL FROM (empty: a bounce). Answer with
    /// [`Session::sender_verdict`] before stepping again.
    Sender(String),
    /// RCPT TO. Answer with [`Session::recipient_verdict`] before stepping
    /// again.
    Recipient(String),
    /// The next bytes of the message (dot-unstuffed), in order.
    Data(Vec<u8>),
    /// The message is complete. Answer with [`Session::message_done`]
    /// before stepping again. `too_big` says the data passed the size
    /// limit (its bytes were not all given as [`Event::Data`]).
    MessageEnd { too_big: bool },
    /// AUTH with a login and password (submission only). Answer with
    /// [`Session::auth_verdict`] before stepping again.
    Auth { login: String, password: Secret },
    /// Write this reply and close the connection.
    Close(Reply),
}

enum State {
    Command,
    /// A line over [`MAX_LINE`]: skipping to its end.
    Overlong,
    AwaitSender,
    AwaitRecipient,
    Data(DataReceiver),
    /// A BDAT chunk; `last` ends the message; `refuse` answers it when the
    /// chunk is only consumed (no transaction to put it in).
    Bdat {
        receiver: BdatReceiver,
        size: usize,
        last: bool,
        refuse: Option<Reply>,
    },
    AwaitMessage,
    /// AUTH PLAIN sent `334`: the next line is the response.
    AuthPlain,
    /// AUTH LOGIN: the next line is the user name, then the password.
    AuthLogin {
        login: Option<String>,
    },
    AwaitAuth,
    Closed,
}

/// One SMTP connection.
pub struct Session {
    limits: Limits,
    state: State,
    /// Events decided but not yet handed out.
    pending: std::collections::VecDeque<Event>,
    tls: bool,
    helo: Option<String>,
    from: Option<String>,
    recipients: Vec<String>,
    /// BDAT chunks were taken in this transaction (DATA is refused then).
    chunking: bool,
    message_bytes: u64,
    too_big: bool,
    errors: u32,
    buf: Vec<u8>,
    /// Who logged in with AUTH (submission).
    user: Option<String>,
    auth_failures: u32,
}

impl Session {
    pub fn new(limits: Limits) -> Session {
        Session {
            limits,
            state: State::Command,
            pending: std::collections::VecDeque::new(),
            tls: false,
            helo: None,
            from: None,
            recipients: Vec::new(),
            chunking: false,
            message_bytes: 0,
            too_big: false,
            errors: 0,
            buf: Vec::new(),
            user: None,
            auth_failures: 0,
        }
    }

    /// The 220 greeting.
    pub fn greeting(&self) -> Reply {
        Reply::new(220, "", format!("{} ESMTP Granary", self.limits.hostname))
    }

    /// What the client said in HELO or EHLO.
    pub fn helo(&self) -> Option<&str> {
        self.helo.as_deref()
    }

    /// The accepted recipients of the current transaction.
    pub fn recipients(&self) -> &[String] {
        &self.recipients
    }

    /// MAIL FROM of the current transaction.
    pub fn sender(&self) -> Option<&str> {
        self.from.as_deref()
    }

    pub fn tls(&self) -> bool {
        self.tls
    }

    /// The user AUTH logged in (submission), as the driver named them.
    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    /// Answers [`Event::Auth`]: `Ok(user)` logs the session in as `user`;
    /// an `Err` is the refusal, and after a few the session closes.
    pub fn auth_verdict(&mut self, verdict: Result<String, Reply>) -> Reply {
        self.state = State::Command;
        match verdict {
            Ok(user) => {
                self.user = Some(user);
                Reply::new(235, "2.7.0", "Authentication successful")
            }
            Err(r) => {
                self.auth_failures += 1;
                if self.auth_failures >= MAX_AUTH_FAILURES {
                    self.state = State::Closed;
                    self.pending.push_back(Event::Close(Reply::new(
                        421,
                        "4.7.0",
                        "Too many failed logins, closing",
                    )));
                }
                r
            }
        }
    }

    /// Whether message data is being received (DATA or BDAT), so the
    /// driver applies the data timeout rather than the command timeout.
    pub fn receiving(&self) -> bool {
        matches!(self.state, State::Data(_) | State::Bdat { .. })
    }

    /// Whether the session sits between transactions, waiting for a
    /// command with nothing under way (a stopping server may close it).
    pub fn idle(&self) -> bool {
        matches!(self.state, State::Command) && self.from.is_none() && self.pending.is_empty()
    }

    /// The handshake after [`Event::StartTls`] finished: everything is
    /// forgotten, the client must say EHLO again.
    pub fn tls_started(&mut self) {
        self.tls = true;
        self.limits.starttls = false;
        self.helo = None;
        self.user = None;
        self.reset();
        self.pending.clear();
        self.state = State::Command;
    }

    fn reset(&mut self) {
        self.from = None;
        self.recipients.clear();
        self.chunking = false;
        self.message_bytes = 0;
        self.too_big = false;
        self.buf.clear();
    }

    /// Answers [`Event::Sender`]: `Ok` accepts the sender.
    pub fn sender_verdict(&mut self, sender: &str, verdict: Result<(), Reply>) -> Reply {
        self.state = State::Command;
        match verdict {
            Ok(()) => {
                self.from = Some(sender.to_owned());
                Reply::new(250, "2.1.0", "Sender OK")
            }
            Err(r) => r,
        }
    }

    /// Answers [`Event::Recipient`]: `Ok` adds the recipient.
    pub fn recipient_verdict(&mut self, recipient: &str, verdict: Result<(), Reply>) -> Reply {
        self.state = State::Command;
        match verdict {
            Ok(()) => {
                self.recipients.push(recipient.to_owned());
                Reply::new(250, "2.1.5", "Recipient OK")
            }
            Err(r) => r,
        }
    }

    /// Answers [`Event::MessageEnd`]: the transaction is over, whatever the
    /// driver replies.
    pub fn message_done(&mut self) {
        self.reset();
        self.state = State::Command;
    }

    /// Takes bytes from the front of `input`; returns how many it used and
    /// what to do next. Call again with the rest until [`Event::NeedMore`].
    /// While the session waits for a verdict it takes nothing.
    pub fn step(&mut self, input: &[u8]) -> (usize, Event) {
        if let Some(e) = self.pending.pop_front() {
            return (0, e);
        }
        match &mut self.state {
            State::Closed
            | State::AwaitSender
            | State::AwaitRecipient
            | State::AwaitMessage
            | State::AwaitAuth => (0, Event::NeedMore),
            State::AuthPlain | State::AuthLogin { .. } => self.sasl_line(input),
            State::Overlong => match input.iter().position(|&b| b == b'\n') {
                None => (input.len(), Event::NeedMore),
                Some(p) => {
                    self.state = State::Command;
                    (p + 1, self.error(500, "5.5.2", "Line too long"))
                }
            },
            State::Data(receiver) => {
                let mut it = input.iter();
                let done = receiver.ingest(&mut it, &mut self.buf);
                let used = input.len() - it.as_slice().len();
                self.take_data(done);
                if done {
                    self.state = State::AwaitMessage;
                    self.pending.push_back(Event::MessageEnd {
                        too_big: self.too_big,
                    });
                }
                (used, self.pending.pop_front().unwrap_or(Event::NeedMore))
            }
            State::Bdat {
                receiver,
                size,
                last,
                refuse,
            } => {
                let mut it = input.iter();
                let done = receiver.ingest(&mut it, &mut self.buf);
                let used = input.len() - it.as_slice().len();
                if done {
                    let (size, last, refuse) = (*size, *last, refuse.take());
                    if let Some(r) = refuse {
                        self.buf.clear();
                        self.state = State::Command;
                        self.pending.push_back(Event::Reply(r));
                    } else {
                        self.take_data(true);
                        if last {
                            self.state = State::AwaitMessage;
                            self.pending.push_back(Event::MessageEnd {
                                too_big: self.too_big,
                            });
                        } else {
                            self.state = State::Command;
                            self.pending.push_back(Event::Reply(Reply::new(
                                250,
                                "2.0.0",
                                format!("{size} octets received"),
                            )));
                        }
                    }
                } else if refuse.is_some() {
                    // A refused chunk is read and thrown away: none of it
                    // belongs to a message.
                    self.buf.clear();
                } else {
                    self.take_data(false);
                }
                (used, self.pending.pop_front().unwrap_or(Event::NeedMore))
            }
            State::Command => self.command(input),
        }
    }

    /// Moves received bytes out as [`Event::Data`], counting them against
    /// the size limit. Until the data is `done` the last byte stays back:
    /// the DATA receiver takes back a CR it pushed when the next byte
    /// turns out to end the message.
    fn take_data(&mut self, done: bool) {
        let keep = if done { 0 } else { 1 };
        if self.buf.len() <= keep {
            return;
        }
        let out: Vec<u8> = self.buf.drain(..self.buf.len() - keep).collect();
        self.message_bytes += out.len() as u64;
        if self.message_bytes > self.limits.max_message_bytes {
            self.too_big = true;
        }
        if !self.too_big {
            self.pending.push_back(Event::Data(out));
        }
    }

    /// A refusal of a bad command; after too many the session ends.
    /// A line of the AUTH exchange: base64, or `*` to cancel.
    fn sasl_line(&mut self, input: &[u8]) -> (usize, Event) {
        let Some(end) = input.iter().position(|&b| b == b'\n') else {
            if input.len() > MAX_LINE {
                self.state = State::Overlong;
                return (input.len(), Event::NeedMore);
            }
            return (0, Event::NeedMore);
        };
        let used = end + 1;
        let line = input[..end].trim_ascii_end();
        if line == b"*" {
            self.state = State::Command;
            return (used, self.error(501, "5.0.0", "Authentication cancelled"));
        }
        let decoded = if line == b"=" {
            Some(Vec::new())
        } else {
            base64::engine::general_purpose::STANDARD.decode(line).ok()
        };
        let Some(decoded) = decoded else {
            self.state = State::Command;
            return (used, self.error(501, "5.5.2", "Cannot decode the response"));
        };
        let state = std::mem::replace(&mut self.state, State::Command);
        let event = match state {
            State::AuthPlain => self.plain(&decoded),
            State::AuthLogin { login: None } => match String::from_utf8(decoded) {
                Ok(login) if !login.is_empty() => {
                    self.state = State::AuthLogin { login: Some(login) };
                    Event::Reply(Reply::new(334, "", "UGFzc3dvcmQ6"))
                }
                _ => self.error(501, "5.5.2", "Bad user name"),
            },
            State::AuthLogin { login: Some(login) } => match String::from_utf8(decoded) {
                Ok(password) => {
                    self.state = State::AwaitAuth;
                    Event::Auth {
                        login,
                        password: Secret(password),
                    }
                }
                Err(_) => self.error(501, "5.5.2", "Bad password encoding"),
            },
            _ => unreachable!("sasl_line runs only in an AUTH state"),
        };
        (used, event)
    }

    /// An AUTH PLAIN response (RFC 4616).
    fn plain(&mut self, response: &[u8]) -> Event {
        match crate::imap::sasl_plain(response) {
            Some((login, password)) => {
                self.state = State::AwaitAuth;
                Event::Auth {
                    login,
                    password: Secret(password),
                }
            }
            None => self.error(501, "5.5.2", "Bad PLAIN response"),
        }
    }

    /// AUTH (RFC 4954) on a submission session.
    fn auth(&mut self, mechanism: u64, initial: &str) -> Event {
        if !self.limits.submission {
            return self.error(
                503,
                "5.5.1",
                "AUTH is not offered on the MX; use the submission port",
            );
        }
        if !self.tls {
            return self.error(538, "5.7.11", "Encryption required: say STARTTLS first");
        }
        if self.user.is_some() {
            return self.error(503, "5.5.1", "Already authenticated");
        }
        if self.from.is_some() {
            return self.error(503, "5.5.1", "AUTH is not allowed during a transaction");
        }
        let initial = match initial {
            "" => None,
            "=" => Some(Vec::new()),
            b64 => match base64::engine::general_purpose::STANDARD.decode(b64) {
                Ok(d) => Some(d),
                Err(_) => return self.error(501, "5.5.2", "Cannot decode the initial response"),
            },
        };
        match (mechanism, initial) {
            (smtp_proto::AUTH_PLAIN, Some(response)) => self.plain(&response),
            (smtp_proto::AUTH_PLAIN, None) => {
                self.state = State::AuthPlain;
                Event::Reply(Reply::new(334, "", ""))
            }
            (smtp_proto::AUTH_LOGIN, None) => {
                self.state = State::AuthLogin { login: None };
                Event::Reply(Reply::new(334, "", "VXNlcm5hbWU6"))
            }
            (smtp_proto::AUTH_LOGIN, Some(login)) => match String::from_utf8(login) {
                Ok(login) if !login.is_empty() => {
                    self.state = State::AuthLogin { login: Some(login) };
                    Event::Reply(Reply::new(334, "", "UGFzc3dvcmQ6"))
                }
                _ => self.error(501, "5.5.2", "Bad user name"),
            },
            _ => self.error(
                504,
                "5.5.4",
                "Unrecognized authentication type; use PLAIN or LOGIN",
            ),
        }
    }

    /// RCPT TO for `address`, once its syntax is known to be good.
    fn rcpt(&mut self, address: String) -> Event {
        if self.from.is_none() {
            return self.error(503, "5.5.1", "Need MAIL before RCPT");
        }
        if self.recipients.len() >= self.limits.max_recipients {
            return Event::Reply(Reply::new(452, "4.5.3", "Too many recipients"));
        }
        self.state = State::AwaitRecipient;
        Event::Recipient(address)
    }

    fn error(&mut self, code: u16, status: &'static str, text: &str) -> Event {
        self.errors += 1;
        if self.errors >= MAX_ERRORS {
            self.state = State::Closed;
            return Event::Close(Reply::new(421, "4.7.0", "Too many errors, closing"));
        }
        Event::Reply(Reply::new(code, status, text))
    }

    fn command(&mut self, input: &[u8]) -> (usize, Event) {
        let Some(end) = input.iter().position(|&b| b == b'\n') else {
            if input.len() > MAX_LINE {
                self.state = State::Overlong;
                return (input.len(), Event::NeedMore);
            }
            return (0, Event::NeedMore);
        };
        let used = end + 1;
        if end > MAX_LINE {
            return (used, self.error(500, "5.5.2", "Line too long"));
        }
        let line = &input[..used];
        if is_bare_postmaster(line) {
            return (used, self.rcpt("postmaster".to_owned()));
        }
        let parsed = Request::parse(&mut line.iter());
        let event = match parsed {
            Ok(request) => self.request(request),
            Err(ParseError::UnknownCommand) => self.error(500, "5.5.1", "Command unrecognized"),
            Err(ParseError::InvalidSenderAddress) => {
                self.error(501, "5.1.7", "Bad sender address syntax")
            }
            Err(ParseError::InvalidRecipientAddress) => {
                self.error(501, "5.1.3", "Bad recipient address syntax")
            }
            Err(ParseError::SyntaxError { syntax }) => {
                self.error(501, "5.5.4", &format!("Syntax: {syntax}"))
            }
            Err(ParseError::InvalidParameter { param }) => {
                self.error(501, "5.5.4", &format!("Invalid {param} parameter"))
            }
            Err(ParseError::UnsupportedParameter { param }) => {
                self.error(555, "5.5.4", &format!("Unsupported parameter {param}"))
            }
            Err(_) => self.error(500, "5.5.2", "Syntax error"),
        };
        if event == Event::NeedMore && matches!(self.state, State::Bdat { .. }) {
            // The chunk's bytes may already follow the command.
            let (more, event) = self.step(&input[used..]);
            return (used + more, event);
        }
        (used, event)
    }

    fn request(&mut self, request: Request<Cow<'_, str>>) -> Event {
        match request {
            Request::Ehlo { host } => {
                self.helo = Some(host.into_owned());
                self.reset();
                let mut lines = vec![
                    format!("{} Hello", self.limits.hostname),
                    "PIPELINING".to_owned(),
                    "8BITMIME".to_owned(),
                    "SMTPUTF8".to_owned(),
                    format!("SIZE {}", self.limits.max_message_bytes),
                    "CHUNKING".to_owned(),
                    "ENHANCEDSTATUSCODES".to_owned(),
                ];
                if self.limits.starttls && !self.tls {
                    lines.push("STARTTLS".to_owned());
                }
                if self.limits.submission && self.tls && self.user.is_none() {
                    lines.push("AUTH PLAIN LOGIN".to_owned());
                }
                Event::Reply(Reply {
                    code: 250,
                    status: "",
                    lines,
                })
            }
            Request::Helo { host } => {
                self.helo = Some(host.into_owned());
                self.reset();
                Event::Reply(Reply::new(250, "", self.limits.hostname.clone()))
            }
            Request::Lhlo { .. } => self.error(500, "5.5.1", "This is not LMTP"),
            Request::StartTls => {
                if self.tls {
                    self.error(503, "5.5.1", "TLS is already active")
                } else if !self.limits.starttls {
                    self.error(502, "5.5.1", "STARTTLS is not offered here")
                } else {
                    Event::StartTls(Reply::new(220, "2.0.0", "Ready to start TLS"))
                }
            }
            Request::Mail { from } => {
                if self.helo.is_none() {
                    return self.error(503, "5.5.1", "Say EHLO first");
                }
                if self.from.is_some() {
                    return self.error(503, "5.5.1", "A transaction is already open");
                }
                if self.limits.submission && self.user.is_none() {
                    return self.error(530, "5.7.0", "Authentication required");
                }
                let unsupported = smtp_proto::MAIL_BODY_BINARYMIME
                    | smtp_proto::MAIL_REQUIRETLS
                    | smtp_proto::MAIL_RET_FULL
                    | smtp_proto::MAIL_RET_HDRS
                    | smtp_proto::MAIL_BY_NOTIFY
                    | smtp_proto::MAIL_BY_RETURN
                    | smtp_proto::MAIL_BY_TRACE
                    | smtp_proto::MAIL_CONPERM;
                if from.flags & unsupported != 0
                    || from.env_id.is_some()
                    || (from.auth.is_some() && !self.limits.submission)
                    || from.mtrk.is_some()
                    || from.hold_for != 0
                    || from.hold_until != 0
                {
                    return self.error(555, "5.5.4", "Unsupported MAIL parameter");
                }
                if from.size as u64 > self.limits.max_message_bytes {
                    return Event::Reply(Reply::new(
                        552,
                        "5.3.4",
                        format!(
                            "Message too big: this server takes at most {} bytes",
                            self.limits.max_message_bytes
                        ),
                    ));
                }
                self.state = State::AwaitSender;
                Event::Sender(from.address.into_owned())
            }
            Request::Rcpt { to } => {
                if self.from.is_none() {
                    return self.error(503, "5.5.1", "Need MAIL before RCPT");
                }
                if to.flags != 0 || to.orcpt.is_some() {
                    return self.error(555, "5.5.4", "Unsupported RCPT parameter");
                }
                if to.address.is_empty() {
                    return self.error(501, "5.1.3", "Bad recipient address syntax");
                }
                self.rcpt(to.address.into_owned())
            }
            Request::Data => {
                if self.from.is_none() {
                    return self.error(503, "5.5.1", "Need MAIL before DATA");
                }
                if self.chunking {
                    return self.error(503, "5.5.1", "DATA after BDAT: use BDAT to the end");
                }
                if self.recipients.is_empty() {
                    return Event::Reply(Reply::new(554, "5.5.1", "No valid recipients"));
                }
                // The receiver looks for CRLF "." CRLF; the CRLF that
                // ended the DATA line counts, so an empty message (".")
                // ends and a first line of ".." is unstuffed.
                let mut receiver = DataReceiver::new();
                receiver.ingest(&mut b"\r\n".iter(), &mut Vec::new());
                self.state = State::Data(receiver);
                Event::Reply(Reply::new(
                    354,
                    "",
                    "Start mail input; end with <CRLF>.<CRLF>",
                ))
            }
            Request::Bdat {
                chunk_size,
                is_last,
            } => {
                let refuse = if self.from.is_none() {
                    Some(Reply::new(503, "5.5.1", "Need MAIL before BDAT"))
                } else if self.recipients.is_empty() {
                    Some(Reply::new(554, "5.5.1", "No valid recipients"))
                } else {
                    None
                };
                if refuse.is_some() {
                    self.errors += 1;
                } else {
                    self.chunking = true;
                }
                self.state = State::Bdat {
                    receiver: BdatReceiver::new(chunk_size, is_last),
                    size: chunk_size,
                    last: is_last,
                    refuse,
                };
                Event::NeedMore
            }
            Request::Rset => {
                self.reset();
                Event::Reply(Reply::new(250, "2.0.0", "OK"))
            }
            Request::Noop { .. } => Event::Reply(Reply::new(250, "2.0.0", "OK")),
            Request::Quit => {
                self.state = State::Closed;
                Event::Close(Reply::new(221, "2.0.0", "Bye"))
            }
            Request::Vrfy { .. } => Event::Reply(Reply::new(
                252,
                "2.5.0",
                "Cannot verify the user, but will accept the message",
            )),
            Request::Help { .. } => Event::Reply(Reply::new(
                214,
                "2.0.0",
                "See RFC 5321; this is Granary's MX",
            )),
            Request::Auth {
                mechanism,
                initial_response,
            } => self.auth(mechanism, &initial_response),
            Request::Expn { .. }
            | Request::Etrn { .. }
            | Request::Atrn { .. }
            | Request::Burl { .. } => self.error(502, "5.5.1", "Command not implemented"),
        }
    }
}

#[cfg(test)]
mod tests;

/// `RCPT TO:<Postmaster>` without a domain, which RFC 5321 §4.1.1.3 says
/// every server takes (the parser refuses an address without a domain).
/// A space after the colon, which many clients send, is taken too; any
/// parameters after it are not (none is offered).
fn is_bare_postmaster(line: &[u8]) -> bool {
    let line = line.trim_ascii_end();
    let Some(rest) = line
        .get(..8)
        .filter(|p| p.eq_ignore_ascii_case(b"RCPT TO:"))
        .map(|_| line[8..].trim_ascii_start())
    else {
        return false;
    };
    rest.eq_ignore_ascii_case(b"<postmaster>")
}
