//! Types and helpers every benchmark shares: options, figures, machine
//! facts, CPU pinning, RAII guards for what a benchmark creates.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
};

use anyhow::{bail, Context as _, Result};

/// What the benchmarks are asked to do.
pub struct Opts {
    /// A short run: checks that the harness works and numbers are sane.
    pub quick: bool,
    /// The `xdplb` binary (target/release/xdplb, or debug).
    pub xdplb: PathBuf,
    /// The `xdplb-testbackend` binary.
    pub testbackend: PathBuf,
}

/// One measured quantity: a sample per repetition.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Figure {
    /// e.g. "per-packet", "pps", "e2e-keepalive", "e2e-newconn", "failover", "maglev", "memory".
    pub group: String,
    /// e.g. "dsr established flow".
    pub case: String,
    /// "ns", "Mpps", "req/s", "ms", "MiB", "fraction".
    pub unit: String,
    /// One per repetition.
    pub samples: Vec<f64>,
    /// Case name (same group) this is compared to; ratio = median / baseline median.
    pub baseline: Option<String>,
    pub higher_is_better: bool,
    /// Human-readable target, e.g. "<= 180 ns above XDP_PASS" or ">= 0.8x floor".
    pub target: Option<String>,
    pub target_met: Option<bool>,
    pub note: Option<String>,
}

impl Figure {
    /// A figure with no baseline, target or note.
    pub fn new(
        group: &str,
        case: &str,
        unit: &str,
        samples: Vec<f64>,
        higher_is_better: bool,
    ) -> Self {
        Self {
            group: group.into(),
            case: case.into(),
            unit: unit.into(),
            samples,
            baseline: None,
            higher_is_better,
            target: None,
            target_met: None,
            note: None,
        }
    }

    pub fn baseline(mut self, case: &str) -> Self {
        self.baseline = Some(case.into());
        self
    }

    /// Sets the target and whether the median meets it.
    pub fn target(mut self, target: &str, met: bool) -> Self {
        self.target = Some(target.into());
        self.target_met = Some(met);
        self
    }

    pub fn note(mut self, note: impl Into<String>) -> Self {
        self.note = Some(note.into());
        self
    }

    pub fn min(&self) -> f64 {
        self.samples.iter().copied().fold(f64::INFINITY, f64::min)
    }

    pub fn median(&self) -> f64 {
        median(&self.samples)
    }

    pub fn max(&self) -> f64 {
        self.samples
            .iter()
            .copied()
            .fold(f64::NEG_INFINITY, f64::max)
    }
}

/// Median of `values` (mean of the middle two for an even count; NaN if empty).
pub fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// A number measured elsewhere, shown next to a group's figures for
/// comparison (never a target, never measured by this run).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Reference {
    pub case: String,
    pub unit: String,
    pub value: f64,
    pub source: String,
}

/// One group's results: figures, plus reference rows and notes (method,
/// profiling evidence) for the report.
#[derive(Clone, Debug, Default)]
pub struct Section {
    pub group: String,
    pub figures: Vec<Figure>,
    pub references: Vec<Reference>,
    pub notes: Vec<String>,
    /// Sanity checks that failed (orderings that must hold whatever the
    /// machine); reported, and they make the run exit non-zero.
    pub problems: Vec<String>,
}

/// Where and on what a run happened; recorded in every result file.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Machine {
    pub kernel: String,
    pub cpu: String,
    pub cpus: usize,
    pub commit: String,
    /// Seconds since the Unix epoch at the start of the run.
    pub started: u64,
    /// /proc/loadavg at the start of the run: how busy the shared machine was.
    pub loadavg: String,
}

impl Machine {
    pub fn probe(root: &Path) -> Self {
        let out = |cmd: &mut Command| {
            cmd.output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
                .unwrap_or_else(|| "unknown".into())
        };
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".into());
        Self {
            kernel: out(Command::new("uname").arg("-r")),
            cpu,
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            commit: out(Command::new("git")
                .args(["rev-parse", "--short", "HEAD"])
                .current_dir(root)),
            started: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            loadavg: std::fs::read_to_string("/proc/loadavg")
                .unwrap_or_default()
                .trim()
                .to_owned(),
        }
    }
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

/// Makes SIGINT and SIGTERM set a flag that [`interrupted`] turns into an
/// error, so a benchmark stops at its next check and its guards remove
/// what it created (instead of the process dying with namespaces and pins
/// left behind).
/// Runs `f`, turning a panic into an error: one benchmark that panics
/// must not cost the others their figures.
pub fn catch<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()));
        Err(anyhow::anyhow!("panicked: {}", msg.unwrap_or_default()))
    })
}

pub fn catch_interrupts() {
    // SAFETY: the handler only stores to an atomic (async-signal-safe).
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
}

/// Fails once SIGINT or SIGTERM arrived; call it in long loops.
pub fn interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    Ok(())
}

/// Aggregate CPU time counters from /proc/stat: (total, steal, idle), in ticks.
pub fn cpu_times() -> (u64, u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return (0, 0, 0);
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal guest guest_nice;
    // guest time is already counted in user.
    let total = v.iter().take(8).sum();
    (
        total,
        v.get(7).copied().unwrap_or(0),
        v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0),
    )
}

/// A line on how busy the machine was between two `cpu_times` readings.
pub fn busy_note(before: (u64, u64, u64), after: (u64, u64, u64)) -> String {
    let total = after.0.saturating_sub(before.0).max(1) as f64;
    let steal = after.1.saturating_sub(before.1) as f64 / total * 100.0;
    let busy = 100.0 - after.2.saturating_sub(before.2) as f64 / total * 100.0;
    format!(
        "While this group ran, the machine's CPUs were {busy:.0} % busy (this benchmark included) \
         and the hypervisor stole {steal:.1} % of their time; load average at the end: {}.",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    )
}

/// Runs `f` on a fresh thread pinned to `cpu` (sched_setaffinity), so the
/// caller's thread keeps its affinity. A panic in `f` is re-raised.
pub fn on_cpu<T: Send>(cpu: usize, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        let handle = s.spawn(move || {
            pin_current_thread(cpu).expect("pinning the benchmark thread");
            f()
        });
        match handle.join() {
            Ok(v) => v,
            Err(payload) => std::panic::resume_unwind(payload),
        }
    })
}

/// Pins the calling thread to `cpu`.
pub fn pin_current_thread(cpu: usize) -> Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_SET writes inside it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            bail!(
                "sched_setaffinity(cpu {cpu}): {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

/// Runs a command to completion and returns its stdout, or an error with
/// its stderr.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Installs the Debian packages in `packages` ((name, why) pairs) that are
/// missing, with apt-get. Only on Debian and as root; elsewhere it fails
/// naming them.
pub fn ensure_apt(packages: &[(&str, &str)]) -> Result<()> {
    let installed = |p: &str| {
        Command::new("dpkg-query")
            .args(["-W", "-f=${Status}", p])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
    };
    let missing: Vec<&str> = packages
        .iter()
        .map(|(p, _)| *p)
        .filter(|p| !installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    for (p, why) in packages.iter().filter(|(p, _)| missing.contains(p)) {
        println!("bench setup: installing {p} ({why})");
    }
    // SAFETY: geteuid has no preconditions.
    if !Path::new("/etc/debian_version").exists() || unsafe { libc::geteuid() } != 0 {
        bail!(
            "missing packages (install them, as root): {}",
            missing.join(" ")
        );
    }
    let apt = |args: &[&str]| -> Result<()> {
        let status = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("running apt-get")?;
        if !status.success() {
            bail!("apt-get {} failed: {status}", args.join(" "));
        }
        Ok(())
    };
    apt(&["update", "-q"])?;
    let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
    args.extend(&missing);
    apt(&args)
}

/// Formats a value with a sensible number of significant digits.
pub fn fmt_value(v: f64) -> String {
    if !v.is_finite() {
        return format!("{v}");
    }
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if a >= 1000.0 {
        format!("{v:.0}")
    } else if a >= 100.0 {
        format!("{v:.1}")
    } else if a >= 10.0 {
        format!("{v:.2}")
    } else if a >= 0.01 {
        format!("{v:.3}")
    } else {
        format!("{v:.2e}")
    }
}

/// The resident memory of `pid` (the sum of its mappings' `Rss` in
/// `/proc/PID/smaps`, which is `VmRSS`) less its memory-mapped BPF maps (the
/// Maglev array, the flow-event ring), in MiB. Those pages are the maps' own
/// kernel memory, counted once by the memory group's "kernel" rows;
/// mapping them adds nothing.
pub fn rss_mib(pid: u32) -> Result<f64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    let (mut kib, mut bpf_map) = (0.0, false);
    for line in smaps.lines() {
        let Some(field) = line.split_whitespace().next() else {
            continue;
        };
        if !field.ends_with(':') {
            // A mapping's header line: its address range, ..., its name.
            bpf_map = line.ends_with("anon_inode:bpf-map");
        } else if field == "Rss:" && !bpf_map {
            kib += line[4..]
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<f64>()?;
        }
    }
    Ok(kib / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_statistics() {
        let f = Figure::new("g", "c", "ns", vec![5.0, 1.0, 3.0, 2.0], false);
        assert_eq!((f.min(), f.median(), f.max()), (1.0, 2.5, 5.0));
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert!(median(&[]).is_nan());
    }
}
