//! `granary demo`: the demo user, fresh app passwords for git, mail, dav and xmpp,
//! the demo domain as a mail domain, and the banner whose next steps work
//! when pasted.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use granary_config::Config;
use granary_model::UserName;
use granary_state::{RevokeSelector, Store};

/// The demo user `granary demo` creates.
pub(crate) const DEMO_USER: &str = "demo";

/// What the banner shows once (only hashes are stored).
pub(super) struct DemoSecrets {
    password: String,
    git_password: String,
    mail_password: String,
    dav_password: String,
    xmpp_password: String,
}

/// Makes sure the demo user exists, gives it a fresh generated account
/// password and fresh app passwords for git and mail (the previous demo
/// ones are revoked), makes the demo's domain a mail domain, and returns
/// the passwords to print once.
pub(super) async fn ensure_demo_user(
    store: &Arc<Store>,
    domain: &str,
) -> anyhow::Result<DemoSecrets> {
    let store = store.clone();
    let domain = granary_model::MailDomain::parse(domain)?;
    tokio::task::spawn_blocking(move || -> anyhow::Result<DemoSecrets> {
        let name = UserName::new(DEMO_USER)?;
        let password = granary_auth::generate_password()?;
        let hash = granary_auth::hash_password(&password)?;
        if store.user(&name)?.is_some() {
            store.set_password_hash(&name, &hash, "demo")?;
            for kind in ["git", "mail", "dav", "xmpp"] {
                store.revoke_app_passwords(
                    &name,
                    &RevokeSelector::Kind(kind.to_owned()),
                    "demo",
                )?;
            }
        } else {
            store.add_user(&name, &hash, "demo")?;
        }
        // A fresh app password of `kind`, shown once.
        let app_password = |kind: &str| -> anyhow::Result<String> {
            let password = granary_auth::generate_password()?;
            let hash = granary_auth::hash_password(&password)?;
            store.add_app_password(&name, kind, "demo banner", &hash, "demo")?;
            Ok(password)
        };
        let secrets = DemoSecrets {
            git_password: app_password("git")?,
            mail_password: app_password("mail")?,
            dav_password: app_password("dav")?,
            xmpp_password: {
                // Chat logins use SCRAM: the verifiers go in the same row.
                let password = granary_auth::generate_password()?;
                let hash = granary_auth::hash_password(&password)?;
                let scram = super::admin::scram_verifiers(&password, std::iter::empty())
                    .map_err(|e| anyhow::anyhow!("{}", e.extra))?;
                store.add_app_password_with_scram(
                    &name,
                    "xmpp",
                    "demo banner",
                    &hash,
                    &scram,
                    "demo",
                )?;
                password
            },
            password,
        };
        store.add_mail_domain(&domain, "demo")?;
        Ok(secrets)
    })
    .await
    .context("demo user setup panicked")?
}

pub(super) fn print_banner(
    config: &Config,
    https: SocketAddr,
    listener: impl Fn(&str) -> Option<SocketAddr>,
    ca_file: Option<&Path>,
    secrets: &DemoSecrets,
    builtin: &[PathBuf],
) {
    let ssh = listener("ssh");
    let mail = (listener("smtp"), listener("imaps"));
    let xmpps = listener("xmpps");
    let port = https.port();
    let host = &config.domain;
    let home = sh_quote(&config.data_dir.display().to_string());
    let installed: Vec<String> = builtin
        .iter()
        .filter_map(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .collect();
    let (user, password, git) = (DEMO_USER, &secrets.password, &secrets.git_password);
    // The admin commands as this very binary, so they work when pasted.
    let granary = sh_quote(
        &std::env::current_exe()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| "granary".to_owned()),
    );
    // Names under the domain may not resolve on this host (Debian has no
    // nss-myhostname): each example pins them to the listener (an IPv6
    // address in brackets, as curl takes it).
    let ip = match https.ip() {
        std::net::IpAddr::V6(v6) => format!("[{v6}]"),
        v4 => v4.to_string(),
    };
    // The local CA's file, for git (GIT_SSL_CAINFO: git ignores
    // `-c http.sslCAInfo` given on the command line when it runs its https
    // helper) and curl; with the admin's own certificate, nothing.
    let (ca_shown, git_ca, curl_ca) = match ca_file {
        Some(p) => {
            let q = sh_quote(&p.display().to_string());
            (
                p.display().to_string(),
                format!("GIT_SSL_CAINFO={q} "),
                format!("--cacert {q} "),
            )
        }
        None => (
            "(admin-provided certificate)".to_owned(),
            String::new(),
            String::new(),
        ),
    };
    let git_c = format!(
        "{git_ca}git -c http.curloptResolve=git.{host}:{port}:{ip} -c user.name=Demo -c user.email={user}@{host}"
    );
    let remote = format!("https://{user}:{git}@git.{host}:{port}/{user}/site.git");
    let has = |app: &str| installed.iter().any(|a| a == app);
    let git_steps = if has("git") {
        format!(
            "
Try git (paste as is):
  cd \"$(mktemp -d)\" && git init -q -b main
  echo '<h1>Hello from Granary</h1>' > index.html && git add . && {git_c} commit -qm first
  {git_c} push {remote} main{ssh_hint}
",
            ssh_hint = ssh.map_or_else(String::new, |s| format!(
                "\n\nOr over SSH, with your own key:\n  {granary} --home {home} ssh-key add {user} ~/.ssh/id_ed25519.pub\n  git push ssh://{user}@{s}/{user}/site.git main",
            )),
        )
    } else {
        String::new()
    };
    let blog_steps = if has("blog") && has("git") {
        format!(
            "
Publish it as {user}'s blog (in the same shell):
  {granary} --home {home} grant add --from {user}/blog --to {user}/git --cap git.read:site
  {granary} --home {home} grant add --from {user}/git --to {user}/blog --cap notify:site
  {git_c} commit -q --allow-empty -m publish && {git_c} push {remote} main
  curl {curl_ca}--resolve {user}.{host}:{port}:{ip} https://{user}.{host}:{port}/
"
        )
    } else {
        String::new()
    };
    let mail_steps = match (has("mail"), mail) {
        (true, (Some(smtp), Some(imaps))) => {
            let ca_py = ca_file
                .map(|p| format!("cafile={:?}", p.display().to_string()))
                .unwrap_or_default();
            format!(
                "
Try mail (paste as is; swaks is Debian's, apt install swaks):
  swaks --server {smtp_ip} --port {smtp_port} --from friend@example.net --to {user}@{host} --header 'Subject: hello'
  {granary} --home {home} mail status {user}

Read it with any IMAP client at {imaps} (TLS), user {user}, the mail password; for example:
  python3 -c 'import imaplib, ssl; m = imaplib.IMAP4_SSL(\"{imaps_ip}\", {imaps_port}, ssl_context=ssl.create_default_context({ca_py})); m.login(\"{user}\", \"{mail}\"); m.select(); print(m.fetch(\"1:*\", \"(BODY[HEADER.FIELDS (SUBJECT)])\")[1])'
",
                smtp_ip = smtp.ip(),
                smtp_port = smtp.port(),
                imaps_ip = imaps.ip(),
                imaps_port = imaps.port(),
                mail = secrets.mail_password,
            )
        }
        _ => String::new(),
    };
    let dav_steps = if has("dav") {
        format!(
            "
Try calendars and contacts (any CalDAV/CardDAV client, e.g. DAVx5, at https://dav.{host}:{port}/ as {user}, the DAV password):
  curl {curl_ca}--resolve dav.{host}:{port}:{ip} -u {user}:{dav} -X PROPFIND -H 'Depth: 1' https://dav.{host}:{port}/calendars/{user}/
",
            dav = secrets.dav_password,
        )
    } else {
        String::new()
    };
    let xmpp_steps = match (has("xmpp"), xmpps, ca_file) {
        (true, Some(xmpps), Some(ca)) => format!(
            "
Try chat (Conversations, Gajim, Dino, Monal: {user}@{host}, the chat password, server {xmpps_ip} port {xmpps_port}, direct TLS):
  SSL_CERT_FILE={ca} go-sendxmpp -u {user}@{host} -p {xmpp} -t -j {xmpps} {user}@{host} <<< 'a note to myself'
",
            xmpps_ip = xmpps.ip(),
            xmpps_port = xmpps.port(),
            ca = sh_quote(&ca.display().to_string()),
            xmpp = secrets.xmpp_password,
        ),
        _ => String::new(),
    };
    let tasks_steps = if has("tasks") {
        format!(
            "
Try Taskwarrior (3: a client id for its sync settings; 2.6: a certificate, with listen.taskd on):
  {granary} --home {home} tasks client add {user}
"
        )
    } else {
        String::new()
    };
    println!(
        "\
Granary demo is running.

  Front page     https://{host}:{port}/   (curl {curl_ca}--resolve {host}:{port}:{ip} https://{host}:{port}/)
  CA certificate {ca_shown}
  User           {user}
  Password       {password}
                 (shown once: only its argon2id hash is stored; a new one is made on each demo start)
  Git password   {git}   (an app password of kind git, also new on each start)
  Mail password  {mail_password}   (kind mail, for IMAP clients; also new)
  DAV password   {dav_password}   (kind dav, for calendar and contacts clients; also new)
  Chat password  {xmpp_password}   (kind xmpp, for XMPP clients; also new)
  Built-in apps  {apps}
  Admin          {granary} --home {home} status
                 {granary} --home {home} grain list
{git_steps}{blog_steps}{mail_steps}{dav_steps}{xmpp_steps}{tasks_steps}
Stop with Ctrl-C.",
        mail_password = secrets.mail_password,
        dav_password = secrets.dav_password,
        xmpp_password = secrets.xmpp_password,
        apps = if installed.is_empty() {
            "none (./granary-demo builds and signs them into DATA_DIR/builtin-apps)".to_owned()
        } else {
            installed.join(", ")
        },
    );
}

/// `text` as one word for a POSIX shell: as it is when it needs no quoting,
/// else in single quotes.
fn sh_quote(text: &str) -> String {
    let plain = !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+:@=,".contains(&b));
    if plain {
        text.to_owned()
    } else {
        format!("'{}'", text.replace('\'', "'\\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::sh_quote;

    #[test]
    fn paths_are_quoted_for_the_shell_only_when_needed() {
        assert_eq!(sh_quote("/srv/granary-data"), "/srv/granary-data");
        assert_eq!(sh_quote("/home/me/my data"), "'/home/me/my data'");
        assert_eq!(sh_quote("it's"), "'it'\\''s'");
    }
}
