//! The seccomp policy (`policy/seccomp-<arch>.json`, a reviewed data file)
//! compiled with seccompiler and installed as the last step before exec.

use seccompiler::{BpfProgram, TargetArch};

use crate::JailError;

// Both policies are always compiled in (and tested on every machine); only
// the one for this architecture is installed.
#[cfg_attr(not(any(test, target_arch = "x86_64")), allow(dead_code))]
const X86_64: &str = include_str!("../../policy/seccomp-x86_64.json");
#[cfg_attr(not(any(test, target_arch = "aarch64")), allow(dead_code))]
const AARCH64: &str = include_str!("../../policy/seccomp-aarch64.json");

#[cfg(target_arch = "x86_64")]
const POLICY: Option<(&str, TargetArch)> = Some((X86_64, TargetArch::x86_64));
#[cfg(target_arch = "aarch64")]
const POLICY: Option<(&str, TargetArch)> = Some((AARCH64, TargetArch::aarch64));
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const POLICY: Option<(&str, TargetArch)> = None;

/// The compiled filters, in installation order.
pub struct Filters {
    grain: BpfProgram,
    clone3: BpfProgram,
    ioctl_deny: BpfProgram,
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
        ioctl_deny: take("ioctl_deny")?,
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
        seccompiler::apply_filter(&self.ioctl_deny)
            .map_err(|e| JailError::new(format!("installing the ioctl denylist: {e}")))?;
        seccompiler::apply_filter(&self.clone3)
            .map_err(|e| JailError::new(format!("installing the clone3 filter: {e}")))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_architectures_policies_compile() {
        // Each policy is compiled for its own architecture, whatever the
        // build machine, so an ARM policy error shows up on x86 CI too.
        compile_policy(X86_64, TargetArch::x86_64).unwrap();
        compile_policy(AARCH64, TargetArch::aarch64).unwrap();
    }

    #[test]
    fn the_aarch64_policy_is_the_x86_64_one_minus_calls_arm_lacks() {
        let names = |json: &str| -> std::collections::BTreeSet<String> {
            let v: serde_json::Value = serde_json::from_str(json).unwrap();
            v["grain"]["filter"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["syscall"].as_str().unwrap().to_owned())
                .collect()
        };
        let (x86, arm) = (names(X86_64), names(AARCH64));
        assert!(
            arm.is_subset(&x86),
            "aarch64 allows {:?} that x86_64 does not",
            arm.difference(&x86).collect::<Vec<_>>()
        );
        // Only legacy calls that arm64 replaced with *at/2/3 variants differ.
        for gone in x86.difference(&arm) {
            assert!(
                !["openat", "clone", "execve", "ioctl", "socket"].contains(&gone.as_str()),
                "{gone}"
            );
        }
    }

    #[test]
    fn the_policy_compiles() {
        let filters = compile().unwrap();
        assert!(filters.grain.len() > 100);
        assert!(!filters.clone3.is_empty());
    }
}
