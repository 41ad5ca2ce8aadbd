//! Logging for apps: each line goes to the host's log through
//! `Host.log`, tagged with the grain, escaped and rate-limited there. Out
//! of a grain (a standalone run, a test) lines go to standard error.
//!
//! ```no_run
//! granary_sdk::log::info("repository created");
//! granary_sdk::log::warn(&format!("notify failed: {}", "reason"));
//! ```
//!
//! Calls do not wait for the host: a line is sent and the app goes on.

use std::cell::RefCell;

use granary_schema::host_capnp::{LogLevel, host};

thread_local! {
    /// The host of this grain; the SDK runs on one thread.
    static HOST: RefCell<Option<host::Client>> = const { RefCell::new(None) };
}

/// Sends lines to this host from now on (the SDK calls it at start).
pub(crate) fn attach(client: host::Client) {
    HOST.with(|h| *h.borrow_mut() = Some(client));
}

fn send(level: LogLevel, message: &str) {
    let client = HOST.with(|h| h.borrow().clone());
    match client {
        Some(client) => {
            let mut req = client.log_request();
            req.get().set_level(level);
            req.get().set_message(message);
            let sent = req.send().promise;
            tokio::task::spawn_local(async move {
                let _ = sent.await;
            });
        }
        None => {
            let tag = match level {
                LogLevel::Error => "error",
                LogLevel::Warn => "warn",
                LogLevel::Info => "info",
                LogLevel::Debug => "debug",
            };
            eprintln!("{tag}: {message}");
        }
    }
}

pub fn error(message: &str) {
    send(LogLevel::Error, message);
}

pub fn warn(message: &str) {
    send(LogLevel::Warn, message);
}

pub fn info(message: &str) {
    send(LogLevel::Info, message);
}

pub fn debug(message: &str) {
    send(LogLevel::Debug, message);
}
