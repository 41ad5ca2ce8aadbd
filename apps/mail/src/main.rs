//! The mail grain's binary: opens the store and serves the app (see the
//! library, `granary_mail`).

use std::process::ExitCode;
use std::rc::Rc;
use std::sync::Arc;

use granary_sdk::{Accepted, App, GrainRef, Host};

use granary_mail::store::Store;
use granary_mail::{deliver, imap};

/// Where the store lives inside the grain.
const STORE_DIR: &str = "/var/mail";

struct Mail {
    store: Arc<Store>,
}

impl App for Mail {
    async fn accept(self: Rc<Self>, conn: Accepted) {
        match conn.service.as_str() {
            "imap" => imap::serve(conn, self.store.clone()).await,
            other => granary_sdk::log::warn(&format!("no service named {other}")),
        }
    }

    fn offer(
        &self,
        descriptor: &str,
        requester: GrainRef,
    ) -> Result<capnp::capability::Client, capnp::Error> {
        match descriptor {
            // A server route: only the host delivers mail (a grant from
            // another grain names that grain as the requester).
            "mail.deliver" if requester.id.is_empty() => {
                let d: granary_sdk::services_capnp::mail_delivery::Client =
                    capnp_rpc::new_client(deliver::Delivery {
                        store: self.store.clone(),
                    });
                Ok(d.client)
            }
            "mail.deliver" => Err(capnp::Error::failed(
                "mail.deliver is the host's; no grain may deliver mail".to_owned(),
            )),
            other => Err(capnp::Error::failed(format!("nothing offered as {other}"))),
        }
    }

    async fn prepare_snapshot(self: Rc<Self>) -> Result<String, capnp::Error> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.checkpoint())
            .await
            .map_err(|e| capnp::Error::failed(e.to_string()))?
            .map_err(|e| capnp::Error::failed(e.to_string()))
    }
}

fn main() -> ExitCode {
    let dir = std::env::var_os("GRANARY_MAIL_DIR").unwrap_or_else(|| STORE_DIR.into());
    let store = match Store::open(std::path::Path::new(&dir)) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            eprintln!("granary-mail: cannot open the mail store: {e}");
            return ExitCode::from(70);
        }
    };
    granary_sdk::run(move |_host: Host| Mail { store })
}
