//! Gateway errors know whose fault they are and whether the client may
//! simply try again; what a client is told follows from that.

use granary_grains::{Fault, GrainError};
use hyper::StatusCode;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct GatewayError {
    pub fault: Fault,
    /// Whether the same request may succeed later with nothing changed.
    pub retry_safe: bool,
    /// What the client is told (no internal detail).
    pub message: String,
}

impl GatewayError {
    /// The HTTP status for it: a client's mistake is 404; a grain that
    /// fails 502; a host that cannot serve now 503 (500 when a retry would
    /// not help).
    pub fn status(&self) -> StatusCode {
        match (self.fault, self.retry_safe) {
            (Fault::Client, _) => StatusCode::NOT_FOUND,
            (Fault::Grain, _) => StatusCode::BAD_GATEWAY,
            (Fault::Host, true) => StatusCode::SERVICE_UNAVAILABLE,
            (Fault::Host, false) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl From<&GrainError> for GatewayError {
    fn from(e: &GrainError) -> GatewayError {
        let message = match e.fault() {
            Fault::Client => "There is no such app here.",
            Fault::Grain if e.retry_safe() => "The app failed to answer; try again in a moment.",
            Fault::Grain => "The app is stopped after repeated failures; its admin was told.",
            Fault::Host if e.retry_safe() => "The app is not available right now; try again soon.",
            Fault::Host => "The server failed; its admin was told.",
        };
        GatewayError {
            fault: e.fault(),
            retry_safe: e.retry_safe(),
            message: message.to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use granary_grains::{GrainId, Problem};

    #[test]
    fn the_status_follows_the_fault() {
        let id = GrainId::parse("alice-git").unwrap();
        let cases = [
            (Problem::NoSuchGrain, StatusCode::NOT_FOUND),
            (Problem::Grain("crashed".into()), StatusCode::BAD_GATEWAY),
            (
                Problem::Held {
                    reason: "crash loop".into(),
                },
                StatusCode::BAD_GATEWAY,
            ),
            (
                Problem::Busy("full".into()),
                StatusCode::SERVICE_UNAVAILABLE,
            ),
            (Problem::Stopping, StatusCode::SERVICE_UNAVAILABLE),
        ];
        for (problem, status) in cases {
            let e = GatewayError::from(&GrainError::new(&id, problem.clone()));
            assert_eq!(e.status(), status, "{problem:?}");
        }
    }
}
