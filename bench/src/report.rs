//! Result files and the benchmark document.
//!
//! Every group's results go to `bench/results/<group>.json` (a `--quick`
//! run writes `bench/results/quick-<group>.json` instead), with the machine
//! facts, the samples and the derived statistics. `docs/benchmarks.md` and
//! its charts (`docs/bench/<group>.png`) are rendered from the full-run
//! files only, so a full run of a single group (`--only`) refreshes that
//! group's section and keeps the others.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};

use crate::{
    charts,
    harness::{fmt_value, median, Figure, Machine, Reference, Section},
};

/// Known groups, in document order; others follow alphabetically.
const ORDER: &[&str] = &[
    "per-packet",
    "pps",
    "e2e-keepalive",
    "e2e-newconn",
    "e2e-p50",
    "e2e-p99",
    "e2e-cpu",
    "failover",
    "replication-datapath",
    "replication",
    "maglev",
    "memory",
];

/// A figure as stored: the measured samples and what is derived from them.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct FigureRecord {
    #[serde(flatten)]
    pub figure: Figure,
    pub min: f64,
    pub median: f64,
    pub max: f64,
    /// median / the baseline case's median, if there is a baseline.
    pub ratio: Option<f64>,
}

/// One result file: a group of one run.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct GroupFile {
    pub group: String,
    pub quick: bool,
    pub machine: Machine,
    pub description: Option<String>,
    pub notes: Vec<String>,
    pub references: Vec<Reference>,
    pub figures: Vec<FigureRecord>,
    /// Set when the group's benchmark failed; figures may then be partial.
    pub error: Option<String>,
}

/// A record reads as its figure: `record.case`, `record.samples`.
impl std::ops::Deref for FigureRecord {
    type Target = Figure;

    fn deref(&self) -> &Figure {
        &self.figure
    }
}

impl GroupFile {
    /// Figures grouped by unit, in first-appearance order (one chart panel each).
    pub fn by_unit(&self) -> Vec<(String, Vec<&FigureRecord>)> {
        let mut out: Vec<(String, Vec<&FigureRecord>)> = Vec::new();
        for f in &self.figures {
            match out.iter_mut().find(|(u, _)| *u == f.unit) {
                Some((_, v)) => v.push(f),
                None => out.push((f.unit.clone(), vec![f])),
            }
        }
        out
    }
}

/// Computes ratios and order statistics of one group's figures.
pub fn records(figures: &[Figure]) -> Vec<FigureRecord> {
    figures
        .iter()
        .map(|f| {
            let ratio = f.baseline.as_ref().and_then(|b| {
                figures
                    .iter()
                    .find(|g| g.group == f.group && &g.case == b)
                    .map(|g| f.median() / g.median())
            });
            FigureRecord {
                figure: f.clone(),
                min: f.min(),
                median: f.median(),
                max: f.max(),
                ratio,
            }
        })
        .collect()
}

/// Problems that make numbers meaningless: no samples, non-finite values,
/// a baseline that is not in the group, a non-positive median where only
/// positive values make sense.
pub fn sanity(file: &GroupFile) -> Vec<String> {
    let mut problems = Vec::new();
    for f in &file.figures {
        let name = format!("{} / {}", f.group, f.case);
        if f.samples.is_empty() {
            problems.push(format!("{name}: no samples"));
            continue;
        }
        if f.samples.iter().any(|v| !v.is_finite()) {
            problems.push(format!("{name}: non-finite sample in {:?}", f.samples));
        }
        // Times, rates and sizes must be positive (a cost above a floor may
        // dip below zero in one sample, not in its median); counts and
        // fractions may be 0 legitimately (e.g. failed requests).
        const POSITIVE: &[&str] = &[
            "ns", "us", "µs", "ms", "s", "Mpps", "pps", "req/s", "conn/s", "Gbit/s", "MiB", "KiB",
            "B",
        ];
        if POSITIVE.contains(&f.unit.as_str()) && f.median <= 0.0 {
            problems.push(format!(
                "{name}: median {} {} is not positive",
                f.median, f.unit
            ));
        }
        if let Some(b) = &f.baseline {
            if f.ratio.is_none() {
                problems.push(format!("{name}: baseline {b:?} not found in the group"));
            }
        }
    }
    problems
}

/// Writes result files and renders the document.
pub struct Report {
    root: PathBuf,
    quick: bool,
    machine: Machine,
}

impl Report {
    /// `root` is the workspace root (bench/results and docs/ below it).
    pub fn new(root: &Path, quick: bool, machine: Machine) -> Self {
        Self {
            root: root.to_owned(),
            quick,
            machine,
        }
    }

    fn results_dir(&self) -> PathBuf {
        self.root.join("bench").join("results")
    }

    /// Writes one group's result file; returns it (with derived numbers).
    pub fn write_group(
        &self,
        section: &Section,
        description: Option<&str>,
        error: Option<String>,
    ) -> Result<GroupFile> {
        let file = GroupFile {
            group: section.group.clone(),
            quick: self.quick,
            machine: self.machine.clone(),
            description: description.map(str::to_owned),
            notes: section.notes.clone(),
            references: section.references.clone(),
            figures: records(&section.figures),
            error,
        };
        let dir = self.results_dir();
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = self.path(&section.group);
        let text = serde_json::to_string_pretty(&file)?;
        std::fs::write(&path, text + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(file)
    }

    fn path(&self, group: &str) -> PathBuf {
        let name = if self.quick {
            format!("quick-{group}.json")
        } else {
            format!("{group}.json")
        };
        self.results_dir().join(name)
    }

    /// Records that benchmark `name` failed: in its earlier result file if
    /// there is one (keeping those figures, marked as from an earlier run),
    /// else in a new file without figures.
    pub fn record_failure(&self, name: &str, description: Option<&str>, error: &str) -> Result<()> {
        let path = self.path(name);
        let message = format!("the run at commit {} failed: {error}", self.machine.commit);
        if let Ok(text) = std::fs::read_to_string(&path) {
            if let Ok(mut old) = serde_json::from_str::<GroupFile>(&text) {
                old.error = Some(format!(
                    "{message}; the figures are from the earlier run described below"
                ));
                std::fs::write(&path, serde_json::to_string_pretty(&old)? + "\n")?;
                return Ok(());
            }
        }
        let empty = Section {
            group: name.into(),
            ..Default::default()
        };
        self.write_group(&empty, description, Some(message))?;
        Ok(())
    }

    /// Every full-run result file, in document order.
    fn full_results(&self) -> Result<Vec<GroupFile>> {
        let mut files = Vec::new();
        let dir = self.results_dir();
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))?
        {
            let path = entry?.path();
            let name = path
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            if !name.ends_with(".json") || name.starts_with("quick-") {
                continue;
            }
            let text = std::fs::read_to_string(&path)?;
            match serde_json::from_str::<GroupFile>(&text) {
                Ok(f) if !f.quick => files.push(f),
                Ok(_) => {}
                Err(e) => eprintln!("warning: skipping {}: {e}", path.display()),
            }
        }
        let rank = |g: &str| ORDER.iter().position(|o| *o == g).unwrap_or(ORDER.len());
        files.sort_by(|a, b| (rank(&a.group), &a.group).cmp(&(rank(&b.group), &b.group)));
        Ok(files)
    }

    /// Renders docs/benchmarks.md and docs/bench/<group>.png from the
    /// full-run result files.
    pub fn render_docs(&self) -> Result<PathBuf> {
        let files = self.full_results()?;
        let chart_dir = self.root.join("docs").join("bench");
        std::fs::create_dir_all(&chart_dir)?;
        let mut charts_ok = BTreeMap::new();
        for f in &files {
            let path = chart_dir.join(format!("{}.png", f.group));
            match charts::draw_group(&path, f) {
                Ok(()) => {
                    charts_ok.insert(f.group.clone(), true);
                }
                Err(e) => eprintln!("warning: chart for {}: {e:#}", f.group),
            }
        }
        let md = render_markdown(&files, &charts_ok);
        let path = self.root.join("docs").join("benchmarks.md");
        std::fs::write(&path, md).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }
}

fn ratio_cell(f: &FigureRecord) -> String {
    match (&f.baseline, f.ratio) {
        (Some(b), Some(r)) => format!("{:.2}× {}", r, b),
        (Some(b), None) => format!("? ({b} missing)"),
        _ => String::new(),
    }
}

fn met_cell(m: Option<bool>) -> &'static str {
    match m {
        Some(true) => "yes",
        Some(false) => "**no**",
        None => "",
    }
}

fn machine_line(m: &Machine) -> String {
    format!(
        "kernel {}, {} ({} CPUs), commit {}, load average at start {}",
        m.kernel, m.cpu, m.cpus, m.commit, m.loadavg
    )
}

/// The whole document.
pub fn render_markdown(files: &[GroupFile], charts: &BTreeMap<String, bool>) -> String {
    let mut md = String::new();
    md += "# Benchmarks\n\n";
    md += "Generated by `cargo xtask bench` (the `xdplb-bench` crate in [bench/](../bench/); how \
           to run it and how to read the numbers: [bench/README.md](../bench/README.md)) from the \
           result files in `bench/results/`. Do not edit by hand: rerun the benchmarks.\n\n";
    md += "Method, for every figure: it is measured against a baseline in the same run, on the \
           same machine, repeated with the systems compared alternating; tables give min / median \
           / max over the repetitions and the ratio of the median to the baseline's median. The \
           machines are shared and noisy (2 cores); compare ratios rather than absolute numbers \
           across runs.\n\n";

    // Machine facts: once if every group agrees, else per group.
    let lines: Vec<String> = files.iter().map(|f| machine_line(&f.machine)).collect();
    let mut distinct = lines.clone();
    distinct.sort();
    distinct.dedup();
    if distinct.len() == 1 {
        let _ = writeln!(md, "Measured on: {}.\n", distinct[0]);
    } else {
        md += "Measured on (per group):\n\n";
        for (f, l) in files.iter().zip(&lines) {
            let _ = writeln!(md, "- {}: {l}", f.group);
        }
        md += "\n";
    }

    // Targets first: the short answer.
    let targeted: Vec<&FigureRecord> = files
        .iter()
        .flat_map(|f| &f.figures)
        .filter(|f| f.target.is_some())
        .collect();
    if !targeted.is_empty() {
        md += "## Targets\n\n| group | case | median | target | met |\n|---|---|---|---|---|\n";
        for f in targeted {
            let _ = writeln!(
                md,
                "| {} | {} | {} {} | {} | {} |",
                f.group,
                f.case,
                fmt_value(f.median),
                f.unit,
                f.target.as_deref().unwrap_or(""),
                met_cell(f.target_met)
            );
        }
        md += "\n";
    }

    for f in files {
        let _ = writeln!(md, "## {}\n", f.group);
        if let Some(e) = &f.error {
            let _ = writeln!(md, "**This group's last full run failed:** {e}\n");
        }
        if let Some(d) = &f.description {
            let _ = writeln!(md, "{}\n", d.trim());
        }
        md += "| case | min | median | max | unit | ratio vs baseline | target | met |\n";
        md += "|---|---:|---:|---:|---|---|---|---|\n";
        for r in &f.figures {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                r.case,
                fmt_value(r.min),
                fmt_value(r.median),
                fmt_value(r.max),
                r.unit,
                ratio_cell(r),
                r.target.as_deref().unwrap_or(""),
                met_cell(r.target_met)
            );
        }
        for r in &f.references {
            let _ = writeln!(
                md,
                "| *reference: {}* | | *{}* | | {} | | | |",
                r.case,
                fmt_value(r.value),
                r.unit
            );
        }
        md += "\n";
        if !f.references.is_empty() {
            let mut sources: Vec<&str> = f.references.iter().map(|r| r.source.as_str()).collect();
            sources.dedup();
            let _ = writeln!(
                md,
                "Reference rows (not measured by this run): {}\n",
                sources.join("; ")
            );
        }
        let counts = f.figures.iter().map(|r| r.samples.len());
        let (lo, hi) = (counts.clone().min().unwrap_or(0), counts.max().unwrap_or(0));
        let range = if lo == hi {
            lo.to_string()
        } else {
            format!("{lo}–{hi}")
        };
        let _ = writeln!(
            md,
            "Samples per figure: {range} (all of them are in `bench/results/{}.json`).\n",
            f.group
        );
        if charts.get(&f.group).copied().unwrap_or(false) {
            let _ = writeln!(
                md,
                "![{g}: medians, whiskers from min to max](bench/{g}.png)\n",
                g = f.group
            );
        }
        let notes: Vec<String> = f
            .figures
            .iter()
            .filter_map(|r| r.note.as_ref().map(|n| format!("- *{}*: {}", r.case, n)))
            .collect();
        if !notes.is_empty() {
            md += "Notes on the figures:\n\n";
            md += &notes.join("\n");
            md += "\n\n";
        }
        if !f.notes.is_empty() {
            for n in &f.notes {
                let _ = writeln!(md, "{}\n", n.trim_end());
            }
        }
    }
    md
}

/// Prints one group's table to stdout.
pub fn print_group(file: &GroupFile) {
    println!("\n== {} ==", file.group);
    let width = file
        .figures
        .iter()
        .map(|f| f.case.chars().count())
        .max()
        .unwrap_or(4)
        .max(4);
    for f in &file.figures {
        let ratio = ratio_cell(f);
        let target = match (&f.target, f.target_met) {
            (Some(t), Some(m)) => format!("  [{t}: {}]", if m { "met" } else { "MISSED" }),
            _ => String::new(),
        };
        println!(
            "  {:<width$}  min {:>9}  median {:>9}  max {:>9} {:<8} {}{}",
            f.case,
            fmt_value(f.min),
            fmt_value(f.median),
            fmt_value(f.max),
            f.unit,
            ratio,
            target
        );
    }
    for r in &file.references {
        println!(
            "  {:<width$}  reference {} {} ({})",
            r.case,
            fmt_value(r.value),
            r.unit,
            r.source
        );
    }
}

/// The median of a figure found by case name in `figures` (NaN if absent).
pub fn median_of(figures: &[Figure], case: &str) -> f64 {
    figures
        .iter()
        .find(|f| f.case == case)
        .map_or(f64::NAN, |f| median(&f.samples))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine() -> Machine {
        Machine {
            kernel: "k".into(),
            cpu: "c".into(),
            cpus: 2,
            commit: "abc".into(),
            started: 0,
            loadavg: "0".into(),
        }
    }

    #[test]
    fn ratios_and_markdown() {
        let figs = vec![
            Figure::new("g", "floor", "Mpps", vec![10.0, 12.0, 11.0], true),
            Figure::new("g", "lb", "Mpps", vec![9.0, 8.0, 8.5], true)
                .baseline("floor")
                .target(">= 0.8x floor", true),
        ];
        let recs = records(&figs);
        assert!((recs[1].ratio.unwrap() - 8.5 / 11.0).abs() < 1e-9);
        let file = GroupFile {
            group: "g".into(),
            quick: false,
            machine: machine(),
            description: Some("desc".into()),
            notes: vec!["a note".into()],
            references: vec![],
            figures: recs,
            error: None,
        };
        assert!(sanity(&file).is_empty());
        let md = render_markdown(&[file], &BTreeMap::new());
        assert!(
            md.contains(
                "| lb | 8.000 | 8.500 | 9.000 | Mpps | 0.77× floor | >= 0.8x floor | yes |"
            ),
            "{md}"
        );
    }
}
