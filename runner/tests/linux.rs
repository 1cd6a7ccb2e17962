//! Boots Debian's arm64 Linux (`cargo qemu-linux`'s guest) against QEMU's own virtio-iommu and
//! checks what it reports: the IOMMU probed, the disk's PCI function in an IOMMU group of the
//! type the kernel arguments ask for, the whole disk read with the host's SHA-256, a scratch
//! region written, verified and restored, and no fault.
//!
//! Runs (the cheapest set covering each case once): QEMU 10.0 strict (the default); QEMU 11.1
//! with `iommu.strict=0` (flush queues); QEMU 10.0 with `iommu.passthrough=1` (identity
//! domain); bookworm-backports' older 6.12 build through `VIOMMU_LINUX_DEB` (bookworm's 6.1 is
//! refused: it has no virtio-iommu); against our device (`VIOMMU_DEVICE=ours`, QEMU 11.1 and our
//! vfio-user server): strict, `iommu.strict=0` and `iommu.passthrough=1`. Then two runs of the binary for
//! its exit status: a guest without its IOMMU (status 1) and one that never finishes (status
//! 124 at `VIOMMU_TIMEOUT_SECS`). Each prints its wall time.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};
use virtio_iommu_runner::linux::{
    fetch_kernel_deb, fetch_suite_packages, linux_problems, prepare_guest, reported_group_type,
    LinuxConfig, DEFAULT_SUITE,
};
use virtio_iommu_runner::{run_linux, DeviceChoice, LinuxOutcome, QemuChoice, RunConfig};

/// A generous limit for one boot on a loaded 2-core machine (a boot takes about 5 s alone).
const TIMEOUT: Duration = Duration::from_secs(180);

fn config(qemu: QemuChoice, kernel_deb: Option<PathBuf>, kernel_args: &[&str]) -> LinuxConfig {
    LinuxConfig {
        run: RunConfig {
            qemu,
            timeout: TIMEOUT,
            ..RunConfig::default()
        },
        kernel_deb,
        kernel_args: kernel_args.iter().map(|s| s.to_string()).collect(),
    }
}

/// Boots, asserts every pass criterion and the group type, and returns the outcome.
fn boot(name: &str, config: &LinuxConfig, group_type: &str) -> LinuxOutcome {
    let started = Instant::now();
    let outcome = run_linux(config).unwrap_or_else(|e| panic!("{name}: {e}"));
    let problems = linux_problems(&outcome.run, &config.kernel_args);
    assert!(
        problems.is_empty(),
        "{name}: {problems:#?}\n--- stderr ---\n{}",
        outcome.run.stderr
    );
    assert_eq!(
        reported_group_type(&outcome.run.output).as_deref(),
        Some(group_type),
        "{name}: the disk's IOMMU group type"
    );
    let log = &outcome.run.output;
    for expected in [
        "ok 1 - insmod virtio_iommu",
        "virtio_iommu virtio0: input address:",
        "Adding to iommu group",
        "scratch region restored",
    ] {
        assert!(
            log.contains(expected),
            "{name}: no `{expected}` in the output"
        );
    }
    eprintln!(
        "{name}: kernel {}, QEMU {:.1} s, preparing {:.1} s, test {:.1} s in all",
        outcome.guest.release,
        outcome.run.duration.as_secs_f64(),
        outcome.prepare.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    outcome
}

#[test]
fn qemu_10_strict() {
    let outcome = boot(
        "qemu 10.0 strict",
        &config(QemuChoice::System, None, &[]),
        "DMA",
    );
    assert!(outcome
        .run
        .output
        .contains("iommu: DMA domain TLB invalidation policy: strict mode"));
    assert_eq!(outcome.guest.modules, ["virtio_iommu", "virtio_blk"]);
}

#[test]
fn qemu_111_lazy() {
    let outcome = boot(
        "qemu 11.1 iommu.strict=0",
        &config(QemuChoice::Debian111, None, &["iommu.strict=0"]),
        "DMA-FQ",
    );
    assert!(outcome.run.qemu.to_string_lossy().contains("qemu-11.1"));
    assert!(outcome.run.output.contains("lazy mode"));
}

#[test]
fn qemu_10_passthrough() {
    let outcome = boot(
        "qemu 10.0 iommu.passthrough=1",
        &config(QemuChoice::System, None, &["iommu.passthrough=1"]),
        "identity",
    );
    assert!(outcome
        .run
        .output
        .contains("Default domain type: Passthrough"));
}

/// An older kernel through `VIOMMU_LINUX_DEB`: bookworm-backports' 6.12 build (bookworm's own
/// 6.1 has no `CONFIG_VIRTIO_IOMMU`, see the next test).
#[test]
fn older_kernel_bookworm_backports() {
    let deb = fetch_kernel_deb(&["bookworm-backports"]).unwrap_or_else(|e| panic!("{e}"));
    let outcome = boot(
        "bookworm-backports kernel via VIOMMU_LINUX_DEB",
        &config(QemuChoice::System, Some(deb), &[]),
        "DMA",
    );
    let trixie = fetch_suite_packages(DEFAULT_SUITE).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        outcome.guest.release.ends_with("+deb12-arm64"),
        "{}",
        outcome.guest.release
    );
    assert!(!trixie
        .kernel_deb
        .to_string_lossy()
        .contains(&outcome.guest.release));
}

/// A kernel without virtio-iommu (bookworm's 6.1) is refused before booting, naming the option.
#[test]
fn a_kernel_without_virtio_iommu_is_refused() {
    let deb = fetch_kernel_deb(&["bookworm"]).unwrap_or_else(|e| panic!("{e}"));
    let busybox = fetch_suite_packages(DEFAULT_SUITE).unwrap_or_else(|e| panic!("{e}"));
    let error = prepare_guest(&deb, &busybox.busybox_deb).expect_err("6.1 has no virtio-iommu");
    assert!(
        error.to_string().contains("CONFIG_VIRTIO_IOMMU=<unset>"),
        "{error}"
    );
}

/// `VIOMMU_DEVICE=ours`: the configuration of [`config`] against our device.
fn ours(kernel_args: &[&str]) -> LinuxConfig {
    let mut config = config(QemuChoice::System, None, kernel_args);
    config.run.device = DeviceChoice::Ours;
    config
}

/// Asserts that our server served the run and saw no fault; returns its request count.
fn served(name: &str, outcome: &LinuxOutcome) -> u64 {
    let server = outcome.run.server.as_ref().expect("a server report");
    let counts = server.counts.expect("the server's counts");
    assert_eq!(counts.faults, 0, "{name}: faults");
    assert!(
        outcome.run.qemu.to_string_lossy().contains("qemu-11.1"),
        "{name}: vfio-user needs QEMU 11.1"
    );
    assert!(
        outcome.run.args.iter().any(|a| a.contains("vfio-user-pci")),
        "{name}"
    );
    assert!(
        !outcome
            .run
            .args
            .iter()
            .any(|a| a.starts_with("virtio-iommu-pci")),
        "{name}: QEMU's IOMMU must not be there"
    );
    eprintln!(
        "{name}: server requests={} notifications={}",
        counts.requests, counts.notifications
    );
    counts.requests
}

#[test]
fn ours_strict() {
    let outcome = boot("ours strict", &ours(&[]), "DMA");
    // Every DMA buffer of the disk is mapped and unmapped: thousands of requests.
    assert!(served("ours strict", &outcome) > 1000);
}

#[test]
fn ours_lazy() {
    let outcome = boot("ours iommu.strict=0", &ours(&["iommu.strict=0"]), "DMA-FQ");
    assert!(served("ours iommu.strict=0", &outcome) > 1000);
}

#[test]
fn ours_passthrough() {
    let outcome = boot(
        "ours iommu.passthrough=1",
        &ours(&["iommu.passthrough=1"]),
        "identity",
    );
    // An identity domain: the ATTACH (bypass) and little else, no MAP per buffer.
    assert!(served("ours iommu.passthrough=1", &outcome) < 100);
}

/// `cargo qemu-linux` as a user runs it, with `env`; returns (status, stderr).
fn command(env: &[(&str, &str)]) -> (i32, String) {
    // Fetched and unpacked in this process first (serialised with the other tests), so the
    // binary finds them cached rather than downloading them a second time in parallel.
    let packages = fetch_suite_packages(DEFAULT_SUITE).unwrap_or_else(|e| panic!("{e}"));
    prepare_guest(&packages.kernel_deb, &packages.busybox_deb).unwrap_or_else(|e| panic!("{e}"));
    let output = Command::new(env!("CARGO_BIN_EXE_virtio-iommu-runner"))
        .arg("qemu-linux")
        .env_remove("VIOMMU_QEMU")
        .env_remove("VIOMMU_DISK")
        .env_remove("VIOMMU_LINUX_DEB")
        .env_remove("VIOMMU_DEVICE")
        .envs(env.iter().copied())
        .output()
        .expect("runner");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn a_guest_without_its_iommu_fails() {
    let started = Instant::now();
    // The kernel refuses to load virtio-iommu: the disk works (QEMU's boot-bypass) but is in
    // no IOMMU group.
    let (status, stderr) = command(&[("VIOMMU_LINUX_ARGS", "module_blacklist=virtio_iommu")]);
    assert_eq!(status, 1, "{stderr}");
    assert!(
        stderr.contains("FAIL: not ok 1 - insmod virtio_iommu"),
        "{stderr}"
    );
    assert!(stderr.contains("virtio-iommu probed"), "{stderr}");
    eprintln!(
        "guest without IOMMU: {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn a_guest_that_never_finishes_ends_at_the_timeout() {
    let started = Instant::now();
    // Arguments after `--` go to init: busybox runs `sleep 1000` as PID 1.
    let (status, stderr) = command(&[
        ("VIOMMU_LINUX_ARGS", "rdinit=/bin/busybox -- sleep 1000"),
        ("VIOMMU_TIMEOUT_SECS", "8"),
    ]);
    assert_eq!(status, 124, "{stderr}");
    assert!(
        stderr.contains("did not power off within 8 s (VIOMMU_TIMEOUT_SECS)"),
        "{stderr}"
    );
    let took = started.elapsed();
    assert!(took < Duration::from_secs(60), "{took:?}");
    eprintln!("guest that never finishes: {:.1} s", took.as_secs_f64());
}
