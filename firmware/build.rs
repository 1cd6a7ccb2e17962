//! Links the firmware with aarch64-rt's `image.ld` and our `memory.ld` (image origin and size).

use std::{env, path::PathBuf};

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    // `image.ld` is on the search path via aarch64-rt's build script; add ours for `memory.ld`.
    println!("cargo:rustc-link-search={}", manifest_dir.display());
    println!("cargo:rustc-link-arg-bins=-Timage.ld");
    println!("cargo:rustc-link-arg-bins=-Tmemory.ld");
    println!("cargo:rerun-if-changed=memory.ld");
    println!("cargo:rerun-if-changed=build.rs");
}
