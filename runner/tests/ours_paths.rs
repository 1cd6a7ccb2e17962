//! `VIOMMU_DEVICE=ours` runs that cannot succeed, against fake servers: the run must end
//! bounded, report what went wrong and leave no process or temporary directory behind. (The
//! real server's runs are in `ours.rs`.)

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use virtio_iommu_runner::{firmware_elf, problems, run, DeviceChoice, Error, RunConfig};

fn firmware() -> &'static Path {
    static ELF: OnceLock<PathBuf> = OnceLock::new();
    ELF.get_or_init(|| firmware_elf().unwrap_or_else(|e| panic!("building the firmware: {e}")))
}

/// A fake server script in its own directory; the script records its PID and arguments there.
fn fake(name: &str, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("viommu-fake-{}-{name}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    let path = dir.join("server");
    let d = dir.display();
    fs::write(
        &path,
        format!("#!/bin/sh\necho $$ > {d}/pid\necho \"$@\" > {d}/args\n{body}\n"),
    )
    .unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn recorded(server: &Path, what: &str) -> String {
    fs::read_to_string(server.parent().unwrap().join(what)).unwrap_or_default()
}

fn ours(server: &Path) -> RunConfig {
    RunConfig {
        device: DeviceChoice::Ours,
        server: Some(server.to_path_buf()),
        timeout: Duration::from_secs(60),
        ..RunConfig::default()
    }
}

/// The socket directory named in the recorded arguments (`--iommu DIR/iommu.sock`).
fn socket_dir(server: &Path) -> PathBuf {
    let args = recorded(server, "args");
    let mut words = args.split_whitespace();
    while let Some(w) = words.next() {
        if w == "--iommu" {
            return Path::new(words.next().unwrap()).parent().unwrap().into();
        }
    }
    panic!("no --iommu in {args:?}")
}

#[test]
fn server_that_never_listens_fails_with_its_stderr() {
    let server = fake("mute", "echo 'cannot bind: Address in use' >&2\nexit 7");
    match run(&ours(&server), firmware()) {
        Err(Error::Server { reason, stderr }) => {
            assert!(reason.contains("status 7"), "{reason}");
            assert!(stderr.contains("Address in use"), "{stderr}");
        }
        other => panic!("{other:?}"),
    }
    assert!(!socket_dir(&server).exists(), "temporary directory left");
    let _ = fs::remove_dir_all(server.parent().unwrap());
}

#[test]
fn qemu_that_cannot_connect_ends_the_run_and_the_server() {
    // Says it listens but creates no socket: QEMU's vfio-user-pci fails to connect and QEMU
    // exits; the server never exits by itself and is killed after the bound.
    let server = fake(
        "liar",
        "echo 'virtio-iommu-vfio-user: listening'\nexec sleep 120",
    );
    let started = Instant::now();
    let outcome = run(&ours(&server), firmware()).expect("the run itself completes");
    assert!(started.elapsed() < Duration::from_secs(40));
    let pid: u32 = recorded(&server, "pid").trim().parse().unwrap();
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "server left running"
    );
    assert_ne!(outcome.exit_code, 0);
    assert!(
        outcome.stderr.contains("iommu.sock"),
        "QEMU names the socket: {}",
        outcome.stderr
    );
    let report = outcome.server.as_ref().expect("server report");
    assert!(report.killed);
    let found = problems(&outcome, true);
    assert!(found.iter().any(|p| p.contains("killed")), "{found:#?}");
    // The arguments follow the contract; endpoint IDs are the requester IDs; the driver
    // checker is on.
    let args = recorded(&server, "args");
    let dir = socket_dir(&server);
    assert_eq!(
        args.trim(),
        format!(
            "--iommu {0}/iommu.sock --blk {0}/blk.sock --disk {0}/disk.img --blk-endpoint 16 \
             --edu {0}/edu.sock --edu-endpoint 24 --checker",
            dir.display()
        )
    );
    assert!(!dir.exists(), "temporary directory left");
    // QEMU's devices are absent, ours are vfio-user-pci at 01.0, 02.0, 03.0 with -dtb.
    let joined = outcome.args.join(" ");
    assert!(!joined.contains("virtio-iommu-pci") && !joined.contains("-drive"));
    for (sock, addr) in [("iommu", "01.0"), ("blk", "02.0"), ("edu", "03.0")] {
        assert!(
            joined.contains(&format!(
                "{sock}.sock\",\"type\":\"unix\"}},\"addr\":\"{addr}\""
            )),
            "{joined}"
        );
    }
    assert!(joined.contains("share=on") && joined.contains(" -dtb "));
    let _ = fs::remove_dir_all(server.parent().unwrap());
}

#[test]
fn qemu_7_2_is_refused() {
    let server = fake("unused", "exit 0");
    let config = RunConfig {
        qemu: virtio_iommu_runner::QemuChoice::Debian72,
        ..ours(&server)
    };
    assert!(matches!(
        run(&config, firmware()),
        Err(Error::InvalidEnv {
            name: "VIOMMU_QEMU",
            ..
        })
    ));
    assert_eq!(recorded(&server, "pid"), "", "no server started");
    let _ = fs::remove_dir_all(server.parent().unwrap());
}

/// A fake QEMU in `dir`: answers `-machine dumpdtb=F` with a real QEMU 11.1 tree, otherwise
/// records its PID in `dir/qemu-pid` and "runs" (sleeps) for two minutes.
fn fake_qemu(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    use virtio_iommu_runner::devicetree::dump;
    use virtio_iommu_runner::{resolve_qemu, QemuChoice};
    let real = resolve_qemu(&QemuChoice::Debian111).expect("QEMU 11.1");
    let tree = dump(
        &real,
        &["-M", "virt", "-m", "512M", "-nographic"].map(String::from),
    )
    .unwrap();
    fs::write(dir.join("tree.dtb"), tree).unwrap();
    let qemu = dir.join("qemu");
    let d = dir.display();
    fs::write(
        &qemu,
        format!(
            "#!/bin/sh\nfor a in \"$@\"; do case \"$a\" in dumpdtb=*) cp {d}/tree.dtb \"${{a#dumpdtb=}}\"; exit 0;; esac; done\n\
             echo $$ > {d}/qemu-pid\nexec sleep 120\n"
        ),
    )
    .unwrap();
    fs::set_permissions(&qemu, fs::Permissions::from_mode(0o755)).unwrap();
    qemu
}

#[test]
fn timeout_kills_qemu_and_server() {
    let server = fake(
        "patient",
        "echo 'virtio-iommu-vfio-user: listening'\nexec sleep 120",
    );
    let dir = server.parent().unwrap().to_path_buf();
    let qemu = fake_qemu(&dir);
    let started = Instant::now();
    let result = run(
        &RunConfig {
            qemu: virtio_iommu_runner::QemuChoice::Binary(qemu),
            timeout: Duration::from_secs(3),
            ..ours(&server)
        },
        firmware(),
    );
    assert!(
        matches!(result, Err(Error::Timeout { seconds: 3, .. })),
        "{result:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    for pid_file in ["pid", "qemu-pid"] {
        let pid: u32 = recorded(&server, pid_file).trim().parse().unwrap();
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "{pid_file}: process left running"
        );
    }
    assert!(!socket_dir(&server).exists(), "temporary directory left");
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn server_dying_mid_run_cuts_qemu_short() {
    // A fake QEMU (answers dumpdtb with a real tree, then "runs" forever) and a server that
    // dies 0.5 s after listening: the run must end about WATCH_GRACE (5 s) later, not at the
    // 60 s timeout, with QEMU killed.
    use virtio_iommu_runner::QemuChoice;
    let server = fake(
        "dying",
        "echo 'virtio-iommu-vfio-user: listening'\nsleep 0.5\necho 'crash' >&2\nexit 9",
    );
    let dir = server.parent().unwrap().to_path_buf();
    let qemu = fake_qemu(&dir);
    let started = Instant::now();
    let outcome = run(
        &RunConfig {
            qemu: QemuChoice::Binary(qemu.clone()),
            ..ours(&server)
        },
        firmware(),
    )
    .expect("run");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(5) && took < Duration::from_secs(20),
        "{took:?}"
    );
    assert_eq!(outcome.exit_code, 128 + 9, "QEMU killed");
    let report = outcome.server.as_ref().unwrap();
    assert_eq!(report.exit_code, 9);
    assert!(report.stderr.contains("crash"));
    assert!(!problems(&outcome, false).is_empty());
    let pid: u32 = recorded(&server, "qemu-pid").trim().parse().unwrap();
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "QEMU left running"
    );
    let _ = fs::remove_dir_all(&dir);
}
