//! QEMU 11.1 from Debian trixie-backports, fetched into `target/qemu-11.1/` without touching
//! the system's apt or dpkg state, and run through trixie's own dynamic loader.
//!
//! Steps (facts in `../shared/reference/vfio-user.md`): a private apt configuration
//! (`APT_CONFIG`) whose state, lists, cache, an empty dpkg status and a sources list naming
//! trixie, trixie-updates, trixie-backports and trixie-security all live in
//! `target/qemu-11.1/apt/`; `apt-get update`; `apt-get install -s -t trixie-backports
//! qemu-system-arm` against the empty status lists the whole closure (about 90 packages);
//! `apt-get download` of those exact versions; `dpkg-deb -x` of each into
//! `target/qemu-11.1/root/`. The launcher `target/qemu-11.1/qemu-system-aarch64` is a shell script
//! that runs `root/usr/bin/qemu-system-aarch64` through `root/usr/lib/x86_64-linux-gnu/ld-linux-
//! x86-64.so.2` with the unpacked libraries, firmware data (`-L`) and module directory, so the
//! rest of the runner treats it as any QEMU binary. The marker `target/qemu-11.1/complete` is
//! written last; a completed fetch is reused.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{io_context, run_captured, Error, Result};

/// Debian package version of the QEMU 11.1 build used with [`crate::QemuChoice::Debian111`].
pub const QEMU_111_DEB_VERSION: &str = "1:11.1.3+ds-2~bpo13+1";

/// Debian's archive host as the system's sources name it (so trixie comes from the same mirror).
fn archive_uri() -> String {
    crate::debian_archive_uri()
}

/// The private apt configuration: every directory apt reads or writes lies under `apt_dir`.
fn apt_config(apt_dir: &Path) -> String {
    let d = apt_dir.display();
    format!(
        "Dir::State \"{d}/state\";\nDir::State::Lists \"{d}/state/lists\";\n\
         Dir::State::status \"{d}/status\";\nDir::Cache \"{d}/cache\";\n\
         Dir::Etc::sourcelist \"{d}/sources.list\";\nDir::Etc::sourceparts \"{d}/sources.list.d\";\n\
         Dir::Etc::Parts \"{d}/apt.conf.d\";\nDir::Etc::preferencesparts \"{d}/preferences.d\";\n\
         Dir::Etc::preferences \"{d}/preferences\";\n\
         APT::Install-Recommends \"false\";\nAPT::Sandbox::User \"root\";\nAcquire::Languages \"none\";\n"
    )
}

/// The one-line-per-suite sources list for trixie (signed by the archive keyring bookworm has).
fn sources_list() -> String {
    let uri = archive_uri();
    let security = uri
        .trim_end_matches('/')
        .replace("/debian", "/debian-security");
    let keyring = "[signed-by=/usr/share/keyrings/debian-archive-keyring.gpg]";
    format!(
        "deb {keyring} {uri} trixie main\ndeb {keyring} {uri} trixie-updates main\n\
         deb {keyring} {uri} trixie-backports main\ndeb {keyring} {security} trixie-security main\n"
    )
}

/// `apt-get` with the private configuration.
fn apt(config: &Path) -> Command {
    let mut command = Command::new("apt-get");
    command
        .env("APT_CONFIG", config)
        .env("DEBIAN_FRONTEND", "noninteractive");
    command
}

/// The `name=version` pairs of the `Inst` lines of `apt-get install -s` output.
fn simulated_installs(output: &str) -> Vec<String> {
    output
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("Inst ")?;
            let mut words = rest.split_whitespace();
            let name = words.next()?;
            let version = words.next()?.strip_prefix('(')?;
            Some(format!("{name}={version}"))
        })
        .collect()
}

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
    let apt_dir = dir.join("apt");
    let root = dir.join("root");
    let debs = dir.join("debs");
    for sub in [
        "state/lists/partial",
        "cache/archives/partial",
        "sources.list.d",
        "apt.conf.d",
        "preferences.d",
    ] {
        let path = apt_dir.join(sub);
        io_context(fs::create_dir_all(&path), || {
            format!("cannot create {}", path.display())
        })?;
    }
    for path in [&root, &debs] {
        io_context(fs::create_dir_all(path), || {
            format!("cannot create {}", path.display())
        })?;
    }
    let config = apt_dir.join("apt.conf");
    let files = [
        (config.clone(), apt_config(&apt_dir)),
        (apt_dir.join("sources.list"), sources_list()),
        (apt_dir.join("status"), String::new()),
    ];
    for (path, text) in &files {
        io_context(fs::write(path, text), || {
            format!("cannot write {}", path.display())
        })?;
    }
    run_captured(apt(&config).arg("update"))?;
    let simulated = run_captured(apt(&config).args([
        "install",
        "-s",
        "-t",
        "trixie-backports",
        &format!("qemu-system-arm={QEMU_111_DEB_VERSION}"),
    ]))?;
    let packages = simulated_installs(&String::from_utf8_lossy(&simulated.stdout));
    if packages.is_empty() {
        return Err(Error::QemuUnavailable(
            "apt-get install -s -t trixie-backports qemu-system-arm listed no packages".into(),
        ));
    }
    run_captured(
        apt(&config)
            .current_dir(&debs)
            .arg("download")
            .args(&packages),
    )?;
    let mut unpacked = 0usize;
    for entry in io_context(fs::read_dir(&debs), || {
        format!("cannot read {}", debs.display())
    })? {
        let path = entry
            .map_err(|e| Error::Io {
                context: format!("cannot read {}", debs.display()),
                source: e,
            })?
            .path();
        if path.extension().is_some_and(|e| e == "deb") {
            run_captured(Command::new("dpkg-deb").arg("-x").arg(&path).arg(&root))?;
            unpacked += 1;
        }
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

    #[test]
    fn inst_lines() {
        let out = "NOTE: simulation\nInst libc6 (2.41-12 Debian:13.2/stable [amd64])\n\
                   Inst qemu-system-arm (1:11.1.3+ds-2~bpo13+1 Debian Backports:trixie-backports [amd64])\n\
                   Conf libc6 (2.41-12 Debian:13.2/stable [amd64])\n";
        assert_eq!(
            simulated_installs(out),
            ["libc6=2.41-12", "qemu-system-arm=1:11.1.3+ds-2~bpo13+1"]
        );
    }

    #[test]
    fn private_apt_state_only() {
        let config = apt_config(Path::new("/t/apt"));
        for line in config.lines().filter(|l| l.starts_with("Dir::")) {
            assert!(line.contains("\"/t/apt/"), "{line}");
        }
        assert!(sources_list().contains("trixie-backports main"));
    }
}
