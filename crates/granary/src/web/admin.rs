//! The admin pages under `/admin`, for users in `web.admins`: this node's
//! health and certificate, users, grains, apps, backups, the doctor and
//! the audit log. Each request asks the user's `Home` for the admin
//! capability again (refused to anyone else, and once the password
//! changed), then makes the same calls the CLI makes.

use std::collections::HashMap;

use granary_gateway::home::HomeRequest;
use granary_schema::admin_capnp::admin;
use hyper::Response;
use hyper::StatusCode;
use hyper::body::Bytes;

use super::actions::text;
use super::admin_views::{self as views, Event, Filter, GrainLine, Overview, UserLine};
use super::handlers::{Me, Web, capitalise, html, not_found, why};
use super::pages;

/// What one admin action said: an error, or what was done (and a secret
/// shown once).
pub(super) enum Said {
    Nothing,
    Done(String),
    Failed(String),
    Secret(String, String),
}

impl Web {
    pub(super) async fn admin(
        &self,
        req: &HomeRequest,
        me: &Me,
        post: bool,
        rest: &[&str],
        f: &HashMap<String, String>,
    ) -> Response<Bytes> {
        let refused = || {
            html(
                StatusCode::FORBIDDEN,
                pages::message(
                    "Not allowed",
                    "Only admins (web.admins in the configuration) may open the admin pages.",
                    Some(me.nav()),
                ),
                &[],
            )
        };
        // The daemon decides, each time (the session's flag only shows the
        // menu link): anyone else is refused, and so is a session whose
        // password changed.
        let admin = match me.home.admin_request().send().promise.await {
            Ok(r) => match r.get().and_then(|r| r.get_admin()) {
                Ok(a) => a,
                Err(e) => return self.failed(me, &e),
            },
            Err(e) if why(&e) == "not an admin" => return refused(),
            Err(e) => return self.failed(me, &e),
        };
        let field = |k: &str| f.get(k).map_or("", |v| v.trim()).to_owned();
        let said = |r: Result<String, capnp::Error>| match r {
            Ok(done) => Said::Done(done),
            Err(e) => Said::Failed(capitalise(&why(&e))),
        };
        match (post, rest) {
            (false, [] | [""]) => self.overview(me, &admin).await,
            (false, ["users"]) => self.users(me, &admin, Said::Nothing).await,
            (true, ["users"]) => {
                let name = field("name");
                let mut call = crate::admin::users(&admin).add_request();
                call.get().set_name(&name);
                call.get().set_password("");
                let r = match call.send().promise.await {
                    Ok(r) => match r.get().map(|r| text(r.get_generated_password())) {
                        Ok(p) => Said::Secret(name, p),
                        Err(e) => Said::Failed(capitalise(&why(&e))),
                    },
                    Err(e) => Said::Failed(capitalise(&why(&e))),
                };
                self.users(me, &admin, r).await
            }
            (true, ["users", name, "remove"]) => {
                let mut call = crate::admin::users(&admin).remove_request();
                call.get().set_name(*name);
                call.get().set_purge(false);
                let r = call
                    .send()
                    .promise
                    .await
                    .map(|_| format!("{name} removed."));
                self.users(me, &admin, said(r)).await
            }
            (true, ["users", name, action @ ("disable" | "enable")]) => {
                let disable = *action == "disable";
                // The CLI can undo it; this page could not, for its admin.
                if disable && *name == me.user {
                    let no = Said::Failed("You cannot disable yourself here.".to_owned());
                    return self.users(me, &admin, no).await;
                }
                let mut call = crate::admin::users(&admin).set_disabled_request();
                call.get().set_name(*name);
                call.get().set_disabled(disable);
                let r = call.send().promise.await.map(|r| {
                    let stopped = r.get().map_or(0, |r| r.get_stopped_grains());
                    match (disable, stopped) {
                        (false, _) => format!("{name} enabled."),
                        (true, 0) => format!("{name} disabled."),
                        (true, n) => format!("{name} disabled; {n} running grain(s) stopped."),
                    }
                });
                self.users(me, &admin, said(r)).await
            }
            (false, ["grains"]) => self.grains(me, &admin, Said::Nothing).await,
            (true, ["grains", id, action @ ("start" | "stop")]) => {
                let grains = crate::admin::grains(&admin);
                let r = if *action == "start" {
                    let mut call = grains.start_request();
                    call.get().set_grain(*id);
                    call.send().promise.await.map(|_| format!("{id} started."))
                } else {
                    let mut call = grains.stop_request();
                    call.get().set_grain(*id);
                    call.send().promise.await.map(|_| format!("{id} stopped."))
                };
                self.grains(me, &admin, said(r)).await
            }
            (true, ["grains", id, "quota"]) => {
                let r = match crate::admin::grains::parse_quota(&field("size")) {
                    Ok(quota) => {
                        let mut call = crate::admin::grains(&admin).set_quota_request();
                        call.get().set_grain(*id);
                        let shown = match quota {
                            Some(Some(b)) => {
                                call.get().set_bytes(b);
                                pages::size(b)
                            }
                            Some(None) => {
                                call.get().set_unlimited(true);
                                "none".to_owned()
                            }
                            None => "the default".to_owned(),
                        };
                        let done = call.send().promise.await;
                        said(done.map(|_| format!("{id}: quota {shown}.")))
                    }
                    Err(e) => Said::Failed(e.to_string()),
                };
                self.grains(me, &admin, r).await
            }
            (false, ["apps"]) => self.apps(me, &admin, Said::Nothing).await,
            (true, ["apps"]) => {
                let r = self.upgrade(&admin, &field("path")).await;
                self.apps(me, &admin, r).await
            }
            (false, ["backups"]) => self.backups(me, &admin).await,
            (false, ["audit"]) => {
                let q: HashMap<String, String> = granary_wire::form::fields(req.query.as_bytes())
                    .into_iter()
                    .collect();
                let get = |k: &str| q.get(k).map_or("", |v| v.trim()).to_owned();
                let filter = Filter {
                    actor: get("actor"),
                    action: get("action").trim_end_matches('.').to_owned(),
                    subject: get("subject"),
                    before: get("before").parse().unwrap_or(0),
                };
                self.audit(me, &admin, filter).await
            }
            (false, ["doctor"]) => self.doctor(me, &admin).await,
            _ => not_found(Some(me.nav())),
        }
    }

    async fn overview(&self, me: &Me, admin: &admin::Client) -> Response<Bytes> {
        let status = match admin.status_request().send().promise.await {
            Ok(s) => s,
            Err(e) => return self.failed(me, &e),
        };
        let Ok(s) = status.get().and_then(|s| s.get_status()) else {
            return not_found(Some(me.nav()));
        };
        let mut o = Overview {
            version: text(s.get_version()),
            healthy: s.get_healthy(),
            uptime: s.get_uptime_seconds(),
            domain: text(s.get_domain()),
            storage: text(s.get_storage_backend()),
            sandbox: text(s.get_sandbox()),
            counts: [
                s.get_users(),
                s.get_app_passwords(),
                s.get_apps(),
                s.get_grains(),
                s.get_grants(),
            ],
            refused: s.get_refused_count(),
            listeners: Vec::new(),
            cluster: None,
            nodes: Vec::new(),
            certificate: String::new(),
            certificate_error: None,
        };
        if let Ok(l) = s.get_listeners() {
            o.listeners = l
                .iter()
                .map(|l| (text(l.get_name()), text(l.get_address())))
                .collect();
        }
        if s.has_cluster()
            && let Ok(c) = s.get_cluster()
        {
            let lagging: Vec<String> = c
                .get_replication_lagging()
                .map(|l| l.iter().map(text).collect())
                .unwrap_or_default();
            o.cluster = Some((text(c.get_node()), text(c.get_lease()), lagging));
            o.nodes = c
                .get_nodes()
                .map(|l| {
                    l.iter()
                        .map(|n| views::NodeLine {
                            name: text(n.get_name()),
                            state: text(n.get_state()),
                            lease_age: n.get_lease_age_secs(),
                            grains: n.get_grains(),
                            free: n.get_free_bytes(),
                        })
                        .collect()
                })
                .unwrap_or_default();
        }
        let ca = text(s.get_ca_file());
        match crate::admin::certificates::acme(admin).await {
            Ok(Some(a)) => {
                o.certificate = a.summary();
                o.certificate_error = a.error.clone();
            }
            Ok(None) if !ca.is_empty() => {
                o.certificate = format!("from this host's own CA; clients trust {ca}");
            }
            Ok(None) => o.certificate = "the configured [tls] certificate".to_owned(),
            Err(e) => o.certificate_error = Some(format!("{e:#}")),
        }
        html(StatusCode::OK, views::overview(me.nav(), &o), &[])
    }

    async fn users(&self, me: &Me, admin: &admin::Client, said: Said) -> Response<Bytes> {
        let list = match crate::admin::users(admin)
            .list_request()
            .send()
            .promise
            .await
        {
            Ok(r) => r,
            Err(e) => return self.failed(me, &e),
        };
        let users: Vec<UserLine> = list
            .get()
            .and_then(|r| r.get_users())
            .map(|l| {
                l.iter()
                    .map(|u| UserLine {
                        name: text(u.get_name()),
                        created: u.get_created_at(),
                        devices: u.get_app_passwords(),
                        disabled: u.get_disabled_at(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        html(StatusCode::OK, views::users(me.nav(), &users, &said), &[])
    }

    async fn grains(&self, me: &Me, admin: &admin::Client, said: Said) -> Response<Bytes> {
        let list = match crate::admin::grains(admin)
            .list_request()
            .send()
            .promise
            .await
        {
            Ok(r) => r,
            Err(e) => return self.failed(me, &e),
        };
        let grains: Vec<GrainLine> = list
            .get()
            .and_then(|r| r.get_grains())
            .map(|l| {
                l.iter()
                    .map(|g| GrainLine {
                        shown: crate::admin::shown(&text(g.get_id())),
                        id: text(g.get_id()),
                        state: text(g.get_state()),
                        reason: text(g.get_reason()),
                        starts: g.get_starts(),
                        crashes: g.get_crashes(),
                        memory_limit: g.get_memory_limit(),
                        dataset: (g.get_dataset_bytes(), g.get_quota_bytes()),
                    })
                    .collect()
            })
            .unwrap_or_default();
        html(StatusCode::OK, views::grains(me.nav(), &grains, &said), &[])
    }

    /// Installs `path` (a package file on this server) when its kind is
    /// new, else upgrades to it, as `granary app install` and `granary
    /// app upgrade` do.
    async fn upgrade(&self, admin: &admin::Client, path: &str) -> Said {
        let failed = |e: &capnp::Error| Said::Failed(capitalise(&why(e)));
        if !path.starts_with('/') {
            return Said::Failed("Give the package file's full path on this server.".to_owned());
        }
        let apps = crate::admin::apps(admin);
        let mut call = apps.upgrade_request();
        call.get().set_path(path);
        match call.send().promise.await {
            Ok(r) => match r.get() {
                Ok(r) if r.get_rolled_back() => Said::Failed(format!(
                    "The new version failed to start ({}); everything went back to {}.",
                    text(r.get_error()),
                    text(r.get_previous_version())
                )),
                Ok(r) => {
                    let app = r.get_app();
                    let (kind, version) = app.map_or_else(
                        |_| (String::new(), String::new()),
                        |a| (text(a.get_kind()), text(a.get_version())),
                    );
                    Said::Done(format!(
                        "{kind} upgraded from {} to {version}; {} grain(s) restarted.",
                        text(r.get_previous_version()),
                        r.get_restarted()
                    ))
                }
                Err(e) => failed(&e),
            },
            // Not installed yet: an install.
            Err(e) if why(&e).contains("is installed; use `granary app install`") => {
                let mut call = apps.install_request();
                call.get().set_path(path);
                match call.send().promise.await {
                    Ok(r) => match r.get().and_then(|r| r.get_app()) {
                        Ok(a) => Said::Done(format!(
                            "{} {} installed.",
                            text(a.get_kind()),
                            text(a.get_version())
                        )),
                        Err(e) => failed(&e),
                    },
                    Err(e) => failed(&e),
                }
            }
            Err(e) => failed(&e),
        }
    }

    async fn apps(&self, me: &Me, admin: &admin::Client, said: Said) -> Response<Bytes> {
        let list = match crate::admin::apps(admin)
            .list_request()
            .send()
            .promise
            .await
        {
            Ok(r) => r,
            Err(e) => return self.failed(me, &e),
        };
        let apps: Vec<[String; 4]> = list
            .get()
            .and_then(|r| r.get_apps())
            .map(|l| {
                l.iter()
                    .map(|a| {
                        [
                            text(a.get_kind()),
                            text(a.get_version()),
                            pages::when(a.get_installed_at()),
                            if a.get_dev_mode() {
                                "unsigned (development)".to_owned()
                            } else {
                                "signed".to_owned()
                            },
                        ]
                    })
                    .collect()
            })
            .unwrap_or_default();
        html(StatusCode::OK, views::apps(me.nav(), &apps, &said), &[])
    }

    async fn events(
        admin: &admin::Client,
        filter: &Filter,
        limit: u32,
    ) -> Result<Vec<Event>, capnp::Error> {
        let mut call = admin.audit_request();
        call.get().set_actor(&filter.actor);
        call.get().set_action(&filter.action);
        call.get().set_subject(&filter.subject);
        call.get().set_before(filter.before);
        call.get().set_limit(limit);
        let r = call.send().promise.await?;
        Ok(r.get()?
            .get_events()?
            .iter()
            .map(|e| Event {
                id: e.get_id(),
                at: e.get_at(),
                actor: text(e.get_actor()),
                action: text(e.get_action()),
                subject: text(e.get_subject()),
                detail: text(e.get_detail()),
            })
            .collect())
    }

    async fn backups(&self, me: &Me, admin: &admin::Client) -> Response<Bytes> {
        let keys = match crate::admin::backups(admin)
            .keys_request()
            .send()
            .promise
            .await
        {
            Ok(k) => k,
            Err(e) => return self.failed(me, &e),
        };
        let list = |l: capnp::Result<capnp::text_list::Reader<'_>>| -> Vec<String> {
            l.map(|l| l.iter().map(text).collect()).unwrap_or_default()
        };
        let (targets, recipients) = keys
            .get()
            .map(|k| (list(k.get_targets()), list(k.get_recipients())))
            .unwrap_or_default();
        let filter = Filter {
            action: "backup".to_owned(),
            ..Filter::default()
        };
        let events = match Self::events(admin, &filter, 50).await {
            Ok(e) => e,
            Err(e) => return self.failed(me, &e),
        };
        html(
            StatusCode::OK,
            views::backups(me.nav(), &targets, &recipients, &events),
            &[],
        )
    }

    async fn audit(&self, me: &Me, admin: &admin::Client, filter: Filter) -> Response<Bytes> {
        const PAGE: u32 = 100;
        match Self::events(admin, &filter, PAGE).await {
            Ok(events) => {
                let more = events.len() == PAGE as usize;
                html(
                    StatusCode::OK,
                    views::audit(me.nav(), &filter, &events, more),
                    &[],
                )
            }
            Err(e) => self.failed(me, &e),
        }
    }

    async fn doctor(&self, me: &Me, admin: &admin::Client) -> Response<Bytes> {
        let r = match admin.doctor_request().send().promise.await {
            Ok(r) => r,
            Err(e) => return self.failed(me, &e),
        };
        let checks: Vec<[String; 5]> = r
            .get()
            .and_then(|r| r.get_checks())
            .map(|l| {
                l.iter()
                    .map(|c| {
                        [
                            text(c.get_level()),
                            text(c.get_area()),
                            text(c.get_name()),
                            text(c.get_detail()),
                            text(c.get_fix()),
                        ]
                    })
                    .collect()
            })
            .unwrap_or_default();
        html(StatusCode::OK, views::doctor(me.nav(), &checks), &[])
    }
}
