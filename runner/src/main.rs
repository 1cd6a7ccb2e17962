//! `virtio-iommu-runner <firmware.elf> [extra QEMU arguments...]`
//!
//! The cargo runner for `aarch64-unknown-none` (see `.cargo/config.toml`): boots the ELF in
//! QEMU as configured by the `VIOMMU_*` environment variables (see the library documentation),
//! streams the output and exits with QEMU's exit status (the firmware's, via semihosting).

use std::path::PathBuf;
use std::process::ExitCode;
use virtio_iommu_runner::QemuChoice;

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let Some(elf) = args.next().map(PathBuf::from) else {
        eprintln!("usage: virtio-iommu-runner <firmware.elf> [extra QEMU arguments...]");
        eprintln!("       virtio-iommu-runner install-qemu");
        return ExitCode::from(2);
    };
    if elf.as_os_str() == "install-qemu" {
        // Both QEMUs the tests use: 10.0 on PATH (installed with apt when missing) and 7.2
        // unpacked into target/qemu-7.2.
        for choice in [QemuChoice::System, QemuChoice::Debian72] {
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
    let mut config = match virtio_iommu_runner::RunConfig::from_env() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("runner: {e}");
            return ExitCode::from(2);
        }
    };
    config
        .extra_args
        .extend(args.map(|a| a.to_string_lossy().into_owned()));
    match virtio_iommu_runner::run(&config, &elf) {
        Ok(outcome) => {
            eprintln!(
                "runner: QEMU exited with status {} after {:.2} s",
                outcome.exit_code,
                outcome.duration.as_secs_f64()
            );
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
