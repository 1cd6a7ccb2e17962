//! `virtio-iommu-runner qemu [--device qemu|ours] [--blk-devices N] [extra QEMU arguments...]`
//! `virtio-iommu-runner <firmware.elf> [extra QEMU arguments...]`
//! `virtio-iommu-runner install-qemu`
//! `virtio-iommu-runner qemu-linux [extra QEMU arguments...]`
//!
//! - `qemu` (behind `cargo qemu`, `cargo qemu-bench`, `cargo qemu-dma-modes`, see
//!   `.cargo/config.toml`): installs the `aarch64-unknown-none` Rust target if the toolchain
//!   lacks it, builds the firmware (release, into `target/firmware/`), then boots it like the
//!   ELF form below.
//! - `<firmware.elf>`: the cargo runner for `aarch64-unknown-none`: boots the ELF in QEMU as
//!   configured by the `VIOMMU_*` environment variables (see the library documentation), streams
//!   the output and exits with QEMU's exit status (the firmware's, via semihosting).
//! - `qemu-linux` (behind `cargo qemu-linux`): boots Debian's arm64 Linux with a busybox
//!   initramfs against the same devices and checks what it reports (library module `linux`).
//! - `--device ours` (behind `cargo qemu-ours`) is `VIOMMU_DEVICE=ours`: the firmware runs
//!   against our device through our vfio-user server under QEMU 11.1 (the server is built
//!   first, release, into `target/vfio-user/`, unless `VIOMMU_SERVER` names one). The exit
//!   status is then QEMU's, or 1 when QEMU's is 0 but the server did not end cleanly.
//! - `--blk-devices N` (behind `cargo qemu-blk-bench`: 3) is `VIOMMU_BLK_DEVICES=N`: N
//!   virtio-blk devices on the disk, each with its own temporary overlay of the image.
//! - `install-qemu`: installs or fetches the three QEMUs the tests use (10.0, 7.2, 11.1).

use std::path::PathBuf;
use std::process::ExitCode;
use virtio_iommu_runner::{BuildOutput, DeviceChoice, QemuChoice};

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1).peekable();
    let Some(first) = args.next() else {
        eprintln!("usage: virtio-iommu-runner qemu [--device qemu|ours] [--blk-devices N] [extra QEMU arguments...]");
        eprintln!("       virtio-iommu-runner <firmware.elf> [extra QEMU arguments...]");
        eprintln!("       virtio-iommu-runner install-qemu");
        eprintln!("       virtio-iommu-runner qemu-linux [extra QEMU arguments...]");
        return ExitCode::from(2);
    };
    if first == "qemu-linux" {
        // Debian's arm64 kernel with a busybox initramfs (see the library's `linux` module).
        let rest = args.skip_while(|a| a == "--");
        let extra = rest.map(|a| a.to_string_lossy().into_owned());
        return ExitCode::from(virtio_iommu_runner::linux::qemu_linux_command(extra));
    }
    if first == "install-qemu" {
        // The QEMUs the tests use: 10.0 on PATH (installed with apt when missing), 7.2
        // unpacked into target/qemu-7.2 and 11.1 into target/qemu-11.1.
        for choice in [
            QemuChoice::System,
            QemuChoice::Debian72,
            QemuChoice::Debian111,
        ] {
            match virtio_iommu_runner::resolve_qemu(&choice) {
                Ok(path) => println!("runner: {choice:?}: {}", path.display()),
                Err(e) => {
                    eprintln!("runner: {choice:?}: {e}");
                    return ExitCode::from(2);
                }
            }
        }
        return ExitCode::SUCCESS;
    }
    let mut device = None;
    let mut blk_devices = None;
    let elf = if first == "qemu" {
        // `cargo qemu -- --blk-devices 3` reaches us as `qemu -- --blk-devices 3`: the
        // separator is cargo's, here or after the runner's own flags.
        if args.peek().is_some_and(|a| a == "--") {
            args.next();
        }
        // The runner's own flags, in any order, before the QEMU arguments.
        while let Some(f @ ("--device" | "--blk-devices")) = args.peek().and_then(|a| a.to_str()) {
            let flag = f.to_string();
            args.next();
            let value = args.next().map(|v| v.to_string_lossy().into_owned());
            if flag == "--device" {
                match DeviceChoice::parse(value.as_deref()) {
                    Ok(choice) if value.is_some() => device = Some(choice),
                    Ok(_) => {
                        eprintln!("runner: --device needs a value: qemu or ours");
                        return ExitCode::from(2);
                    }
                    Err(_) => {
                        eprintln!(
                            "runner: --device {}: neither `qemu` nor `ours`",
                            value.unwrap_or_default()
                        );
                        return ExitCode::from(2);
                    }
                }
            } else {
                match virtio_iommu_runner::parse_blk_devices(value.as_deref().unwrap_or_default()) {
                    Ok(n) => blk_devices = Some(n),
                    Err(e) => {
                        eprintln!("runner: --blk-devices: {e}");
                        return ExitCode::from(2);
                    }
                }
            }
        }
        // `cargo qemu -- -smp 2` reaches us as `qemu -- -smp 2`: the separator is cargo's.
        if args.peek().is_some_and(|a| a == "--") {
            args.next();
        }
        match virtio_iommu_runner::build_firmware_with(BuildOutput::Inherited) {
            Ok(elf) => elf,
            Err(e) => {
                eprintln!("runner: building the firmware: {e}");
                return ExitCode::from(2);
            }
        }
    } else {
        PathBuf::from(first)
    };
    let mut config = match virtio_iommu_runner::RunConfig::from_env() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("runner: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(device) = device {
        config.device = device;
    }
    if let Some(n) = blk_devices {
        config.blk_devices = n;
    }
    config
        .extra_args
        .extend(args.map(|a| a.to_string_lossy().into_owned()));
    if config.device == DeviceChoice::Ours {
        // Refused before the server is built (a build of about a minute on a fresh clone).
        if let Err(e) = virtio_iommu_runner::ours::check_config(&config) {
            eprintln!("runner: {e}");
            return ExitCode::from(2);
        }
    }
    if config.device == DeviceChoice::Ours && config.server.is_none() {
        // Built here with cargo's output on our stderr, as the firmware.
        match virtio_iommu_runner::ours::build_server(BuildOutput::Inherited) {
            Ok(server) => config.server = Some(server),
            Err(e) => {
                eprintln!("runner: building the vfio-user server: {e}");
                return ExitCode::from(2);
            }
        }
    }
    match virtio_iommu_runner::run(&config, &elf) {
        Ok(outcome) => {
            eprintln!(
                "runner: QEMU exited with status {} after {:.2} s",
                outcome.exit_code,
                outcome.duration.as_secs_f64()
            );
            let server_problems = outcome
                .server
                .as_ref()
                .map(|s| {
                    let mut p = s.problems();
                    p.extend(virtio_iommu_runner::ours::checker::unannounced(
                        s.checker.as_ref(),
                        &outcome.output,
                    ));
                    p
                })
                .unwrap_or_default();
            for problem in &server_problems {
                eprintln!("runner: {problem}");
            }
            if outcome.exit_code == 0 && !server_problems.is_empty() {
                return ExitCode::from(1);
            }
            ExitCode::from(u8::try_from(outcome.exit_code).unwrap_or(1))
        }
        Err(e) => {
            eprintln!("runner: {e}");
            ExitCode::from(if matches!(e, virtio_iommu_runner::Error::Timeout { .. }) {
                124
            } else {
                2
            })
        }
    }
}
