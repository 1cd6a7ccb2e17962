//! QEMU 11.1 from Debian trixie-backports, fetched into `target/qemu-11.1/` without touching
//! the system's apt or dpkg state, and run through trixie's own dynamic loader.
//!
//! Steps: a private apt configuration (`APT_CONFIG`) whose state, lists, cache, an empty dpkg
//! status and a sources list naming trixie, trixie-updates, trixie-backports and
//! trixie-security all live in `target/qemu-11.1/apt/`; `apt-get update`;
//! `apt-get install -s -t trixie-backports qemu-system-arm` against the empty status lists the
//! whole closure (about 90 packages);
//! `apt-get download` of those exact versions; `dpkg-deb -x` of each into
//! `target/qemu-11.1/root/`. The launcher `target/qemu-11.1/qemu-system-aarch64` is a shell script
//! that runs `root/usr/bin/qemu-system-aarch64` through `root/usr/lib/x86_64-linux-gnu/ld-linux-
//! x86-64.so.2` with the unpacked libraries, firmware data (`-L`) and module directory, so the
//! rest of the runner treats it as any QEMU binary. The marker `target/qemu-11.1/complete` is
//! written last; a completed fetch is reused.

use std::fs;
use std::path::{Path, PathBuf};

use crate::apt::{debs_in, unpack_deb, PrivateApt};
use crate::{io_context, Error, Result};

/// Debian package version of the QEMU 11.1 build used with [`crate::QemuChoice::Debian111`].
pub const QEMU_111_DEB_VERSION: &str = "1:11.1.3+ds-2~bpo13+1";

/// The suites QEMU 11.1 and its library closure come from.
const SUITES: [&str; 4] = [
    "trixie",
    "trixie-updates",
    "trixie-backports",
    "trixie-security",
];

/// The launcher script for the unpacked tree at `root`.
fn launcher_script(root: &Path) -> String {
    let r = root.display();
    format!(
        "#!/bin/sh\n# Runs Debian trixie-backports' QEMU 11.1 unpacked in {r} (written by virtio-iommu-runner).\n\
         export QEMU_MODULE_DIR=\"{r}/usr/lib/x86_64-linux-gnu/qemu\"\n\
         exec \"{r}/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2\" --library-path \"{r}/usr/lib/x86_64-linux-gnu\" \
         \"{r}/usr/bin/qemu-system-aarch64\" -L \"{r}/usr/share/qemu\" \"$@\"\n"
    )
}

/// Fetches QEMU 11.1 into `dir` (see the module documentation) unless a completed fetch is
/// there, and returns the launcher `dir/qemu-system-aarch64`.
///
/// # Errors
/// [`Error::Io`] when a file cannot be written; [`Error::CommandFailed`] naming the apt-get or
/// dpkg-deb command (and package) that failed; [`Error::QemuUnavailable`] when the simulated
/// install lists no packages or the binary is missing after unpacking.
pub fn fetch_debian_qemu_111(dir: &Path) -> Result<PathBuf> {
    let launcher = dir.join("qemu-system-aarch64");
    let marker = dir.join("complete");
    if marker.is_file() && launcher.is_file() {
        return Ok(launcher);
    }
    let _guard = crate::QEMU_SETUP.lock().unwrap_or_else(|e| e.into_inner());
    if marker.is_file() && launcher.is_file() {
        return Ok(launcher);
    }
    eprintln!(
        "runner: fetching QEMU 11.1 (qemu-system-arm={QEMU_111_DEB_VERSION}, trixie-backports) into {}",
        dir.display()
    );
    let _ = fs::remove_dir_all(dir);
    let root = dir.join("root");
    let debs = dir.join("debs");
    for path in [&root, &debs] {
        io_context(fs::create_dir_all(path), || {
            format!("cannot create {}", path.display())
        })?;
    }
    let apt = PrivateApt::create(&dir.join("apt"), &SUITES, None)?;
    apt.update()?;
    let packages = apt.simulate_install(&[
        "-t",
        "trixie-backports",
        &format!("qemu-system-arm={QEMU_111_DEB_VERSION}"),
    ])?;
    if packages.is_empty() {
        return Err(Error::QemuUnavailable(
            "apt-get install -s -t trixie-backports qemu-system-arm listed no packages".into(),
        ));
    }
    apt.download(&debs, &packages)?;
    let mut unpacked = 0usize;
    for deb in debs_in(&debs)? {
        unpack_deb(&deb, &root)?;
        unpacked += 1;
    }
    let binary = root.join("usr/bin/qemu-system-aarch64");
    if !binary.is_file() {
        return Err(Error::QemuUnavailable(format!(
            "{} missing after unpacking {unpacked} packages",
            binary.display()
        )));
    }
    io_context(fs::write(&launcher, launcher_script(&root)), || {
        format!("cannot write {}", launcher.display())
    })?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        io_context(
            fs::set_permissions(&launcher, fs::Permissions::from_mode(0o755)),
            || format!("cannot make {} executable", launcher.display()),
        )?;
    }
    let _ = fs::remove_dir_all(&debs);
    io_context(fs::write(&marker, format!("{unpacked} packages\n")), || {
        format!("cannot write {}", marker.display())
    })?;
    eprintln!(
        "runner: QEMU 11.1: {unpacked} packages unpacked; launcher {}",
        launcher.display()
    );
    Ok(launcher)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apt::{apt_config, sources_list};

    #[test]
    fn private_apt_state_only() {
        let config = apt_config(Path::new("/t/apt"), None);
        for line in config.lines().filter(|l| l.starts_with("Dir::")) {
            assert!(line.contains("\"/t/apt/"), "{line}");
        }
        let sources = sources_list(&SUITES);
        assert!(sources.contains("trixie-backports main"));
        assert!(sources.contains("/debian-security trixie-security main"));
        assert_eq!(sources.lines().count(), 4);
    }
}
