//! The tasks grain's binary: opens the store in the grain's /var and
//! serves the owner's Taskwarrior clients.

use std::process::ExitCode;
use std::rc::Rc;
use std::sync::Arc;

use granary_sdk::{Accepted, App, GrainRef, Host};
use granary_tasks::http::{self, Sync};
use granary_tasks::store::{Store, Versions};
use granary_tasks::taskd_service;
use taskchampion_sync_server_core::{Server, ServerConfig};

/// Where the store lives inside the grain.
const STORE_DIR: &str = "/var/tasks";

struct Tasks {
    store: Arc<Store>,
    sync: Rc<Sync>,
}

impl App for Tasks {
    async fn accept(self: Rc<Self>, conn: Accepted) {
        match conn.service.as_str() {
            "http" => http::serve(self.sync.clone(), conn).await,
            "taskd" => taskd_service::serve(&self.store, &self.sync.owner, conn).await,
            other => granary_sdk::log::warn(&format!("no service named {other}")),
        }
    }

    fn offer(
        &self,
        descriptor: &str,
        _: GrainRef,
    ) -> Result<capnp::capability::Client, capnp::Error> {
        Err(capnp::Error::failed(format!(
            "nothing offered as {descriptor}"
        )))
    }

    async fn prepare_snapshot(self: Rc<Self>) -> Result<String, capnp::Error> {
        self.store
            .checkpoint()
            .map_err(|e| capnp::Error::failed(e.to_string()))
    }
}

fn main() -> ExitCode {
    let dir = std::env::var_os("GRANARY_TASKS_DIR").unwrap_or_else(|| STORE_DIR.into());
    let owner = std::env::var("GRANARY_OWNER").unwrap_or_default();
    let store = match Store::open(std::path::Path::new(&dir)) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            eprintln!("granary-tasks: cannot open the task store: {e:#}");
            return ExitCode::from(70);
        }
    };
    granary_sdk::run(move |_host: Host| {
        let server = Server::new(ServerConfig::default(), Versions(store.clone()));
        Tasks {
            store: store.clone(),
            sync: Rc::new(Sync {
                server,
                owner: owner.clone(),
            }),
        }
    })
}
