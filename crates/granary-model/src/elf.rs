//! What the first bytes of an ELF executable say about where it runs.
//! Reads untrusted bytes (a package's program); every offset is checked.

/// The architecture (one of [`crate::ARCHES`]) an ELF file is built for,
/// from its first 20 bytes; `None` for anything else (a script runs
/// anywhere its interpreter does).
pub fn elf_arch(header: &[u8]) -> Option<&'static str> {
    if header.len() < 20 || &header[..4] != b"\x7fELF" {
        return None;
    }
    let machine = match header[5] {
        1 => u16::from_le_bytes([header[18], header[19]]),
        2 => u16::from_be_bytes([header[18], header[19]]),
        _ => return None,
    };
    match machine {
        62 => Some("x86_64"),
        183 => Some("aarch64"),
        _ => None,
    }
}

/// Whether a 64-bit little-endian ELF file (both architectures images are
/// built for) names a program interpreter, i.e. needs a dynamic loader and
/// shared libraries. `None` when `file` is not such an ELF file or its
/// program headers lie outside it.
pub fn elf_needs_loader(file: &[u8]) -> Option<bool> {
    if file.len() < 64 || &file[..4] != b"\x7fELF" || file[4] != 2 || file[5] != 1 {
        return None;
    }
    let u16_at = |o: usize| u16::from_le_bytes([file[o], file[o + 1]]) as usize;
    let phoff = usize::try_from(u64::from_le_bytes(file[0x20..0x28].try_into().ok()?)).ok()?;
    let (entsize, count) = (u16_at(0x36), u16_at(0x38));
    if entsize < 4 {
        return None;
    }
    let mut interp = false;
    for i in 0..count {
        let at = phoff.checked_add(i.checked_mul(entsize)?)?;
        let entry = file.get(at..at.checked_add(entsize)?)?;
        // PT_INTERP
        if u32::from_le_bytes(entry[..4].try_into().ok()?) == 3 {
            interp = true;
        }
    }
    Some(interp)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 64-bit little-endian ELF header for `machine` with one program
    /// header of type `ptype`.
    fn elf(machine: u16, ptype: u32) -> Vec<u8> {
        let mut f = vec![0u8; 64 + 56];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2;
        f[5] = 1;
        f[18..20].copy_from_slice(&machine.to_le_bytes());
        f[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        f[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        f[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        f[64..68].copy_from_slice(&ptype.to_le_bytes());
        f
    }

    #[test]
    fn reads_the_machine_and_the_loader() {
        assert_eq!(elf_arch(&elf(62, 1)), Some("x86_64"));
        assert_eq!(elf_arch(&elf(183, 1)), Some("aarch64"));
        assert_eq!(elf_arch(&elf(40, 1)), None);
        assert_eq!(elf_arch(b"#!/bin/sh\nexit 0\n"), None);
        assert_eq!(elf_needs_loader(&elf(183, 3)), Some(true));
        assert_eq!(elf_needs_loader(&elf(183, 1)), Some(false));
        // Program headers past the end: not an answer, not a panic.
        let mut cut = elf(62, 3);
        cut.truncate(80);
        assert_eq!(elf_needs_loader(&cut), None);
        let mut far = elf(62, 3);
        far[0x20..0x28].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(elf_needs_loader(&far), None);
    }

    #[test]
    fn this_test_binary_is_read_right() {
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert_eq!(elf_arch(&me), Some(std::env::consts::ARCH));
        assert!(elf_needs_loader(&me).is_some());
    }
}
