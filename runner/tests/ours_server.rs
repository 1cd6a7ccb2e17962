//! The runner's handling of our vfio-user server process, against fake servers (shell scripts
//! that follow or break the server's contract): waiting until it listens, its early exit (with
//! its stderr in the error), a server that never listens or never exits (killed, bounded), and
//! no process left behind when the handle is dropped.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use virtio_iommu_runner::ours::{ServerCounts, ServerProcess, ServerSpec};
use virtio_iommu_runner::Error;

/// A temporary directory for one test, removed at the end.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Self {
        let path =
            std::env::temp_dir().join(format!("viommu-fake-server-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap();
        Self(path)
    }

    /// Writes an executable `/bin/sh` script `body`.
    fn script(&self, body: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = self.0.join("fake-server");
        fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    fn spec(&self) -> ServerSpec {
        ServerSpec {
            iommu_socket: self.0.join("iommu.sock"),
            blk_socket: self.0.join("blk.sock"),
            disk: self.0.join("disk.img"),
            blk_endpoint: 0x10,
            edu_socket: self.0.join("edu.sock"),
            edu_endpoint: 0x18,
            log_level: None,
            checker: false,
        }
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Whether process `pid` exists (a zombie counts: it was not reaped).
fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// The PID the fake wrote to `pid` (waits briefly for it).
fn fake_pid(dir: &Dir) -> u32 {
    let file = dir.0.join("pid");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(pid) = fs::read_to_string(&file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            return pid;
        }
        assert!(Instant::now() < deadline, "the fake wrote no pid");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn listens_then_exits_with_counts() {
    let dir = Dir::new("good");
    let d = dir.0.display();
    let program = dir.script(&format!(
        "echo \"$@\" > {d}/args\n\
         echo $$ > {d}/pid\n\
         sleep 0.3\n\
         echo 'virtio-iommu-vfio-user: listening'\n\
         while [ ! -e {d}/quit ]; do sleep 0.05; done\n\
         echo 'virtio-iommu-vfio-user: requests=12 notifications=5 faults=2'\n\
         echo 'bye' >&2"
    ));
    let spec = dir.spec();
    let started = Instant::now();
    let server = ServerProcess::start(&program, &spec, Duration::from_secs(10)).expect("start");
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "returned before the listening line"
    );
    let args: Vec<String> = spec
        .args()
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        fs::read_to_string(dir.0.join("args")).unwrap().trim(),
        args.join(" ")
    );
    let pid = fake_pid(&dir);
    assert_eq!(server.id(), Some(pid));
    fs::write(dir.0.join("quit"), b"").unwrap();
    let report = server.stop(Duration::from_secs(10));
    assert!(!report.killed, "{report:?}");
    assert_eq!(report.exit_code, 0);
    assert_eq!(
        report.counts,
        Some(ServerCounts {
            requests: 12,
            notifications: 5,
            faults: 2
        })
    );
    assert!(report.stderr.contains("bye"));
    assert!(report.problems().is_empty(), "{:?}", report.problems());
    assert!(!alive(pid));
}

#[test]
fn early_exit_shows_stderr() {
    let dir = Dir::new("early");
    let program = dir.script("echo 'cannot open disk: No such file' >&2\nexit 3");
    match ServerProcess::start(&program, &dir.spec(), Duration::from_secs(10)) {
        Err(Error::Server { reason, stderr }) => {
            assert!(reason.contains("status 3"), "{reason}");
            assert!(stderr.contains("cannot open disk"), "{stderr}");
            let shown = Error::Server { reason, stderr }.to_string();
            assert!(shown.contains("cannot open disk"), "{shown}");
        }
        Err(other) => panic!("{other}"),
        Ok(_) => panic!("a server that exited early was accepted"),
    }
}

#[test]
fn never_listening_is_killed_in_time() {
    let dir = Dir::new("silent");
    let d = dir.0.display();
    let program = dir.script(&format!(
        "echo $$ > {d}/pid\necho 'virtio-iommu-vfio-user: almost listening'\nexec sleep 60"
    ));
    let started = Instant::now();
    let result = ServerProcess::start(&program, &dir.spec(), Duration::from_secs(1));
    let took = started.elapsed();
    match result {
        Err(Error::Server { reason, .. }) => {
            assert!(reason.contains("within 1 s"), "{reason}")
        }
        Err(other) => panic!("{other}"),
        Ok(_) => panic!("a server that never listened was accepted"),
    }
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(5),
        "{took:?}"
    );
    assert!(!alive(fake_pid(&dir)), "the silent server was left running");
}

#[test]
fn never_exiting_is_killed_and_reported() {
    let dir = Dir::new("stubborn");
    let d = dir.0.display();
    let program = dir.script(&format!(
        "echo $$ > {d}/pid\necho 'virtio-iommu-vfio-user: listening'\nexec sleep 60"
    ));
    let server = ServerProcess::start(&program, &dir.spec(), Duration::from_secs(10)).unwrap();
    let pid = fake_pid(&dir);
    let started = Instant::now();
    let report = server.stop(Duration::from_millis(500));
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(report.killed);
    assert_eq!(report.exit_code, 128 + 9, "SIGKILL");
    assert_eq!(report.counts, None);
    assert_eq!(report.problems().len(), 2, "{:?}", report.problems());
    assert!(!alive(pid));
}

#[test]
fn dropping_the_handle_kills_the_server() {
    let dir = Dir::new("dropped");
    let d = dir.0.display();
    let program = dir.script(&format!(
        "echo $$ > {d}/pid\necho 'virtio-iommu-vfio-user: listening'\nexec sleep 60"
    ));
    let server = ServerProcess::start(&program, &dir.spec(), Duration::from_secs(10)).unwrap();
    let pid = fake_pid(&dir);
    assert!(alive(pid));
    drop(server);
    assert!(!alive(pid), "the server outlived its handle");
}

#[test]
fn missing_program_is_an_io_error() {
    let dir = Dir::new("missing");
    let result = ServerProcess::start(&dir.0.join("nope"), &dir.spec(), Duration::from_secs(1));
    assert!(matches!(result, Err(Error::Io { .. })));
}
