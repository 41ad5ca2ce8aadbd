//! Applying a [`Plan`] on FreeBSD: a jail(2) per grain, its root assembled
//! from nullfs, tmpfs and devfs mounts, limits enforced by rctl(8) rules.
//!
//! FreeBSD has no user namespaces: the grain's processes run as its own
//! host uid, which is what isolates grains from each other on the file
//! system. The jail has no IP addresses (`ip4`/`ip6` disabled), cannot see
//! mounts outside its root (`enforce_statfs=2`), cannot create child jails,
//! and its devfs shows only the devices of ruleset 4 (`devfsrules_jail`).
//!
//! Status: compiled for x86_64-unknown-freebsd in CI, not yet run on a
//! FreeBSD host.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::{JailError, Plan};

unsafe extern "C" {
    fn rctl_add_rule(
        inbufp: *const libc::c_char,
        inbuflen: libc::size_t,
        outbufp: *mut libc::c_char,
        outbuflen: libc::size_t,
    ) -> libc::c_int;
    fn rctl_remove_rule(
        inbufp: *const libc::c_char,
        inbuflen: libc::size_t,
        outbufp: *mut libc::c_char,
        outbuflen: libc::size_t,
    ) -> libc::c_int;
    fn jail_attach(jid: libc::c_int) -> libc::c_int;
    fn unmount(dir: *const libc::c_char, flags: libc::c_int) -> libc::c_int;
}

/// Name/value pairs for nmount(2) and jail_set(2), kept alive while the
/// iovec array points into them.
struct Params {
    strings: Vec<CString>,
}

impl Params {
    fn new() -> Params {
        Params {
            strings: Vec::new(),
        }
    }

    fn set(mut self, name: &str, value: &str) -> Params {
        self.strings
            .push(CString::new(name).expect("parameter names have no NUL"));
        self.strings
            .push(CString::new(value).expect("parameter values have no NUL"));
        self
    }

    fn set_path(self, name: &str, value: &Path) -> Result<Params, JailError> {
        let text = value
            .to_str()
            .ok_or_else(|| JailError::new(format!("path {} is not UTF-8", value.display())))?
            .to_owned();
        Ok(self.set(name, &text))
    }

    fn iovecs(&self) -> Vec<libc::iovec> {
        self.strings
            .iter()
            .map(|s| libc::iovec {
                iov_base: s.as_ptr() as *mut libc::c_void,
                iov_len: s.as_bytes_with_nul().len(),
            })
            .collect()
    }
}

fn nmount(params: Params, flags: libc::c_int, step: &str, target: &Path) -> Result<(), JailError> {
    let mut iov = params.iovecs();
    // SAFETY: `iov` points into `params`, which outlives the call.
    if unsafe { libc::nmount(iov.as_mut_ptr(), iov.len() as libc::c_uint, flags) } != 0 {
        return Err(JailError::last_os(format!("{step} {}", target.display())));
    }
    Ok(())
}

fn rctl(rule: &str, add: bool) -> Result<(), JailError> {
    let c = CString::new(rule).expect("rules have no NUL");
    // SAFETY: the rule buffer is valid for its length; no output buffer.
    let rc = unsafe {
        if add {
            rctl_add_rule(
                c.as_ptr(),
                c.as_bytes_with_nul().len(),
                std::ptr::null_mut(),
                0,
            )
        } else {
            rctl_remove_rule(
                c.as_ptr(),
                c.as_bytes_with_nul().len(),
                std::ptr::null_mut(),
                0,
            )
        }
    };
    if rc != 0 {
        return Err(JailError::last_os(format!("rctl rule {rule}")));
    }
    Ok(())
}

/// Everything made for one grain, undone in reverse on drop.
struct Built {
    mounts: Vec<PathBuf>,
    jid: Option<libc::c_int>,
    rctl_subject: Option<String>,
}

impl Drop for Built {
    fn drop(&mut self) {
        if let Some(subject) = self.rctl_subject.take() {
            let _ = rctl(&subject, false);
        }
        if let Some(jid) = self.jid.take() {
            // SAFETY: removing the jail we created kills what is left in it.
            unsafe { libc::jail_remove(jid) };
        }
        for target in self.mounts.drain(..).rev() {
            if let Ok(c) = CString::new(target.as_os_str().as_bytes()) {
                // SAFETY: a valid path; MNT_FORCE because the jail is gone.
                unsafe { unmount(c.as_ptr(), libc::MNT_FORCE) };
            }
        }
    }
}

/// Runs the grain and returns its exit status as a shell would.
pub fn launch(plan: &Plan) -> Result<i32, JailError> {
    let root = PathBuf::from("/var/run/granary/roots").join(&plan.grain);
    std::fs::create_dir_all(&root)
        .map_err(|e| JailError::os(format!("creating {}", root.display()), e))?;
    let mut built = Built {
        mounts: Vec::new(),
        jid: None,
        rctl_subject: None,
    };

    nmount(
        Params::new()
            .set("fstype", "tmpfs")
            .set_path("fspath", &root)?
            .set("size", "1m"),
        libc::MNT_NOSUID,
        "mounting the root tmpfs on",
        &root,
    )?;
    built.mounts.push(root.clone());
    let entries = std::fs::read_dir(&plan.image)
        .map_err(|e| JailError::os(format!("reading image {}", plan.image.display()), e))?;
    for entry in entries {
        let entry = entry.map_err(|e| JailError::os("reading the image", e))?;
        let name = entry.file_name();
        if ["dev", "tmp", "var"]
            .iter()
            .any(|p| std::ffi::OsStr::new(p) == name)
        {
            continue;
        }
        let kind = entry
            .file_type()
            .map_err(|e| JailError::os("reading the image", e))?;
        let target = root.join(&name);
        if kind.is_symlink() {
            let dest = std::fs::read_link(entry.path())
                .map_err(|e| JailError::os("reading the image", e))?;
            std::os::unix::fs::symlink(dest, &target)
                .map_err(|e| JailError::os(format!("linking {}", target.display()), e))?;
        } else if kind.is_dir() {
            std::fs::create_dir(&target)
                .map_err(|e| JailError::os(format!("creating {}", target.display()), e))?;
            nmount(
                Params::new()
                    .set("fstype", "nullfs")
                    .set_path("fspath", &target)?
                    .set_path("target", &entry.path())?,
                libc::MNT_RDONLY | libc::MNT_NOSUID,
                "mounting the image read-only on",
                &target,
            )?;
            built.mounts.push(target);
        }
    }
    let var = root.join("var");
    std::fs::create_dir(&var).map_err(|e| JailError::os("creating /var", e))?;
    nmount(
        Params::new()
            .set("fstype", "nullfs")
            .set_path("fspath", &var)?
            .set_path("target", &plan.dataset)?,
        libc::MNT_NOSUID,
        "mounting the dataset on",
        &var,
    )?;
    built.mounts.push(var);
    let tmp = root.join("tmp");
    std::fs::create_dir(&tmp).map_err(|e| JailError::os("creating /tmp", e))?;
    nmount(
        Params::new()
            .set("fstype", "tmpfs")
            .set_path("fspath", &tmp)?
            .set("size", &plan.limits.tmp_bytes.to_string())
            .set("inodes", &plan.limits.tmp_inodes.to_string())
            .set("mode", "1777"),
        libc::MNT_NOSUID,
        "mounting tmpfs on",
        &tmp,
    )?;
    built.mounts.push(tmp);
    let dev = root.join("dev");
    std::fs::create_dir(&dev).map_err(|e| JailError::os("creating /dev", e))?;
    nmount(
        Params::new()
            .set("fstype", "devfs")
            .set_path("fspath", &dev)?
            .set("ruleset", "4"),
        libc::MNT_NOSUID | libc::MNT_NOEXEC,
        "mounting devfs on",
        &dev,
    )?;
    built.mounts.push(dev);

    let name = format!("granary-{}", plan.grain);
    let params = Params::new()
        .set_path("path", &root)?
        .set("name", &name)
        .set("host.hostname", &plan.hostname)
        .set("ip4", "disable")
        .set("ip6", "disable")
        .set("enforce_statfs", "2")
        .set("children.max", "0")
        .set("securelevel", "3")
        .set("persist", "");
    let mut iov = params.iovecs();
    // SAFETY: `iov` points into `params`, which outlives the call.
    let jid = unsafe {
        libc::jail_set(
            iov.as_mut_ptr(),
            iov.len() as libc::c_uint,
            libc::JAIL_CREATE,
        )
    };
    if jid < 0 {
        return Err(JailError::last_os(format!("jail_set {name}")));
    }
    built.jid = Some(jid);

    let subject = format!("jail:{name}");
    built.rctl_subject = Some(subject.clone());
    let l = &plan.limits;
    rctl(
        &format!("{subject}:memoryuse:deny={}", l.memory_bytes),
        true,
    )?;
    rctl(&format!("{subject}:maxproc:deny={}", l.pids), true)?;
    rctl(
        &format!("{subject}:openfiles:deny={}", l.nofile * l.pids),
        true,
    )?;

    let args = crate::ExecArgs::new(plan)?;
    let gid = plan.host_gid;
    let uid = plan.host_uid;

    // SAFETY: the launcher is single-threaded; the child only makes the
    // calls below and execs or exits.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(JailError::last_os("fork"));
    }
    if pid == 0 {
        // SAFETY: attaching to the jail we created, dropping to the grain's
        // uid and gid, then exec with arrays that outlive the call.
        unsafe {
            let ok = jail_attach(jid) == 0
                && libc::setsid() >= 0
                && libc::setgroups(1, &gid) == 0
                && libc::setgid(gid) == 0
                && libc::setuid(uid) == 0
                && libc::chdir(c"/var".as_ptr()) == 0;
            if ok {
                args.exec();
            }
            libc::_exit(125);
        }
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    drop(built);
    Ok(crate::shell_status(status))
}
