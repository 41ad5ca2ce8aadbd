//! Building the grain's root filesystem, as host root inside the grain's new
//! mount namespace, then `pivot_root` into it.
//!
//! ```text
//! /            tmpfs, read-only after setup
//! /<entry>     each top-level entry of the image, bound read-only, nosuid, nodev
//! /var         the grain's dataset, read-write, nosuid, nodev
//! /tmp         tmpfs with size and inode limits, nosuid, nodev
//! /dev         tmpfs, read-only: null zero full random urandom
//! ```
//!
//! There is no `/proc`. Even `subset=pid` leaves each process its own
//! `mountinfo`, `mounts` and `mountstats`, which name the host paths the
//! image and dataset were bound from (`DATA_DIR/grains/<user>-<kind>/data`)
//! and their device (a ZFS source is the dataset's name, which names the
//! user). Nothing a grain runs needs it: Rust's std and tokio fall back to
//! `sched_getaffinity`, and git works without it.

use std::ffi::{CString, OsStr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::{JailError, Plan};

/// Where the new root is assembled. Over-mounting it is invisible outside
/// this private mount namespace, and the image and dataset are reached
/// through descriptors opened beforehand.
const STAGING: &str = "/tmp";

/// Entries of the image that the sandbox provides itself (or, for
/// `proc`, withholds).
const PROVIDED: &[&str] = &["dev", "proc", "tmp", "var"];

/// Device nodes of `/dev`: name, major, minor.
const DEVICES: &[(&str, u32, u32)] = &[
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
];

fn cstr(path: &Path) -> Result<CString, JailError> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| JailError::new(format!("path {} contains a NUL byte", path.display())))
}

fn mount(
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
    step: &str,
) -> Result<(), JailError> {
    let source = source.map(cstr).transpose()?;
    let target_c = cstr(target)?;
    let fstype = fstype.map(|f| CString::new(f).expect("static fs type"));
    let data = data.map(|d| CString::new(d).expect("mount options have no NUL"));
    // SAFETY: every pointer is either null or a valid NUL-terminated string
    // that outlives the call.
    let rc = unsafe {
        libc::mount(
            source.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            target_c.as_ptr(),
            fstype.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            flags,
            data.as_ref()
                .map_or(std::ptr::null(), |s| s.as_ptr().cast()),
        )
    };
    if rc != 0 {
        return Err(JailError::last_os(format!("{step} {}", target.display())));
    }
    Ok(())
}

fn bind(source: &Path, target: &Path, flags: libc::c_ulong, step: &str) -> Result<(), JailError> {
    mount(Some(source), target, None, libc::MS_BIND, None, step)?;
    // Bind mounts take their flags only on a remount.
    mount(
        None,
        target,
        None,
        libc::MS_BIND | libc::MS_REMOUNT | flags,
        None,
        step,
    )
}

fn mkdir(path: &Path) -> Result<(), JailError> {
    std::fs::create_dir(path)
        .map_err(|e| JailError::os(format!("creating mount point {}", path.display()), e))
}

fn touch(path: &Path) -> Result<(), JailError> {
    std::fs::File::create(path)
        .map(drop)
        .map_err(|e| JailError::os(format!("creating mount point {}", path.display()), e))
}

fn fd_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// Builds the root and pivots into it. On return the process's `/` is the
/// grain's root and the host's file system is unreachable.
pub(crate) fn build_root(plan: &Plan, rootless: bool) -> Result<(), JailError> {
    let staging = Path::new(STAGING);
    // Nothing we mount may propagate back to the host.
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
        "making private",
    )?;
    // Opened here, inside the new mount namespace (a bind source must be a
    // mount of the caller's namespace), and before the staging mount can
    // hide them.
    let image = &super::fds::open_dir_path(&plan.image, "image")?;
    let dataset = &super::fds::open_dir_path(&plan.dataset, "dataset")?;
    mount(
        Some(Path::new("tmpfs")),
        staging,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("mode=0755,size=1m,nr_inodes=4096"),
        "mounting the root tmpfs on",
    )?;

    let image_dir = fd_path(image);
    let ro = libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV;
    let entries = std::fs::read_dir(&image_dir)
        .map_err(|e| JailError::os(format!("reading image {}", plan.image.display()), e))?;
    for entry in entries {
        let entry = entry.map_err(|e| JailError::os("reading the image", e))?;
        let name = entry.file_name();
        if PROVIDED.iter().any(|p| OsStr::new(p) == name) {
            continue;
        }
        let source = image_dir.join(&name);
        let target = staging.join(&name);
        let kind = entry
            .file_type()
            .map_err(|e| JailError::os("reading the image", e))?;
        if kind.is_symlink() {
            let dest = std::fs::read_link(&source)
                .map_err(|e| JailError::os(format!("reading link {}", source.display()), e))?;
            std::os::unix::fs::symlink(&dest, &target)
                .map_err(|e| JailError::os(format!("linking {}", target.display()), e))?;
        } else if kind.is_dir() {
            mkdir(&target)?;
            bind(&source, &target, ro, "binding the image read-only on")?;
        } else if kind.is_file() {
            touch(&target)?;
            bind(&source, &target, ro, "binding the image read-only on")?;
        }
    }

    let var = staging.join("var");
    mkdir(&var)?;
    bind(
        &fd_path(dataset),
        &var,
        libc::MS_NOSUID | libc::MS_NODEV,
        "binding the dataset on",
    )?;

    let tmp = staging.join("tmp");
    mkdir(&tmp)?;
    mount(
        Some(Path::new("tmpfs")),
        &tmp,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some(&format!(
            "mode=1777,size={},nr_inodes={}",
            plan.limits.tmp_bytes, plan.limits.tmp_inodes
        )),
        "mounting tmpfs on",
    )?;

    build_dev(&staging.join("dev"), rootless)?;

    pivot(staging)?;
    // The root tmpfs itself becomes read-only: the grain cannot add files at /.
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
        None,
        "remounting read-only",
    )
}

/// Device nodes are made with mknod as root; without root (no mknod in a
/// user namespace) the host's nodes are bound instead.
fn build_dev(dev: &Path, rootless: bool) -> Result<(), JailError> {
    mkdir(dev)?;
    mount(
        Some(Path::new("tmpfs")),
        dev,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("mode=0755,size=64k,nr_inodes=64"),
        "mounting tmpfs on",
    )?;
    if rootless {
        for (name, _, _) in DEVICES {
            let target = dev.join(name);
            touch(&target)?;
            bind(
                &Path::new("/dev").join(name),
                &target,
                libc::MS_NOSUID | libc::MS_NOEXEC,
                "binding a device on",
            )?;
        }
    }
    for (name, major, minor) in DEVICES.iter().filter(|_| !rootless) {
        let target = cstr(&dev.join(name))?;
        // SAFETY: a valid path; a character device with a fixed number.
        let rc = unsafe {
            libc::mknod(
                target.as_ptr(),
                libc::S_IFCHR | 0o666,
                libc::makedev(*major, *minor),
            )
        };
        if rc != 0 {
            return Err(JailError::last_os(format!("creating /dev/{name}")));
        }
        // mknod's mode is filtered by the umask.
        // SAFETY: chmod of the node just made.
        if unsafe { libc::chmod(target.as_ptr(), 0o666) } != 0 {
            return Err(JailError::last_os(format!("chmod /dev/{name}")));
        }
    }
    mount(
        None,
        dev,
        None,
        libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NOEXEC,
        None,
        "remounting read-only",
    )
}

/// `pivot_root(".", ".")` then detach the old root: the new root needs no
/// directory for the old one.
fn pivot(new_root: &Path) -> Result<(), JailError> {
    std::env::set_current_dir(new_root)
        .map_err(|e| JailError::os(format!("entering {}", new_root.display()), e))?;
    let dot = CString::new(".").expect("static");
    // SAFETY: both arguments are valid NUL-terminated strings.
    if unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) } != 0 {
        return Err(JailError::last_os(format!(
            "pivot_root into {}",
            new_root.display()
        )));
    }
    // SAFETY: "." is a valid path; MNT_DETACH lazily unmounts the old root
    // stacked on the new one.
    if unsafe { libc::umount2(dot.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(JailError::last_os("detaching the host root"));
    }
    std::env::set_current_dir("/").map_err(|e| JailError::os("entering the new root", e))
}
