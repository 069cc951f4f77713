//! Builds the kernel relay (`proxy-ebpf`) for the BPF target and leaves the object in
//! `$OUT_DIR/proxy-ebpf`, where `src/ebpf.rs` embeds it with `include_bytes_aligned!`.
//!
//! aya-build runs `cargo +nightly build -Z build-std=core --target bpfel-unknown-none` in a
//! target directory of its own under `OUT_DIR` (needs the nightly toolchain with rust-src and
//! `bpf-linker` on PATH). `AYA_BUILD_SKIP=1` skips that build; an empty object is left instead,
//! so the crate still compiles and the proxy reports the kernel relay as unavailable.
//!
//! `cargo xtask` builds the programs first, as a step of its own whose progress shows (a build
//! script can only show a nested build's output as warnings), and names the object in
//! `WSPROXY_EBPF_OBJECT`; this script then embeds that object as it is.

use std::{env, fs, path::PathBuf};

use anyhow::{Context as _, anyhow};

/// Name of the eBPF package and of its binary (the object file).
const EBPF_PACKAGE: &str = "proxy-ebpf";
/// Set by `cargo xtask`: a kernel object it built.
const PREBUILT: &str = "WSPROXY_EBPF_OBJECT";

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?);
    let workspace = manifest_dir.parent().ok_or_else(|| anyhow!("proxy/ has no parent"))?;

    // aya-build watches the eBPF package; the object also depends on the shared layout and on the
    // locked versions of aya-ebpf.
    for watched in ["proxy-common", "Cargo.lock"] {
        println!("cargo:rerun-if-changed={}", workspace.join(watched).display());
    }

    let object = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR")?).join(EBPF_PACKAGE);
    println!("cargo:rerun-if-env-changed={PREBUILT}");
    if let Some(prebuilt) = env::var_os(PREBUILT) {
        println!("cargo:rerun-if-changed={}", PathBuf::from(&prebuilt).display());
        fs::copy(&prebuilt, &object)
            .with_context(|| format!("copying {PREBUILT}={}", PathBuf::from(&prebuilt).display()))?;
        return Ok(());
    }

    let ebpf_dir = workspace.join(EBPF_PACKAGE);
    let ebpf_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", ebpf_dir.display()))?;
    let package = aya_build::Package {
        name: EBPF_PACKAGE,
        root_dir: ebpf_dir,
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::default())?;

    if !object.exists() {
        // Only when AYA_BUILD_SKIP is set: keep `include_bytes!` compiling.
        fs::write(&object, []).with_context(|| format!("writing {}", object.display()))?;
    }
    Ok(())
}
