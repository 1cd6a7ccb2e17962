//! `cargo qemu-linux`: Debian's arm64 Linux kernel, with a busybox initramfs built here, booted
//! in `qemu-system-aarch64 -M virt` with a virtio-blk disk behind a virtio-iommu; the guest's
//! `/init` checks the IOMMU and the disk through it and the runner checks its report (issue #9).
//!
//! Modules: `fetch` (the kernel and busybox packages, `target/linux/`), `modules` (the kernel
//! modules: lookup, decompression, `depends=`, load order), `initramfs` (the gzip'd newc
//! archive), `init.sh` (the guest's `/init`). This file: the configuration, QEMU's command
//! line, the run and the pass criteria.
//!
//! Environment ([`LinuxConfig::from_env`]): everything [`RunConfig::from_env`] reads
//! (`VIOMMU_QEMU`, `VIOMMU_DISK`, `VIOMMU_QEMU_ARGS`, `VIOMMU_IOMMU_ADDR`, `VIOMMU_BLK_ADDR`,
//! `VIOMMU_TIMEOUT_SECS`), plus:
//!
//! | variable | meaning |
//! |---|---|
//! | `VIOMMU_LINUX_DEB` | a `linux-image-*-arm64` `.deb` to boot instead of trixie's current kernel |
//! | `VIOMMU_LINUX_ARGS` | kernel arguments appended to the runner's (split on whitespace), e.g. `iommu.strict=0`, `iommu.passthrough=1` |
//! | `VIOMMU_DEVICE` | `ours`: against our device over vfio-user ([`run_ours`]), read by [`RunConfig::from_env`] |

mod fetch;
mod initramfs;
mod modules;

pub use fetch::{
    fetch_kernel_deb, fetch_suite_packages, kernel_package_of, linux_dir, unpacked, SuitePackages,
    DEFAULT_SUITE,
};
pub use initramfs::{build_cpio, build_initramfs, module_file_name, InitramfsModule};
pub use modules::{
    decompress, dependencies, modinfo, module_name, normalize_module_name, ModuleTree,
};

#[allow(unused_imports)]
use crate::*;

/// The guest's `/init` (a busybox ash script; see `init.sh`).
pub const INIT_SCRIPT: &str = include_str!("init.sh");
/// RAM of the Linux guest.
pub const LINUX_MEMORY: &str = "1G";
/// The kernel's own arguments, before `VIOMMU_LINUX_ARGS`: the PL011 console, a quiet boot,
/// an immediate reboot (QEMU exits: `-no-reboot`) on panic, and the initramfs's `/init`.
pub const BASE_KERNEL_ARGS: &str = "console=ttyAMA0 quiet panic=-1 rdinit=/init";

/// The kernel options the guest needs, each with the module that provides it when it is `=m`,
/// in load order: virtio-pci (the transport), virtio-iommu (before any DMA of the disk),
/// virtio-blk.
pub const NEEDED_OPTIONS: [(&str, &str); 3] = [
    ("CONFIG_VIRTIO_PCI", "virtio_pci"),
    ("CONFIG_VIRTIO_IOMMU", "virtio_iommu"),
    ("CONFIG_VIRTIO_BLK", "virtio_blk"),
];

/// How to run the Linux guest.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct LinuxConfig {
    /// QEMU, disk, device addresses, extra QEMU arguments and timeout, as for the firmware.
    pub run: RunConfig,
    /// `VIOMMU_LINUX_DEB`: the kernel package to boot; `None` ⇒ trixie's (fetched).
    pub kernel_deb: Option<PathBuf>,
    /// `VIOMMU_LINUX_ARGS`: kernel arguments appended to [`BASE_KERNEL_ARGS`].
    pub kernel_args: Vec<String>,
}

impl LinuxConfig {
    /// The configuration the `VIOMMU_*` environment variables describe (see the module
    /// documentation).
    ///
    /// # Errors
    /// Those of [`RunConfig::from_env`]; [`Error::InvalidEnv`] when `VIOMMU_LINUX_DEB` names no
    /// file.
    pub fn from_env() -> Result<Self> {
        let kernel_deb = std::env::var_os("VIOMMU_LINUX_DEB")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from);
        if let Some(deb) = kernel_deb.as_ref().filter(|d| !d.is_file()) {
            return Err(Error::InvalidEnv {
                name: "VIOMMU_LINUX_DEB",
                reason: format!("{} is not a file", deb.display()),
            });
        }
        Ok(Self {
            run: RunConfig::from_env()?,
            kernel_deb,
            kernel_args: std::env::var("VIOMMU_LINUX_ARGS")
                .map(|v| v.split_whitespace().map(String::from).collect())
                .unwrap_or_default(),
        })
    }
}

/// A kernel and initramfs ready to boot.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct LinuxGuest {
    /// The kernel release (e.g. `6.12.117+deb13-arm64`).
    pub release: String,
    /// The kernel image (`boot/vmlinuz-<release>` of the package).
    pub vmlinuz: PathBuf,
    /// The gzip'd newc initramfs.
    pub initrd: PathBuf,
    /// The modules in the initramfs, in load order.
    pub modules: Vec<String>,
}

/// The first entry of `dir` whose name starts with `prefix`, with the rest of its name.
fn entry_with_prefix(dir: &Path, prefix: &str) -> Option<(PathBuf, String)> {
    let mut found: Vec<(PathBuf, String)> = fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_string();
            let rest = name.strip_prefix(prefix)?.to_string();
            Some((e.path(), rest))
        })
        .collect();
    found.sort();
    found.into_iter().next()
}

/// The value (`y`, `m`, …) of `option` in a kernel `.config`, `None` when unset.
pub fn kernel_config_value<'a>(config: &'a str, option: &str) -> Option<&'a str> {
    config
        .lines()
        .find_map(|line| line.strip_prefix(option)?.strip_prefix('='))
}

/// Which of [`NEEDED_OPTIONS`] need their module loaded: `=m` (or, without a `.config`, present
/// in `tree`); `=y` ones are built in.
///
/// # Errors
/// [`Error::Initramfs`] naming the option when the kernel has it neither built in nor as a
/// module.
pub fn modules_to_load(config: Option<&str>, tree: &ModuleTree) -> Result<Vec<&'static str>> {
    let mut load = Vec::new();
    for (option, module) in NEEDED_OPTIONS {
        let value = config.and_then(|c| kernel_config_value(c, option));
        match value {
            Some("y") => {}
            Some("m") => load.push(module),
            None if config.is_none() && tree.path(module).is_some() => load.push(module),
            None if config.is_none() && option == "CONFIG_VIRTIO_PCI" => {}
            other => {
                return Err(Error::Initramfs(format!(
                    "kernel {} has {option}={} (needs y or m)",
                    tree.release,
                    other.unwrap_or("<unset>")
                )))
            }
        }
    }
    Ok(load)
}

/// Unpacks the kernel package `kernel_deb` and `busybox-static` (`busybox_deb`), builds the
/// initramfs for them (written atomically to `target/linux/kernels/<stem>/initrd.gz`) and
/// returns what to boot.
///
/// # Errors
/// [`Error::Fetch`] when a package cannot be unpacked; [`Error::Initramfs`] when the kernel
/// image, a module or busybox is missing or unusable; [`Error::Io`].
pub fn prepare_guest(kernel_deb: &Path, busybox_deb: &Path) -> Result<LinuxGuest> {
    let kernel_dir = unpacked("kernels", kernel_deb)?;
    let root = kernel_dir.join("root");
    let (vmlinuz, release) =
        entry_with_prefix(&root.join("boot"), "vmlinuz-").ok_or_else(|| {
            Error::Initramfs(format!(
                "{} has no boot/vmlinuz-*: not a linux-image package",
                kernel_deb.display()
            ))
        })?;
    let modules_dir = ["usr/lib/modules", "lib/modules"]
        .iter()
        .map(|d| root.join(d).join(&release))
        .find(|d| d.is_dir())
        .ok_or_else(|| {
            Error::Initramfs(format!(
                "{} has no modules for {release}",
                kernel_deb.display()
            ))
        })?;
    let tree = ModuleTree::open(&modules_dir)?;
    let config = fs::read_to_string(root.join("boot").join(format!("config-{release}"))).ok();
    let wanted = modules_to_load(config.as_deref(), &tree)?;
    let modules = tree.load_order(&wanted)?;
    let busybox_root = unpacked("busybox", busybox_deb)?.join("root");
    let busybox_path = ["usr/bin/busybox", "bin/busybox"]
        .iter()
        .map(|p| busybox_root.join(p))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            Error::Initramfs(format!("{} has no busybox binary", busybox_deb.display()))
        })?;
    let busybox = io_context(fs::read(&busybox_path), || {
        format!("cannot read {}", busybox_path.display())
    })?;
    let image = build_initramfs(&busybox, INIT_SCRIPT, &modules)?;
    let initrd = kernel_dir.join("initrd.gz");
    let staging = kernel_dir.join(format!(
        ".initrd.{}.{:?}.tmp",
        std::process::id(),
        thread::current().id()
    ));
    io_context(fs::write(&staging, &image), || {
        format!("cannot write {}", staging.display())
    })?;
    io_context(fs::rename(&staging, &initrd), || {
        format!(
            "cannot rename {} to {}",
            staging.display(),
            initrd.display()
        )
    })?;
    Ok(LinuxGuest {
        release,
        vmlinuz,
        initrd,
        modules: modules.into_iter().map(|m| m.name).collect(),
    })
}

/// The kernel command line: [`BASE_KERNEL_ARGS`], then `extra` (so a later value wins).
pub fn kernel_command_line(extra: &[String]) -> String {
    std::iter::once(BASE_KERNEL_ARGS.to_string())
        .chain(extra.iter().cloned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The devices the guest drives, as QEMU arguments: the IOMMU and the disk behind it, exactly as
/// the firmware run has them (QEMU's `virtio-iommu-pci`; `virtio-blk-pci` with
/// `iommu_platform=on,disable-legacy=on` on a `snapshot=on` drive, so the guest's writes never
/// reach the image). The one place to switch to another IOMMU (our device over vfio-user).
pub fn device_args(config: &RunConfig, disk: &Path) -> Vec<String> {
    vec![
        "-device".into(),
        with_addr("virtio-iommu-pci", config.iommu_addr.as_ref()),
        "-drive".into(),
        format!(
            "if=none,id=disk0,format=raw,snapshot=on,file={}",
            qemu_option_value(&disk.to_string_lossy())
        ),
        "-device".into(),
        with_addr(
            "virtio-blk-pci,drive=disk0,iommu_platform=on,disable-legacy=on",
            config.blk_addr.as_ref(),
        ),
    ]
}

/// What makes a boot a Linux boot, whatever the devices: [`LINUX_MEMORY`] (`-m`),
/// `-no-reboot` (a panic ends QEMU: `panic=-1`), `-initrd` and `-append`
/// [`kernel_command_line`]. Given after the machine arguments, so a later `-m` wins.
pub fn guest_args(config: &LinuxConfig, guest: &LinuxGuest) -> Vec<String> {
    vec![
        "-m".into(),
        LINUX_MEMORY.into(),
        "-no-reboot".into(),
        "-initrd".into(),
        guest.initrd.to_string_lossy().into_owned(),
        "-append".into(),
        kernel_command_line(&config.kernel_args),
    ]
}

/// QEMU's arguments for booting `guest` with `disk` against QEMU's devices: `-M virt`, a
/// Cortex-A57, no graphics or network, `-kernel`, the [`guest_args`], the [`device_args`], then
/// `VIOMMU_QEMU_ARGS`.
pub fn linux_qemu_args(config: &LinuxConfig, guest: &LinuxGuest, disk: &Path) -> Vec<String> {
    let mut args: Vec<String> = [
        "-M",
        "virt",
        "-cpu",
        "cortex-a57",
        "-nographic",
        "-nic",
        "none",
        "-kernel",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push(guest.vmlinuz.to_string_lossy().into_owned());
    args.extend(guest_args(config, guest));
    args.extend(device_args(&config.run, disk));
    args.extend(config.run.extra_args.iter().cloned());
    args
}

/// A Linux run: QEMU's outcome and the guest booted.
#[derive(Clone, Debug)]
pub struct LinuxOutcome {
    /// QEMU's outcome (exit status, console, host disk hash, command line, wall time).
    pub run: RunOutcome,
    /// The kernel and initramfs.
    pub guest: LinuxGuest,
    /// Wall time of fetching, unpacking and building the initramfs (before QEMU started).
    pub prepare: Duration,
}

/// Fetches what `config` needs, builds the initramfs and boots it, streaming the console:
/// against QEMU's devices ([`linux_qemu_args`]) or, with `VIOMMU_DEVICE=ours`
/// ([`DeviceChoice::Ours`]), against ours through [`run_ours`] (QEMU 11.1, our vfio-user
/// server; the kernel as `-kernel`, the [`guest_args`] after the runner's own).
///
/// Prints `runner: linux: kernel <release>, modules <list>`, the disk line and QEMU's command
/// line first. Returns the outcome whatever the guest reported (see [`linux_problems`]).
///
/// # Errors
/// [`Error::Timeout`] when the guest did not power off within `VIOMMU_TIMEOUT_SECS`; those
/// of [`fetch_suite_packages`], [`prepare_guest`], [`resolve_qemu`], [`prepare_disk`] and
/// [`run_ours`].
pub fn run_linux(config: &LinuxConfig) -> Result<LinuxOutcome> {
    let started = Instant::now();
    let packages = fetch_suite_packages(DEFAULT_SUITE)?;
    let kernel_deb = config.kernel_deb.as_deref().unwrap_or(&packages.kernel_deb);
    let guest = prepare_guest(kernel_deb, &packages.busybox_deb)?;
    println!(
        "runner: linux: kernel {} ({}), modules {}",
        guest.release,
        kernel_deb.display(),
        guest.modules.join(" ")
    );
    if config.run.device == DeviceChoice::Ours {
        let mut run = config.run.clone();
        run.extra_args = guest_args(config, &guest);
        run.extra_args.extend(config.run.extra_args.iter().cloned());
        let prepare = started.elapsed();
        let outcome = run_ours(&run, &guest.vmlinuz)?;
        return Ok(LinuxOutcome {
            run: outcome,
            guest,
            prepare,
        });
    }
    let qemu = resolve_qemu(&config.run.qemu)?;
    let disk = prepare_disk(config.run.disk.as_deref())?;
    let prepare = started.elapsed();
    println!(
        "runner: disk {} {} bytes sha256 {}",
        disk.path.display(),
        disk.size,
        disk.sha256
    );
    let args = linux_qemu_args(config, &guest, &disk.path);
    println!("runner: {}", display_command(&qemu, &args));
    let ran = run_qemu(&qemu, &args, Instant::now() + config.run.timeout)?;
    let Some(status) = ran.status else {
        eprintln!(
            "runner: TIMEOUT: the Linux guest did not power off within {} s (VIOMMU_TIMEOUT_SECS); QEMU killed",
            config.run.timeout.as_secs()
        );
        return Err(Error::Timeout {
            seconds: config.run.timeout.as_secs(),
            output: ran.output,
        });
    };
    Ok(LinuxOutcome {
        run: {
            let duration = ran.duration;
            ran.outcome(exit_code(status), disk, qemu, args, duration, None)
        },
        guest,
        prepare,
    })
}

/// The guest's `linux: N passed, M failed` line (the last one) as `(N, M)`.
pub fn linux_summary(output: &str) -> Option<(u32, u32)> {
    output
        .lines()
        .filter_map(|line| {
            let rest = line.trim_end().strip_prefix("linux: ")?;
            let (passed, failed) = rest.split_once(" passed, ")?;
            let failed = failed.strip_suffix(" failed")?;
            Some((passed.parse().ok()?, failed.parse().ok()?))
        })
        .next_back()
}

/// The type of the disk's IOMMU group as the guest reported it (`iommu-group-type: <type>`:
/// `DMA`, `DMA-FQ`, `identity`, …).
pub fn reported_group_type(output: &str) -> Option<String> {
    output
        .lines()
        .filter_map(|line| line.trim().strip_prefix("iommu-group-type:"))
        .map(|t| t.trim().to_string())
        .next_back()
}

/// Whether a kernel boolean parameter value is true (`1`, `y`, `on`, as `kstrtobool`).
fn kernel_bool(value: &str) -> Option<bool> {
    match value.chars().next()? {
        '1' | 'y' | 'Y' => Some(true),
        '0' | 'n' | 'N' => Some(false),
        _ => match value.to_ascii_lowercase().as_str() {
            "on" => Some(true),
            "off" => Some(false),
            _ => None,
        },
    }
}

/// The last value of kernel parameter `name` in `args`, as a boolean.
fn kernel_flag(args: &[String], name: &str) -> Option<bool> {
    args.iter()
        .filter_map(|a| a.strip_prefix(name)?.strip_prefix('='))
        .filter_map(kernel_bool)
        .next_back()
}

/// The IOMMU group types the kernel arguments allow for the disk: `identity` with
/// `iommu.passthrough=1`; `DMA` with `iommu.strict=1`; otherwise `DMA` or `DMA-FQ` (a kernel's
/// default policy and whether its virtio-iommu driver supports flush queues decide: 6.12's
/// does, 6.1's does not).
pub fn allowed_group_types(kernel_args: &[String]) -> &'static [&'static str] {
    if kernel_flag(kernel_args, "iommu.passthrough") == Some(true) {
        &["identity"]
    } else if kernel_flag(kernel_args, "iommu.strict") == Some(true) {
        &["DMA"]
    } else {
        &["DMA", "DMA-FQ"]
    }
}

/// Everything wrong with a Linux run: a `linux: N passed, M failed` line with N > 0 and
/// M = 0; no `not ok`; every TAP number of the plan present; the guest's `disk-sha256` equal to
/// the host's; the disk's IOMMU group type one of [`allowed_group_types`]; QEMU's exit status
/// 0; against our device, a server that exited by itself with status 0 and printed its counts
/// ([`ServerReport::problems`]). Empty when the run passed.
pub fn linux_problems(outcome: &RunOutcome, kernel_args: &[String]) -> Vec<String> {
    let mut problems = Vec::new();
    if outcome.exit_code != 0 {
        problems.push(format!(
            "QEMU exit status {} (expected 0)",
            outcome.exit_code
        ));
    }
    let summary = linux_summary(&outcome.output);
    match summary {
        None => problems.push(
            "no `linux: N passed, M failed` line (did the kernel panic or /init stop?)".into(),
        ),
        Some((0, _)) => problems.push("no check passed".into()),
        Some((_, 0)) => {}
        Some((_, failed)) => problems.push(format!("{failed} check(s) failed")),
    }
    let tap = parse_tap(&outcome.output);
    for line in tap.iter().filter(|l| !l.ok) {
        let why = line.directive.as_deref().unwrap_or("");
        problems.push(format!("not ok {} - {} {why}", line.number, line.name));
    }
    if let Some(n) = tap_plan(&outcome.output) {
        let missing: Vec<u32> = (1..=n)
            .filter(|i| !tap.iter().any(|l| l.number == *i))
            .collect();
        if !missing.is_empty() {
            problems.push(format!("TAP numbers missing from 1..={n}: {missing:?}"));
        }
    } else if summary.is_some() {
        problems.push("no TAP plan".into());
    }
    match reported_disk_sha256(&outcome.output) {
        None => problems.push("the guest reported no disk-sha256".into()),
        Some(reported) if reported != outcome.disk_sha256 => problems.push(format!(
            "disk-sha256 mismatch: guest {reported}, host {}",
            outcome.disk_sha256
        )),
        Some(_) => {}
    }
    let allowed = allowed_group_types(kernel_args);
    match reported_group_type(&outcome.output) {
        Some(t) if allowed.contains(&t.as_str()) => {}
        Some(t) => problems.push(format!(
            "disk's IOMMU group type {t}, expected one of {allowed:?} for the kernel arguments"
        )),
        None if summary.is_some() => problems.push("the guest reported no iommu-group-type".into()),
        None => {}
    }
    if let Some(server) = &outcome.server {
        problems.extend(server.problems());
    }
    problems
}

/// `virtio-iommu-runner qemu-linux [extra QEMU arguments...]` (behind `cargo qemu-linux`): runs
/// the guest as the environment says ([`LinuxConfig::from_env`]) and returns the exit status:
/// 0 when every check passed and the disk hash matched, 1 when a check failed, 124 at the
/// timeout, 2 when the run could not be set up.
pub fn qemu_linux_command(extra_qemu_args: impl IntoIterator<Item = String>) -> u8 {
    let mut config = match LinuxConfig::from_env() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("runner: {e}");
            return 2;
        }
    };
    config.run.extra_args.extend(extra_qemu_args);
    match run_linux(&config) {
        Ok(outcome) => {
            let problems = linux_problems(&outcome.run, &config.kernel_args);
            eprintln!(
                "runner: linux: QEMU exited with status {} after {:.2} s (preparing took {:.2} s)",
                outcome.run.exit_code,
                outcome.run.duration.as_secs_f64(),
                outcome.prepare.as_secs_f64()
            );
            if problems.is_empty() {
                eprintln!(
                    "runner: linux: PASS (disk-sha256 equal to the host's {})",
                    outcome.run.disk_sha256
                );
                0
            } else {
                for problem in &problems {
                    eprintln!("runner: linux: FAIL: {problem}");
                }
                1
            }
        }
        Err(e) => {
            eprintln!("runner: linux: {e}");
            if matches!(e, Error::Timeout { .. }) {
                124
            } else {
                2
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn command_line_has_the_firmware_devices_and_the_kernel_args() {
        let config = LinuxConfig {
            run: RunConfig {
                iommu_addr: Some("0x5".into()),
                extra_args: args(&["-smp", "2"]),
                ..RunConfig::default()
            },
            kernel_deb: None,
            kernel_args: args(&["iommu.strict=0"]),
        };
        let guest = LinuxGuest {
            release: "r".into(),
            vmlinuz: "/k/vmlinuz-r".into(),
            initrd: "/k/initrd.gz".into(),
            modules: Vec::new(),
        };
        let a = linux_qemu_args(&config, &guest, Path::new("/d,1.img"));
        let joined = a.join(" ");
        assert!(joined.starts_with("-M virt -cpu cortex-a57 -nographic -nic none -kernel /k/vmlinuz-r -m 1G -no-reboot -initrd /k/initrd.gz -append"));
        let append = a.iter().position(|x| x == "-append").unwrap();
        assert_eq!(
            a[append + 1],
            "console=ttyAMA0 quiet panic=-1 rdinit=/init iommu.strict=0"
        );
        assert!(joined.contains("-device virtio-iommu-pci,addr=0x5 "));
        assert!(joined.contains("if=none,id=disk0,format=raw,snapshot=on,file=/d,,1.img "));
        assert!(joined.contains(
            "-device virtio-blk-pci,drive=disk0,iommu_platform=on,disable-legacy=on -smp 2"
        ));
        assert!(!joined.contains("semihosting"));
    }

    #[test]
    fn group_types_follow_the_arguments() {
        assert_eq!(allowed_group_types(&[]), ["DMA", "DMA-FQ"]);
        assert_eq!(
            allowed_group_types(&args(&["iommu.passthrough=1"])),
            ["identity"]
        );
        assert_eq!(
            allowed_group_types(&args(&["iommu.passthrough=on"])),
            ["identity"]
        );
        assert_eq!(
            allowed_group_types(&args(&["iommu.passthrough=1", "iommu.passthrough=0"])),
            ["DMA", "DMA-FQ"]
        );
        assert_eq!(allowed_group_types(&args(&["iommu.strict=1"])), ["DMA"]);
    }

    const GOOD: &str = "linux: kernel 6.12\nok 1 - insmod virtio_iommu\nok 2 - probed\n\
        iommu-group-type: DMA\ndisk-sha256: ABCDEF0123456789abcdef0123456789abcdef0123456789abcdef0123456789\n\
        1..2\nlinux: 2 passed, 0 failed\n";

    fn outcome(output: &str, sha: &str) -> RunOutcome {
        RunOutcome {
            exit_code: 0,
            output: output.into(),
            stderr: String::new(),
            disk_sha256: sha.into(),
            disk: PathBuf::new(),
            qemu: PathBuf::new(),
            args: Vec::new(),
            duration: Duration::ZERO,
            server: None,
        }
    }

    #[test]
    fn pass_criteria() {
        let sha = "abcdef0123456789abcdef0123456789abcdef0123456789abcdef0123456789";
        assert_eq!(linux_summary(GOOD), Some((2, 0)));
        assert!(linux_problems(&outcome(GOOD, sha), &[]).is_empty());
        // Another disk: the hash differs.
        assert_eq!(
            linux_problems(&outcome(GOOD, &"0".repeat(64)), &[]).len(),
            1
        );
        // passthrough asked for, but the group is translated.
        assert_eq!(
            linux_problems(&outcome(GOOD, sha), &args(&["iommu.passthrough=1"])).len(),
            1
        );
        // A failed check, and a missing number.
        let bad = GOOD
            .replace("ok 2 - probed", "not ok 3 - probed # none")
            .replace("1..2", "1..3")
            .replace("2 passed, 0 failed", "1 passed, 1 failed");
        assert_eq!(
            linux_problems(&outcome(&bad, sha), &[]).len(),
            3,
            "{:?}",
            linux_problems(&outcome(&bad, sha), &[])
        );
        // A kernel that panicked before /init finished.
        let panicked = "Kernel panic - not syncing: Attempted to kill init!\n";
        let found = linux_problems(&outcome(panicked, sha), &[]);
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(found[0].contains("linux: N passed"));
    }

    #[test]
    fn kernel_config_values() {
        let config = "# comment\nCONFIG_VIRTIO_PCI=y\nCONFIG_VIRTIO_IOMMU=m\n# CONFIG_VIRTIO_BLK is not set\n";
        assert_eq!(kernel_config_value(config, "CONFIG_VIRTIO_PCI"), Some("y"));
        assert_eq!(
            kernel_config_value(config, "CONFIG_VIRTIO_IOMMU"),
            Some("m")
        );
        assert_eq!(kernel_config_value(config, "CONFIG_VIRTIO_BLK"), None);
        assert_eq!(kernel_config_value(config, "CONFIG_VIRTIO"), None);
    }

    #[test]
    fn which_modules_to_load() {
        let dir = std::env::temp_dir().join(format!("viommu-linux-tree-{}", std::process::id()));
        let release = dir.join("6.0-empty");
        fs::create_dir_all(release.join("kernel")).unwrap();
        let tree = ModuleTree::open(&release).unwrap();
        let trixie = "CONFIG_VIRTIO_PCI=y\nCONFIG_VIRTIO_IOMMU=m\nCONFIG_VIRTIO_BLK=m\n";
        assert_eq!(
            modules_to_load(Some(trixie), &tree).unwrap(),
            ["virtio_iommu", "virtio_blk"]
        );
        let all_modules = "CONFIG_VIRTIO_PCI=m\nCONFIG_VIRTIO_IOMMU=m\nCONFIG_VIRTIO_BLK=m\n";
        assert_eq!(
            modules_to_load(Some(all_modules), &tree).unwrap(),
            ["virtio_pci", "virtio_iommu", "virtio_blk"]
        );
        let built_in = "CONFIG_VIRTIO_PCI=y\nCONFIG_VIRTIO_IOMMU=y\nCONFIG_VIRTIO_BLK=y\n";
        assert!(modules_to_load(Some(built_in), &tree).unwrap().is_empty());
        // bookworm's 6.1: no virtio-iommu at all.
        let bookworm =
            "CONFIG_VIRTIO_PCI=m\n# CONFIG_VIRTIO_IOMMU is not set\nCONFIG_VIRTIO_BLK=m\n";
        let e = modules_to_load(Some(bookworm), &tree)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("has CONFIG_VIRTIO_IOMMU=<unset> (needs y or m)"),
            "{e}"
        );
        // Without a .config, the tree decides: no virtio_iommu module ⇒ refused.
        assert!(modules_to_load(None, &tree).is_err());
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn init_script_reports_what_the_runner_reads() {
        for needle in [
            "disk-sha256: $sum",
            "iommu-group-type: ",
            "linux: $((n - failed)) passed, $failed failed",
            "poweroff -f",
            "dmesg | grep -i iommu",
            "/sys/class/iommu",
            "iommu_group",
        ] {
            assert!(INIT_SCRIPT.contains(needle), "{needle}");
        }
    }
}
