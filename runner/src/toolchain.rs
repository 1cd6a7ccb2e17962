//! The firmware's Rust target (`aarch64-unknown-none`): present in the toolchain, or installed.
//!
//! `rust-toolchain.toml` lists the target, but rustup installs what a toolchain file lists only
//! when it installs the toolchain itself, and never with `RUSTUP_AUTO_INSTALL=0`: on a machine
//! whose `stable` already exists the target is missing and the build stops with "can't find
//! crate for `core`". [`ensure_target`] closes that gap before every firmware build.

use crate::{io_context, run_captured, workspace_root, Error, Result};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Mutex;

/// Serialises target checks and installs within this process (tests run in parallel).
static TARGET_SETUP: Mutex<()> = Mutex::new(());

/// Makes sure the active toolchain (the one `rust-toolchain.toml` selects at the workspace root,
/// or `$RUSTUP_TOOLCHAIN` when cargo runs us through rustup) has the standard library for
/// `target`.
///
/// With rustup: `rustup target list --installed`, silent when `target` is listed; otherwise
/// `rustup target add <target>`, announced on stderr. Without rustup: the target's directory in
/// `rustc --print sysroot` (`lib/rustlib/<target>`) must exist.
///
/// # Errors
///
/// [`Error::TargetUnavailable`] when rustup is absent and the toolchain lacks the target (the
/// message says what to install); [`Error::CommandFailed`] when `rustup target add` fails (e.g.
/// offline); [`Error::Io`] when `rustc` cannot be run.
pub fn ensure_target(target: &str) -> Result<()> {
    let _guard = TARGET_SETUP.lock().unwrap_or_else(|e| e.into_inner());
    let root = workspace_root();
    let listed = Command::new("rustup")
        .current_dir(&root)
        .args(["target", "list", "--installed"])
        .stdin(Stdio::null())
        .output();
    match listed {
        Ok(output) if output.status.success() => {
            let installed = String::from_utf8_lossy(&output.stdout);
            if installed.lines().any(|line| line.trim() == target) {
                return Ok(());
            }
            eprintln!("runner: Rust target {target} is not installed; running `rustup target add {target}`");
            run_captured(
                Command::new("rustup")
                    .current_dir(&root)
                    .args(["target", "add", target])
                    .stdin(Stdio::null()),
            )?;
            Ok(())
        }
        Ok(output) => Err(Error::CommandFailed {
            command: "rustup target list --installed".into(),
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let sysroot = rustc_sysroot()?;
            let libdir = sysroot.join("lib").join("rustlib").join(target);
            if libdir.is_dir() {
                Ok(())
            } else {
                Err(Error::TargetUnavailable(format!(
                    "the Rust toolchain at {} has no standard library for {target} ({} is \
                     missing) and `rustup` is not in PATH to install it: install rustup \
                     (https://rustup.rs) and run `rustup target add {target}`, or use a \
                     toolchain that ships {target}",
                    sysroot.display(),
                    libdir.display()
                )))
            }
        }
        Err(e) => Err(Error::Io {
            context: "cannot run `rustup target list --installed`".into(),
            source: e,
        }),
    }
}

/// `rustc --print sysroot` of the `rustc` cargo would use (`$RUSTC`, else `rustc` in `PATH`).
fn rustc_sysroot() -> Result<PathBuf> {
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let output = io_context(
        Command::new(&rustc)
            .current_dir(workspace_root())
            .args(["--print", "sysroot"])
            .stdin(Stdio::null())
            .output(),
        || format!("cannot run `{} --print sysroot`", rustc.to_string_lossy()),
    )?;
    Ok(PathBuf::from(
        String::from_utf8_lossy(&output.stdout).trim().to_string(),
    ))
}
