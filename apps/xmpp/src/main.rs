//! The chat grain's binary: opens the account's store, asks the host for
//! its route to other users, and serves the app (see the library,
//! `granary_xmpp`).

use std::process::ExitCode;
use std::rc::Rc;

use granary_sdk::services_capnp::xmpp_router;
use granary_sdk::{Accepted, App, GrainRef, Host};
use granary_xmpp::server::{Deliver, Server};
use granary_xmpp::session;
use granary_xmpp::store::Store;

/// Where the store lives inside the grain.
const STORE_DIR: &str = "/var/xmpp";

struct Chat {
    server: Rc<Server>,
}

impl App for Chat {
    async fn accept(self: Rc<Self>, conn: Accepted) {
        match conn.service.as_str() {
            "xmpp" if conn.user == self.server.bare.local.clone().unwrap_or_default() => {
                session::serve(conn, self.server.clone()).await
            }
            "xmpp" => granary_sdk::log::warn("a client of another user was handed here"),
            // Uploads and downloads of shared files (anyone with the
            // address: the gateway serves it publicly).
            "http" => granary_xmpp::upload::serve(self.server.clone(), conn).await,
            other => granary_sdk::log::warn(&format!("no service named {other}")),
        }
    }

    fn offer(
        &self,
        descriptor: &str,
        requester: GrainRef,
    ) -> Result<capnp::capability::Client, capnp::Error> {
        match descriptor {
            // Only the host delivers: a grant from another grain names
            // that grain as the requester.
            "xmpp.deliver" if requester.id.is_empty() => {
                let d: xmpp_router::Client = capnp_rpc::new_client(Deliver {
                    server: self.server.clone(),
                });
                Ok(d.client)
            }
            "xmpp.deliver" => Err(capnp::Error::failed(
                "xmpp.deliver is the host's; no grain may deliver stanzas".to_owned(),
            )),
            other => Err(capnp::Error::failed(format!("nothing offered as {other}"))),
        }
    }

    async fn shutdown(self: Rc<Self>) {
        self.server.flush_archive();
    }

    async fn prepare_snapshot(self: Rc<Self>) -> Result<String, capnp::Error> {
        self.server.flush_archive();
        self.server
            .store
            .checkpoint()
            .map_err(|e| capnp::Error::failed(e.to_string()))
    }
}

/// A room grain (`granary-xmpp room`): one group chat.
struct RoomApp {
    room: Rc<granary_xmpp::room::Room>,
}

impl App for RoomApp {
    async fn accept(self: Rc<Self>, conn: Accepted) {
        granary_sdk::log::warn(&format!(
            "a room takes no connections ({} was handed here)",
            conn.service
        ));
    }

    fn offer(
        &self,
        descriptor: &str,
        requester: GrainRef,
    ) -> Result<capnp::capability::Client, capnp::Error> {
        match descriptor {
            "xmpp.deliver" if requester.id.is_empty() => {
                let d: xmpp_router::Client = capnp_rpc::new_client(granary_xmpp::room::Deliver {
                    room: self.room.clone(),
                });
                Ok(d.client)
            }
            "xmpp.deliver" => Err(capnp::Error::failed(
                "xmpp.deliver is the host's; no grain may deliver stanzas".to_owned(),
            )),
            other => Err(capnp::Error::failed(format!("nothing offered as {other}"))),
        }
    }

    async fn prepare_snapshot(self: Rc<Self>) -> Result<String, capnp::Error> {
        self.room.flush().map_err(capnp::Error::failed)
    }
}

fn room_main(dir: std::ffi::OsString, owner: &str, domain: &str) -> ExitCode {
    // The room's name is the grain's instance: <owner>-room--<name>.
    let grain = std::env::var("GRANARY_GRAIN").unwrap_or_default();
    let Some((_, name)) = grain.split_once("--") else {
        eprintln!("granary-xmpp: {grain:?} is not a room grain (<owner>-room--<name>)");
        return ExitCode::from(64);
    };
    let store = match granary_xmpp::room::store::RoomStore::open(std::path::Path::new(&dir)) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("granary-xmpp: cannot open the room store: {e}");
            return ExitCode::from(70);
        }
    };
    let room = match granary_xmpp::room::Room::new(store, name, owner, domain) {
        Ok(r) => Rc::new(r),
        Err(e) => {
            eprintln!("granary-xmpp: room {name}: {e}");
            return ExitCode::from(70);
        }
    };
    granary_sdk::run(move |host: Host| {
        let r = room.clone();
        granary_sdk::spawn_local(async move {
            match host.request_as::<xmpp_router::Client>("xmpp.route").await {
                Ok(router) => {
                    *r.router.borrow_mut() = Some(router);
                    // What came in before the route was there goes now.
                    r.pump();
                }
                Err(e) => granary_sdk::log::error(&format!(
                    "no route to the occupants: {}",
                    granary_sdk::message(&e)
                )),
            }
        });
        RoomApp { room }
    })
}

fn main() -> ExitCode {
    let dir = std::env::var_os("GRANARY_XMPP_DIR").unwrap_or_else(|| STORE_DIR.into());
    let owner = std::env::var("GRANARY_OWNER").unwrap_or_default();
    let domain = std::env::var("GRANARY_DOMAIN").unwrap_or_else(|_| "localhost".to_owned());
    if std::env::args().nth(1).as_deref() == Some("room") {
        return room_main(dir, &owner, &domain);
    }
    let store = match Store::open(std::path::Path::new(&dir)) {
        Ok(s) => Rc::new(s),
        Err(e) => {
            eprintln!("granary-xmpp: cannot open the chat store: {e}");
            return ExitCode::from(70);
        }
    };
    let server = match Server::new(store, &owner, &domain) {
        Ok(s) => Rc::new(s),
        Err(e) => {
            eprintln!("granary-xmpp: {owner}@{domain}: {e}");
            return ExitCode::from(70);
        }
    };
    // Shared files past their time go at every start (a grain that is
    // asked for one is started, so this runs before it is served).
    if let Err(e) = granary_xmpp::upload::expire(&server) {
        eprintln!("granary-xmpp: removing expired uploads: {e}");
    }
    granary_sdk::run(move |host: Host| {
        let s = server.clone();
        granary_sdk::spawn_local(async move {
            match host.request_as::<xmpp_router::Client>("xmpp.route").await {
                Ok(router) => *s.router.borrow_mut() = Some(router),
                Err(e) => granary_sdk::log::error(&format!(
                    "no route to other users: {}",
                    granary_sdk::message(&e)
                )),
            }
        });
        Chat { server }
    })
}
