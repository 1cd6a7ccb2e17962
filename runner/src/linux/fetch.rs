//! The guest's packages: Debian's arm64 kernel (`linux-image-arm64`'s versioned dependency,
//! e.g. `linux-image-6.12.117+deb13-arm64`) and `busybox-static`, downloaded through a private
//! arm64 apt ([`crate::apt`]; nothing is installed, the system's apt and dpkg state stay as
//! they are) and unpacked with `dpkg-deb -x`.
//!
//! Cache under `target/linux/`:
//!
//! - `<suite>/apt/`: the private apt state; `<suite>/debs/`: the downloaded packages;
//!   `<suite>/complete`: written last, naming the kernel and busybox packages (a completed
//!   fetch is reused; delete `target/linux` to fetch anew). [`fetch_kernel_deb`] of other
//!   suites (e.g. `bookworm-backports`) caches the same way under their names.
//! - `kernels/<package file stem>/`: one unpacked kernel package (`root/`), with its own
//!   `complete` marker holding the package's size and modification time (a changed file given
//!   by `VIOMMU_LINUX_DEB` is unpacked again), and the initramfs built for it.
//! - `busybox/<package file stem>/`: unpacked busybox-static.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::apt::{control_field, debs_in, unpack_deb, PrivateApt};
use crate::{io_context, Error, Result};

/// The suite the default kernel and busybox come from.
pub const DEFAULT_SUITE: &str = "trixie";

/// Serialises fetching and unpacking within this process (tests run in parallel).
static LINUX_SETUP: Mutex<()> = Mutex::new(());

/// `<workspace>/target/linux`.
pub fn linux_dir() -> PathBuf {
    crate::workspace_root().join("target").join("linux")
}

/// The versioned kernel package a `linux-image-arm64` stanza depends on (the first
/// `linux-image-*-arm64` among its `Depends`, version constraint dropped).
pub fn kernel_package_of(stanza: &str) -> Option<String> {
    control_field(stanza, "Depends")?
        .split([',', '|'])
        .map(|alternative| alternative.split_whitespace().next().unwrap_or(""))
        .find(|name| name.starts_with("linux-image-") && name.ends_with("-arm64"))
        .map(String::from)
}

/// A [`Error::Fetch`] for `what`.
fn fetch_error(what: &str, error: Error) -> Error {
    Error::Fetch {
        what: what.to_string(),
        reason: error.to_string(),
    }
}

/// A fresh staging directory next to `dir` (private to this process and thread), for work that
/// [`publish`] then renames to `dir`: other processes never see a half-done `dir`.
fn staging_for(dir: &Path) -> Result<PathBuf> {
    let parent = dir.parent().unwrap_or(Path::new("."));
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let staging = parent.join(format!(
        ".{name}.partial-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let _ = fs::remove_dir_all(&staging);
    io_context(fs::create_dir_all(&staging), || {
        format!("cannot create {}", staging.display())
    })?;
    Ok(staging)
}

/// Renames the finished `staging` to `dir`. When `dir` exists: kept if `complete(dir)` (another
/// process finished first; `staging` is dropped), else replaced.
///
/// # Errors
/// [`Error::Io`] when `staging` cannot be moved.
fn publish(staging: &Path, dir: &Path, complete: impl Fn(&Path) -> bool) -> Result<()> {
    if fs::rename(staging, dir).is_ok() {
        return Ok(());
    }
    if complete(dir) {
        let _ = fs::remove_dir_all(staging);
        return Ok(());
    }
    let _ = fs::remove_dir_all(dir);
    let moved = fs::rename(staging, dir);
    if moved.is_err() && complete(dir) {
        let _ = fs::remove_dir_all(staging);
        return Ok(());
    }
    io_context(moved, || {
        format!("cannot move {} to {}", staging.display(), dir.display())
    })
}

/// The packages a `complete` marker in `dir` names (`<key> <file>` lines, files under
/// `dir/debs`), if there are `count` of them and all exist.
fn completed_packages(dir: &Path, count: usize) -> Option<Vec<PathBuf>> {
    let text = fs::read_to_string(dir.join("complete")).ok()?;
    let named: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(_, file)| dir.join("debs").join(file.trim()))
        .filter(|p| p.is_file())
        .collect();
    (named.len() == count).then_some(named)
}

/// The downloaded packages of one suite.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct SuitePackages {
    /// The kernel package (`linux-image-<release>_<version>_arm64.deb`).
    pub kernel_deb: PathBuf,
    /// The `busybox-static` package.
    pub busybox_deb: PathBuf,
}

/// The `.deb` in `debs` whose file name starts with `<package>_`.
fn deb_of(debs: &Path, package: &str) -> Result<Option<PathBuf>> {
    let prefix = format!("{package}_");
    Ok(debs_in(debs)?.into_iter().find(|deb| {
        deb.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(&prefix))
    }))
}

/// Downloads `suite`'s arm64 kernel (`linux-image-arm64`'s dependency) and `busybox-static`
/// from `suite` and `<suite>-security` into `target/linux/<suite>/debs/` unless a completed
/// download is there.
///
/// # Errors
/// [`Error::Fetch`] naming the step and package that failed (apt's stderr included).
pub fn fetch_suite_packages(suite: &str) -> Result<SuitePackages> {
    let security = format!("{suite}-security");
    let mut found = fetch_packages(suite, &[suite, &security], true)?;
    let busybox_deb = found.pop().unwrap_or_default();
    let kernel_deb = found.pop().unwrap_or_default();
    Ok(SuitePackages {
        kernel_deb,
        busybox_deb,
    })
}

/// Downloads the arm64 kernel `linux-image-arm64` depends on in `suites` (e.g.
/// `["bookworm-backports"]`) into `target/linux/<suites joined by +>/debs/` unless a completed
/// download is there, and returns the package (for `VIOMMU_LINUX_DEB`).
///
/// # Errors
/// As [`fetch_suite_packages`].
pub fn fetch_kernel_deb(suites: &[&str]) -> Result<PathBuf> {
    let mut found = fetch_packages(&suites.join("+"), suites, false)?;
    Ok(found.pop().unwrap_or_default())
}

/// The kernel package and, with `busybox`, busybox-static, downloaded from `suites` into
/// `target/linux/<name>/debs/` (reused when `<name>/complete` names them), in that order.
fn fetch_packages(name: &str, suites: &[&str], busybox: bool) -> Result<Vec<PathBuf>> {
    let dir = linux_dir().join(name);
    let count = 1 + usize::from(busybox);
    let what = suites.join(", ");
    let _guard = LINUX_SETUP.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(found) = completed_packages(&dir, count) {
        return Ok(found);
    }
    eprintln!(
        "runner: fetching the arm64 kernel{} of {what} into {}",
        if busybox { " and busybox-static" } else { "" },
        dir.display()
    );
    let staging = staging_for(&dir)?;
    let result = download_packages(&staging, suites, busybox);
    if let Err(e) = result {
        let _ = fs::remove_dir_all(&staging);
        return Err(e);
    }
    publish(&staging, &dir, |d| completed_packages(d, count).is_some())?;
    completed_packages(&dir, count).ok_or_else(|| Error::Fetch {
        what: what.clone(),
        reason: format!("{} incomplete after the download", dir.display()),
    })
}

/// [`fetch_packages`]' work in `dir` (a staging directory): the private apt, the download and
/// the `complete` marker.
fn download_packages(dir: &Path, suites: &[&str], busybox: bool) -> Result<()> {
    let debs = dir.join("debs");
    let what = suites.join(", ");
    io_context(fs::create_dir_all(&debs), || {
        format!("cannot create {}", debs.display())
    })?;
    let apt = PrivateApt::create(&dir.join("apt"), suites, Some("arm64"))
        .map_err(|e| fetch_error(&format!("{what} package lists"), e))?;
    apt.update()
        .map_err(|e| fetch_error(&format!("{what} arm64 package lists (apt-get update)"), e))?;
    let stanza = apt
        .show("linux-image-arm64")
        .map_err(|e| fetch_error(&format!("linux-image-arm64 of {what}"), e))?;
    let kernel = kernel_package_of(&stanza).ok_or_else(|| Error::Fetch {
        what: format!("linux-image-arm64 of {what}"),
        reason: "its Depends names no linux-image-*-arm64 package".into(),
    })?;
    let mut packages = vec![("kernel", kernel)];
    if busybox {
        packages.push(("busybox", "busybox-static".to_string()));
    }
    let mut record = String::new();
    for (key, package) in &packages {
        apt.download(&debs, std::slice::from_ref(package))
            .map_err(|e| fetch_error(&format!("{package} (arm64, {what})"), e))?;
        let deb = deb_of(&debs, package)?.ok_or_else(|| Error::Fetch {
            what: format!("{package} (arm64, {what})"),
            reason: format!(
                "apt-get download left no {package}_*.deb in {}",
                debs.display()
            ),
        })?;
        let file = deb
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        eprintln!("runner: fetched {file}");
        record.push_str(&format!("{key} {file}\n"));
    }
    let marker = dir.join("complete");
    io_context(fs::write(&marker, record), || {
        format!("cannot write {}", marker.display())
    })
}

/// `deb` unpacked under `target/linux/<kind>/<file stem>/root` (reused while the package's
/// size and modification time are those recorded in the `complete` marker). Returns the
/// directory holding `root/`.
///
/// # Errors
/// [`Error::Io`] when `deb` cannot be read or a file cannot be written;
/// [`Error::Fetch`] naming the package when `dpkg-deb -x` fails.
pub fn unpacked(kind: &str, deb: &Path) -> Result<PathBuf> {
    let metadata = io_context(fs::metadata(deb), || format!("package {}", deb.display()))?;
    let modified = metadata
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let stamp = format!("{} {} {modified}\n", deb.display(), metadata.len());
    let stem = deb
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "package".into());
    let dir = linux_dir().join(kind).join(&stem);
    let done = |d: &Path| fs::read_to_string(d.join("complete")).is_ok_and(|t| t == stamp);
    let _guard = LINUX_SETUP.lock().unwrap_or_else(|e| e.into_inner());
    if done(&dir) {
        return Ok(dir);
    }
    eprintln!("runner: unpacking {} into {}", deb.display(), dir.display());
    let staging = staging_for(&dir)?;
    let unpacked = unpack_deb(deb, &staging.join("root"))
        .map_err(|e| fetch_error(&format!("{} (dpkg-deb -x)", deb.display()), e))
        .and_then(|()| {
            let marker = staging.join("complete");
            io_context(fs::write(&marker, &stamp), || {
                format!("cannot write {}", marker.display())
            })
        });
    if let Err(e) = unpacked {
        let _ = fs::remove_dir_all(&staging);
        return Err(e);
    }
    publish(&staging, &dir, done)?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_dependency() {
        let trixie = "Package: linux-image-arm64\nSource: linux-signed-arm64 (6.12.117+1)\n\
                      Version: 6.12.117-1\nDepends: linux-image-6.12.117+deb13-arm64 (= 6.12.117-1)\n";
        assert_eq!(
            kernel_package_of(trixie).as_deref(),
            Some("linux-image-6.12.117+deb13-arm64")
        );
        let odd = "Depends: kmod, linux-image-6.1.0-41-arm64 (= 6.1.158-1) | linux-image-6.1.0-41-arm64-unsigned\n";
        assert_eq!(
            kernel_package_of(odd).as_deref(),
            Some("linux-image-6.1.0-41-arm64")
        );
        assert_eq!(kernel_package_of("Depends: kmod\n"), None);
        assert_eq!(kernel_package_of("Package: x\n"), None);
    }
}
