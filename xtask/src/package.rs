//! `cargo xtask package`: the Debian package, built by cargo-deb from
//! xdp-userspace's `[package.metadata.deb]`. The man page and the shell
//! completions are generated here from the binary being packaged.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use crate::{cargo_cmd, setup, workspace_root};

/// The cargo-deb release installed when none is: 3.8.0 builds with Rust 1.95.
const CARGO_DEB_VERSION: &str = "3.8.0";

/// Where the generated man page and completions go (the paths the package
/// metadata names).
const ASSETS: &str = "target/package-assets";

/// What `cargo xtask package` was asked.
pub struct Options {
    /// Cargo profile of the binary: "release" (default) or "dev".
    pub profile: String,
    /// Package the binary already built instead of building it.
    pub no_build: bool,
    /// Directory for the .deb (default: target/debian).
    pub output: Option<PathBuf>,
    /// Faster, weaker compression (for tests).
    pub fast: bool,
}

/// Builds the package; returns the path of the .deb.
pub fn run(opts: &Options) -> Result<PathBuf> {
    ensure_cargo_deb()?;
    let root = workspace_root();
    let profile_dir = if opts.profile == "dev" {
        "debug"
    } else {
        &opts.profile
    };
    if !opts.no_build {
        let mut cmd = cargo_cmd();
        cmd.args(["build", "--profile", &opts.profile, "-p", "xdp-userspace"])
            .args(["--bin", "xdplb"]);
        run_step("build xdplb", &mut cmd)?;
    }
    let binary = root.join("target").join(profile_dir).join("xdplb");
    if !binary.exists() {
        bail!(
            "{} does not exist: build it, or drop --no-build",
            binary.display()
        );
    }
    generate_assets(&binary, &root.join(ASSETS))?;

    let output = opts
        .output
        .clone()
        .unwrap_or_else(|| root.join("target/debian"));
    fs::create_dir_all(&output).with_context(|| format!("creating {}", output.display()))?;
    let mut cmd = cargo_cmd();
    // Stripped: a debug build's symbols are most of its size.
    cmd.args(["deb", "-p", "xdp-userspace", "--no-build", "--strip"])
        .args(["--profile", &opts.profile])
        .arg("--output")
        .arg(&output);
    if opts.fast {
        cmd.arg("--fast");
    }
    let out = cmd.output().context("running cargo deb")?;
    if !out.status.success() {
        bail!(
            "`{}` failed: {}",
            setup::cmdline(&cmd),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    // cargo-deb prints the path of the package it wrote.
    let deb = String::from_utf8_lossy(&out.stdout)
        .lines()
        .rev()
        .find(|l| l.trim().ends_with(".deb"))
        .map(|l| PathBuf::from(l.trim()))
        .context("cargo deb did not print the package's path")?;
    println!("{}", deb.display());
    Ok(deb)
}

/// Installs cargo-deb unless `cargo deb` already runs (setup calls it too,
/// so the packaging test finds it).
pub(crate) fn ensure_cargo_deb() -> Result<()> {
    let present = Command::new(setup::cargo())
        .args(["deb", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if present {
        return Ok(());
    }
    println!("xtask package: installing cargo-deb {CARGO_DEB_VERSION} (a few minutes)");
    let mut cmd = Command::new(setup::cargo());
    cmd.args([
        "install",
        "cargo-deb",
        "--locked",
        "--version",
        CARGO_DEB_VERSION,
    ])
    .current_dir(std::env::temp_dir());
    run_step("cargo install cargo-deb", &mut cmd)
}

/// The man page (gzipped, as Debian wants) and bash, zsh and fish
/// completions, from `binary man` and `binary completions SHELL`.
fn generate_assets(binary: &Path, dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let capture = |args: &[&str]| -> Result<Vec<u8>> {
        let out = Command::new(binary)
            .args(args)
            .output()
            .with_context(|| format!("running {}", binary.display()))?;
        if !out.status.success() {
            bail!(
                "xdplb {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(out.stdout)
    };
    let man = dir.join("xdplb.1");
    fs::write(&man, capture(&["man"])?)?;
    // -n: no name or time stamp inside, so the package is reproducible.
    run_step(
        "gzip the man page",
        Command::new("gzip").args(["-9nf"]).arg(&man),
    )?;
    for (shell, file) in [
        ("bash", "xdplb.bash"),
        ("zsh", "_xdplb"),
        ("fish", "xdplb.fish"),
    ] {
        fs::write(dir.join(file), capture(&["completions", shell])?)?;
    }
    Ok(())
}

fn run_step(what: &str, cmd: &mut Command) -> Result<()> {
    let line = setup::cmdline(cmd);
    println!("+ {line}");
    let status = cmd
        .status()
        .with_context(|| format!("{what}: cannot run `{line}`"))?;
    if !status.success() {
        bail!("{what}: `{line}` exited with {status}");
    }
    Ok(())
}
