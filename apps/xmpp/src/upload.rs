//! File sharing (XEP-0363 HTTP upload). The account is its own upload
//! service, `upload.<domain>`: a client asks it for a slot (name, size,
//! type), gets a PUT and a GET address at `https://upload.<domain>/<owner>/
//! <slot>/<name>`, and uploads through the gateway to this grain's `http`
//! service. The file is stored in this grain's dataset (so the dataset's
//! quota bounds it, and it is snapshotted and backed up with the account),
//! and served to anyone who has the address until it expires.
//!
//! The slot id is 192 random bits, the address's only secret: nothing
//! lists files, an unknown or expired address is a 404 like one that never
//! existed, and a slot takes one upload of exactly the size it was given,
//! within five minutes. Limits come from `[xmpp]` (`upload_max_mib`,
//! `upload_expire_secs`, `upload_quota_mib`) through the environment.

use std::convert::Infallible;
use std::path::PathBuf;
use std::rc::Rc;

use base64::Engine;
use bytes::Bytes;
use granary_wire::stanza::Element;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWriteExt};

use crate::account::result_for;
use crate::ns;
use crate::server::{Server, error_reply};

pub const NS: &str = "urn:xmpp:http:upload:0";
/// How long a slot waits for its upload.
const SLOT_SECS: i64 = 300;
/// Slots waiting for an upload at once.
const MAX_OPEN_SLOTS: u64 = 64;

/// The upload service's settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `https://upload.<domain>[:port]`; empty: uploads are off.
    pub base: String,
    pub max_bytes: u64,
    pub expire_secs: i64,
    pub quota_bytes: u64,
    /// Where files live (`/var/xmpp/uploads`).
    pub dir: PathBuf,
}

impl Settings {
    pub fn from_env(store_dir: &std::path::Path) -> Settings {
        let num = |k: &str, d: u64| {
            std::env::var(k)
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(d)
        };
        Settings {
            base: std::env::var("GRANARY_XMPP_UPLOAD_URL").unwrap_or_default(),
            max_bytes: num("GRANARY_XMPP_UPLOAD_MAX_BYTES", 16 << 20),
            expire_secs: num("GRANARY_XMPP_UPLOAD_EXPIRE_SECS", 30 * 86_400) as i64,
            quota_bytes: num("GRANARY_XMPP_UPLOAD_QUOTA_BYTES", 1 << 30),
            dir: store_dir.join("uploads"),
        }
    }

    pub fn enabled(&self) -> bool {
        !self.base.is_empty()
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The service's address: `upload.<domain>`.
pub fn service_jid(domain: &str) -> String {
    format!("upload.{domain}")
}

/// Disco for `upload.<domain>`.
pub fn disco_info(server: &Server, el: &Element) -> Element {
    let max = server.upload.max_bytes.to_string();
    let form = Element::new("x", ns::DATA)
        .with_attr("type", "result")
        .with_child(field("FORM_TYPE", NS, Some("hidden")))
        .with_child(field("max-file-size", &max, None));
    result_for(el).with_child(
        Element::new("query", ns::DISCO_INFO)
            .with_child(
                Element::new("identity", ns::DISCO_INFO)
                    .with_attr("category", "store")
                    .with_attr("type", "file")
                    .with_attr("name", "HTTP file upload"),
            )
            .with_child(Element::new("feature", ns::DISCO_INFO).with_attr("var", NS))
            .with_child(form),
    )
}

fn field(var: &str, value: &str, kind: Option<&str>) -> Element {
    let mut f = Element::new("field", ns::DATA).with_attr("var", var);
    if let Some(k) = kind {
        f.set_attr("type", k);
    }
    f.with_child(Element::new("value", ns::DATA).with_text(value))
}

/// A file name as it may appear in the address: no separators, no
/// control characters, not empty, at most 200 bytes.
fn clean_name(name: &str) -> Option<String> {
    let base = name.rsplit(['/', '\\']).next().unwrap_or("").trim();
    let ok = !base.is_empty()
        && base != "."
        && base != ".."
        && base.len() <= 200
        && !base.chars().any(char::is_control);
    ok.then(|| base.to_owned())
}

/// Percent-encodes a file name for an address (unreserved bytes stay).
pub fn encode_segment(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn decode_segment(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// An iq to `upload.<domain>` from one of the user's sessions: disco, or
/// a slot request.
pub fn handle_iq(server: &Rc<Server>, session: &Rc<crate::server::Session>, el: Element) {
    let kind = el.attr("type").unwrap_or("");
    if !matches!(kind, "get" | "set") {
        return;
    }
    let payload = el.elements().next().cloned();
    let mut reply = match (kind, payload) {
        ("get", Some(p)) if p.is("query", ns::DISCO_INFO) => disco_info(server, &el),
        ("get", Some(p)) if p.is("query", ns::DISCO_ITEMS) => {
            result_for(&el).with_child(Element::new("query", ns::DISCO_ITEMS))
        }
        ("get", Some(p)) if p.is("request", NS) => request_slot(server, &el, &p),
        _ => error_reply(&el, "cancel", "service-unavailable", None),
    };
    reply.set_attr("from", service_jid(&server.domain));
    reply.set_attr("to", session.full.to_string());
    session.send(reply);
}

/// `/<owner>/<slot>/<name>` of an upload address: the owner, the slot
/// id and the decoded file name; `None` for anything else (extra
/// segments, an empty part, a name that is not UTF-8 once decoded or
/// that a slot could not have been given).
pub fn parse_path(path: &str) -> Option<(&str, &str, String)> {
    let mut parts = path.strip_prefix('/')?.splitn(3, '/');
    let (owner, id, name) = (parts.next()?, parts.next()?, parts.next()?);
    if owner.is_empty()
        || id.is_empty()
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return None;
    }
    let name = decode_segment(name)?;
    (clean_name(&name).as_deref() == Some(name.as_str())).then_some((owner, id, name))
}

/// A slot request from the user's own client.
pub fn request_slot(server: &Rc<Server>, el: &Element, req: &Element) -> Element {
    let settings = &server.upload;
    let modify = |text: &str| error_reply(el, "modify", "bad-request", Some(text));
    if !settings.enabled() {
        return error_reply(el, "cancel", "service-unavailable", Some("uploads are off"));
    }
    let Some(name) = req.attr("filename").and_then(clean_name) else {
        return modify("a file name without slashes or control characters");
    };
    let Some(size) = req.attr("size").and_then(|s| s.parse::<u64>().ok()) else {
        return modify("the size in bytes");
    };
    if size == 0 {
        return modify("the file is empty");
    }
    if size > settings.max_bytes {
        let mut e = error_reply(
            el,
            "modify",
            "not-acceptable",
            Some(&format!("the largest file is {} bytes", settings.max_bytes)),
        );
        let found = e.elements().find(|c| c.name == "error").cloned();
        if let Some(mut error) = found {
            error.push(Element::new("file-too-large", NS).with_child(
                Element::new("max-file-size", NS).with_text(settings.max_bytes.to_string()),
            ));
            e.retain_children(|c| c.name != "error");
            e.push(error);
        }
        return e;
    }
    // "" when the client named none: the upload may then say any.
    let content_type = req
        .attr("content-type")
        .filter(|t| t.len() <= 100 && t.bytes().all(|b| b.is_ascii_graphic() || b == b' '))
        .map(media_type)
        .unwrap_or_default();
    let store = &server.store;
    let _ = expire(server);
    let (open, used) = match store.upload_usage(now()) {
        Ok(u) => u,
        Err(_) => return error_reply(el, "wait", "internal-server-error", None),
    };
    if open >= MAX_OPEN_SLOTS {
        return error_reply(
            el,
            "wait",
            "resource-constraint",
            Some("too many uploads are waiting; finish them first"),
        );
    }
    if used.saturating_add(size) > settings.quota_bytes {
        return error_reply(
            el,
            "wait",
            "resource-constraint",
            Some("your upload space is full; old files expire"),
        );
    }
    let mut raw = [0u8; 24];
    if getrandom::fill(&mut raw).is_err() {
        return error_reply(el, "wait", "internal-server-error", None);
    }
    let id = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw);
    let t = now();
    if store
        .add_upload_slot(
            &id,
            &name,
            size,
            &content_type,
            t + SLOT_SECS,
            t + settings.expire_secs,
        )
        .is_err()
    {
        return error_reply(el, "wait", "internal-server-error", None);
    }
    let owner = server.bare.local.clone().unwrap_or_default();
    let url = format!(
        "{}/{owner}/{id}/{}",
        settings.base.trim_end_matches('/'),
        encode_segment(&name)
    );
    result_for(el).with_child(
        Element::new("slot", NS)
            .with_child(Element::new("put", NS).with_attr("url", url.clone()))
            .with_child(Element::new("get", NS).with_attr("url", url)),
    )
}

/// Deletes expired files and stale slots (never one being uploaded to
/// right now). Every file is tried; the first failure is returned.
pub fn expire(server: &Server) -> std::io::Result<()> {
    let busy: Vec<String> = server.uploading.borrow().iter().cloned().collect();
    let Ok(gone) = server.store.expire_uploads(now(), &busy) else {
        return Ok(());
    };
    let mut first = Ok(());
    for id in gone {
        for path in [file(&server.upload, &id), part(&server.upload, &id)] {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    if first.is_ok() {
                        first = Err(e);
                    }
                }
            }
        }
    }
    first
}

/// A slot being uploaded to: while it lives the slot is busy (a second
/// PUT is refused, expiry leaves it alone); dropped before the upload
/// finished (an error, the connection gone, the grain stopping), it
/// removes the partial file.
struct InFlight<'a> {
    server: &'a Server,
    id: String,
    done: bool,
}

impl<'a> InFlight<'a> {
    fn start(server: &'a Server, id: &str) -> Option<InFlight<'a>> {
        server
            .uploading
            .borrow_mut()
            .insert(id.to_owned())
            .then(|| InFlight {
                server,
                id: id.to_owned(),
                done: false,
            })
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.server.uploading.borrow_mut().remove(&self.id);
        if !self.done {
            let _ = std::fs::remove_file(part(&self.server.upload, &self.id));
        }
    }
}

/// The media type alone, lowercased (`image/JPEG; q=1` is `image/jpeg`).
fn media_type(t: &str) -> String {
    t.split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

fn file(s: &Settings, id: &str) -> PathBuf {
    s.dir.join(id)
}

fn part(s: &Settings, id: &str) -> PathBuf {
    s.dir.join(format!("{id}.part"))
}

type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, std::io::Error>;

fn text(status: StatusCode, body: &str) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(
            Full::new(Bytes::from(format!("{body}\n")))
                .map_err(|never| match never {})
                .boxed_unsync(),
        )
        .expect("static parts")
}

fn not_found() -> Response<Body> {
    text(StatusCode::NOT_FOUND, "No such file.")
}

/// The grain's `http` service: uploads into slots and downloads.
pub async fn serve(server: Rc<Server>, conn: granary_sdk::Accepted) {
    let service = hyper::service::service_fn(move |req| {
        let server = server.clone();
        async move { Ok::<_, Infallible>(answer(&server, req).await) }
    });
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(conn.stream), service)
        .await
    {
        granary_sdk::log::info(&format!("upload connection ended: {e}"));
    }
}

async fn answer(server: &Rc<Server>, req: Request<Incoming>) -> Response<Body> {
    let owner = server.bare.local.clone().unwrap_or_default();
    let path = req.uri().path().to_owned();
    let Some((o, id, name)) = parse_path(&path) else {
        return not_found();
    };
    if o != owner {
        return not_found();
    }
    let Ok(Some(up)) = server.store.upload(id) else {
        return not_found();
    };
    if up.name != name {
        return not_found();
    }
    let t = now();
    match *req.method() {
        Method::PUT => put(server, req, id, &up, t).await,
        Method::GET | Method::HEAD => {
            if !up.stored || up.expires_at <= t {
                return not_found();
            }
            let head = req.method() == Method::HEAD;
            get(server, id, &up, head).await
        }
        _ => {
            let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "GET, HEAD or PUT.");
            r.headers_mut().insert(
                header::ALLOW,
                header::HeaderValue::from_static("GET, HEAD, PUT"),
            );
            r
        }
    }
}

async fn put(
    server: &Rc<Server>,
    req: Request<Incoming>,
    id: &str,
    up: &crate::store::Upload,
    t: i64,
) -> Response<Body> {
    // Used, or waited too long: as if it never was.
    if up.stored || up.slot_until <= t {
        return not_found();
    }
    let length = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    match length {
        None => {
            return text(
                StatusCode::LENGTH_REQUIRED,
                &format!("Send Content-Length: {}.", up.size),
            );
        }
        Some(n) if n != up.size => {
            return text(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("The slot is for exactly {} bytes.", up.size),
            );
        }
        Some(_) => {}
    }
    let given = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(media_type)
        .unwrap_or_default();
    let slot_type = media_type(&up.content_type);
    // A slot asked for without a type takes any.
    if !given.is_empty() && !slot_type.is_empty() && given != slot_type {
        return text(
            StatusCode::BAD_REQUEST,
            &format!("The slot is for {slot_type}."),
        );
    }
    // One upload per slot, even two at once.
    let Some(mut flight) = InFlight::start(server, id) else {
        return text(StatusCode::CONFLICT, "That slot is being uploaded to.");
    };
    if let Err((status, why)) = receive(server, req, id, up.size).await {
        return text(status, why);
    }
    flight.done = true;
    match server.store.upload_stored(id) {
        Ok(true) => Response::builder()
            .status(StatusCode::CREATED)
            .body(
                Full::new(Bytes::new())
                    .map_err(|n| match n {})
                    .boxed_unsync(),
            )
            .expect("static parts"),
        // The slot went meanwhile: the file must not stay behind.
        Ok(false) => {
            let _ = tokio::fs::remove_file(file(&server.upload, id)).await;
            not_found()
        }
        Err(_) => {
            let _ = tokio::fs::remove_file(file(&server.upload, id)).await;
            text(StatusCode::INTERNAL_SERVER_ERROR, "The file was not kept.")
        }
    }
}

/// Writes the body to the slot's file: at most `size` bytes, synced, then
/// renamed into place (a failed upload leaves nothing).
async fn receive(
    server: &Rc<Server>,
    req: Request<Incoming>,
    id: &str,
    size: u64,
) -> Result<(), (StatusCode, &'static str)> {
    let io = |_| {
        (
            StatusCode::INSUFFICIENT_STORAGE,
            "The file could not be stored.",
        )
    };
    tokio::fs::create_dir_all(&server.upload.dir)
        .await
        .map_err(io)?;
    let tmp = part(&server.upload, id);
    let mut out = tokio::fs::File::create(&tmp).await.map_err(io)?;
    let mut body = req.into_body();
    let mut written = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| (StatusCode::BAD_REQUEST, "The upload broke off."))?;
        if let Ok(data) = frame.into_data() {
            written += data.len() as u64;
            if written > size {
                return Err((StatusCode::PAYLOAD_TOO_LARGE, "More than the slot's size."));
            }
            out.write_all(&data).await.map_err(io)?;
        }
    }
    if written != size {
        return Err((StatusCode::BAD_REQUEST, "Less than the slot's size."));
    }
    out.sync_all().await.map_err(io)?;
    drop(out);
    tokio::fs::rename(&tmp, file(&server.upload, id))
        .await
        .map_err(io)?;
    Ok(())
}

/// Types a browser may show inline; anything else downloads.
fn inline(content_type: &str) -> bool {
    let t = content_type.split(';').next().unwrap_or("").trim();
    matches!(
        t,
        "image/jpeg"
            | "image/png"
            | "image/gif"
            | "image/webp"
            | "image/avif"
            | "video/mp4"
            | "video/webm"
            | "audio/mpeg"
            | "audio/ogg"
            | "audio/mp4"
            | "audio/webm"
            | "text/plain"
    )
}

async fn get(
    server: &Rc<Server>,
    id: &str,
    up: &crate::store::Upload,
    head: bool,
) -> Response<Body> {
    let Ok(f) = tokio::fs::File::open(file(&server.upload, id)).await else {
        return not_found();
    };
    let shown = inline(&up.content_type);
    let content_type = if shown {
        up.content_type.as_str()
    } else {
        "application/octet-stream"
    };
    let disposition = format!(
        "{}; filename*=UTF-8''{}",
        if shown { "inline" } else { "attachment" },
        encode_segment(&up.name)
    );
    let body: Body = if head {
        Full::new(Bytes::new())
            .map_err(|n| match n {})
            .boxed_unsync()
    } else {
        FileBody {
            file: f,
            left: up.size,
            buf: Vec::new(),
        }
        .boxed_unsync()
    };
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CONTENT_LENGTH, up.size)
        .header(header::CONTENT_DISPOSITION, disposition)
        .header(header::CACHE_CONTROL, "private, max-age=86400")
        .header("x-content-type-options", "nosniff")
        .header("content-security-policy", "default-src 'none'; sandbox")
        .header("referrer-policy", "no-referrer")
        .body(body)
        .unwrap_or_else(|_| not_found())
}

/// A stored file, read in 64 KiB pieces as the client takes them (the
/// grain never holds a whole file in memory).
struct FileBody {
    file: tokio::fs::File,
    left: u64,
    buf: Vec<u8>,
}

impl hyper::body::Body for FileBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        use std::task::Poll;
        let this = &mut *self;
        if this.left == 0 {
            return Poll::Ready(None);
        }
        let want = this.left.min(64 << 10) as usize;
        this.buf.resize(want, 0);
        let mut read = tokio::io::ReadBuf::new(&mut this.buf);
        match std::pin::Pin::new(&mut this.file).poll_read(cx, &mut read) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e))),
            Poll::Ready(Ok(())) => {
                let n = read.filled().len();
                if n == 0 {
                    return Poll::Ready(Some(Err(std::io::ErrorKind::UnexpectedEof.into())));
                }
                this.left -= n as u64;
                Poll::Ready(Some(Ok(Frame::data(Bytes::copy_from_slice(
                    &this.buf[..n],
                )))))
            }
        }
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.left)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_cleaned_and_round_trip() {
        assert_eq!(clean_name("../../etc/passwd").as_deref(), Some("passwd"));
        assert_eq!(clean_name("C:\\x\\cat.jpg").as_deref(), Some("cat.jpg"));
        assert_eq!(clean_name(".."), None);
        assert_eq!(clean_name("a\nb"), None);
        assert_eq!(clean_name(""), None);
        let n = "my cat (1) é.jpg";
        assert_eq!(decode_segment(&encode_segment(n)).as_deref(), Some(n));
        assert!(!encode_segment(n).contains(' '));
    }

    #[test]
    fn paths() {
        assert_eq!(
            parse_path("/alice/abc_-1/cat%20picture.png"),
            Some(("alice", "abc_-1", "cat picture.png".to_owned()))
        );
        assert_eq!(parse_path("/alice/abc/"), None);
        assert_eq!(parse_path("/alice/abc"), None);
        assert_eq!(parse_path("/alice//x"), None);
        assert_eq!(parse_path("/alice/a.b/x"), None);
        assert_eq!(parse_path("/alice/abc/a%2Fb"), None);
        assert_eq!(parse_path("/alice/abc/%FF"), None);
        assert_eq!(parse_path("/alice/abc/x/y"), None);
    }

    #[test]
    fn only_safe_types_show_inline() {
        assert!(inline("image/png"));
        assert!(!inline("text/html"));
        assert!(!inline("image/svg+xml"));
        assert!(!inline("application/octet-stream"));
    }
}
