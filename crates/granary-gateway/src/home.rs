//! The web home at `https://<domain>/`: the gateway hands it each request
//! for the domain that none of its own pages answered, with the body read
//! (bounded), and sends back what it answers. The home itself is the
//! daemon's (`granary::web`): it reaches the daemon only through the admin
//! capabilities, with the signed-in user's authority, so the gateway knows
//! nothing of sessions or users here.

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;

use hyper::body::Bytes;
use hyper::{HeaderMap, Method, Response};

/// The largest request body the home takes (its forms are small).
pub const MAX_BODY: usize = 64 * 1024;

/// One request to the home.
#[derive(Debug)]
pub struct HomeRequest {
    pub method: Method,
    /// The path, percent-encoded as it came.
    pub path: String,
    pub query: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub peer: IpAddr,
    /// The host and port the client asked for (`example.org:8443`): where
    /// same-origin checks and links point.
    pub authority: String,
}

/// What answers the home's requests.
pub trait WebHome: Send + Sync {
    fn answer(
        &self,
        request: HomeRequest,
    ) -> Pin<Box<dyn Future<Output = Response<Bytes>> + Send + 'static>>;
}
