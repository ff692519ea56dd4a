//! CPU counters read before and after a run: the whole machine's softirq
//! time (/proc/stat), one process's user+system time (/proc/PID/stat), and
//! one BPF program's own run time (`kernel.bpf_stats_enabled`).

use anyhow::{Context as _, Result};

fn tick_ns() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    1_000_000_000 / hz.max(1) as u64
}

/// Softirq time of all CPUs since boot, in ns (10 ms resolution).
pub fn softirq_ns() -> Result<u64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let cpu = stat.lines().next().context("empty /proc/stat")?;
    // "cpu  user nice system idle iowait irq softirq steal ..."
    let ticks: u64 = cpu
        .split_whitespace()
        .nth(7)
        .context("no softirq field")?
        .parse()?;
    Ok(ticks * tick_ns())
}

/// utime + stime of process `pid` (all its threads), in ns.
pub fn process_ns(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after "(comm)": state is field 3; utime, stime are 14, 15.
    let rest = stat.rsplit_once(')').context("bad /proc/PID/stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let (u, s): (u64, u64) = (f[11].parse()?, f[12].parse()?);
    Ok((u + s) * tick_ns())
}

/// (run_time_ns, run_cnt) of BPF program `id` (needs
/// `kernel.bpf_stats_enabled=1` while it runs).
pub fn bpf_prog_ns(id: u32) -> Result<(u64, u64)> {
    let out = std::process::Command::new("bpftool")
        .args(["prog", "show", "id", &id.to_string(), "--json"])
        .output()?;
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("bpftool prog show --json")?;
    Ok((
        v["run_time_ns"].as_u64().unwrap_or(0),
        v["run_cnt"].as_u64().unwrap_or(0),
    ))
}
