//! The seccomp policy (`policy/seccomp-<arch>.json`, a reviewed data file)
//! compiled with seccompiler and installed as the last step before exec.

use seccompiler::{BpfProgram, TargetArch};

use crate::JailError;

#[cfg(target_arch = "x86_64")]
const POLICY: Option<(&str, TargetArch)> = Some((
    include_str!("../../policy/seccomp-x86_64.json"),
    TargetArch::x86_64,
));
#[cfg(not(target_arch = "x86_64"))]
const POLICY: Option<(&str, TargetArch)> = None;

/// The compiled filters, in installation order.
pub struct Filters {
    grain: BpfProgram,
    clone3: BpfProgram,
}

/// Compiles the policy for this machine's architecture.
pub fn compile() -> Result<Filters, JailError> {
    let Some((json, arch)) = POLICY else {
        return Err(JailError::new(
            "no seccomp policy for this architecture yet; refusing to run a grain unfiltered",
        ));
    };
    compile_policy(json, arch)
}

pub(crate) fn compile_policy(json: &str, arch: TargetArch) -> Result<Filters, JailError> {
    let mut map = seccompiler::compile_from_json(json.as_bytes(), arch)
        .map_err(|e| JailError::new(format!("compiling the seccomp policy: {e}")))?;
    let mut take = |name: &str| {
        map.remove(name)
            .ok_or_else(|| JailError::new(format!("seccomp policy has no {name:?} filter")))
    };
    Ok(Filters {
        grain: take("grain")?,
        clone3: take("clone3_enosys")?,
    })
}

impl Filters {
    /// Installs both filters on the calling thread. The clone3 filter goes
    /// last: of two filters answering with an errno, the kernel takes the
    /// newest one's, so clone3 answers ENOSYS rather than the allowlist's
    /// EPERM.
    pub fn install(&self) -> Result<(), JailError> {
        seccompiler::apply_filter(&self.grain)
            .map_err(|e| JailError::new(format!("installing the seccomp allowlist: {e}")))?;
        seccompiler::apply_filter(&self.clone3)
            .map_err(|e| JailError::new(format!("installing the clone3 filter: {e}")))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_compiles() {
        let filters = compile().unwrap();
        assert!(filters.grain.len() > 100);
        assert!(!filters.clone3.is_empty());
    }
}
