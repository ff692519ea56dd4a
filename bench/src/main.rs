//! `xdplb-bench`: the benchmarks behind docs/benchmarks.md.
//!
//! `cargo xtask bench [--quick]` runs `cargo run --release -p xdplb-bench --
//! [--quick]`. See bench/README.md for what each figure means.

mod charts;
mod e2e;
mod failover;
mod fixture;
mod frames;
mod harness;
mod maglev;
mod memory;
mod node_loss;
mod perpacket;
mod pps;
mod profile;
mod replication;
mod report;
mod scale;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    time::Instant,
};

use anyhow::{bail, Context as _, Result};
use harness::{Figure, Machine, Opts, Section};
use report::Report;

/// A benchmark: a name for `--only`, and how to run it.
struct Bench {
    name: &'static str,
    run: fn(&Opts) -> Result<Vec<Section>>,
}

fn one(section: Result<Section>) -> Result<Vec<Section>> {
    section.map(|s| vec![s])
}

/// Figures of possibly several groups, one section per group.
fn sections(figures: Result<Vec<Figure>>) -> Result<Vec<Section>> {
    let mut groups: Vec<Section> = Vec::new();
    for f in figures? {
        match groups.iter_mut().find(|s| s.group == f.group) {
            Some(s) => s.figures.push(f),
            None => groups.push(Section {
                group: f.group.clone(),
                figures: vec![f],
                ..Default::default()
            }),
        }
    }
    Ok(groups)
}

const BENCHES: &[Bench] = &[
    Bench {
        name: "per-packet",
        run: perpacket::run,
    },
    Bench {
        name: "pps",
        run: pps::run,
    },
    Bench {
        name: "maglev",
        run: |o| one(maglev::run(o)),
    },
    Bench {
        name: "memory",
        run: |o| one(memory::run(o)),
    },
    Bench {
        name: "e2e",
        run: |o| sections(e2e::run(o)),
    },
    Bench {
        name: "failover",
        run: |o| sections(failover::run(o)),
    },
    Bench {
        name: "replication",
        run: replication::run,
    },
    Bench {
        name: "node-loss",
        run: node_loss::run,
    },
    Bench {
        name: "control-plane",
        run: |o| one(scale::run(o)),
    },
];

/// The method text of the groups this crate measures itself.
fn description(group: &str) -> Option<&'static str> {
    match group {
        perpacket::GROUP => Some(perpacket::DESCRIPTION),
        perpacket::REPLICATION_GROUP => Some(perpacket::REPLICATION_DESCRIPTION),
        pps::GROUP => Some(pps::DESCRIPTION),
        maglev::GROUP => Some(maglev::DESCRIPTION),
        memory::GROUP => Some(memory::DESCRIPTION),
        node_loss::GROUP => Some(node_loss::DESCRIPTION),
        failover::GROUP => Some(failover::DESCRIPTION),
        replication::GROUP => Some(replication::DESCRIPTION),
        scale::GROUP => Some(scale::DESCRIPTION),
        g if g.starts_with("e2e") => Some(e2e::DESCRIPTION),
        _ => None,
    }
}

struct Args {
    quick: bool,
    only: Option<Vec<String>>,
    build: bool,
}

fn usage() -> ! {
    eprintln!(
        "usage: xdplb-bench [--quick] [--only NAME[,NAME...]] [--no-build]\n\
         benchmarks: {}",
        BENCHES
            .iter()
            .map(|b| b.name)
            .collect::<Vec<_>>()
            .join(", ")
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut args = Args {
        quick: false,
        only: None,
        build: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => args.quick = true,
            "--no-build" => args.build = false,
            "--only" => {
                let list = it.next().unwrap_or_else(|| usage());
                let names: Vec<String> = list.split(',').map(str::to_owned).collect();
                if let Some(bad) = names
                    .iter()
                    .find(|n| !BENCHES.iter().any(|b| b.name == n.as_str()))
                {
                    eprintln!("unknown benchmark {bad:?}");
                    usage();
                }
                args.only = Some(names);
            }
            _ => usage(),
        }
    }
    args
}

/// The workspace root (bench/results and docs/ live below it).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("bench/ is inside the workspace")
        .to_owned()
}

/// Builds the binaries the end-to-end and memory benchmarks run, in the
/// profile this binary was built in (`cargo run -p xdplb-bench` builds only
/// this package's dependencies' libraries, not their binaries).
fn build_binaries(root: &Path, profile_dir: &Path) -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root)
        .args(["build", "--bin", "xdplb", "--bin", "xdplb-testbackend"]);
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    println!("bench setup: building xdplb and xdplb-testbackend");
    let status = cmd.status().context("running cargo build")?;
    if !status.success() {
        bail!("building xdplb and xdplb-testbackend failed: {status}");
    }
    Ok(())
}

/// Network namespaces or bpffs pins this process left behind.
fn leftovers() -> Vec<String> {
    let pid = std::process::id().to_string();
    let mut left = Vec::new();
    if let Ok(list) = xdplb_tests::netns::list() {
        left.extend(
            list.into_iter()
                .filter(|n| n.contains(&pid))
                .map(|n| format!("network namespace {n}")),
        );
    }
    if let Ok(dir) = std::fs::read_dir("/sys/fs/bpf") {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.contains(&pid) {
                left.push(format!("/sys/fs/bpf/{name}"));
            }
        }
    }
    left
}

fn main() -> ExitCode {
    match real_main() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("xdplb-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> Result<bool> {
    let args = parse_args();
    let started = Instant::now();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "the benchmarks need root (BPF, network namespaces); run `sudo -E cargo xtask bench`"
        );
    }
    harness::catch_interrupts();
    let root = root();
    if let Err(e) = harness::ensure_apt(&[
        ("fonts-dejavu-core", "text in the charts"),
        ("bpftool", "program instruction counts, map memory"),
        ("iproute2", "namespaces and veths"),
        ("ethtool", "veth settings"),
    ]) {
        eprintln!("warning: bench setup: {e:#}");
    }
    let exe = std::env::current_exe()?;
    let profile_dir = exe
        .parent()
        .context("executable has no directory")?
        .to_owned();
    if args.build {
        build_binaries(&root, &profile_dir)?;
    }
    let opts = Opts {
        quick: args.quick,
        xdplb: profile_dir.join("xdplb"),
        testbackend: profile_dir.join("xdplb-testbackend"),
    };
    let machine = Machine::probe(&root);
    println!(
        "xdplb-bench{}: kernel {}, {} ({} CPUs), commit {}, load {}",
        if opts.quick { " --quick" } else { "" },
        machine.kernel,
        machine.cpu,
        machine.cpus,
        machine.commit,
        machine.loadavg
    );
    let report = Report::new(&root, opts.quick, machine);

    let mut ok = true;
    let mut timings = BTreeMap::new();
    for bench in BENCHES {
        if args
            .only
            .as_ref()
            .is_some_and(|o| !o.iter().any(|n| n == bench.name))
        {
            continue;
        }
        if harness::interrupted().is_err() {
            bail!("interrupted; results of the benchmarks that finished are in bench/results/");
        }
        println!("\n### {}", bench.name);
        let t = Instant::now();
        let cpu_before = harness::cpu_times();
        let result = harness::catch(|| (bench.run)(&opts));
        timings.insert(bench.name, t.elapsed());
        let busy = harness::busy_note(cpu_before, harness::cpu_times());
        match result {
            Ok(sections) => {
                for mut s in sections {
                    s.notes.push(busy.clone());
                    let file = report.write_group(&s, description(&s.group), None)?;
                    report::print_group(&file);
                    for p in s.problems.iter().chain(&report::sanity(&file)) {
                        eprintln!("  PROBLEM: {p}");
                        ok = false;
                    }
                }
            }
            Err(e) => {
                eprintln!("  FAILED: {e:#}");
                ok = false;
                if harness::interrupted().is_err() {
                    bail!(
                        "interrupted; results of the benchmarks that finished are in \
                        bench/results/"
                    );
                }
                report.record_failure(bench.name, description(bench.name), &format!("{e:#}"))?;
            }
        }
    }

    if !opts.quick {
        let path = report.render_docs()?;
        println!("\nwrote {}", path.display());
    }
    let left = leftovers();
    for l in &left {
        eprintln!("PROBLEM: left behind: {l}");
        ok = false;
    }
    println!(
        "\nxdplb-bench: {} in {:.0?} ({})",
        if ok {
            "done"
        } else {
            "done, WITH PROBLEMS (see above)"
        },
        started.elapsed(),
        timings
            .iter()
            .map(|(n, d)| format!("{n} {d:.0?}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(ok)
}
