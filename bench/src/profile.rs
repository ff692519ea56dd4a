//! Sampling profiles with `perf` (Debian's linux-perf), as evidence of
//! where a benchmark's time goes. These machines have no hardware PMU, so
//! the software `cpu-clock` event is sampled: a sample that falls while
//! interrupts are disabled (inside spin_lock_irqsave) is taken when they
//! are re-enabled, and so is charged to the unlock.

use std::{path::PathBuf, process::Command, time::Duration};

use anyhow::{bail, Context as _, Result};
use xdplb_tests::proc::Proc;

/// The hottest symbols of the calling thread (user and kernel) while `f`
/// ran on it: (percent of samples, symbol).
pub fn hottest<T>(limit: usize, f: impl FnOnce() -> Result<T>) -> Result<(T, Vec<(f64, String)>)> {
    if !xdplb_tests::which("perf") {
        bail!("perf not installed (Debian package linux-perf)");
    }
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    let data = PathBuf::from(format!(
        "/tmp/xdplb-bench-perf-{}-{tid}.data",
        std::process::id()
    ));
    let _cleanup = Remove(data.clone());
    let mut perf = Proc::spawn(
        Command::new("perf")
            .args([
                "record",
                "-q",
                "-e",
                "cpu-clock",
                "-F",
                "20000",
                "-t",
                &tid.to_string(),
                "-o",
            ])
            .arg(&data),
    )?;
    // perf prints nothing when it starts; give it time to open its events.
    std::thread::sleep(Duration::from_millis(500));
    let result = f();
    perf.kill(libc::SIGINT)?;
    if perf.wait_timeout(Duration::from_secs(20))?.is_none() {
        bail!("perf record did not stop");
    }
    let value = result?;
    let report = Command::new("perf")
        .args([
            "report",
            "--stdio",
            "--no-children",
            "--sort",
            "sym",
            "-q",
            "-i",
        ])
        .arg(&data)
        .output()
        .context("running perf report")?;
    if !report.status.success() {
        bail!(
            "perf report failed: {}",
            String::from_utf8_lossy(&report.stderr).trim()
        );
    }
    let mut rows = Vec::new();
    for line in String::from_utf8_lossy(&report.stdout).lines() {
        // "    12.34%  [k] htab_lru_map_update_elem"
        let mut words = line.split_whitespace();
        let (Some(pct), Some(_kind)) = (words.next(), words.next()) else {
            continue;
        };
        let Ok(pct) = pct.trim_end_matches('%').parse::<f64>() else {
            continue;
        };
        let sym: String = words.collect::<Vec<_>>().join(" ");
        rows.push((pct, sym));
        if rows.len() == limit {
            break;
        }
    }
    Ok((value, rows))
}

struct Remove(PathBuf);

impl Drop for Remove {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
        let _ = std::fs::remove_file(self.0.with_extension("data.old"));
    }
}
