//! Booting the firmware: QEMU's command line, running it with a timeout, and capturing the
//! console.

#[allow(unused_imports)]
use crate::*;

/// Escapes a value for a QEMU `-drive`/`-device` option list (`,` ⇒ `,,`).
pub(crate) fn qemu_option_value(value: &str) -> String {
    value.replace(',', ",,")
}

/// `device` with `,addr=<addr>` if `addr` is given.
pub(crate) fn with_addr(device: &str, addr: Option<&String>) -> String {
    match addr {
        Some(addr) => format!("{device},addr={}", qemu_option_value(addr)),
        None => device.to_string(),
    }
}

/// QEMU's arguments for booting `elf` with `disk`.
///
/// The drive is opened with `snapshot=on`: the firmware's writes go to a temporary overlay, so
/// the image (shared by runs in parallel) stays exactly what the host hashed.
pub fn qemu_args(config: &RunConfig, elf: &Path, disk: &Path) -> Vec<String> {
    let mut args: Vec<String> = [
        "-M",
        "virt",
        "-cpu",
        "cortex-a57",
        "-m",
        "512M",
        "-nographic",
        "-semihosting",
        "-nic",
        "none",
        "-kernel",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push(elf.to_string_lossy().into_owned());
    args.push("-device".into());
    args.push(config.iommu.qemu_device(config.iommu_addr.as_ref()));
    args.push("-drive".into());
    args.push(format!(
        "if=none,id=disk0,format=raw,snapshot=on,file={}",
        qemu_option_value(&disk.to_string_lossy())
    ));
    args.push("-device".into());
    args.push(with_addr(
        "virtio-blk-pci,drive=disk0,iommu_platform=on,disable-legacy=on",
        config.blk_addr.as_ref(),
    ));
    args.push("-device".into());
    args.push(with_addr(
        "edu,dma_mask=0xffffffffffffffff",
        config.edu_addr.as_ref(),
    ));
    args.extend(config.extra_args.iter().cloned());
    args
}

/// A command line for display (arguments with spaces quoted).
pub(crate) fn display_command(program: &Path, args: &[String]) -> String {
    std::iter::once(program.to_string_lossy().into_owned())
        .chain(args.iter().map(|a| {
            if a.contains(char::is_whitespace) || a.is_empty() {
                format!("'{a}'")
            } else {
                a.clone()
            }
        }))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Copies a pipe line by line to our stdout or stderr (through `print!`/`eprint!`, so test
/// harnesses capture it) and returns everything read.
pub(crate) fn pump(
    pipe: impl Read + Send + 'static,
    to_stderr: bool,
) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut all = Vec::new();
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let text = String::from_utf8_lossy(&line);
                    if to_stderr {
                        eprint!("{text}");
                    } else {
                        print!("{text}");
                        let _ = io::stdout().flush();
                    }
                    all.extend_from_slice(&line);
                }
            }
        }
        String::from_utf8_lossy(&all).into_owned()
    })
}

/// Exit code of a finished process (128 + signal number when killed by a signal).
pub(crate) fn exit_code(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(-1)
}

/// Boots `elf` in QEMU as `config` says, streaming the console to stdout while keeping it.
///
/// Prints `runner: disk <path> <size> bytes sha256 <hex>` and the QEMU command line first.
/// Returns the outcome whatever the exit status; [`Error::Timeout`] if QEMU had to be killed.
pub fn run(config: &RunConfig, elf: &Path) -> Result<RunOutcome> {
    if !elf.is_file() {
        return Err(Error::Io {
            context: format!("firmware ELF {}", elf.display()),
            source: io::ErrorKind::NotFound.into(),
        });
    }
    let qemu = resolve_qemu(&config.qemu)?;
    let disk = prepare_disk(config.disk.as_deref())?;
    println!(
        "runner: disk {} {} bytes sha256 {}",
        disk.path.display(),
        disk.size,
        disk.sha256
    );
    let mut args = qemu_args(config, elf, &disk.path);
    if config.iommu == IommuKind::Mmio {
        args = mmio_boot_args(config, &qemu, args)?;
    }
    println!("runner: {}", display_command(&qemu, &args));
    let started = Instant::now();
    let mut child = io_context(
        Command::new(&qemu)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn(),
        || format!("cannot start {}", qemu.display()),
    )?;
    let stdout = child.stdout.take().map(|pipe| pump(pipe, false));
    let stderr = child.stderr.take().map(|pipe| pump(pipe, true));
    let deadline = started + config.timeout;
    let status = loop {
        match io_context(child.try_wait(), || "waiting for QEMU".into())? {
            Some(status) => break Some(status),
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            None => thread::sleep(Duration::from_millis(10)),
        }
    };
    let duration = started.elapsed();
    let output = stdout
        .map(|t| t.join().unwrap_or_default())
        .unwrap_or_default();
    let stderr = stderr
        .map(|t| t.join().unwrap_or_default())
        .unwrap_or_default();
    let Some(status) = status else {
        eprintln!(
            "runner: TIMEOUT: QEMU still running after {} s; killed it",
            config.timeout.as_secs()
        );
        return Err(Error::Timeout {
            seconds: config.timeout.as_secs(),
            output,
        });
    };
    Ok(RunOutcome {
        exit_code: exit_code(status),
        output,
        stderr,
        disk_sha256: disk.sha256,
        disk: disk.path,
        qemu,
        args,
        duration,
    })
}
