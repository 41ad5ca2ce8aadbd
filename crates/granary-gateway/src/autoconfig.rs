//! Mail client autoconfiguration, answered by the gateway itself:
//!
//! - Thunderbird's autoconfig (`https://autoconfig.<domain>/mail/config-v1.1.xml`
//!   and `https://<domain>/.well-known/autoconfig/mail/config-v1.1.xml`),
//!   for every mail domain: IMAP over TLS and submission over TLS on this
//!   host, the full address as the user name.
//! - An Apple configuration profile (`.mobileconfig`) per user at
//!   `https://mail.<domain>/mobileconfig`, after an HTTP Basic login with
//!   an app password of kind `mail`: the same servers, the user's own
//!   address and name, no password (the device asks for it). Its UUIDs are
//!   derived from the user and host, so a second download replaces the
//!   first profile instead of adding another.

/// Where clients reach this host's mail.
#[derive(Debug, Clone)]
pub struct MailClients {
    /// The host name clients connect to (`mail.hostname`).
    pub hostname: String,
    /// `imaps` (TLS) port, and `submissions` (TLS) port; `None` when off.
    pub imaps: Option<u16>,
    pub submissions: Option<u16>,
    /// STARTTLS ports, offered when the TLS ones are off.
    pub imap: Option<u16>,
    pub submission: Option<u16>,
}

/// The Thunderbird autoconfig path on `autoconfig.<domain>`.
pub const THUNDERBIRD_PATH: &str = "/mail/config-v1.1.xml";
/// The same, on `<domain>` itself.
pub const THUNDERBIRD_WELL_KNOWN: &str = "/.well-known/autoconfig/mail/config-v1.1.xml";
/// The Apple profile's path on `mail.<domain>`.
pub const MOBILECONFIG_PATH: &str = "/mobileconfig";

/// Escapes text for XML (and plist) content.
fn xml(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

impl MailClients {
    /// `(port, socketType)` for reading: TLS when it listens, else STARTTLS.
    fn incoming(&self) -> Option<(u16, &'static str)> {
        self.imaps
            .map(|p| (p, "SSL"))
            .or(self.imap.map(|p| (p, "STARTTLS")))
    }

    fn outgoing(&self) -> Option<(u16, &'static str)> {
        self.submissions
            .map(|p| (p, "SSL"))
            .or(self.submission.map(|p| (p, "STARTTLS")))
    }

    /// Thunderbird's `config-v1.1.xml` for `domain`.
    pub fn thunderbird(&self, domain: &str) -> String {
        let host = xml(&self.hostname);
        let d = xml(domain);
        let mut out = format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
             <clientConfig version=\"1.1\">\n\
             \x20 <emailProvider id=\"{d}\">\n\
             \x20   <domain>{d}</domain>\n\
             \x20   <displayName>Mail at {d} (Granary)</displayName>\n\
             \x20   <displayShortName>{d}</displayShortName>\n"
        );
        for (tag, kind, server) in [
            ("incomingServer", "imap", self.incoming()),
            ("outgoingServer", "smtp", self.outgoing()),
        ] {
            if let Some((port, socket)) = server {
                out.push_str(&format!(
                    "    <{tag} type=\"{kind}\">\n\
                     \x20     <hostname>{host}</hostname>\n\
                     \x20     <port>{port}</port>\n\
                     \x20     <socketType>{socket}</socketType>\n\
                     \x20     <authentication>password-cleartext</authentication>\n\
                     \x20     <username>%EMAILADDRESS%</username>\n\
                     \x20   </{tag}>\n"
                ));
            }
        }
        out.push_str("  </emailProvider>\n</clientConfig>\n");
        out
    }

    /// The Apple profile for `user`, whose address is `address`.
    pub fn mobileconfig(&self, user: &str, address: &str) -> String {
        let (imap_port, imap_tls) = self
            .incoming()
            .map(|(p, s)| (p, s == "SSL"))
            .unwrap_or((993, true));
        let (smtp_port, smtp_tls) = self
            .outgoing()
            .map(|(p, s)| (p, s == "SSL"))
            .unwrap_or((465, true));
        let host = xml(&self.hostname);
        let (u, a) = (xml(user), xml(address));
        let id = format!("org.granary.{}.mail.{}", reverse(&self.hostname), xml(user));
        let uuid = |what: &str| uuid_for(&format!("{what}/{user}@{}", self.hostname));
        let bool_tag = |b: bool| if b { "<true/>" } else { "<false/>" };
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
<!DOCTYPE plist PUBLIC \"-//Apple//DTD PLIST 1.0//EN\" \"http://www.apple.com/DTDs/PropertyList-1.0.dtd\">\n\
<plist version=\"1.0\">\n<dict>\n\
\t<key>PayloadContent</key>\n\t<array>\n\t\t<dict>\n\
\t\t\t<key>EmailAccountDescription</key>\n\t\t\t<string>{a}</string>\n\
\t\t\t<key>EmailAccountName</key>\n\t\t\t<string>{u}</string>\n\
\t\t\t<key>EmailAccountType</key>\n\t\t\t<string>EmailTypeIMAP</string>\n\
\t\t\t<key>EmailAddress</key>\n\t\t\t<string>{a}</string>\n\
\t\t\t<key>IncomingMailServerAuthentication</key>\n\t\t\t<string>EmailAuthPassword</string>\n\
\t\t\t<key>IncomingMailServerHostName</key>\n\t\t\t<string>{host}</string>\n\
\t\t\t<key>IncomingMailServerPortNumber</key>\n\t\t\t<integer>{imap_port}</integer>\n\
\t\t\t<key>IncomingMailServerUseSSL</key>\n\t\t\t{}\n\
\t\t\t<key>IncomingMailServerUsername</key>\n\t\t\t<string>{u}</string>\n\
\t\t\t<key>OutgoingMailServerAuthentication</key>\n\t\t\t<string>EmailAuthPassword</string>\n\
\t\t\t<key>OutgoingMailServerHostName</key>\n\t\t\t<string>{host}</string>\n\
\t\t\t<key>OutgoingMailServerPortNumber</key>\n\t\t\t<integer>{smtp_port}</integer>\n\
\t\t\t<key>OutgoingMailServerUseSSL</key>\n\t\t\t{}\n\
\t\t\t<key>OutgoingMailServerUsername</key>\n\t\t\t<string>{u}</string>\n\
\t\t\t<key>OutgoingPasswordSameAsIncomingPassword</key>\n\t\t\t<true/>\n\
\t\t\t<key>PayloadDisplayName</key>\n\t\t\t<string>Mail ({a})</string>\n\
\t\t\t<key>PayloadIdentifier</key>\n\t\t\t<string>{id}.account</string>\n\
\t\t\t<key>PayloadType</key>\n\t\t\t<string>com.apple.mail.managed</string>\n\
\t\t\t<key>PayloadUUID</key>\n\t\t\t<string>{}</string>\n\
\t\t\t<key>PayloadVersion</key>\n\t\t\t<integer>1</integer>\n\
\t\t</dict>\n\t</array>\n\
\t<key>PayloadDisplayName</key>\n\t<string>Mail for {a}</string>\n\
\t<key>PayloadIdentifier</key>\n\t<string>{id}</string>\n\
\t<key>PayloadRemovalDisallowed</key>\n\t<false/>\n\
\t<key>PayloadType</key>\n\t<string>Configuration</string>\n\
\t<key>PayloadUUID</key>\n\t<string>{}</string>\n\
\t<key>PayloadVersion</key>\n\t<integer>1</integer>\n\
</dict>\n</plist>\n",
            bool_tag(imap_tls),
            bool_tag(smtp_tls),
            uuid("account"),
            uuid("profile"),
        )
    }
}

/// `mail.example.org` as `org.example.mail`.
fn reverse(host: &str) -> String {
    host.split('.').rev().collect::<Vec<_>>().join(".")
}

/// A UUID (version 5 layout) from a SHA-256 of `name`: the same name, the
/// same UUID.
fn uuid_for(name: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, name.as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&d.as_ref()[..16]);
    b[6] = (b[6] & 0x0f) | 0x50;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02X}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clients() -> MailClients {
        MailClients {
            hostname: "mail.example.org".into(),
            imaps: Some(993),
            submissions: Some(465),
            imap: Some(143),
            submission: Some(587),
        }
    }

    #[test]
    fn thunderbird_gets_tls_servers_and_the_address_as_login() {
        let x = clients().thunderbird("example.org");
        assert!(x.contains("<emailProvider id=\"example.org\">"), "{x}");
        assert!(x.contains("<incomingServer type=\"imap\">\n      <hostname>mail.example.org</hostname>\n      <port>993</port>\n      <socketType>SSL</socketType>"), "{x}");
        assert!(x.contains("<outgoingServer type=\"smtp\">\n      <hostname>mail.example.org</hostname>\n      <port>465</port>"), "{x}");
        assert_eq!(x.matches("%EMAILADDRESS%").count(), 2);
        let mut starttls = clients();
        starttls.imaps = None;
        starttls.submissions = None;
        let x = starttls.thunderbird("example.org");
        assert!(
            x.contains("<port>143</port>\n      <socketType>STARTTLS</socketType>"),
            "{x}"
        );
        assert!(clients().thunderbird("a<b").contains("a&lt;b"));
    }

    #[test]
    fn profiles_are_stable_per_user_and_escape_what_they_quote() {
        let c = clients();
        let p = c.mobileconfig("alice", "alice@example.org");
        assert_eq!(p, c.mobileconfig("alice", "alice@example.org"));
        assert_ne!(p, c.mobileconfig("bob", "bob@example.org"));
        assert!(p.contains("<string>com.apple.mail.managed</string>"), "{p}");
        assert!(p.contains("<integer>465</integer>"), "{p}");
        assert!(p.contains("org.example.mail.mail.alice"), "{p}");
        assert!(
            !p.contains("Password</key>\n\t\t\t<string>"),
            "no password in it"
        );
        let uuid = uuid_for("x");
        assert_eq!(uuid.len(), 36);
        assert_eq!(&uuid[14..15], "5");
    }
}
