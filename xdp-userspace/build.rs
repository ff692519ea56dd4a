//! Builds the XDP program (xdp-ebpf) for the BPF target and leaves the object
//! in OUT_DIR, where `src/program.rs` embeds it: a plain `cargo build`
//! rebuilds the datapath whenever its source changes.

use anyhow::{anyhow, Context as _};
use aya_build::{Package, Toolchain};

/// The rustup toolchain that builds the eBPF crate. `cargo xtask setup`
/// creates it (Debian's rustc with a prebuilt `core` for the BPF targets);
/// XDPLB_EBPF_TOOLCHAIN overrides it, e.g. with `nightly` where rust-src
/// can be installed.
const DEFAULT_TOOLCHAIN: &str = "debian-bpf";

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=XDPLB_EBPF_TOOLCHAIN");
    let toolchain =
        std::env::var("XDPLB_EBPF_TOOLCHAIN").unwrap_or_else(|_| DEFAULT_TOOLCHAIN.into());
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .iter()
        .find(|p| p.name == "xdp-ebpf")
        .ok_or_else(|| anyhow!("xdp-ebpf package not found in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", ebpf.manifest_path))?;
    // aya-ebpf needs unstable features; naming only that crate here keeps
    // the stable Debian compiler from building `core` itself (aya-build adds
    // -Z build-std when RUSTC_BOOTSTRAP is "1" or names the eBPF package).
    std::env::set_var("RUSTC_BOOTSTRAP", "aya_ebpf");
    aya_build::build_ebpf(
        [Package {
            name: "xdp-ebpf",
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        Toolchain::Custom(&toolchain),
    )
}
