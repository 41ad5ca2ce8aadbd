//! Taskwarrior 3's sync protocol (TaskChampion) over the grain's `http`
//! service: the four `/v1/client/...` endpoints, answered by the
//! TaskChampion server core on the grain's store, as
//! taskchampion-sync-server answers them (same paths, headers, content
//! types and status codes).
//!
//! The gateway has already turned the client's `X-Client-Id` (a bearer
//! secret) into a credential of the owner and strips the header; a
//! connection serves that one credential, so the task list a request
//! reaches is the credential's. Bodies are end-to-end encrypted by the
//! clients: the server stores bytes it cannot read.

use std::convert::Infallible;
use std::rc::Rc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, StatusCode, header};
use hyper_util::rt::TokioIo;
use taskchampion_sync_server_core::{
    AddVersionResult, GetVersionResult, Server, ServerError, SnapshotUrgency,
};
use uuid::Uuid;

pub const HISTORY_SEGMENT: &str = "application/vnd.taskchampion.history-segment";
pub const SNAPSHOT: &str = "application/vnd.taskchampion.snapshot";

/// The largest history segment or snapshot accepted (the grain's memory
/// limit is 256 MiB; a year of heavy use makes snapshots of a few MiB).
pub const MAX_BODY: usize = 32 << 20;

/// The TaskChampion side of the grain.
pub struct Sync {
    pub server: Server,
    pub owner: String,
}

/// The core's client id for one of the owner's credentials: each client
/// id the admin made is its own task list (its replicas share it).
pub fn client_key(credential_id: i64) -> Uuid {
    Uuid::from_u128(credential_id as u128)
}

type Answer = hyper::Response<Full<Bytes>>;

fn answer(status: StatusCode, text: &str) -> Answer {
    let body = if text.is_empty() {
        Bytes::new()
    } else {
        Bytes::from(format!("{text}\n"))
    };
    let mut r = hyper::Response::new(Full::new(body));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store, max-age=0"),
    );
    r
}

fn with(mut r: Answer, name: &'static str, value: &str) -> Answer {
    if let Ok(v) = header::HeaderValue::from_str(value) {
        r.headers_mut().insert(name, v);
    }
    r
}

fn binary(content_type: &'static str, body: Vec<u8>) -> Answer {
    let mut r = hyper::Response::new(Full::new(Bytes::from(body)));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    h.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store, max-age=0"),
    );
    r
}

fn failed(e: &dyn std::fmt::Display) -> Answer {
    granary_sdk::log::warn(&format!("task sync failed: {e}"));
    answer(
        StatusCode::INTERNAL_SERVER_ERROR,
        "the task store failed; try again",
    )
}

/// Serves one connection from the gateway (one credential's requests).
pub async fn serve(sync: Rc<Sync>, conn: granary_sdk::Accepted) {
    let credential = conn.credential_id;
    let allowed = conn.user == sync.owner
        && conn.protocol == "https"
        && matches!(conn.method, granary_sdk::AuthMethod::ClientSecret)
        && credential > 0;
    let service = hyper::service::service_fn(move |req| {
        let sync = sync.clone();
        async move {
            if !allowed {
                return Ok::<_, Infallible>(answer(
                    StatusCode::FORBIDDEN,
                    "this grain serves its owner's task clients only",
                ));
            }
            Ok(sync.answer(req, client_key(credential)).await)
        }
    });
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(conn.stream), service)
        .await
    {
        granary_sdk::log::info(&format!("http connection ended: {e}"));
    }
}

/// Reads a body of `content_type`, non-empty and at most [`MAX_BODY`].
async fn read_body(req: hyper::Request<Incoming>, content_type: &str) -> Result<Vec<u8>, Answer> {
    let given = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let wrong_type = given.split(';').next().unwrap_or("").trim() != content_type;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let mut body = req.into_body();
    // A refusal is sent after the body is read (and dropped), so the
    // client reads it instead of a reset connection.
    if wrong_type || declared.is_some_and(|n| n > MAX_BODY as u64) {
        drain(body).await;
        return Err(match wrong_type {
            true => answer(
                StatusCode::BAD_REQUEST,
                &format!("expected content type {content_type}"),
            ),
            false => too_large(),
        });
    }
    let mut bytes = Vec::with_capacity(declared.unwrap_or(0) as usize);
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return Err(answer(StatusCode::BAD_REQUEST, "the body ended early"));
        };
        if let Ok(data) = frame.into_data() {
            if bytes.len() + data.len() > MAX_BODY {
                drain(body).await;
                return Err(too_large());
            }
            bytes.extend_from_slice(&data);
        }
    }
    if bytes.is_empty() {
        return Err(answer(StatusCode::BAD_REQUEST, "empty body"));
    }
    Ok(bytes)
}

/// Reads and drops the rest of a refused body (up to 64 MiB, for 30 s).
async fn drain(mut body: Incoming) {
    let mut seen = 0usize;
    let _ = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        while let Some(Ok(frame)) = body.frame().await {
            if let Ok(data) = frame.into_data() {
                seen += data.len();
                if seen > 64 << 20 {
                    break;
                }
            }
        }
    })
    .await;
}

fn too_large() -> Answer {
    answer(
        StatusCode::PAYLOAD_TOO_LARGE,
        &format!("bodies are limited to {} MiB", MAX_BODY >> 20),
    )
}

/// The version id in the path after `prefix`, if the path is that
/// endpoint's.
fn path_version(path: &str, prefix: &str) -> Option<Result<Uuid, Answer>> {
    let rest = path.strip_prefix(prefix)?;
    Some(
        Uuid::parse_str(rest)
            .map_err(|_| answer(StatusCode::NOT_FOUND, "the path names no version")),
    )
}

impl Sync {
    /// Answers one request for the task list `client`.
    pub async fn answer(&self, req: hyper::Request<Incoming>, client: Uuid) -> Answer {
        let path = req.uri().path().to_owned();
        let method = req.method().clone();
        if let Some(parent) = path_version(&path, "/v1/client/get-child-version/") {
            if method != Method::GET {
                return answer(StatusCode::METHOD_NOT_ALLOWED, "use GET");
            }
            return match parent {
                Ok(parent) => self.get_child_version(client, parent).await,
                Err(a) => a,
            };
        }
        if let Some(parent) = path_version(&path, "/v1/client/add-version/") {
            if method != Method::POST {
                return answer(StatusCode::METHOD_NOT_ALLOWED, "use POST");
            }
            let parent = match parent {
                Ok(p) => p,
                Err(a) => return a,
            };
            return match read_body(req, HISTORY_SEGMENT).await {
                Ok(body) => self.add_version(client, parent, body).await,
                Err(a) => a,
            };
        }
        if let Some(version) = path_version(&path, "/v1/client/add-snapshot/") {
            if method != Method::POST {
                return answer(StatusCode::METHOD_NOT_ALLOWED, "use POST");
            }
            let version = match version {
                Ok(v) => v,
                Err(a) => return a,
            };
            return match read_body(req, SNAPSHOT).await {
                Ok(body) => match self.server.add_snapshot(client, version, body).await {
                    Ok(()) => answer(StatusCode::OK, ""),
                    Err(ServerError::NoSuchClient) => no_client(),
                    Err(e) => failed(&e),
                },
                // A snapshot too big to keep is dropped, not refused: a
                // refusal fails the client's whole sync, every time; the
                // protocol lets the server ignore a snapshot.
                Err(a) if a.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                    granary_sdk::log::warn("dropped a snapshot over the size limit");
                    answer(StatusCode::OK, "")
                }
                Err(a) => a,
            };
        }
        match (method, path.as_str()) {
            (Method::GET, "/v1/client/snapshot") => match self.server.get_snapshot(client).await {
                Ok(Some((version, data))) => {
                    with(binary(SNAPSHOT, data), "x-version-id", &version.to_string())
                }
                Ok(None) => answer(StatusCode::NOT_FOUND, "no snapshot yet"),
                Err(ServerError::NoSuchClient) => no_client(),
                Err(e) => failed(&e),
            },
            (Method::GET, "/") => answer(
                StatusCode::OK,
                "Granary tasks: TaskChampion sync (Taskwarrior 3)",
            ),
            _ => answer(StatusCode::NOT_FOUND, "not a TaskChampion endpoint"),
        }
    }

    async fn get_child_version(&self, client: Uuid, parent: Uuid) -> Answer {
        match self.server.get_child_version(client, parent).await {
            Ok(GetVersionResult::Success {
                version_id,
                parent_version_id,
                history_segment,
            }) => {
                let r = binary(HISTORY_SEGMENT, history_segment);
                let r = with(r, "x-version-id", &version_id.to_string());
                with(r, "x-parent-version-id", &parent_version_id.to_string())
            }
            Ok(GetVersionResult::NotFound) => answer(StatusCode::NOT_FOUND, "no newer version"),
            Ok(GetVersionResult::Gone) => answer(
                StatusCode::GONE,
                "that version is gone; start from the snapshot",
            ),
            Err(ServerError::NoSuchClient) => no_client(),
            Err(e) => failed(&e),
        }
    }

    async fn add_version(&self, client: Uuid, parent: Uuid, segment: Vec<u8>) -> Answer {
        // The first version from a new client id makes its task list.
        let created = async {
            let mut txn = self.server.txn(client).await?;
            if txn
                .get_client()
                .await
                .map_err(ServerError::Other)?
                .is_none()
            {
                txn.new_client(Uuid::nil())
                    .await
                    .map_err(ServerError::Other)?;
                txn.commit().await.map_err(ServerError::Other)?;
            }
            Ok::<_, ServerError>(())
        }
        .await;
        if let Err(e) = created {
            return failed(&e);
        }
        let result = self.server.add_version(client, parent, segment).await;
        match result {
            Ok((AddVersionResult::Ok(version), urgency)) => {
                let r = with(
                    answer(StatusCode::OK, ""),
                    "x-version-id",
                    &version.to_string(),
                );
                match urgency {
                    SnapshotUrgency::None => r,
                    SnapshotUrgency::Low => with(r, "x-snapshot-request", "urgency=low"),
                    SnapshotUrgency::High => with(r, "x-snapshot-request", "urgency=high"),
                }
            }
            Ok((AddVersionResult::ExpectedParentVersion(latest), _)) => with(
                answer(
                    StatusCode::CONFLICT,
                    "another replica added a version first; sync again",
                ),
                "x-parent-version-id",
                &latest.to_string(),
            ),
            Err(ServerError::NoSuchClient) => no_client(),
            Err(e) => failed(&e),
        }
    }
}

fn no_client() -> Answer {
    answer(StatusCode::NOT_FOUND, "no task list yet for this client id")
}
