//! The signed-in user's pages, each filled from their `Home`.

use hyper::body::Bytes;
use hyper::{Response, StatusCode, header};

use super::handlers::{Me, Web, capitalise, html, not_found, why};
use super::views::{self, Device, GrainRow, GrantRow, KeyRow, NewDevice, Security};

/// The `.taskrc` lines of a task list.
fn taskrc(url: &str, client: &str) -> String {
    format!(
        "# Taskwarrior 3: this task list's sync with Granary.\n\
         sync.server.url={url}\n\
         sync.server.client_id={client}\n\
         # Then choose a secret of your own, the same on every computer that\n\
         # shares this list (the server never sees it):\n\
         #   task config sync.encryption_secret \"$(openssl rand -hex 32)\"\n"
    )
}

pub(super) fn text(t: capnp::Result<capnp::text::Reader<'_>>) -> String {
    t.ok().and_then(|t| t.to_string().ok()).unwrap_or_default()
}

impl Web {
    /// `host` with the port of listener `name` when it is not `default`.
    fn at(&self, host: &str, name: &str, default: u16) -> String {
        match self.setup.listeners.iter().find(|(n, _)| n == name) {
            Some((_, a)) if a.port() != default => format!("{host}:{}", a.port()),
            _ => host.to_owned(),
        }
    }

    pub(super) async fn home_page(&self, me: &Me) -> Response<Bytes> {
        let rows = match me.home.grains_request().send().promise.await {
            Ok(r) => match r.get().and_then(|r| r.get_grains()) {
                Ok(list) => list
                    .iter()
                    .map(|g| GrainRow {
                        kind: text(g.get_kind()),
                        state: text(g.get_state()),
                        used: g.get_used_bytes(),
                        quota: g.get_quota_bytes(),
                        last_snapshot: g.get_last_snapshot(),
                        last_backup: g.get_last_backup(),
                    })
                    .collect(),
                Err(_) => Vec::new(),
            },
            Err(e) => return self.failed(me, &e),
        };
        html(StatusCode::OK, views::home(me.nav(), &rows), &[])
    }

    pub(super) fn failed(&self, me: &Me, e: &capnp::Error) -> Response<Bytes> {
        tracing::warn!(user = %me.user, error = %e, "web home call failed");
        html(
            StatusCode::SERVICE_UNAVAILABLE,
            super::pages::message("Not available", &capitalise(&why(e)), Some(me.nav())),
            &[],
        )
    }

    pub(super) async fn devices(
        &self,
        me: &Me,
        error: Option<&str>,
        ok: Option<&str>,
    ) -> Response<Bytes> {
        let list = match me.home.devices_request().send().promise.await {
            Ok(r) => match r.get().and_then(|r| r.get_devices()) {
                Ok(l) => l
                    .iter()
                    .map(|d| Device {
                        id: d.get_id(),
                        kind: text(d.get_kind()),
                        label: text(d.get_label()),
                        created: d.get_created_at(),
                        last_used: d.get_last_used_at(),
                    })
                    .collect::<Vec<_>>(),
                Err(_) => Vec::new(),
            },
            Err(e) => return self.failed(me, &e),
        };
        // Task lists exist only where the tasks app is; none is no error.
        let task_lists = match me.home.task_lists_request().send().promise.await {
            Ok(r) => r
                .get()
                .and_then(|r| r.get_clients())
                .map(|l| {
                    l.iter()
                        .map(|c| Device {
                            id: c.get_id(),
                            kind: "tasks".to_owned(),
                            label: text(c.get_label()),
                            created: c.get_created_at(),
                            last_used: c.get_last_used_at(),
                        })
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default(),
            Err(e) => return self.failed(me, &e),
        };
        html(
            StatusCode::OK,
            views::devices(me.nav(), &list, &task_lists, error, ok),
            &[],
        )
    }

    /// A Taskwarrior 3 task list: its client id, shown once, and the
    /// `.taskrc` lines to sync with.
    async fn add_task_list(&self, me: &Me, label: &str) -> Response<Bytes> {
        let mut call = me.home.add_task_list_request();
        call.get().set_label(label);
        let answer = match call.send().promise.await {
            Ok(a) => a,
            Err(e) => return self.devices(me, Some(&capitalise(&why(&e))), None).await,
        };
        let (id, url) = match answer.get() {
            Ok(a) => (text(a.get_client_id()), text(a.get_url())),
            Err(e) => return self.failed(me, &e),
        };
        let page = views::device_added(
            me.nav(),
            &NewDevice {
                kind: "tasks",
                label,
                password: &id,
                settings: vec![("Server", url.clone()), ("Client id", id.clone())],
                qr: None,
                lines: Some(taskrc(&url, &id)),
                downloads: vec![("taskrc", "Download the .taskrc lines", Some(id.clone()))],
            },
        );
        html(StatusCode::OK, page, &[])
    }

    pub(super) async fn add_device(&self, me: &Me, kind: &str, label: &str) -> Response<Bytes> {
        if !views::SERVICES.iter().any(|(k, _)| *k == kind) {
            return self.devices(me, Some("Choose a service."), None).await;
        }
        let label = label.trim();
        if label.is_empty() || label.len() > 100 {
            return self
                .devices(
                    me,
                    Some("Give the device a name (up to 100 characters)."),
                    None,
                )
                .await;
        }
        if kind == "tasks" {
            return self.add_task_list(me, label).await;
        }
        let mut call = me.home.add_device_request();
        call.get().set_kind(kind);
        call.get().set_label(label);
        let answer = match call.send().promise.await {
            Ok(a) => a,
            Err(e) => return self.devices(me, Some(&capitalise(&why(&e))), None).await,
        };
        let password = text(answer.get().and_then(|a| a.get_password()));
        let (user, domain) = (me.user.as_str(), self.setup.domain.as_str());
        let address = format!("{user}@{domain}");
        let mail = &self.setup.mail;
        let mut settings: Vec<(&'static str, String)> = Vec::new();
        let mut downloads = Vec::new();
        match kind {
            "mail" => {
                settings.push(("Address", address.clone()));
                if let Some(p) = mail.imaps {
                    settings.push(("IMAP server (TLS)", format!("{}:{p}", mail.hostname)));
                } else if let Some(p) = mail.imap {
                    settings.push(("IMAP server (STARTTLS)", format!("{}:{p}", mail.hostname)));
                }
                if let Some(p) = mail.submissions {
                    settings.push(("SMTP server (TLS)", format!("{}:{p}", mail.hostname)));
                } else if let Some(p) = mail.submission {
                    settings.push(("SMTP server (STARTTLS)", format!("{}:{p}", mail.hostname)));
                }
                downloads.push((
                    "mobileconfig",
                    "Download the profile for iPhone, iPad and Mac",
                    None,
                ));
            }
            "dav" => {
                let dav = self.at(&format!("dav.{domain}"), "https", 443);
                settings.push(("Server", format!("https://{dav}/")));
            }
            "xmpp" => settings.push(("Chat address", address.clone())),
            "git" => {
                let git = self.at(&format!("git.{domain}"), "https", 443);
                settings.push((
                    "Remote",
                    format!("https://{user}@{git}/{user}/REPOSITORY.git"),
                ));
            }
            _ => {}
        }
        settings.push(("User name", user.to_owned()));
        let page = views::device_added(
            me.nav(),
            &NewDevice {
                kind,
                label,
                password: &password,
                settings,
                qr: Some((
                    password.clone(),
                    "QR code of the password, to scan into a phone",
                )),
                lines: None,
                downloads,
            },
        );
        html(StatusCode::OK, page, &[])
    }

    /// A file the device page offers: the mail profile, or a task list's
    /// `.taskrc` lines (its client id comes back from the page's form:
    /// only its hash is kept here).
    pub(super) fn download(&self, me: &Me, what: &str, client: &str) -> Response<Bytes> {
        let (body, kind, name) = match what {
            "mobileconfig" => {
                let address = format!("{}@{}", me.user, self.setup.domain);
                (
                    self.setup.mail.mobileconfig(&me.user, &address),
                    "application/x-apple-aspen-config",
                    "attachment; filename=\"mail.mobileconfig\"",
                )
            }
            "taskrc" if uuid::Uuid::try_parse(client).is_ok() => {
                // Written back in the one form Taskwarrior is given.
                let client = uuid::Uuid::try_parse(client)
                    .map(|u| u.hyphenated().to_string())
                    .unwrap_or_default();
                let host = self.at(&format!("tasks.{}", self.setup.domain), "https", 443);
                (
                    taskrc(&format!("https://{host}"), &client),
                    "text/plain; charset=utf-8",
                    "attachment; filename=\"granary.taskrc\"",
                )
            }
            _ => return not_found(Some(me.nav())),
        };
        let mut r = Response::new(Bytes::from(body));
        let h = r.headers_mut();
        h.insert(header::CONTENT_TYPE, header::HeaderValue::from_static(kind));
        h.insert(
            header::CONTENT_DISPOSITION,
            header::HeaderValue::from_static(name),
        );
        r
    }

    pub(super) async fn grants(&self, me: &Me, ok: Option<&str>) -> Response<Bytes> {
        let list = match me.home.grants_request().send().promise.await {
            Ok(r) => match r.get().and_then(|r| r.get_grants()) {
                Ok(l) => l
                    .iter()
                    .map(|g| GrantRow {
                        id: g.get_id(),
                        from: text(g.get_from()),
                        to: text(g.get_to()),
                        capability: text(g.get_capability()),
                        created: g.get_created_at(),
                    })
                    .collect::<Vec<_>>(),
                Err(_) => Vec::new(),
            },
            Err(e) => return self.failed(me, &e),
        };
        html(StatusCode::OK, views::grants(me.nav(), &list, ok), &[])
    }

    pub(super) async fn keys(
        &self,
        me: &Me,
        error: Option<&str>,
        ok: Option<&str>,
    ) -> Response<Bytes> {
        let list = match me.home.ssh_keys_request().send().promise.await {
            Ok(r) => match r.get().and_then(|r| r.get_keys()) {
                Ok(l) => l
                    .iter()
                    .map(|k| KeyRow {
                        id: k.get_id(),
                        label: text(k.get_label()),
                        fingerprint: text(k.get_fingerprint()),
                        created: k.get_created_at(),
                    })
                    .collect::<Vec<_>>(),
                Err(_) => Vec::new(),
            },
            Err(e) => return self.failed(me, &e),
        };
        html(StatusCode::OK, views::keys(me.nav(), &list, error, ok), &[])
    }

    /// The security page; `password`: the outcome of a password change.
    pub(super) async fn security(
        &self,
        me: &Me,
        error: Option<&str>,
        ok: Option<&str>,
        password: Option<Result<(), String>>,
    ) -> Response<Bytes> {
        self.security_with(me, error, ok, password, None, None)
            .await
    }

    async fn security_with(
        &self,
        me: &Me,
        error: Option<&str>,
        ok: Option<&str>,
        password: Option<Result<(), String>>,
        setup: Option<(&str, &str)>,
        recovery: Option<&[String]>,
    ) -> Response<Bytes> {
        let (totp, left) = match me.home.whoami_request().send().promise.await {
            Ok(w) => match w.get() {
                Ok(w) => (w.get_totp(), w.get_recovery_left()),
                Err(_) => (false, 0),
            },
            Err(e) => return self.failed(me, &e),
        };
        let (pw_error, pw_ok) = match &password {
            Some(Err(e)) => (Some(e.as_str()), None),
            Some(Ok(())) => (
                None,
                Some("Password changed. Other sessions were signed out."),
            ),
            None => (None, None),
        };
        let pw = views::password(me.nav(), pw_error, pw_ok);
        let s = Security {
            totp,
            recovery_left: left,
            setup,
            recovery,
        };
        html(
            StatusCode::OK,
            views::security(me.nav(), &s, error, ok, pw),
            &[],
        )
    }

    pub(super) async fn totp_begin(&self, me: &Me) -> Response<Bytes> {
        let (secret, uri) = match me.home.totp_begin_request().send().promise.await {
            Ok(r) => match r.get() {
                Ok(r) => (text(r.get_secret()), text(r.get_uri())),
                Err(e) => return self.failed(me, &e),
            },
            Err(e) => return self.failed(me, &e),
        };
        self.sessions.with(&me.token, |s| {
            *s.totp_secret.borrow_mut() = Some((secret.clone(), uri.clone()));
        });
        self.security_with(me, None, None, None, Some((&secret, &uri)), None)
            .await
    }

    pub(super) async fn totp_enable(&self, me: &Me, code: &str) -> Response<Bytes> {
        let secret = self
            .sessions
            .with(&me.token, |s| s.totp_secret.borrow().clone())
            .flatten();
        let Some((secret, uri)) = secret else {
            return self
                .security(me, Some("Start the set-up again."), None, None)
                .await;
        };
        let mut call = me.home.totp_enable_request();
        call.get().set_secret(secret.as_str());
        call.get().set_code(code);
        match call.send().promise.await {
            Ok(r) => {
                let codes: Vec<String> = r
                    .get()
                    .and_then(|r| r.get_recovery_codes())
                    .map(|l| l.iter().map(text).collect())
                    .unwrap_or_default();
                self.sessions
                    .with(&me.token, |s| s.totp_secret.borrow_mut().take());
                self.security_with(me, None, None, None, None, Some(&codes))
                    .await
            }
            Err(e) => {
                self.security_with(
                    me,
                    Some(&capitalise(&why(&e))),
                    None,
                    None,
                    Some((&secret, &uri)),
                    None,
                )
                .await
            }
        }
    }
}
