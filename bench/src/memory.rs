//! Memory (group "memory"): the daemon's resident memory with 1 and 100
//! services, and the kernel memory of the datapath's maps.
//!
//! The real `xdplb run` binary runs in the lb namespace of the DSR test
//! topology (3 backends whose MACs resolve), with health checks off.

use std::{fmt::Write as _, time::Duration};

use anyhow::{bail, Context as _, Result};
use xdp_common::{map_names, Flow, FlowKey, MAGLEV_SLOTS, MAX_FLOWS};
use xdplb::dataplane::Maps;
use xdplb_tests::{
    lb::Xdplb,
    topology::{Shape, Topology},
};

use crate::harness::{self, Figure, Opts, Section};

pub const GROUP: &str = "memory";

pub const DESCRIPTION: &str = "Memory of the control plane and of the datapath. **Daemon RSS**: \
`VmRSS` of the real `xdplb run` process less the BPF maps it memory-maps (the Maglev array, the \
flow-event ring: kernel memory, counted below), from `/proc/PID/smaps`, 1.5 s after it reported \
ready, in the lb namespace of the DSR test topology (3 backends with resolvable MACs, health \
checks `type = \"none\"`); configurations: one service with the default 65,537-slot table, one \
service with a 251-slot table, and 100 services (ports 1000–1099 of one VIP, the same 3 backends) \
with 251-slot tables. Each configuration is started several times, alternating. **Kernel \
memory**: `bytes_memlock` of every datapath map (`bpftool map show pinned …`), which on this \
kernel is the map's own estimate of the memory it uses; it does not depend on the configuration \
(every map is preallocated at its full size), and is broken down per flow-table entry and per \
service table.";

const SETTLE: Duration = Duration::from_millis(1500);

struct Config {
    case: &'static str,
    text: String,
    services: usize,
    rss: Vec<f64>,
}

fn config(topo: &Topology, ports: std::ops::Range<u16>, table_size: Option<u32>) -> String {
    let mut text = String::new();
    for port in ports {
        let _ = writeln!(
            text,
            "[[service]]\nname = \"s{port}\"\nvip = \"{}\"\nport = {port}\nprotocol = \"tcp\"",
            topo.vip4()
        );
        if let Some(size) = table_size {
            let _ = writeln!(text, "table_size = {size}");
        }
        text += "\n[service.health_check]\ntype = \"none\"\n\n";
        for i in 1..=topo.backend_count() {
            let _ = writeln!(
                text,
                "[[service.backend]]\naddress = \"{}\"\n",
                topo.backend_addr(i, false)
            );
        }
    }
    text
}

/// One map's kernel facts, from bpftool.
struct MapMem {
    name: String,
    kind: String,
    entries: u64,
    memlock: u64,
}

/// Every map pinned in `pin_dir` (the datapath pins all of its maps there).
fn map_memory(pin_dir: &std::path::Path) -> Result<Vec<MapMem>> {
    let mut maps = Vec::new();
    for entry in std::fs::read_dir(pin_dir)? {
        let entry = entry?;
        if !entry.file_type()?.is_file() {
            continue; // links/
        }
        let path = entry.path();
        let out = crate::harness::run(
            "bpftool",
            &["map", "show", "pinned", &path.to_string_lossy(), "-j"],
        )?;
        let v: serde_json::Value =
            serde_json::from_str(&out).with_context(|| format!("parsing bpftool output {out}"))?;
        maps.push(MapMem {
            name: entry.file_name().to_string_lossy().into_owned(),
            kind: v["type"].as_str().unwrap_or("?").to_owned(),
            entries: v["max_entries"].as_u64().context("max_entries")?,
            memlock: v["bytes_memlock"].as_u64().context("bytes_memlock")?,
        });
    }
    maps.sort_by_key(|m| std::cmp::Reverse(m.memlock));
    if maps.is_empty() {
        bail!("no maps pinned in {}", pin_dir.display());
    }
    Ok(maps)
}

pub fn run(opts: &Opts) -> Result<Section> {
    if !opts.xdplb.exists() {
        bail!("{} not built", opts.xdplb.display());
    }
    let reps = if opts.quick { 1 } else { 3 };
    let topo = Topology::new(Shape::Dsr, "xbmem", 3)?;
    topo.wait_reachable()?;
    let mut configs = vec![
        Config {
            case: "daemon RSS, 1 service (table 65,537)",
            text: config(&topo, 80..81, None),
            services: 1,
            rss: vec![],
        },
        Config {
            case: "daemon RSS, 1 service (table 251)",
            text: config(&topo, 80..81, Some(251)),
            services: 1,
            rss: vec![],
        },
        Config {
            case: "daemon RSS, 100 services (table 251)",
            text: config(&topo, 1000..1100, Some(251)),
            services: 100,
            rss: vec![],
        },
    ];
    let mut maps: Option<Vec<MapMem>> = None;
    let mut totals = Vec::new();
    for rep in 0..reps {
        let n = configs.len();
        for k in 0..n {
            crate::harness::interrupted()?;
            let c = &mut configs[(k + rep) % n];
            let lb = Xdplb::start(&opts.xdplb, &topo, &c.text)
                .with_context(|| format!("starting xdplb for {}", c.case))?;
            std::thread::sleep(SETTLE);
            let programmed = Maps::open_pinned(&lb.pin_dir)?.services.keys().count();
            if programmed != c.services {
                bail!(
                    "{}: {programmed} services in the datapath, expected {}",
                    c.case,
                    c.services
                );
            }
            c.rss.push(harness::rss_mib(lb.proc.pid())?);
            let m = map_memory(&lb.pin_dir)?;
            totals.push(m.iter().map(|m| m.memlock).sum::<u64>() as f64 / (1024.0 * 1024.0));
            maps.get_or_insert(m);
            drop(lb);
        }
        println!("  memory: repetition {}/{reps} done", rep + 1);
    }
    let maps = maps.context("no daemon ran")?;

    let mut figures = Vec::new();
    for c in &configs {
        let mut f = Figure::new(GROUP, c.case, "MiB", c.rss.clone(), false);
        if c.services == 100 {
            f = f.baseline("daemon RSS, 1 service (table 251)");
        }
        figures.push(f);
    }
    figures.push(
        Figure::new(GROUP, "kernel: all datapath maps", "MiB", totals, false)
            .note("sum of bytes_memlock, one sample per daemon start"),
    );
    let get = |name: &str| {
        maps.iter()
            .find(|m| m.name == name)
            .with_context(|| format!("map {name} not pinned"))
    };
    let flows = get(map_names::FLOWS)?;
    let maglev = get(map_names::MAGLEV)?;
    let per_flow = flows.memlock as f64 / flows.entries as f64;
    let per_slot = maglev.memlock as f64 / f64::from(MAGLEV_SLOTS);
    figures.push(
        Figure::new(
            GROUP,
            "kernel: flow table, per \
            entry",
            "B",
            vec![per_flow],
            false,
        )
        .note(format!(
            "{} bytes_memlock / {MAX_FLOWS} entries ({}-byte key, {}-byte value, plus the hash \
                element and LRU node)",
            flows.memlock,
            size_of::<FlowKey>(),
            size_of::<Flow>()
        )),
    );
    for size in [65537u32, 251] {
        figures.push(
            Figure::new(
                GROUP,
                &format!(
                    "kernel: Maglev tables of one service, table_size \
                {size}"
                ),
                "KiB",
                vec![2.0 * f64::from(size) * per_slot / 1024.0],
                false,
            )
            .note(format!(
                "2 × {size} slots (double buffering) × {per_slot:.2} bytes per slot of the \
                     shared array ({} bytes_memlock / {MAGLEV_SLOTS} slots); 4-byte slots would \
                     make it {:.1} KiB",
                maglev.memlock,
                2.0 * f64::from(size) * 4.0 / 1024.0
            )),
        );
    }

    let mut table = String::from(
        "Kernel memory per map (bytes_memlock), largest first:\n\n| map \
        | type | max entries | bytes_memlock | bytes per entry |\n|---|---|---:|---:|---:|\n",
    );
    for m in &maps {
        let _ = writeln!(
            table,
            "| `{}` | {} | {} | {} | {:.1} |",
            m.name,
            m.kind,
            m.entries,
            m.memlock,
            m.memlock as f64 / m.entries.max(1) as f64
        );
    }
    let mut notes = vec![table];
    let total: u64 = maps.iter().map(|m| m.memlock).sum();
    let nat: u64 = maps
        .iter()
        .filter(|m| m.name.contains("_nat"))
        .map(|m| m.memlock)
        .sum();
    if nat > 0 {
        notes.push(format!(
            "Every map is preallocated at its full size whatever the configuration: the NAT tables \
             take {:.1} of the {:.1} MiB although none of the configurations measured has a NAT \
             service.",
            nat as f64 / 1048576.0,
            total as f64 / 1048576.0
        ));
    }
    let mut problems = Vec::new();
    if per_slot > 4.5 {
        notes.push(format!(
            "The Maglev array costs {per_slot:.1} bytes per 4-byte slot: the kernel rounds array \
             elements up to 8 bytes, so half of its {:.1} MiB holds padding.",
            maglev.memlock as f64 / 1048576.0
        ));
    }
    let one = crate::harness::median(&configs[1].rss);
    let hundred = crate::harness::median(&configs[2].rss);
    if hundred < one * 0.9 || !hundred.is_finite() {
        problems.push(format!(
            "memory: 100 services ({hundred:.1} MiB) use less than 1 service ({one:.1} MiB)"
        ));
    }
    Ok(Section {
        group: GROUP.into(),
        figures,
        notes,
        problems,
        ..Default::default()
    })
}
