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

/// The machine part of QEMU's command line, shared by every device choice: `-M virt`, the CPU,
/// 512 MiB of RAM, no graphics or network, semihosting (the firmware's exit status) and
/// `-kernel elf`. Devices and extra arguments come after.
pub fn machine_args(elf: &Path) -> Vec<String> {
    let mut args: Vec<String> = [
        "-M",
        "virt",
        "-cpu",
        "cortex-a57",
        "-m",
        DEFAULT_MEMORY,
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
    args
}

/// QEMU's arguments for booting `elf` with `disk` against QEMU's own devices
/// ([`DeviceChoice::Qemu`]): [`machine_args`], `virtio-iommu-pci`, `virtio-blk-pci` on `disk`,
/// `edu`, `config.blk_devices - 1` more `virtio-blk-pci` on `disk`, then `config.extra_args`.
///
/// The drives are opened with `snapshot=on`: the firmware's writes go to a temporary overlay, so
/// the image (shared by runs in parallel) stays exactly what the host hashed.
pub fn qemu_args(config: &RunConfig, elf: &Path, disk: &Path) -> Vec<String> {
    let mut args = machine_args(elf);
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
    // Further virtio-blk devices (`blk_devices`) on the same image, each its own drive (a drive
    // serves one device) with its own temporary overlay as `disk0`, so all are the same kind of
    // device; after edu, so they never take a slot `VIOMMU_EDU_ADDR` names.
    for i in 1..config.blk_devices {
        args.push("-drive".into());
        args.push(format!(
            "if=none,id=disk{i},format=raw,snapshot=on,file={}",
            qemu_option_value(&disk.to_string_lossy())
        ));
        args.push("-device".into());
        args.push(format!(
            "virtio-blk-pci,drive=disk{i},iommu_platform=on,disable-legacy=on"
        ));
    }
    args.extend(config.extra_args.iter().cloned());
    args
}

/// A command line for display, pasteable into a POSIX shell (arguments with characters the
/// shell treats specially, such as the JSON of `vfio-user-pci`, in single quotes).
pub(crate) fn display_command(program: &Path, args: &[String]) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "_/.,=:@%+-".contains(c);
    std::iter::once(program.to_string_lossy().into_owned())
        .chain(args.iter().map(|a| {
            if a.is_empty() || !a.chars().all(plain) {
                format!("'{}'", a.replace('\'', "'\\''"))
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
    pump_lines(pipe, to_stderr, |_| {})
}

/// [`pump`], also handing each line (lossy UTF-8, with its newline) to `on_line` after it was
/// copied.
pub(crate) fn pump_lines(
    pipe: impl Read + Send + 'static,
    to_stderr: bool,
    mut on_line: impl FnMut(&str) + Send + 'static,
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
                    on_line(&text);
                    all.extend_from_slice(&line);
                }
            }
        }
        String::from_utf8_lossy(&all).into_owned()
    })
}

/// `command.spawn()`, retried for up to about a second while it fails with ETXTBSY ("text file
/// busy"): an executable just written (a fake server or QEMU in the tests, a binary cargo just
/// linked) stays "busy" while any process still holds a descriptor open for writing to it — such
/// as a child forked by another thread that has not reached its `exec` yet. Cargo retries the
/// same way for build scripts.
///
/// # Errors
/// The last spawn error.
pub(crate) fn spawn(command: &mut Command) -> io::Result<Child> {
    const ETXTBSY: i32 = 26;
    let mut tries = 0;
    loop {
        match command.spawn() {
            Err(e) if e.raw_os_error() == Some(ETXTBSY) && tries < 50 => {
                tries += 1;
                thread::sleep(Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

/// Exit code of a finished process (128 + signal number when killed by a signal).
pub(crate) fn exit_code(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(-1)
}

/// A child process that is killed (and reaped) when the guard is dropped, so that no error path
/// leaves it running.
pub(crate) struct ChildGuard(pub(crate) Option<Child>);

impl ChildGuard {
    /// The child, still owned by the guard.
    pub(crate) fn child(&mut self) -> Option<&mut Child> {
        self.0.as_mut()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}

/// What one QEMU process did.
pub(crate) struct QemuRun {
    /// Its exit status; `None` when it was killed at the deadline.
    pub(crate) status: Option<ExitStatus>,
    /// Its stdout (the firmware's console).
    pub(crate) output: String,
    /// Its stderr.
    pub(crate) stderr: String,
    /// From spawning it to its exit (or kill).
    pub(crate) duration: Duration,
    /// Whether it was killed because the watcher said so (not because of the deadline).
    pub(crate) cut_short: bool,
}

impl QemuRun {
    /// The [`RunOutcome`] of this run: its console and stderr, `exit_code`, the disk it was
    /// given, QEMU's binary and arguments, `duration` (the run's own, or a longer one such as
    /// server start to server exit) and our server's report, if any.
    pub(crate) fn outcome(
        self,
        exit_code: i32,
        disk: DiskImage,
        qemu: PathBuf,
        args: Vec<String>,
        duration: Duration,
        server: Option<ServerReport>,
    ) -> RunOutcome {
        RunOutcome {
            exit_code,
            output: self.output,
            stderr: self.stderr,
            disk_sha256: disk.sha256,
            disk: disk.path,
            qemu,
            args,
            duration,
            server,
        }
    }
}

/// How long QEMU may run on once the watcher of [`run_qemu_watched`] reported trouble.
pub(crate) const WATCH_GRACE: Duration = Duration::from_secs(5);

/// Runs `qemu args`, streaming its stdout and stderr while keeping them, until it exits or
/// `deadline` passes (then it is killed and `status` is `None`). QEMU is killed on every error
/// path too.
pub(crate) fn run_qemu(qemu: &Path, args: &[String], deadline: Instant) -> Result<QemuRun> {
    run_qemu_watched(qemu, args, deadline, &mut || false)
}

/// [`run_qemu`], calling `trouble` every 10 ms while QEMU runs: once it returns true (e.g. a
/// process QEMU depends on died), QEMU gets [`WATCH_GRACE`] to exit by itself, then it is
/// killed and [`QemuRun::cut_short`] is set.
pub(crate) fn run_qemu_watched(
    qemu: &Path,
    args: &[String],
    mut deadline: Instant,
    trouble: &mut dyn FnMut() -> bool,
) -> Result<QemuRun> {
    let started = Instant::now();
    let mut watching = true;
    let mut cut_short = false;
    let mut guard = ChildGuard(Some(io_context(
        spawn(
            Command::new(qemu)
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped()),
        ),
        || format!("cannot start {}", qemu.display()),
    )?));
    let (stdout, stderr) = match guard.child() {
        Some(child) => (
            child.stdout.take().map(|pipe| pump(pipe, false)),
            child.stderr.take().map(|pipe| pump(pipe, true)),
        ),
        None => (None, None),
    };
    let status = loop {
        let Some(child) = guard.child() else {
            break None;
        };
        match io_context(child.try_wait(), || "waiting for QEMU".into())? {
            Some(status) => break Some(status),
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            None => {
                if watching && trouble() {
                    watching = false;
                    let cut = Instant::now() + WATCH_GRACE;
                    if cut < deadline {
                        deadline = cut;
                        cut_short = true;
                    }
                }
                thread::sleep(Duration::from_millis(10));
            }
        }
    };
    let duration = started.elapsed();
    drop(guard);
    let output = stdout
        .map(|t| t.join().unwrap_or_default())
        .unwrap_or_default();
    let stderr = stderr
        .map(|t| t.join().unwrap_or_default())
        .unwrap_or_default();
    Ok(QemuRun {
        status,
        output,
        stderr,
        duration,
        cut_short: cut_short && status.is_none(),
    })
}

/// Boots `elf` in QEMU as `config` says, streaming the console to stdout while keeping it.
///
/// Prints `runner: disk <path> <size> bytes sha256 <hex>` and the QEMU command line first.
/// Returns the outcome whatever the exit status; [`Error::Timeout`] if QEMU had to be killed.
/// With [`DeviceChoice::Ours`] this is [`run_ours`].
///
/// # Errors
///
/// [`Error::Timeout`] after `config.timeout`; those of [`resolve_qemu`] and [`prepare_disk`];
/// [`Error::Io`] when the ELF is missing or QEMU cannot start.
pub fn run(config: &RunConfig, elf: &Path) -> Result<RunOutcome> {
    if !elf.is_file() {
        return Err(Error::Io {
            context: format!("firmware ELF {}", elf.display()),
            source: io::ErrorKind::NotFound.into(),
        });
    }
    check_iommu_kind(config)?;
    if config.device == DeviceChoice::Ours {
        return run_ours(config, elf);
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
    let deadline = Instant::now() + config.timeout;
    let ran = run_qemu(&qemu, &args, deadline)?;
    let Some(status) = ran.status else {
        eprintln!(
            "runner: TIMEOUT: QEMU still running after {} s; killed it",
            config.timeout.as_secs()
        );
        return Err(Error::Timeout {
            seconds: config.timeout.as_secs(),
            output: ran.output,
        });
    };
    let duration = ran.duration;
    Ok(ran.outcome(exit_code(status), disk, qemu, args, duration, None))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn displayed_commands_paste_into_a_shell() {
        let args: Vec<String> = [
            "-M",
            "virt,highmem=off",
            r#"{"driver":"vfio-user-pci"}"#,
            "it's",
            "",
            "a b",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            display_command(Path::new("/q"), &args),
            r#"/q -M virt,highmem=off '{"driver":"vfio-user-pci"}' 'it'\''s' '' 'a b'"#
        );
    }
}
