//! Signed app packages.
//!
//! A package file is
//!
//! ```text
//! "GRNYPKG1" | Ed25519 public key (32) | signature (64) | body
//! ```
//!
//! where the signature covers the magic, the key and the body, and the body
//! is a gzip-compressed tar holding `granary-app.toml` (the manifest) and
//! `image/...` (the grain's read-only root), or one `image-<arch>/...` for
//! each architecture the manifest's `arches` lists (a host unpacks the one
//! it runs as `image/`). The signature is checked
//! before a single byte of the body is parsed; the app id in the manifest
//! must be the one derived from the key ([`app_id`]), so an app id always
//! belongs to one key.
//!
//! Builds are deterministic: entries sorted, every timestamp, owner and
//! gzip header field fixed, modes normalised to 0755/0644. The reader
//! ([`Verified::unpack`]) is strict and bounded: only regular files,
//! directories and symlinks that stay inside the image; no absolute paths,
//! `..`, duplicates, hard links, devices or setuid bits; entry count and
//! unpacked size limited.

mod build;
mod definition;
mod keys;
mod read;

pub use build::{BuildReport, build, build_for};
pub use definition::{DEFINITION_TEMPLATE, Definition};
pub use keys::{PublicKey, SigningKey, app_id};
pub use read::{Entry, EntryKind, Limits, Verified, image_for, open};

/// The first bytes of every package.
pub const MAGIC: &[u8; 8] = b"GRNYPKG1";
/// Bytes before the body: magic, public key, signature.
pub const HEADER_LEN: usize = 8 + 32 + 64;

#[derive(Debug, thiserror::Error)]
pub enum PackageError {
    #[error("not a Granary package (bad magic); is this the right file?")]
    NotAPackage,
    #[error("package is truncated ({0} bytes)")]
    Truncated(usize),
    #[error(
        "the package signature does not verify: the file was altered or not signed by the key it names"
    )]
    BadSignature,
    #[error("package is corrupt: {0}")]
    Corrupt(String),
    #[error("package refused: {0}")]
    Refused(String),
    #[error("package is larger than the limit of {limit} bytes ({what})")]
    TooLarge { what: &'static str, limit: u64 },
    #[error("package definition {path}: {message}")]
    Definition { path: String, message: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Key(String),
}

pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> PackageError {
    let context = context.into();
    move |source| PackageError::Io { context, source }
}

/// A package file: the magic, `key`'s public key, its signature over the
/// magic, the key and `body`, then `body`.
pub fn seal(key: &SigningKey, body: &[u8]) -> Vec<u8> {
    let public = key.public();
    let mut signed = Vec::with_capacity(40 + body.len());
    signed.extend_from_slice(MAGIC);
    signed.extend_from_slice(&public.0);
    signed.extend_from_slice(body);
    let signature = key.sign(&signed);
    let mut file = Vec::with_capacity(HEADER_LEN + body.len());
    file.extend_from_slice(MAGIC);
    file.extend_from_slice(&public.0);
    file.extend_from_slice(&signature);
    file.extend_from_slice(body);
    file
}

/// Where a symlink at image path `link` points, resolved lexically inside
/// the image (an absolute target counts from the image root, as it does
/// inside the grain); `None` when it climbs above the root or is empty.
pub(crate) fn resolve_link(link: &str, target: &str) -> Option<String> {
    if target.is_empty() || target.contains('\0') {
        return None;
    }
    let mut stack: Vec<&str> = if target.starts_with('/') {
        Vec::new()
    } else {
        let mut dir: Vec<&str> = link.split('/').filter(|c| !c.is_empty()).collect();
        dir.pop();
        dir
    };
    for c in target.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                stack.pop()?;
            }
            other => stack.push(other),
        }
    }
    Some(format!("/{}", stack.join("/")))
}

/// SHA-256 as lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes))
}
