//! Granary's vocabulary: the names and kinds every other crate speaks in.
//!
//! Pure data and validation only: no I/O, no async runtime, no SQL. A value
//! of one of these types has already been checked, so code that receives a
//! [`UserName`] never has to wonder whether it is safe to use as a DNS label,
//! an e-mail local part or a path component.

mod elf;
mod grain_id;
mod grain_kind;
mod mail;
mod manifest;
mod node_name;
mod uid_range;
mod user_name;

pub use elf::{elf_arch, elf_needs_loader};
pub use grain_id::{GrainId, GrainIdError, valid_instance, valid_resource_name};
pub use grain_kind::{GrainKind, GrainKindError};
pub use mail::{MailAddress, MailAddressError, MailDomain, MailDomainError, POSTMASTER_LOCALS};
pub use manifest::{
    ARCHES, DescriptorError, MANIFEST_FILE, Manifest, ManifestError, ManifestLimits,
    check_descriptor, compare_versions,
};
pub use node_name::valid_node_name;
pub use uid_range::{DEFAULT_UID_RANGE, UidRange, UidRangeError};
pub use user_name::{RESERVED_USER_NAMES, UserName, UserNameError};
