//! `cargo xtask setup`: installs what building and testing xdplb needs, and
//! only what is missing. Idempotent: a second run only checks.
//!
//! On Debian (see /work/shared/toolchain.md for why this route):
//! 1. apt packages: Debian's Rust 1.96 with a prebuilt `core` for the BPF
//!    targets, LLVM 22 (to build bpf-linker), and the network tools the
//!    integration tests use;
//! 2. the rustup toolchain `debian-bpf` -> /usr, which xdp-userspace's
//!    build.rs uses to build the eBPF crate;
//! 3. bpf-linker 0.13.x built against LLVM 22, in ~/.cargo/bin;
//! 4. bpffs mounted on /sys/fs/bpf.
//!
//! Elsewhere it prints the usual aya route (nightly + rust-src) and fails
//! naming what is missing.

use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};

const TOOLCHAIN: &str = "debian-bpf";
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPFFS: &str = "/sys/fs/bpf";

/// Debian packages, and why each is needed.
const PACKAGES: &[(&str, &str)] = &[
    ("rustc-web", "rustc 1.96 for the debian-bpf toolchain"),
    ("cargo-web", "cargo 1.96 for the debian-bpf toolchain"),
    (
        "libstd-rust-web-dev-bpf",
        "prebuilt core for bpfel-unknown-none",
    ),
    ("llvm-22-dev", "building bpf-linker"),
    ("libpolly-22-dev", "building bpf-linker"),
    ("libzstd-dev", "building bpf-linker"),
    ("zlib1g-dev", "building bpf-linker"),
    ("iproute2", "tests: ip netns / veth"),
    ("ethtool", "tests: veth offloads"),
    ("iputils-ping", "tests: ping"),
    ("bpftool", "inspecting programs and maps"),
    ("prometheus", "tests: promtool checks the metrics scrape"),
    ("chromium", "tests: the status page in headless Chromium"),
    ("bird2", "tests: the cluster topology's BGP+BFD routers"),
    (
        "iptables",
        "tests: partitioning the cluster's replication link",
    ),
    ("systemd", "tests: systemd-analyze verify checks the unit"),
    (
        "keepalived",
        "bench: the VRRP active/standby baseline of node loss",
    ),
];

pub fn run() -> Result<()> {
    println!("xtask setup: checking the build and test prerequisites");
    add_cargo_bin_to_path();
    if Path::new("/etc/debian_version").exists() {
        debian()?;
        crate::package::ensure_cargo_deb()?;
    } else {
        other()?;
    }
    println!("xtask setup: done");
    Ok(())
}

fn debian() -> Result<()> {
    let root = is_root();

    // What is missing (all checks first, so a non-root user gets the whole list).
    let missing: Vec<&str> = PACKAGES
        .iter()
        .map(|(p, _)| *p)
        .filter(|p| !dpkg_installed(p))
        .collect();
    let toolchains = rustup_toolchains()?;
    let need_link = !toolchains.iter().any(|t| t == TOOLCHAIN);
    let linker = bpf_linker_version();
    let need_linker = !linker.as_deref().is_some_and(is_wanted_linker);
    let need_mount = !bpffs_mounted();

    for (p, why) in PACKAGES {
        let state = if missing.contains(p) { "MISSING" } else { "ok" };
        println!("  {state:<7} apt package {p} ({why})");
    }
    println!(
        "  {:<7} rustup toolchain {TOOLCHAIN}",
        if need_link { "MISSING" } else { "ok" }
    );
    println!(
        "  {:<7} bpf-linker {} (want {BPF_LINKER_VERSION})",
        if need_linker { "MISSING" } else { "ok" },
        linker.as_deref().unwrap_or("not found")
    );
    println!(
        "  {:<7} bpffs on {BPFFS}",
        if need_mount { "MISSING" } else { "ok" }
    );

    if missing.is_empty() && !need_link && !need_linker && !need_mount {
        println!("xtask setup: everything is in place, nothing to do");
        return Ok(());
    }
    if !root && (!missing.is_empty() || need_mount) {
        println!("\nxtask setup: not root; run these, then `cargo xtask setup` again:");
        if !missing.is_empty() {
            println!("  sudo apt-get update");
            println!(
                "  sudo apt-get install -y --no-install-recommends {}",
                missing.join(" ")
            );
        }
        if need_mount {
            println!("  sudo mount -t bpf bpf {BPFFS}");
        }
        bail!("setup needs root for: apt-get install / mount (see the commands above)");
    }

    if !missing.is_empty() {
        println!("xtask setup: installing {}", missing.join(" "));
        step(
            "apt-get update",
            Command::new("apt-get")
                .arg("update")
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
        step(
            "apt-get install",
            Command::new("apt-get")
                .args(["install", "-y", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }
    let core = Path::new("/usr/lib/rustlib/bpfel-unknown-none");
    if !core.is_dir() {
        bail!(
            "{} is missing although libstd-rust-web-dev-bpf is installed",
            core.display()
        );
    }

    if need_link {
        step(
            "link the debian-bpf toolchain",
            Command::new("rustup").args(["toolchain", "link", TOOLCHAIN, "/usr"]),
        )?;
    }

    if need_linker {
        install_bpf_linker()?;
    }

    if need_mount {
        step(
            "mount bpffs",
            Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]),
        )?;
    }
    Ok(())
}

fn install_bpf_linker() -> Result<()> {
    let install = |locked: bool| {
        let mut cmd = Command::new(cargo());
        cmd.args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION]);
        if locked {
            cmd.arg("--locked");
        }
        cmd.args(["--no-default-features", "--features", "llvm-22"])
            .env("LLVM_PREFIX", LLVM_PREFIX)
            // Away from the workspace, so its .cargo/config.toml does not apply.
            .current_dir(std::env::temp_dir());
        cmd
    };
    println!(
        "xtask setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about a minute)"
    );
    if let Err(e) = step("cargo install bpf-linker (--locked)", &mut install(true)) {
        println!("xtask setup: {e:#}; retrying without --locked");
        step("cargo install bpf-linker", &mut install(false))?;
    }
    match bpf_linker_version() {
        Some(v) if is_wanted_linker(&v) => Ok(()),
        v => bail!(
            "bpf-linker {BPF_LINKER_VERSION} was installed in {}, but `bpf-linker --version` on \
                PATH gives {:?}: \
             put that directory first on PATH",
            cargo_bin().display(),
            v
        ),
    }
}

/// Not Debian: print the usual aya route and fail if something is missing.
fn other() -> Result<()> {
    println!("xtask setup: not Debian (no /etc/debian_version); not installing anything.");
    let mut missing = Vec::new();
    if bpf_linker_version().is_none() {
        missing.push("bpf-linker on PATH".to_string());
    }
    match std::env::var("XDPLB_EBPF_TOOLCHAIN") {
        Err(_) => missing.push("XDPLB_EBPF_TOOLCHAIN (e.g. nightly with rust-src)".to_string()),
        Ok(t) => {
            let have = rustup_toolchains()
                .unwrap_or_default()
                .iter()
                .any(|n| *n == t || n.starts_with(&format!("{t}-")));
            if !have {
                missing.push(format!("rustup toolchain {t} (XDPLB_EBPF_TOOLCHAIN)"));
            }
        }
    }
    if !bpffs_mounted() {
        missing.push(format!("bpffs on {BPFFS}"));
    }
    if missing.is_empty() {
        println!("xtask setup: bpf-linker, the eBPF toolchain and bpffs are present");
        return Ok(());
    }
    println!(
        "\nThe standard aya route:\n  \
         rustup toolchain install nightly --component rust-src\n  \
         cargo install bpf-linker\n  \
         sudo mount -t bpf bpf {BPFFS}\n  \
         export XDPLB_EBPF_TOOLCHAIN=nightly   # then cargo xtask test\n"
    );
    bail!("missing: {}", missing.join(", "))
}

/// Runs a step with inherited stdio, echoing it; the error names the step
/// and the command line.
fn step(what: &str, cmd: &mut Command) -> Result<()> {
    let line = cmdline(cmd);
    println!("+ {line}");
    let status = cmd
        .status()
        .with_context(|| format!("step `{what}` failed: cannot run `{line}`"))?;
    if !status.success() {
        bail!("step `{what}` failed: `{line}` exited with {status}");
    }
    Ok(())
}

/// Runs a query quietly; None if it cannot run or fails.
fn query(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

pub fn cmdline(cmd: &Command) -> String {
    let mut parts: Vec<String> = cmd
        .get_envs()
        .filter_map(|(k, v)| Some(format!("{}={}", k.to_string_lossy(), v?.to_string_lossy())))
        .collect();
    parts.push(cmd.get_program().to_string_lossy().into_owned());
    parts.extend(
        cmd.get_args()
            .map(|a: &OsStr| a.to_string_lossy().into_owned()),
    );
    parts.join(" ")
}

fn dpkg_installed(pkg: &str) -> bool {
    query("dpkg-query", &["-W", "-f=${Status}", pkg]).as_deref() == Some("install ok installed")
}

fn rustup_toolchains() -> Result<Vec<String>> {
    let out = query("rustup", &["toolchain", "list"]).context(
        "step `check rustup toolchains` failed: `rustup toolchain list` (is rustup installed?)",
    )?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect())
}

/// "bpf-linker 0.13.0" -> Some("0.13.0").
fn bpf_linker_version() -> Option<String> {
    let out = query("bpf-linker", &["--version"])?;
    Some(out.split_whitespace().nth(1).unwrap_or(&out).to_string())
}

fn is_wanted_linker(version: &str) -> bool {
    version.starts_with("0.13.")
}

fn bpffs_mounted() -> bool {
    std::fs::read_to_string("/proc/mounts").is_ok_and(|m| {
        m.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 2 && f[1] == BPFFS && f[2] == "bpf"
        })
    })
}

fn is_root() -> bool {
    // The second field of "Uid:" is the effective uid.
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().nth(1))
            == Some("0")
    })
}

pub fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

fn cargo_bin() -> PathBuf {
    match std::env::var_os("CARGO_HOME") {
        Some(h) => PathBuf::from(h).join("bin"),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cargo/bin"),
    }
}

/// bpf-linker lands in ~/.cargo/bin; the eBPF build (and our checks) look
/// for it on PATH. Called before any other thread exists.
fn add_cargo_bin_to_path() {
    let bin = cargo_bin();
    let path = std::env::var_os("PATH").unwrap_or_default();
    if !std::env::split_paths(&path).any(|p| p == bin) {
        let joined = std::env::join_paths(std::iter::once(bin).chain(std::env::split_paths(&path)));
        if let Ok(joined) = joined {
            std::env::set_var("PATH", joined);
        }
    }
}
