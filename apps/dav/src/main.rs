//! The DAV grain's binary: opens the store in the grain's /var and serves
//! the owner's clients and the collections the owner shares.

use std::process::ExitCode;
use std::rc::Rc;
use std::sync::Arc;

use granary_dav::dav::Dav;
use granary_dav::http::{self, Server};
use granary_dav::share::{Offered, Shares, parse_descriptor};
use granary_dav::store::Store;
use granary_sdk::{Accepted, App, GrainRef, Host};

/// Where the store lives inside the grain.
const STORE_DIR: &str = "/var/dav";

struct DavApp {
    server: Rc<Server>,
}

impl App for DavApp {
    async fn accept(self: Rc<Self>, conn: Accepted) {
        match conn.service.as_str() {
            "http" => http::serve(self.server.clone(), conn).await,
            other => granary_sdk::log::warn(&format!("no service named {other}")),
        }
    }

    fn offer(
        &self,
        descriptor: &str,
        requester: GrainRef,
    ) -> Result<capnp::capability::Client, capnp::Error> {
        let Some((kind, name, writable)) = parse_descriptor(descriptor) else {
            return Err(capnp::Error::failed(format!(
                "nothing offered as {descriptor}"
            )));
        };
        if requester.id.is_empty() {
            return Err(capnp::Error::failed(
                "a shared collection is offered to another grain only".to_owned(),
            ));
        }
        let dav = &self.server.dav;
        let Some(collection) = dav.store.collection(kind, &name).ok().flatten() else {
            return Err(capnp::Error::failed(format!(
                "{} has no {} named {name}",
                dav.owner,
                kind.as_str()
            )));
        };
        let c: granary_sdk::services_capnp::dav_collection::Client =
            capnp_rpc::new_client(Offered {
                dav: dav.clone(),
                kind,
                name,
                writable,
                holder: requester,
                incarnation: collection.incarnation,
            });
        Ok(c.client)
    }

    async fn prepare_snapshot(self: Rc<Self>) -> Result<String, capnp::Error> {
        let store = self.server.dav.store.clone();
        tokio::task::spawn_blocking(move || store.checkpoint())
            .await
            .map_err(|e| capnp::Error::failed(e.to_string()))?
            .map_err(|e| capnp::Error::failed(e.to_string()))
    }
}

fn main() -> ExitCode {
    let dir = std::env::var_os("GRANARY_DAV_DIR").unwrap_or_else(|| STORE_DIR.into());
    let store = match Store::open(std::path::Path::new(&dir)).and_then(|s| {
        s.ensure_defaults()?;
        // The data was set back (failover, rollback): sync tokens handed
        // out since the copy must not hold (RFC 6578: the client starts
        // over), so every collection starts a new incarnation.
        let rewound = std::path::Path::new(&dir)
            .parent()
            .map(|p| p.join(granary_sdk::REWOUND));
        if let Some(mark) = rewound.filter(|m| m.exists()) {
            let n = s.new_incarnations()?;
            eprintln!("granary-dav: data set back to an earlier copy; {n} collection(s) start new sync tokens");
            std::fs::remove_file(&mark)?;
        }
        Ok(s)
    }) {
        Ok(s) => {
            let s = Arc::new(s);
            s.spawn_file_writer();
            s
        }
        Err(e) => {
            eprintln!("granary-dav: cannot open the store: {e}");
            return ExitCode::from(70);
        }
    };
    let owner = std::env::var("GRANARY_OWNER").unwrap_or_default();
    granary_sdk::run(move |host: Host| {
        let dav = Arc::new(Dav {
            store,
            owner: owner.clone(),
        });
        DavApp {
            server: Rc::new(Server {
                dav,
                shares: Rc::new(Shares::new(host)),
            }),
        }
    })
}
