//! Our vfio-user server as a child process: building `virtio-iommu-vfio-user`, starting it with
//! its sockets, waiting (bounded) until it prints that it listens, and stopping it after QEMU
//! quit (bounded, killed on timeout). A [`ServerProcess`] kills its child when dropped, so no
//! error path leaves a server running.
//!
//! The server's command-line contract (issue #8 item 2):
//! `virtio-iommu-vfio-user --iommu SOCK --blk SOCK --disk PATH --blk-endpoint ID --edu SOCK
//! --edu-endpoint ID [--log-level L]`; it prints [`LISTENING_LINE`] on stdout once every socket
//! listens and `virtio-iommu-vfio-user: requests=N notifications=N faults=N` when it exits
//! (after QEMU disconnected).

use super::checker::{parse_checker, parse_saw, CheckerFindings};
#[allow(unused_imports)]
use crate::*;
use std::sync::mpsc;

/// The package of the server binary.
pub const SERVER_PACKAGE: &str = "virtio-iommu-device";
/// The server binary.
pub const SERVER_BIN: &str = "virtio-iommu-vfio-user";
/// The cargo feature that builds it.
pub const SERVER_FEATURE: &str = "vfio-user";
/// What the server prints on stdout once all its sockets listen.
pub const LISTENING_LINE: &str = "virtio-iommu-vfio-user: listening";
/// The prefix of the server's counts line.
pub const COUNTS_PREFIX: &str = "virtio-iommu-vfio-user: requests=";
/// How long the server may take to listen.
pub const LISTEN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the server may take to exit after QEMU quit.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// The same after QEMU failed (non-zero status): QEMU may never have connected (a bad option,
/// no `vfio-user-pci`), and a server never connected to does not exit by itself.
pub const FAILED_EXIT_TIMEOUT: Duration = Duration::from_secs(2);

/// Builds the server (`cargo build -p virtio-iommu-device --features vfio-user --bin
/// virtio-iommu-vfio-user --release`) into `<workspace>/target/vfio-user` (its own target
/// directory, so it never waits for the lock of an outer cargo, as the firmware build) and
/// returns the binary.
///
/// Release, because the server is on the path of every register access and request and
/// `cargo qemu-bench` measures it; the build costs once.
///
/// # Errors
///
/// [`Error::CommandFailed`] with cargo's stderr when the build fails ([`BuildOutput::Captured`];
/// with [`BuildOutput::Inherited`] cargo printed it already); [`Error::Io`] when cargo cannot run
/// or produced no binary.
pub fn build_server(output: BuildOutput) -> Result<PathBuf> {
    let root = workspace_root();
    let target_dir = root.join("target").join("vfio-user");
    let mut command = Command::new(cargo());
    command
        .current_dir(&root)
        .args([
            "build",
            "-p",
            SERVER_PACKAGE,
            "--features",
            SERVER_FEATURE,
            "--bin",
            SERVER_BIN,
            "--release",
        ])
        .env("CARGO_TARGET_DIR", &target_dir)
        .stdin(Stdio::null());
    run_build(&mut command, output)?;
    let binary = target_dir.join("release").join(SERVER_BIN);
    if binary.is_file() {
        Ok(binary)
    } else {
        Err(Error::Io {
            context: format!("server build produced no {}", binary.display()),
            source: io::ErrorKind::NotFound.into(),
        })
    }
}

/// The server's sockets, disk and endpoint IDs.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct ServerSpec {
    /// The virtio-iommu's socket.
    pub iommu_socket: PathBuf,
    /// The virtio-blk device's socket.
    pub blk_socket: PathBuf,
    /// The raw disk image virtio-blk serves (read and written in place).
    pub disk: PathBuf,
    /// virtio-blk's endpoint ID (its requester ID).
    pub blk_endpoint: u32,
    /// The edu device's socket.
    pub edu_socket: PathBuf,
    /// edu's endpoint ID (its requester ID).
    pub edu_endpoint: u32,
    /// `--log-level`, if any (`error`, `warn`, `info`, `debug`, `trace`).
    pub log_level: Option<String>,
    /// `--checker`: the IOMMU's driver checker on (its report printed at exit, see
    /// [`super::checker`]).
    pub checker: bool,
}

impl ServerSpec {
    /// The command-line arguments (endpoint IDs in decimal).
    pub fn args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec![
            "--iommu".into(),
            self.iommu_socket.clone().into(),
            "--blk".into(),
            self.blk_socket.clone().into(),
            "--disk".into(),
            self.disk.clone().into(),
            "--blk-endpoint".into(),
            self.blk_endpoint.to_string().into(),
            "--edu".into(),
            self.edu_socket.clone().into(),
            "--edu-endpoint".into(),
            self.edu_endpoint.to_string().into(),
        ];
        if let Some(level) = &self.log_level {
            args.push("--log-level".into());
            args.push(level.into());
        }
        if self.checker {
            args.push("--checker".into());
        }
        args
    }
}

/// The server's counters from its exit line.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub struct ServerCounts {
    /// Requests served on the request queue.
    pub requests: u64,
    /// Notifications (queue kicks) received.
    pub notifications: u64,
    /// Faults reported on the event queue.
    pub faults: u64,
}

/// The last `virtio-iommu-vfio-user: requests=N notifications=N faults=N` line of `output`.
pub fn parse_counts(output: &str) -> Option<ServerCounts> {
    output
        .lines()
        .filter(|l| l.trim_start().starts_with(COUNTS_PREFIX))
        .filter_map(|line| {
            let fields = line.trim().strip_prefix("virtio-iommu-vfio-user:")?;
            let mut counts = ServerCounts::default();
            let mut seen = 0;
            for field in fields.split_whitespace() {
                let (key, value) = field.split_once('=')?;
                let value: u64 = value.parse().ok()?;
                let slot = match key {
                    "requests" => &mut counts.requests,
                    "notifications" => &mut counts.notifications,
                    "faults" => &mut counts.faults,
                    _ => continue,
                };
                *slot = value;
                seen += 1;
            }
            (seen == 3).then_some(counts)
        })
        .next_back()
}

/// How the server ended.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct ServerReport {
    /// The server binary.
    pub program: PathBuf,
    /// Its exit code (128 + signal when killed by one).
    pub exit_code: i32,
    /// Whether the runner had to kill it (it did not exit within the bound).
    pub killed: bool,
    /// Its counters, if it printed them.
    pub counts: Option<ServerCounts>,
    /// Its driver checker's findings, if it printed them (`--checker`).
    pub checker: Option<CheckerFindings>,
    /// Its `device saw: ATTACH a DETACH d MAP m UNMAP u PROBE p faults f` line, if printed.
    pub saw: Option<String>,
    /// Everything it wrote to stdout.
    pub stdout: String,
    /// Everything it wrote to stderr.
    pub stderr: String,
}

impl ServerReport {
    /// What is wrong with how the server ended (empty when it exited by itself with status 0
    /// and printed its counts).
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.killed {
            problems.push("server did not exit by itself after QEMU quit; killed".into());
        } else if self.exit_code != 0 {
            problems.push(format!("server exited with status {}", self.exit_code));
        }
        if self.counts.is_none() {
            problems.push("server printed no `requests=N notifications=N faults=N` line".into());
        }
        problems
    }
}

/// A running server; killed and reaped on drop unless [`stop`](Self::stop)ped.
pub struct ServerProcess {
    /// The program.
    program: PathBuf,
    /// The child, killed on drop.
    child: ChildGuard,
    /// The stdout reader (forwards lines to our stdout, signals [`LISTENING_LINE`]).
    stdout: Option<thread::JoinHandle<String>>,
    /// The stderr reader (forwards to our stderr).
    stderr: Option<thread::JoinHandle<String>>,
}

/// Copies the server's stdout to ours line by line, keeps it, and sends `()` on `listening` at
/// the first [`LISTENING_LINE`].
fn pump_stdout(
    pipe: impl Read + Send + 'static,
    listening: mpsc::Sender<()>,
) -> thread::JoinHandle<String> {
    crate::boot::pump_lines(pipe, false, move |text| {
        if text.trim() == LISTENING_LINE {
            let _ = listening.send(());
        }
    })
}

impl ServerProcess {
    /// Starts `program` with `spec`'s arguments and waits until it prints [`LISTENING_LINE`],
    /// at most `listen_timeout`.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] when it cannot start; [`Error::Server`] (with its stderr) when it exits
    /// before listening or does not listen in time (it is killed then).
    pub fn start(program: &Path, spec: &ServerSpec, listen_timeout: Duration) -> Result<Self> {
        let child = io_context(
            crate::boot::spawn(
                Command::new(program)
                    .args(spec.args())
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped()),
            ),
            || format!("cannot start {}", program.display()),
        )?;
        let mut server = Self {
            program: program.to_path_buf(),
            child: ChildGuard(Some(child)),
            stdout: None,
            stderr: None,
        };
        let (tx, rx) = mpsc::channel();
        if let Some(child) = server.child.child() {
            server.stdout = child.stdout.take().map(|pipe| pump_stdout(pipe, tx));
            server.stderr = child.stderr.take().map(|pipe| pump(pipe, true));
        }
        let deadline = Instant::now() + listen_timeout;
        loop {
            match rx.recv_timeout(Duration::from_millis(20)) {
                Ok(()) => return Ok(server),
                Err(mpsc::RecvTimeoutError::Timeout)
                | Err(mpsc::RecvTimeoutError::Disconnected) => {}
            }
            let exited = match server.child.child() {
                Some(child) => io_context(child.try_wait(), || "waiting for the server".into())?,
                None => None,
            };
            if let Some(status) = exited {
                // Even if it printed the line before exiting, it is no use to QEMU now.
                let report = server.finish(status, false);
                let when = if report.stdout.lines().any(|l| l.trim() == LISTENING_LINE) {
                    "right after listening"
                } else {
                    "before listening"
                };
                return Err(Error::Server {
                    reason: format!(
                        "{} exited with status {} {when}",
                        program.display(),
                        report.exit_code
                    ),
                    stderr: report.stderr,
                });
            }
            if Instant::now() >= deadline {
                let report = server.kill();
                return Err(Error::Server {
                    reason: format!(
                        "{} did not print `{LISTENING_LINE}` within {} s; killed it",
                        program.display(),
                        listen_timeout.as_secs()
                    ),
                    stderr: report.stderr,
                });
            }
        }
    }

    /// Whether the server has exited (it is reaped; [`stop`](Self::stop) still reports it).
    pub fn has_exited(&mut self) -> bool {
        match self.child.child() {
            Some(child) => !matches!(child.try_wait(), Ok(None)),
            None => true,
        }
    }

    /// The server's process ID.
    pub fn id(&self) -> Option<u32> {
        self.child.0.as_ref().map(Child::id)
    }

    /// Waits up to `timeout` for the server to exit by itself (it does once QEMU disconnected),
    /// then kills it; returns how it ended.
    pub fn stop(mut self, timeout: Duration) -> ServerReport {
        let deadline = Instant::now() + timeout;
        loop {
            let status = match self.child.child() {
                Some(child) => child.try_wait(),
                None => return self.kill(),
            };
            match status {
                Ok(Some(status)) => return self.finish(status, false),
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
                Ok(None) | Err(_) => return self.kill(),
            }
        }
    }

    /// Kills the server now and reports.
    pub fn kill(mut self) -> ServerReport {
        let status = self.child.child().and_then(|child| {
            let _ = child.kill();
            child.wait().ok()
        });
        let mut report = match status {
            Some(status) => self.finish(status, true),
            None => self.finish_without_status(),
        };
        report.killed = true;
        report
    }

    /// The report for an exited child (`killed` as given), joining the readers.
    fn finish(&mut self, status: ExitStatus, killed: bool) -> ServerReport {
        let mut report = self.finish_without_status();
        report.exit_code = exit_code(status);
        report.killed = killed;
        report
    }

    /// Reaps the child, joins the readers.
    fn finish_without_status(&mut self) -> ServerReport {
        self.child.0.take().map(|mut c| c.wait());
        let stdout = self
            .stdout
            .take()
            .map(|t| t.join().unwrap_or_default())
            .unwrap_or_default();
        let stderr = self
            .stderr
            .take()
            .map(|t| t.join().unwrap_or_default())
            .unwrap_or_default();
        ServerReport {
            program: self.program.clone(),
            exit_code: -1,
            killed: false,
            counts: parse_counts(&stdout),
            checker: parse_checker(&stdout),
            saw: parse_saw(&stdout),
            stdout,
            stderr,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments() {
        let spec = ServerSpec {
            iommu_socket: "/t/iommu.sock".into(),
            blk_socket: "/t/blk.sock".into(),
            disk: "/t/disk.img".into(),
            blk_endpoint: 0x10,
            edu_socket: "/t/edu.sock".into(),
            edu_endpoint: 0x18,
            log_level: Some("debug".into()),
            checker: true,
        };
        let args: Vec<String> = spec
            .args()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args.join(" "),
            "--iommu /t/iommu.sock --blk /t/blk.sock --disk /t/disk.img --blk-endpoint 16 \
             --edu /t/edu.sock --edu-endpoint 24 --log-level debug --checker"
        );
    }

    #[test]
    fn counts_line() {
        let out = "virtio-iommu-vfio-user: listening\n\
                   virtio-iommu-vfio-user: requests=1 notifications=2 faults=3\n\
                   virtio-iommu-vfio-user: requests=40 notifications=7 faults=2\n";
        assert_eq!(
            parse_counts(out),
            Some(ServerCounts {
                requests: 40,
                notifications: 7,
                faults: 2
            })
        );
        assert_eq!(
            parse_counts("virtio-iommu-vfio-user: requests=1 notifications=x faults=3\n"),
            None
        );
        assert_eq!(
            parse_counts("virtio-iommu-vfio-user: requests=1 faults=3\n"),
            None
        );
        assert_eq!(parse_counts(""), None);
    }
}
