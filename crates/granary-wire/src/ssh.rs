//! SSH: the command a git client asks to run, and OpenSSH public key lines
//! (what an admin registers, and what a client authenticates with), checked
//! and normalised without any SSH library.

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};

use crate::http::{valid_repo, valid_user};

/// A git command over SSH, as the gateway runs it in the owner's git grain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GitCommand {
    /// `upload-pack` (clone, fetch) or `receive-pack` (push).
    pub service: &'static str,
    pub owner: String,
    pub repo: String,
}

impl GitCommand {
    /// Whether it writes to the repository.
    pub fn writes(&self) -> bool {
        self.service == "receive-pack"
    }
}

/// `git-upload-pack '/alice/site.git'` (or `'alice/site'`, unquoted too):
/// only the two git commands, for a valid owner and repository.
pub fn git_command(data: &[u8]) -> Option<GitCommand> {
    let text = std::str::from_utf8(data).ok()?;
    let (cmd, arg) = text.trim().split_once(' ')?;
    let service = match cmd {
        "git-upload-pack" => "upload-pack",
        "git-receive-pack" => "receive-pack",
        _ => return None,
    };
    let arg = arg.trim();
    let path = match arg.strip_prefix('\'') {
        Some(quoted) => quoted.strip_suffix('\'')?,
        None => arg,
    };
    let (owner, repo) = path.trim_start_matches('/').split_once('/')?;
    let repo = repo.strip_suffix(".git").unwrap_or(repo);
    (valid_user(owner) && valid_repo(repo)).then(|| GitCommand {
        service,
        owner: owner.to_owned(),
        repo: repo.to_owned(),
    })
}

/// A public key, checked: its type, its key blob re-encoded (`type
/// base64`, no comment), and its SHA-256 fingerprint as OpenSSH prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    pub normal: String,
    pub fingerprint: String,
    /// The line's comment, if it had one.
    pub comment: String,
}

/// Why a key line was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyError(pub String);

impl std::fmt::Display for KeyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "not an OpenSSH public key line: {}", self.0)
    }
}

impl std::error::Error for KeyError {}

/// Longest key line accepted (an RSA 16384-bit key is about 2.8 KB).
const MAX_LINE: usize = 8192;

/// Reads an SSH string (4-byte big-endian length, then the bytes).
fn string<'a>(blob: &mut &'a [u8]) -> Option<&'a [u8]> {
    if blob.len() < 4 {
        return None;
    }
    let len = u32::from_be_bytes([blob[0], blob[1], blob[2], blob[3]]) as usize;
    let rest = &blob[4..];
    if rest.len() < len {
        return None;
    }
    let (s, tail) = rest.split_at(len);
    *blob = tail;
    Some(s)
}

/// Checks that `blob` is a well-formed key of type `kind`.
fn check_blob(kind: &str, blob: &[u8]) -> Result<(), KeyError> {
    let bad = |why: &str| Err(KeyError(why.to_owned()));
    let mut rest = blob;
    if string(&mut rest) != Some(kind.as_bytes()) {
        return bad("the key data is not of the type the line names");
    }
    let ecdsa = |rest: &mut &[u8], curve: &[u8], point_len: usize| -> Result<(), KeyError> {
        if string(rest) != Some(curve) {
            return Err(KeyError("wrong curve for the key type".to_owned()));
        }
        match string(rest) {
            Some(p) if p.len() == point_len && p[0] == 4 => Ok(()),
            _ => Err(KeyError("not an uncompressed curve point".to_owned())),
        }
    };
    match kind {
        "ssh-ed25519" => match string(&mut rest) {
            Some(k) if k.len() == 32 => {}
            _ => return bad("an Ed25519 key is 32 bytes"),
        },
        "sk-ssh-ed25519@openssh.com" => {
            match string(&mut rest) {
                Some(k) if k.len() == 32 => {}
                _ => return bad("an Ed25519 key is 32 bytes"),
            }
            if string(&mut rest).is_none() {
                return bad("a security-key key names its application");
            }
        }
        "ssh-rsa" => {
            let e = string(&mut rest).ok_or_else(|| KeyError("no RSA exponent".into()))?;
            let n = string(&mut rest).ok_or_else(|| KeyError("no RSA modulus".into()))?;
            let n = n.strip_prefix(&[0]).unwrap_or(n);
            if e.is_empty() || e.len() > 8 {
                return bad("an odd RSA exponent");
            }
            if n.len() * 8 < 2048 {
                return bad("RSA keys must have at least 2048 bits");
            }
        }
        "ecdsa-sha2-nistp256" => ecdsa(&mut rest, b"nistp256", 65)?,
        "ecdsa-sha2-nistp384" => ecdsa(&mut rest, b"nistp384", 97)?,
        "ecdsa-sha2-nistp521" => ecdsa(&mut rest, b"nistp521", 133)?,
        "sk-ecdsa-sha2-nistp256@openssh.com" => {
            ecdsa(&mut rest, b"nistp256", 65)?;
            if string(&mut rest).is_none() {
                return bad("a security-key key names its application");
            }
        }
        other => {
            return Err(KeyError(format!(
                "key type {other:?} is not supported (use ssh-ed25519, ecdsa-sha2-* or ssh-rsa)"
            )));
        }
    }
    if !rest.is_empty() {
        return bad("trailing bytes after the key");
    }
    Ok(())
}

/// `ssh-ed25519 AAAA... comment`: checked and normalised.
pub fn public_key(line: &str) -> Result<PublicKey, KeyError> {
    if line.len() > MAX_LINE {
        return Err(KeyError("the line is too long".to_owned()));
    }
    let mut fields = line.split_whitespace();
    let (Some(kind), Some(data)) = (fields.next(), fields.next()) else {
        return Err(KeyError(
            "expected a key type and its base64 data".to_owned(),
        ));
    };
    let comment = fields.collect::<Vec<_>>().join(" ");
    let blob = STANDARD
        .decode(data)
        .map_err(|_| KeyError("the key data is not base64".to_owned()))?;
    check_blob(kind, &blob)?;
    let digest = ring::digest::digest(&ring::digest::SHA256, &blob);
    Ok(PublicKey {
        normal: format!("{kind} {}", STANDARD.encode(&blob)),
        fingerprint: format!("SHA256:{}", STANDARD_NO_PAD.encode(digest.as_ref())),
        comment: comment
            .chars()
            .filter(|c| !c.is_control())
            .take(64)
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALICE: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB6lM2pxOr4VHXAzRZA3XcIfnSa9MJnqXaT8FdbrwUc9 alice@laptop";

    #[test]
    fn only_git_commands_for_valid_repositories() {
        let c = git_command(b"git-upload-pack '/alice/site.git'").unwrap();
        assert_eq!(
            (c.service, c.owner.as_str(), c.repo.as_str()),
            ("upload-pack", "alice", "site")
        );
        assert!(!c.writes());
        let c = git_command(b"git-receive-pack 'alice/site'").unwrap();
        assert!(c.writes());
        assert!(git_command(b"git-upload-pack alice/site.git").is_some());
        for bad in [
            &b"sh -c id"[..],
            b"git-upload-pack '/alice/../etc.git'",
            b"git-upload-archive '/alice/site.git'",
            b"git-upload-pack",
            b"git-upload-pack '/alice/site.git",
            b"\xff\xfe",
        ] {
            assert_eq!(git_command(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn public_keys_normalise_with_their_fingerprint() {
        let k = public_key(ALICE).unwrap();
        assert_eq!(
            k.normal,
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB6lM2pxOr4VHXAzRZA3XcIfnSa9MJnqXaT8FdbrwUc9"
        );
        assert_eq!(k.comment, "alice@laptop");
        // What `ssh-keygen -lf` prints for this key.
        assert_eq!(
            k.fingerprint,
            "SHA256:Q0oa5MiPHtBcAl/VqF9UKEQtXHr7ouOtRmuWRa3hRFY"
        );
        assert_eq!(public_key(&k.normal).unwrap().normal, k.normal);
        // Keys `ssh-keygen` made, with the fingerprints `ssh-keygen -l`
        // printed.
        for (line, fingerprint) in [
            (
                "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQCdArd9v/qQIhe9E7g3OwvNowl7MeTY877L/xRiZhFXlTHaw6ulyVesESF3RX4QtZ/mGp6dvWwXjV3RW/27TMSnbentI0+E5FwgulCndSHUfpm5gSs00yhoiLco2DGrPqwb4LIjhtn4ajEdAoNFPu8J4ZUY7iLUP703CQEMn46cuQ12ilsSKz1rwkBwtMek/mvsvJzCoIx6FvQR86EBw9f02UJOXh6/L/YHOGTU4njsVdm3sOBKwHDlqaqkkwXvjPVyYWSpiuN5aCDPmhHzWjSKlWhwqUTEb+JgD12/O0CFZZHg9Jg0iBPENlzeO82zVoBwVBWHGNk4811tkc32y2HP",
                "SHA256:syqd7PIMrzYqTHj2QbUnNFnB1YdJ/uQgE0wRKYT3gwE",
            ),
            (
                "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBNDkbYu8eBuWBhlpyAaKiiekAaGbauY2zHQH/MHnQM2trgnUTmokx/I2+qrOHtq97jG3PZDcYxfmzP7A8w9DV+8=",
                "SHA256:jeJiQnZYN/uHvjDpBxdeNyRAWkzeKn82p/nuUlDx8to",
            ),
        ] {
            assert_eq!(public_key(line).unwrap().fingerprint, fingerprint);
        }
    }

    #[test]
    fn malformed_keys_are_refused_with_a_reason() {
        for bad in [
            "not a key",
            "ssh-ed25519",
            "ssh-ed25519 !!!",
            // The blob says ssh-rsa.
            "ssh-ed25519 AAAAB3NzaC1yc2EAAAADAQABAAAAAQC7",
            // 31 bytes of key.
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAHwAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            "ssh-dss AAAAB3NzaC1kc3M=",
        ] {
            assert!(public_key(bad).is_err(), "{bad}");
        }
        let e = public_key("ssh-dss AAAAB3NzaC1kc3M=")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not supported"), "{e}");
    }
}
