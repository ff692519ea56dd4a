//! Development tasks for xdplb: `cargo xtask <setup|test|demo|fuzz|bench|package>`.

mod package;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "xtask",
    bin_name = "cargo xtask",
    about = "xdplb development tasks"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what is missing to build and test xdplb (idempotent).
    Setup,
    /// setup, build, then run all tests serially (`-- ARGS` go to the test binaries).
    Test {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// setup, build, then run the demo (xdplb-demo in package xdplb-tests).
    Demo {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// setup, then run the packet fuzzer (tests/tests/fuzz.rs) for longer.
    Fuzz {
        /// Frames to send through the program.
        #[arg(long, default_value_t = 10_000_000)]
        frames: u64,
        /// Seed to replay (default: a fresh one, printed).
        #[arg(long)]
        seed: Option<String>,
    },
    /// setup, then run the benchmarks (package xdplb-bench) in release mode.
    Bench {
        /// A short run.
        #[arg(long)]
        quick: bool,
    },
    /// Build the Debian package (cargo-deb, installed if missing) into
    /// target/debian: binary, systemd unit, example config, man page,
    /// shell completions.
    Package {
        /// Cargo profile of the packaged binary.
        #[arg(long, default_value = "release")]
        profile: String,
        /// Package the binary already built (target/<profile>/xdplb).
        #[arg(long)]
        no_build: bool,
        /// Directory for the .deb.
        #[arg(long)]
        output: Option<PathBuf>,
        /// Faster, weaker compression.
        #[arg(long)]
        fast: bool,
    },
}

/// `cargo build` flags for everything that runs on the host: xdp-ebpf only
/// builds for the BPF target (xdp-userspace's build.rs builds it).
const HOST_PACKAGES: &[&str] = &["--workspace", "--exclude", "xdp-ebpf"];

fn main() -> ExitCode {
    match run(Cli::parse().cmd) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Setup => setup::run(),
        Cmd::Test { args } => {
            header(1, 3, "setup");
            setup::run()?;
            header(2, 3, "build");
            cargo_step(&["build"], &[HOST_PACKAGES, &["--bins"]], &[])?;
            header(3, 3, "test (serial)");
            cargo_test(&args)
        }
        Cmd::Demo { args } => {
            header(1, 3, "setup");
            setup::run()?;
            header(2, 3, "build");
            cargo_step(&["build"], &[HOST_PACKAGES, &["--bins"]], &[])?;
            header(3, 3, "demo");
            cargo_step(
                &[
                    "run",
                    "-q",
                    "-p",
                    "xdplb-tests",
                    "--bin",
                    "xdplb-demo",
                    "--",
                ],
                &[],
                &args,
            )
        }
        Cmd::Fuzz { frames, seed } => {
            header(1, 2, "setup");
            setup::run()?;
            header(2, 2, "fuzz");
            let mut cmd = cargo_cmd();
            cmd.args([
                "test",
                "-p",
                "xdplb-tests",
                "--test",
                "fuzz",
                "--",
                "--nocapture",
            ])
            .env("XDPLB_FUZZ_FRAMES", frames.to_string());
            if let Some(seed) = seed {
                cmd.env("XDPLB_FUZZ_SEED", seed);
            }
            let status = cmd.status().context("running the fuzzer")?;
            if !status.success() {
                bail!("the fuzzer failed: {status}");
            }
            Ok(())
        }
        Cmd::Package {
            profile,
            no_build,
            output,
            fast,
        } => package::run(&package::Options {
            profile,
            no_build,
            output,
            fast,
        })
        .map(drop),
        Cmd::Bench { quick } => {
            if !has_package("xdplb-bench")? {
                bail!("bench package not found: no package `xdplb-bench` in the workspace");
            }
            header(1, 2, "setup");
            setup::run()?;
            header(2, 2, "bench");
            let quick: &[&str] = if quick { &["--quick"] } else { &[] };
            cargo_step(
                &["run", "--release", "-p", "xdplb-bench", "--"],
                &[quick],
                &[],
            )
        }
    }
}

fn header(n: usize, of: usize, what: &str) {
    println!("\n==================== xtask [{n}/{of}] {what} ====================");
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace root")
        .to_path_buf()
}

fn cargo_cmd() -> Command {
    let mut cmd = Command::new(setup::cargo());
    cmd.current_dir(workspace_root());
    cmd
}

/// Runs cargo from the workspace root. If it fails, xtask exits right away
/// with cargo's exit status (128+signal if killed), after saying so.
fn cargo_step(first: &[&str], groups: &[&[&str]], extra: &[String]) -> Result<()> {
    let mut cmd = cargo_cmd();
    cmd.args(first);
    for g in groups {
        cmd.args(*g);
    }
    cmd.args(extra);
    let line = setup::cmdline(&cmd);
    println!("+ {line}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot run `{line}`"))?;
    if status.success() {
        return Ok(());
    }
    eprintln!("xtask: `{line}` failed: {status}");
    let code = status.code().unwrap_or_else(|| {
        use std::os::unix::process::ExitStatusExt as _;
        128 + status.signal().unwrap_or(0)
    });
    std::process::exit(if code == 0 { 1 } else { code });
}

/// Runs the test suite, echoing its output, and closes with one line that
/// totals every test binary's result: cargo's own last line is that of the
/// last (often empty) doc-test run, which says nothing about the suite.
fn cargo_test(extra: &[String]) -> Result<()> {
    use std::io::{BufRead as _, BufReader};
    let mut cmd = cargo_cmd();
    cmd.arg("test")
        .args(HOST_PACKAGES)
        .args(["--", "--test-threads=1"])
        .args(extra);
    let line = setup::cmdline(&cmd);
    println!("+ {line}");
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run `{line}`"))?;
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    for l in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let l = l?;
        println!("{l}");
        if let Some(rest) = l.strip_prefix("test result: ") {
            // "ok. 8 passed; 0 failed; 1 ignored; ..."
            for part in rest.split(';') {
                let mut words = part.split_whitespace().rev();
                let (Some(what), Some(n)) = (words.next(), words.next()) else {
                    continue;
                };
                let n: u64 = n
                    .trim_start_matches("ok.")
                    .trim_start_matches("FAILED.")
                    .trim()
                    .parse()
                    .unwrap_or(0);
                match what {
                    "passed" => passed += n,
                    "failed" => failed += n,
                    "ignored" => ignored += n,
                    _ => {}
                }
            }
        }
    }
    let status = child.wait()?;
    println!("\nsummary: {passed} passed, {failed} failed, {ignored} skipped");
    if !status.success() {
        eprintln!("xtask: `{line}` failed: {status}");
        std::process::exit(status.code().filter(|&c| c != 0).unwrap_or(1));
    }
    Ok(())
}

fn has_package(name: &str) -> Result<bool> {
    let mut cmd = cargo_cmd();
    cmd.args(["metadata", "--no-deps", "--format-version", "1"]);
    let out = cmd.output().context("cannot run `cargo metadata`")?;
    if !out.status.success() {
        bail!(
            "`cargo metadata` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    // Package objects start with name then version; dependencies with name then source.
    let needle = format!("\"name\":\"{name}\",\"version\"");
    Ok(String::from_utf8_lossy(&out.stdout).contains(&needle))
}
