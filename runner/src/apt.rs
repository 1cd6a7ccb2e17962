//! A private apt: Debian packages resolved and downloaded from Debian's archive without touching
//! the system's apt or dpkg state, and unpacked with `dpkg-deb -x` (nothing is installed).
//!
//! Every directory apt reads or writes (state, lists, cache, an empty dpkg status, the sources
//! list, configuration parts) lies under one directory, named to apt by `APT_CONFIG`. An
//! architecture other than the host's (`arm64` for the Linux guest) is set with
//! `APT::Architecture`/`APT::Architectures`, so that the lists and downloads are that
//! architecture's only.
//!
//! Used by [`crate::qemu_111`] (trixie-backports' QEMU 11.1, host architecture) and
//! `crate::linux` (Debian's arm64 kernel and busybox-static).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{io_context, run_captured, Error, Result};

/// The private apt configuration: every directory apt reads or writes lies under `apt_dir`;
/// with `architecture`, apt handles that Debian architecture (e.g. `arm64`) only.
pub(crate) fn apt_config(apt_dir: &Path, architecture: Option<&str>) -> String {
    let d = apt_dir.display();
    let mut config = format!(
        "Dir::State \"{d}/state\";\nDir::State::Lists \"{d}/state/lists\";\n\
         Dir::State::status \"{d}/status\";\nDir::Cache \"{d}/cache\";\n\
         Dir::Etc::sourcelist \"{d}/sources.list\";\nDir::Etc::sourceparts \"{d}/sources.list.d\";\n\
         Dir::Etc::Parts \"{d}/apt.conf.d\";\nDir::Etc::preferencesparts \"{d}/preferences.d\";\n\
         Dir::Etc::preferences \"{d}/preferences\";\n\
         APT::Install-Recommends \"false\";\nAPT::Sandbox::User \"root\";\nAcquire::Languages \"none\";\n"
    );
    if let Some(arch) = architecture {
        config.push_str(&format!(
            "APT::Architecture \"{arch}\";\nAPT::Architectures {{ \"{arch}\"; }};\n"
        ));
    }
    config
}

/// A one-line-per-suite sources list of Debian's `main` component for `suites` (e.g. `trixie`,
/// `trixie-updates`, `trixie-backports`, `trixie-security`), from the archive host the system's
/// sources name; `*-security` suites come from the matching `debian-security` archive. Signed
/// by the system's Debian archive keyring.
pub(crate) fn sources_list(suites: &[&str]) -> String {
    let uri = crate::debian_archive_uri();
    let security = uri
        .trim_end_matches('/')
        .replace("/debian", "/debian-security");
    let keyring = "[signed-by=/usr/share/keyrings/debian-archive-keyring.gpg]";
    suites
        .iter()
        .map(|suite| {
            let from = if suite.ends_with("-security") {
                &security
            } else {
                &uri
            };
            format!("deb {keyring} {from} {suite} main\n")
        })
        .collect()
}

/// The `name=version` pairs of the `Inst` lines of `apt-get install -s` output.
pub(crate) fn simulated_installs(output: &str) -> Vec<String> {
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

/// A private apt state in one directory (see the module documentation).
#[derive(Clone, Debug)]
pub(crate) struct PrivateApt {
    /// The `apt.conf` named by `APT_CONFIG`.
    config: PathBuf,
}

impl PrivateApt {
    /// Creates the state under `apt_dir` (directories, `apt.conf`, the sources list for
    /// `suites`, an empty dpkg status). Does not download anything yet: see [`Self::update`].
    ///
    /// # Errors
    /// [`Error::Io`] when a directory or file cannot be written.
    pub(crate) fn create(
        apt_dir: &Path,
        suites: &[&str],
        architecture: Option<&str>,
    ) -> Result<Self> {
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
        let config = apt_dir.join("apt.conf");
        let files = [
            (config.clone(), apt_config(apt_dir, architecture)),
            (apt_dir.join("sources.list"), sources_list(suites)),
            (apt_dir.join("status"), String::new()),
        ];
        for (path, text) in &files {
            io_context(fs::write(path, text), || {
                format!("cannot write {}", path.display())
            })?;
        }
        Ok(Self { config })
    }

    /// `program` (`apt-get`, `apt-cache`) with the private configuration.
    pub(crate) fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        command
            .env("APT_CONFIG", &self.config)
            .env("DEBIAN_FRONTEND", "noninteractive");
        command
    }

    /// `apt-get update`: downloads the package lists of the sources.
    ///
    /// # Errors
    /// [`Error::CommandFailed`] with apt's stderr.
    pub(crate) fn update(&self) -> Result<()> {
        run_captured(self.command("apt-get").arg("update")).map(drop)
    }

    /// The `name=version` closure `apt-get install -s <args>` lists against the empty status.
    ///
    /// # Errors
    /// [`Error::CommandFailed`] with apt's stderr.
    pub(crate) fn simulate_install(&self, args: &[&str]) -> Result<Vec<String>> {
        let simulated = run_captured(self.command("apt-get").args(["install", "-s"]).args(args))?;
        Ok(simulated_installs(&String::from_utf8_lossy(
            &simulated.stdout,
        )))
    }

    /// The stanza `apt-cache show --no-all-versions <package>` prints (the candidate version).
    ///
    /// # Errors
    /// [`Error::CommandFailed`] (e.g. no such package) with apt's stderr.
    pub(crate) fn show(&self, package: &str) -> Result<String> {
        let shown =
            run_captured(
                self.command("apt-cache")
                    .args(["show", "--no-all-versions", package]),
            )?;
        Ok(String::from_utf8_lossy(&shown.stdout).into_owned())
    }

    /// `apt-get download <packages>` into the directory `into` (`name` or `name=version`).
    ///
    /// # Errors
    /// [`Error::CommandFailed`] naming the packages, with apt's stderr.
    pub(crate) fn download(&self, into: &Path, packages: &[String]) -> Result<()> {
        run_captured(
            self.command("apt-get")
                .current_dir(into)
                .arg("download")
                .args(packages),
        )
        .map(drop)
    }
}

/// The `.deb` files in `dir`, sorted by name.
///
/// # Errors
/// [`Error::Io`] when the directory cannot be read.
pub(crate) fn debs_in(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut debs = Vec::new();
    for entry in io_context(fs::read_dir(dir), || {
        format!("cannot read {}", dir.display())
    })? {
        let path = entry
            .map_err(|e| Error::Io {
                context: format!("cannot read {}", dir.display()),
                source: e,
            })?
            .path();
        if path.extension().is_some_and(|e| e == "deb") {
            debs.push(path);
        }
    }
    debs.sort();
    Ok(debs)
}

/// `dpkg-deb -x deb root`: unpacks the package's files (no maintainer scripts, nothing
/// installed).
///
/// # Errors
/// [`Error::CommandFailed`] naming the package, with dpkg-deb's stderr.
pub(crate) fn unpack_deb(deb: &Path, root: &Path) -> Result<()> {
    run_captured(Command::new("dpkg-deb").arg("-x").arg(deb).arg(root)).map(drop)
}

/// The value of `field` (e.g. `Depends`) in a Debian control stanza, continuation lines
/// joined.
pub(crate) fn control_field(stanza: &str, field: &str) -> Option<String> {
    let mut lines = stanza.lines();
    let prefix = format!("{field}:");
    let first = lines.by_ref().find_map(|line| line.strip_prefix(&prefix))?;
    let mut value = first.trim().to_string();
    for line in lines.take_while(|l| l.starts_with(' ') || l.starts_with('\t')) {
        value.push(' ');
        value.push_str(line.trim());
    }
    Some(value)
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
    fn private_state_and_architecture() {
        let host = apt_config(Path::new("/t/apt"), None);
        for line in host.lines().filter(|l| l.starts_with("Dir::")) {
            assert!(line.contains("\"/t/apt/"), "{line}");
        }
        assert!(!host.contains("APT::Architecture"));
        let arm = apt_config(Path::new("/t/apt"), Some("arm64"));
        assert!(arm.starts_with(&host));
        assert!(arm.contains("APT::Architecture \"arm64\";\n"));
        assert!(arm.contains("APT::Architectures { \"arm64\"; };\n"));
    }

    #[test]
    fn sources_per_suite() {
        let list = sources_list(&["trixie", "trixie-security"]);
        let lines: Vec<&str> = list.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].ends_with(" trixie main"));
        assert!(lines[0].contains("/debian "), "{}", lines[0]);
        assert!(lines[1].ends_with(" trixie-security main"));
        assert!(lines[1].contains("/debian-security "), "{}", lines[1]);
    }

    #[test]
    fn depends_field() {
        let stanza = "Package: linux-image-arm64\nVersion: 6.12.117-1\nDepends: linux-image-6.12.117+deb13-arm64 (= 6.12.117-1),\n foo\nDescription: x\n";
        assert_eq!(
            control_field(stanza, "Depends").as_deref(),
            Some("linux-image-6.12.117+deb13-arm64 (= 6.12.117-1), foo")
        );
        assert_eq!(control_field(stanza, "Pre-Depends"), None);
    }
}
