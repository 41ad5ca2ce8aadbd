//! `Tasks`: Taskwarrior sync credentials. TaskChampion client ids are made
//! here and returned once (only their SHA-256 is stored); taskd client
//! certificates are issued by the local CA and known by their fingerprint.

use std::rc::Rc;

use capnp::capability::Rc as CapRc;
use granary_schema::admin_capnp::{task_cert, task_client, tasks};
use granary_state::{TaskCert, TaskClient};

use super::{Ctx, blocking, fail, state_failure, user_name};

pub(super) struct Tasks(pub(super) Rc<Ctx>);

use granary_gateway::taskd::ORG as TASKD_ORG;

fn sha256(bytes: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .to_vec()
}

fn set_client(mut out: task_client::Builder<'_>, c: &TaskClient) {
    out.set_id(c.id);
    out.set_user(&c.user);
    out.set_label(&c.label);
    out.set_created_at(c.created_at);
    out.set_last_used_at(c.last_used_at.unwrap_or(0));
}

fn set_cert(mut out: task_cert::Builder<'_>, c: &TaskCert) {
    out.set_id(c.id);
    out.set_user(&c.user);
    out.set_label(&c.label);
    out.set_key(&c.key);
    out.set_expires_at(c.expires_at);
    out.set_created_at(c.created_at);
}

impl Tasks {
    /// `host` or `host:port` when the listener is not on `default`.
    fn host_port(&self, host: &str, listener: &str, default: u16) -> Option<String> {
        let port = self.0.info.listener(listener)?.port();
        Some(if port == default {
            host.to_owned()
        } else {
            format!("{host}:{port}")
        })
    }

    async fn tasks_installed(&self) -> Result<(), capnp::Error> {
        let store = self.0.store.clone();
        let installed =
            blocking(move || Ok(store.app("tasks").map_err(state_failure)?.is_some())).await?;
        if !installed {
            return Err(fail(
                "the tasks app is not installed (granary app install tasks.gpkg)",
            ));
        }
        Ok(())
    }
}

impl tasks::Server for Tasks {
    async fn add_client(
        self: CapRc<Self>,
        params: tasks::AddClientParams,
        mut results: tasks::AddClientResults,
    ) -> Result<(), capnp::Error> {
        let actor = self.0.actor;
        let p = params.get()?;
        let user = user_name(p.get_user()?)?;
        let label = p.get_label()?.to_str()?.to_owned();
        self.tasks_installed().await?;
        let id = uuid::Uuid::new_v4().to_string();
        let hash = sha256(id.as_bytes());
        let store = self.0.store.clone();
        let client = blocking(move || {
            store
                .add_task_client(&user, &label, &hash, actor)
                .map_err(state_failure)
        })
        .await?;
        let host = format!("tasks.{}", self.0.info.domain);
        let url = match self.host_port(&host, "https", 443) {
            Some(h) => format!("https://{h}"),
            None => format!("https://{host} (the https listener is off)"),
        };
        let mut r = results.get();
        set_client(r.reborrow().init_client(), &client);
        r.set_client_id(&id);
        r.set_url(&url);
        Ok(())
    }

    async fn clients(
        self: CapRc<Self>,
        params: tasks::ClientsParams,
        mut results: tasks::ClientsResults,
    ) -> Result<(), capnp::Error> {
        let user = params.get()?.get_user()?;
        let user = match user.is_empty() {
            true => None,
            false => Some(user_name(user)?),
        };
        let store = self.0.store.clone();
        let list =
            blocking(move || store.task_clients(user.as_ref()).map_err(state_failure)).await?;
        let mut out = results.get().init_clients(list.len() as u32);
        for (i, c) in list.iter().enumerate() {
            set_client(out.reborrow().get(i as u32), c);
        }
        Ok(())
    }

    async fn revoke_client(
        self: CapRc<Self>,
        params: tasks::RevokeClientParams,
        _: tasks::RevokeClientResults,
    ) -> Result<(), capnp::Error> {
        let actor = self.0.actor;
        let p = params.get()?;
        let (user, id) = (user_name(p.get_user()?)?, p.get_id());
        let store = self.0.store.clone();
        blocking(move || {
            store
                .revoke_task_client(&user, id, actor)
                .map_err(state_failure)
        })
        .await
    }

    async fn issue_cert(
        self: CapRc<Self>,
        params: tasks::IssueCertParams,
        mut results: tasks::IssueCertResults,
    ) -> Result<(), capnp::Error> {
        let actor = self.0.actor;
        let p = params.get()?;
        let user = user_name(p.get_user()?)?;
        let label = p.get_label()?.to_str()?.to_owned();
        self.tasks_installed().await?;
        let Some(ca_dir) = self.0.local_ca.clone() else {
            return Err(fail(
                "taskd client certificates come from the local CA, and this host's TLS \
                 certificate is not the local CA's (tls.cert is set)",
            ));
        };
        let host = format!("tasks.{}", self.0.info.domain);
        let Some(server) = self.host_port(&host, "taskd", 53589) else {
            return Err(fail(
                "the taskd listener is off: add taskd = \"[::]:53589\" under [listen]",
            ));
        };
        let server = if server.contains(':') {
            server
        } else {
            format!("{server}:53589")
        };
        let key = uuid::Uuid::new_v4().to_string();
        let store = self.0.store.clone();
        let (cert, issued) = blocking(move || {
            if store.user(&user).map_err(state_failure)?.is_none() {
                return Err(fail(format!("no user named {user}")));
            }
            let issued =
                granary_gateway::tls::local_ca::issue_client(&ca_dir, &format!("{user} {key}"))
                    .map_err(|e| fail(format!("cannot issue the certificate: {e}")))?;
            let cert = store
                .add_task_cert(
                    &user,
                    &label,
                    &key,
                    &sha256(&issued.der),
                    issued.not_after,
                    actor,
                )
                .map_err(state_failure)?;
            Ok((cert, issued))
        })
        .await?;
        let ca_file = self.0.info.ca_file.clone().unwrap_or_default();
        let ca_pem = std::fs::read_to_string(&ca_file).map_err(|e| {
            fail(format!(
                "cannot read the local CA {}: {e}",
                ca_file.display()
            ))
        })?;
        let credentials = format!("{TASKD_ORG}/{}/{}", cert.user, cert.key);
        let mut r = results.get();
        set_cert(r.reborrow().init_cert(), &cert);
        r.set_key_pem(&issued.key_pem);
        r.set_cert_pem(&issued.cert_pem);
        r.set_ca_pem(&ca_pem);
        r.set_server(&server);
        r.set_credentials(&credentials);
        Ok(())
    }

    async fn certs(
        self: CapRc<Self>,
        params: tasks::CertsParams,
        mut results: tasks::CertsResults,
    ) -> Result<(), capnp::Error> {
        let user = params.get()?.get_user()?;
        let user = match user.is_empty() {
            true => None,
            false => Some(user_name(user)?),
        };
        let store = self.0.store.clone();
        let list = blocking(move || store.task_certs(user.as_ref()).map_err(state_failure)).await?;
        let mut out = results.get().init_certs(list.len() as u32);
        for (i, c) in list.iter().enumerate() {
            set_cert(out.reborrow().get(i as u32), c);
        }
        Ok(())
    }

    async fn revoke_cert(
        self: CapRc<Self>,
        params: tasks::RevokeCertParams,
        _: tasks::RevokeCertResults,
    ) -> Result<(), capnp::Error> {
        let actor = self.0.actor;
        let p = params.get()?;
        let (user, id) = (user_name(p.get_user()?)?, p.get_id());
        let store = self.0.store.clone();
        blocking(move || {
            store
                .revoke_task_cert(&user, id, actor)
                .map_err(state_failure)
        })
        .await
    }
}
