//! What the gateway asks about users before it routes: one method per
//! question a protocol has (is this credential valid, is this public,
//! whose is this host), never one per app. The daemon answers from its
//! state; the gateway never opens it.

use std::future::Future;
use std::pin::Pin;

use granary_grains::AuthMethod;

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// A credential that checked out: how, and which one (shown to the grain
/// so it can tell devices apart).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credential {
    pub method: AuthMethod,
    pub id: i64,
}

/// Where mail to an address goes, as the MX asks at RCPT time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MailRecipient {
    /// Into this user's mail grain.
    User(String),
    /// One of our domains, but nobody has the address: 550 5.1.1.
    Unknown,
    /// Not one of our domains: the MX does not relay (550 5.7.1).
    NotLocal,
    /// The lookup failed; the sender should try again later (451).
    TryLater,
}

/// An invite token that may be used now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InviteInfo {
    /// The inviter's chat address (`alice@example.org`), for a contact
    /// invite; `None` for an account invite.
    pub inviter: Option<String>,
    /// The group chat's address (`family@rooms.example.org`), for a group
    /// invite.
    pub room: Option<String>,
}

/// The state could not be asked (an answer of "no" would be a lie).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LookupFailed;

/// The account an invite made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InviteRedeemed {
    /// The new user's first `xmpp` app password.
    pub credential: i64,
    /// The inviter's chat address, for a contact or group invite.
    pub inviter: Option<String>,
    /// The group chat's name (its grain's instance), for a group invite.
    pub room: Option<String>,
}

/// Why redeeming an invite made no account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedeemRefused {
    /// Unknown, expired, used up or revoked: told the same way.
    NotValid,
    /// The name is someone's already.
    NameTaken,
    /// The name or the password breaks a rule (said how).
    Unacceptable(String),
    /// Nothing was made; the client may try again.
    TryLater,
}

pub trait Directory: Send + Sync + 'static {
    /// Which of `user`'s app passwords of `kind` `password` is, if any.
    /// A device never holds the account password, so it is never checked
    /// here.
    fn check_password(
        &self,
        user: &str,
        kind: &str,
        password: &str,
    ) -> BoxFuture<Option<Credential>>;

    /// The SCRAM verifiers of `user`'s app passwords of `kind`: the
    /// credential's id and its verifiers, one per line
    /// (`granary_wire::scram::Verifier::encode`). Empty for no such user.
    fn scram_verifiers(&self, user: &str, kind: &str) -> BoxFuture<Vec<(i64, String)>>;

    /// Which of `user`'s SSH keys `key` (`type base64`) is, if any.
    fn check_ssh_key(&self, user: &str, key: &str) -> BoxFuture<Option<Credential>>;

    /// Whether `owner` made `resource` of their grain of `kind` readable by
    /// anyone (a git repository).
    fn is_public(&self, owner: &str, kind: &str, resource: &str) -> BoxFuture<bool>;

    /// Whose grain, of which kind, serves a host its owner registered (a
    /// blog's own domain): `(owner, kind)`.
    fn registered_host(&self, host: &str) -> BoxFuture<Option<(String, String)>>;

    /// Where mail to `address` (as written in RCPT TO) goes: a user (their
    /// name, an alias, `+tag`, postmaster, a catch-all), or nowhere.
    fn mail_recipient(&self, address: &str) -> BoxFuture<MailRecipient>;

    /// The user who may send as `address` (their name, `+tag`, an alias,
    /// postmaster; never a catch-all), or `None`.
    fn mail_sender_owner(&self, address: &str) -> BoxFuture<Option<String>>;

    /// Whose device secret (a TaskChampion client id) hashes to `sha256`:
    /// the user and the credential.
    fn client_secret(&self, sha256: [u8; 32]) -> BoxFuture<Option<(String, Credential)>> {
        let _ = sha256;
        Box::pin(async { None })
    }

    /// Whose taskd client certificate has the DER whose SHA-256 is
    /// `sha256`: the user, the credential, and the key its client must
    /// name.
    fn task_certificate(
        &self,
        sha256: [u8; 32],
    ) -> BoxFuture<Option<(String, Credential, String)>> {
        let _ = sha256;
        Box::pin(async { None })
    }

    /// The invite `token` stands for, if it may be used now.
    fn invite(&self, token: &str) -> BoxFuture<Result<Option<InviteInfo>, LookupFailed>> {
        let _ = token;
        Box::pin(async { Ok(None) })
    }

    /// Spends one use of the invite `token`: makes `user` with `password`
    /// as their first `xmpp` app password, at the chat address
    /// `user@domain`, all or nothing.
    fn redeem_invite(
        &self,
        token: &str,
        user: &str,
        password: &str,
        domain: &str,
    ) -> BoxFuture<Result<InviteRedeemed, RedeemRefused>> {
        let _ = (token, user, password, domain);
        Box::pin(async { Err(RedeemRefused::NotValid) })
    }

    /// Whether `user` is disabled (`granary user disable`): the credential
    /// lookups above find nothing of theirs. A refusal of theirs is not a
    /// guess (their devices keep trying with the right secret), so it is
    /// not counted against where it came from: a family behind one
    /// address is not locked out by one member's phone.
    fn disabled(&self, user: &str) -> BoxFuture<bool> {
        let _ = user;
        Box::pin(async { false })
    }

    /// The chat domains added besides Granary's own
    /// (`granary xmpp domain add`); `None` when they cannot be read.
    fn xmpp_domains(&self) -> BoxFuture<Option<Vec<String>>> {
        Box::pin(async { Some(Vec::new()) })
    }
}
