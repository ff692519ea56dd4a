//! The operator CLI: the subcommands that talk to a running daemon through
//! its API (`xdplb status`, `xdplb backend drain ...`), how they run, and
//! how their answers are shown.
//!
//! `main.rs` owns the top-level parser; it flattens [`ClientOpts`] and
//! [`CliCommand`] into it and hands them to [`execute`]. Rendering is kept in
//! pure functions returning strings so it can be tested without a daemon.

use std::{
    collections::HashMap,
    fmt::Write as _,
    io::{self, IsTerminal as _, Write as _},
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use clap::{Args, Subcommand};
pub use clap_complete::Shell;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::{
    api::{
        client, BackendRef, BackendView, DatapathState, Done, FlowView, Request, ServiceView,
        StatsView, StatusView,
    },
    config::{BackendSpec, Protocol, ServiceSpec, DEFAULT_API_SOCKET},
};

/// Options of every API subcommand.
#[derive(Args, Clone, Debug, PartialEq, Eq)]
pub struct ClientOpts {
    /// The daemon's API socket.
    // A high display order lists these after each subcommand's own options.
    #[arg(long, global = true, value_name = "PATH", env = "XDPLB_SOCKET",
          default_value = DEFAULT_API_SOCKET, display_order = 100)]
    pub socket: PathBuf,
    /// Print the API's JSON answer instead of tables.
    #[arg(long, global = true, display_order = 101)]
    pub json: bool,
}

/// The subcommands that talk to a running daemon.
#[derive(Subcommand, Clone, Debug, PartialEq)]
pub enum CliCommand {
    /// Show the daemon's state and a summary of its services.
    Status,
    /// Add, remove or list services.
    #[command(subcommand)]
    Service(ServiceCmd),
    /// Add, remove, drain, undrain or list backends.
    #[command(subcommand)]
    Backend(BackendCmd),
    /// Show the datapath's counters: per drop/pass reason, service and
    /// backend.
    Stats {
        /// Redraw every SECS seconds (default 2), with rates, until Ctrl-C.
        /// With --json, print one JSON sample per line instead.
        #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "2",
              value_parser = clap::value_parser!(u64).range(1..))]
        watch: Option<u64>,
    },
    /// Show which backend a flow goes to in the live datapath.
    Flow {
        /// The client's address and port.
        // Brackets in a doc comment would be rustdoc links.
        #[arg(help = "Client address and port (IPv6 as [ADDR]:PORT)")]
        src: SocketAddr,
        /// Service address (VIP) and port.
        dst: SocketAddr,
        /// The flow's protocol.
        protocol: Protocol,
    },
    /// Re-read the configuration file and apply the changes.
    Reload,
    /// Leave or rejoin the routers' ECMP groups (docs/cluster.md).
    #[command(subcommand)]
    Cluster(crate::cluster::cli::ClusterCmd),
}

/// `xdplb service ...`.
#[derive(Subcommand, Clone, Debug, PartialEq)]
pub enum ServiceCmd {
    /// Add a service: see [`ServiceSpec`].
    #[command(
        about = "Add a service. The flags are the configuration file's [[service]] keys; \
                       those not given take the file's defaults"
    )]
    Add(Box<ServiceSpec>),
    /// Remove a service and its backends.
    Remove {
        /// The service's name.
        name: String,
    },
    /// List the services and their counters.
    List,
}

/// `xdplb backend ...`.
#[derive(Subcommand, Clone, Debug, PartialEq)]
pub enum BackendCmd {
    /// Add a backend to a service.
    Add {
        /// The service's name.
        service: String,
        #[command(flatten)]
        backend: BackendSpec,
    },
    /// Remove a backend from a service.
    Remove(BackendRef),
    /// Stop sending new flows to a backend; established flows stay.
    Drain(BackendRef),
    /// Let a drained backend take new flows again.
    Undrain(BackendRef),
    /// List backends, of every service or of one.
    List {
        /// Only this service's backends.
        service: Option<String>,
    },
}

/// The API request a command makes (`status` makes a second one,
/// [`Request::ListServices`], for its table).
fn request_of(command: &CliCommand) -> Request {
    match command.clone() {
        CliCommand::Status => Request::Status,
        CliCommand::Service(ServiceCmd::Add(spec)) => Request::AddService(spec),
        CliCommand::Service(ServiceCmd::Remove { name }) => Request::RemoveService { name },
        CliCommand::Service(ServiceCmd::List) => Request::ListServices,
        CliCommand::Backend(BackendCmd::Add { service, backend }) => {
            Request::AddBackend { service, backend }
        }
        CliCommand::Backend(BackendCmd::Remove(backend)) => Request::RemoveBackend(backend),
        CliCommand::Backend(BackendCmd::Drain(backend)) => Request::Drain(backend),
        CliCommand::Backend(BackendCmd::Undrain(backend)) => Request::Undrain(backend),
        CliCommand::Backend(BackendCmd::List { service }) => Request::ListBackends { service },
        CliCommand::Stats { .. } => Request::Stats,
        CliCommand::Flow { src, dst, protocol } => Request::Flow { src, dst, protocol },
        CliCommand::Reload => Request::Reload,
        CliCommand::Cluster(cmd) => cmd.request(),
    }
}

/// Runs `command` against the daemon at `opts.socket` and prints the
/// answer: a table, or with `--json` the JSON the API returned.
pub fn execute(command: CliCommand, opts: &ClientOpts) -> anyhow::Result<()> {
    if let CliCommand::Stats {
        watch: Some(seconds),
    } = command
    {
        return watch_stats(opts, Duration::from_secs(seconds));
    }
    if let CliCommand::Cluster(cmd) = &command {
        return crate::cluster::cli::execute(cmd, opts);
    }
    let answer = client::call(&opts.socket, &request_of(&command))?;
    if opts.json {
        return print(format!("{}\n", serde_json::to_string_pretty(&answer)?));
    }
    let text = match &command {
        CliCommand::Status => {
            let services: Vec<ServiceView> =
                view(client::call(&opts.socket, &Request::ListServices)?)?;
            render_status(&view(answer)?, &services)
        }
        CliCommand::Service(ServiceCmd::List) => render_services(&view::<Vec<_>>(answer)?),
        CliCommand::Backend(BackendCmd::List { .. }) => render_backends(&view::<Vec<_>>(answer)?),
        CliCommand::Stats { .. } => render_stats(&view(answer)?, None),
        CliCommand::Flow { src, dst, protocol } => {
            render_flow(*src, *dst, *protocol, &view(answer)?)
        }
        // Everything else changes something and answers `Done`.
        _ => {
            let done: Done = view(answer)?;
            format!("{}\n", done.message)
        }
    };
    print(text)
}

/// Standard output was closed by its reader (`xdplb man | head -1`): the
/// command ends quietly and successfully, as a C tool does when SIGPIPE ends
/// it. (Rust ignores SIGPIPE, which the daemon's sockets need.)
#[derive(Debug, thiserror::Error)]
#[error("standard output was closed")]
pub struct StdoutClosed;

/// Writes `text` to standard output; a reader that went away is
/// [`StdoutClosed`].
pub fn print(text: impl AsRef<[u8]>) -> anyhow::Result<()> {
    let mut out = io::stdout().lock();
    match out.write_all(text.as_ref()).and_then(|()| out.flush()) {
        Err(err) if err.kind() == io::ErrorKind::BrokenPipe => Err(StdoutClosed.into()),
        written => Ok(written?),
    }
}

/// Reads an API answer as the view it should be.
fn view<T: DeserializeOwned>(answer: Value) -> anyhow::Result<T> {
    serde_json::from_value(answer)
        .context("unexpected answer from the daemon (is it another version of xdplb?)")
}

/// `stats --watch`: samples, redraws and sleeps until the process is
/// interrupted (Ctrl-C ends it the usual way).
fn watch_stats(opts: &ClientOpts, every: Duration) -> anyhow::Result<()> {
    // Clearing the screen only makes sense on a terminal; piped output gets
    // one block per sample.
    let redraw = io::stdout().is_terminal();
    let mut previous: Option<(StatsView, Instant)> = None;
    loop {
        let answer = client::call(&opts.socket, &Request::Stats)?;
        let now = Instant::now();
        let block = if opts.json {
            format!("{}\n", serde_json::to_string(&answer)?)
        } else {
            let stats: StatsView = view(answer)?;
            let rates = previous.as_ref().map(|(before, at)| (before, now - *at));
            let text = render_stats(&stats, rates);
            let separator = if redraw {
                "\x1b[H\x1b[2J"
            } else if previous.is_some() {
                "\n"
            } else {
                ""
            };
            previous = Some((stats, now));
            format!(
                "{separator}every {}s, Ctrl-C to stop\n\n{text}",
                every.as_secs()
            )
        };
        print(block)?;
        std::thread::sleep(every);
    }
}

/// Writes `shell` completions for `command` (the whole `xdplb` command
/// tree) to stdout.
pub fn completions(shell: Shell, command: &mut clap::Command) -> anyhow::Result<()> {
    let name = command.get_name().to_owned();
    let mut script = Vec::new();
    clap_complete::generate(shell, command, name, &mut script);
    print(script)
}

/// Writes the man page of `command` (roff) to stdout.
pub fn man_page(command: clap::Command) -> anyhow::Result<()> {
    let mut page = Vec::new();
    clap_mangen::Man::new(command).render(&mut page)?;
    print(page)
}

// --- Rendering ---------------------------------------------------------------

/// Column alignment: numbers right, text left.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Align {
    Left,
    Right,
}

use Align::{Left, Right};

/// Lays out `rows` under `header` in columns two spaces apart.
fn table(header: &[(&str, Align)], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|(name, _)| name.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let header_row: Vec<String> = header.iter().map(|(name, _)| (*name).to_owned()).collect();
    let mut out = String::new();
    for row in std::iter::once(&header_row).chain(rows) {
        let mut line = String::new();
        for ((cell, width), (_, align)) in row.iter().zip(&widths).zip(header) {
            match align {
                Left => write!(line, "{cell:<width$}  "),
                Right => write!(line, "{cell:>width$}  "),
            }
            .expect("writing to a String cannot fail");
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// "3d 4h 5m 6s", from the largest non-zero unit down.
fn format_uptime(seconds: u64) -> String {
    let units = [(86_400, "d"), (3_600, "h"), (60, "m"), (1, "s")];
    let mut out = Vec::new();
    let mut rest = seconds;
    for (size, unit) in units {
        if rest >= size || !out.is_empty() || size == 1 {
            out.push(format!("{}{unit}", rest / size));
            rest %= size;
        }
    }
    out.join(" ")
}

fn active_of(backends: &[BackendView]) -> String {
    let active = backends
        .iter()
        .filter(|b| b.state == DatapathState::Active)
        .count();
    format!("{active}/{}", backends.len())
}

/// `xdplb status`: the daemon's summary, then its services.
fn render_status(status: &StatusView, services: &[ServiceView]) -> String {
    let interfaces = if status.interfaces.is_empty() {
        "none".to_owned()
    } else {
        let names: Vec<String> = status
            .interfaces
            .iter()
            .map(|i| format!("{} ({})", i.name, i.mode))
            .collect();
        names.join(", ")
    };
    let datapath = if status.adopted {
        "adopted from the previous daemon (hot restart)"
    } else {
        "loaded by this daemon"
    };
    let mut out = format!(
        "xdplb {} (pid {}), up {}\n\
         config:      {}\n\
         pin dir:     {}\n\
         datapath:    {datapath}\n\
         interfaces:  {interfaces}\n\
         services:    {}\n\
         backends:    {} ({} active)\n\
         cluster:     {}\n",
        status.version,
        status.pid,
        format_uptime(status.uptime_s),
        status.config,
        status.pin_dir,
        status.services,
        status.backends,
        status.backends_active,
        crate::cluster::describe(status.cluster.as_ref()),
    );
    if let Some(problem) = &status.datapath_problem {
        let n = status.datapath_repairs;
        out.push_str(&format!("repairs:     {n} (last: {problem})\n"));
    }
    if let Some(replication) = &status.replication {
        out.push_str(&crate::cluster::replication::describe(replication));
    }
    if !services.is_empty() {
        out.push('\n');
        let summary: Vec<Column<ServiceView>> = SERVICE_COLUMNS
            .iter()
            .filter(|(name, ..)| STATUS_SERVICE_COLUMNS.contains(name))
            .copied()
            .collect();
        out.push_str(&columns(services, &summary));
    }
    out
}

/// One column of a table of `T`s: header, alignment, cell.
type Column<T> = (&'static str, Align, fn(&T) -> String);

/// Lays `items` out as a table of `columns`.
fn columns<T>(items: &[T], columns: &[Column<T>]) -> String {
    let header: Vec<(&str, Align)> = columns
        .iter()
        .map(|&(name, align, _)| (name, align))
        .collect();
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|item| columns.iter().map(|(_, _, cell)| cell(item)).collect())
        .collect();
    table(&header, &rows)
}

const SERVICE_COLUMNS: [Column<ServiceView>; 12] = [
    ("SERVICE", Left, |s| s.name.clone()),
    ("VIP", Left, |s| s.vip.to_string()),
    ("PORT", Right, |s| s.port.to_string()),
    ("PROTO", Left, |s| s.protocol.to_string()),
    ("MODE", Left, |s| s.mode.to_string()),
    ("HASH", Left, |s| s.hash.to_string()),
    ("TABLE-SIZE", Right, |s| s.table_size.to_string()),
    ("BACKENDS", Right, |s| active_of(&s.backends)),
    ("PACKETS", Right, |s| s.traffic.packets.to_string()),
    ("BYTES", Right, |s| s.traffic.bytes.to_string()),
    ("NEW-FLOWS", Right, |s| s.traffic.new_flows.to_string()),
    ("TABLE", Left, |s| s.fingerprint.clone()),
];

/// The columns of [`SERVICE_COLUMNS`] that `xdplb status` shows.
const STATUS_SERVICE_COLUMNS: [&str; 7] = [
    "SERVICE", "VIP", "PORT", "PROTO", "MODE", "BACKENDS", "TABLE",
];

const BACKEND_COLUMNS: [Column<BackendView>; 12] = [
    ("SERVICE", Left, |b| b.service.clone()),
    ("ADDRESS", Left, |b| b.address.to_string()),
    ("PORT", Right, |b| b.port.to_string()),
    ("WEIGHT", Right, |b| b.weight.to_string()),
    ("ADMIN", Left, |b| b.admin.to_string()),
    ("HEALTH", Left, |b| b.health.to_string()),
    ("STATE", Left, |b| b.state.to_string()),
    ("PACKETS", Right, |b| b.traffic.packets.to_string()),
    ("BYTES", Right, |b| b.traffic.bytes.to_string()),
    ("NEW-FLOWS", Right, |b| b.traffic.new_flows.to_string()),
    // Times its traffic made it a suspect (docs/operations.md, "Passive detection").
    ("SUSPECTED", Right, |b| b.passive.suspicions.to_string()),
    ("LAST-CHECK", Left, |b| {
        b.last_check.clone().unwrap_or_else(|| "-".into())
    }),
];

/// `xdplb service list`.
fn render_services(services: &[ServiceView]) -> String {
    if services.is_empty() {
        return "no services\n".to_owned();
    }
    columns(services, &SERVICE_COLUMNS)
}

/// `xdplb backend list`.
fn render_backends(backends: &[BackendView]) -> String {
    if backends.is_empty() {
        return "no backends\n".to_owned();
    }
    columns(backends, &BACKEND_COLUMNS)
}

/// `xdplb stats`. With `previous` (an earlier sample and the time since),
/// adds per-second rates.
fn render_stats(stats: &StatsView, previous: Option<(&StatsView, Duration)>) -> String {
    let seconds = previous
        .map(|(_, elapsed)| elapsed.as_secs_f64())
        .filter(|s| *s > 0.0);
    // A counter that went down (the daemon restarted, the backend was
    // re-added) has no meaningful rate.
    let rate = |now: u64, before: Option<u64>| match (before, seconds) {
        (Some(before), Some(seconds)) if now >= before => {
            format!("{:.1}", (now - before) as f64 / seconds)
        }
        _ => "-".to_owned(),
    };
    let with_rates = previous.is_some();
    let mut out = String::new();

    let reasons: Vec<Vec<String>> = stats
        .reasons
        .iter()
        .filter(|(_, count)| **count > 0)
        .map(|(reason, count)| {
            let before = previous.and_then(|(p, _)| p.reasons.get(reason).copied());
            let mut row = vec![reason.clone(), count.to_string()];
            if with_rates {
                row.push(rate(*count, before));
            }
            row
        })
        .collect();
    if reasons.is_empty() {
        out.push_str("no packets counted\n");
    } else {
        let mut header = vec![("REASON", Left), ("PACKETS", Right)];
        if with_rates {
            header.push(("PKT/S", Right));
        }
        out.push_str(&table(&header, &reasons));
    }

    if let Some(nat) = &stats.nat {
        out.push_str(&format!(
            "\nNAT: {} flows, {} source ports in use, capacity {} per table\n",
            nat.flows, nat.reverse, nat.capacity
        ));
    }
    if let Some(replication) = &stats.replication {
        out.push('\n');
        out.push_str(&crate::cluster::replication::describe(replication));
    }
    if stats.services.is_empty() {
        return out;
    }
    let before: HashMap<_, _> = previous
        .into_iter()
        .flat_map(|(p, _)| traffic_of(p))
        .map(|(service, backend, counters)| ((service, backend), counters))
        .collect();
    let rows: Vec<Vec<String>> = traffic_of(stats)
        .map(|(service, backend, now)| {
            let label = backend.map_or_else(|| "(all)".to_owned(), |b| b.to_string());
            let mut row = vec![service.to_owned(), label];
            row.extend(now.iter().map(u64::to_string));
            if with_rates {
                let earlier = before.get(&(service, backend));
                row.extend((0..3).map(|i| rate(now[i], earlier.map(|e| e[i]))));
            }
            row
        })
        .collect();
    let mut header = vec![
        ("SERVICE", Left),
        ("BACKEND", Left),
        ("PACKETS", Right),
        ("BYTES", Right),
        ("NEW-FLOWS", Right),
    ];
    if with_rates {
        header.extend([("PKT/S", Right), ("BYTES/S", Right), ("FLOWS/S", Right)]);
    }
    out.push('\n');
    out.push_str(&table(&header, &rows));
    out
}

/// Each service's counters [packets, bytes, new flows], then its backends':
/// (service, None for the service total or the backend, counters).
fn traffic_of(stats: &StatsView) -> impl Iterator<Item = (&str, Option<SocketAddr>, [u64; 3])> {
    stats.services.iter().flat_map(|service| {
        let name = service.name.as_str();
        let backends = service.backends.iter().map(move |backend| {
            let address = SocketAddr::new(backend.address, backend.port);
            (name, Some(address), backend.traffic.values())
        });
        std::iter::once((name, None, service.traffic.values())).chain(backends)
    })
}

/// `xdplb flow`.
fn render_flow(src: SocketAddr, dst: SocketAddr, protocol: Protocol, flow: &FlowView) -> String {
    let how = match (flow.established, flow.replicated) {
        (true, true) => "established flow, replicated from a peer",
        (true, false) => "established flow",
        (false, _) => "new flow",
    };
    let slot = flow
        .slot
        .map_or_else(|| "-".to_owned(), |slot| slot.to_string());
    let mut out = format!(
        "{src} -> {dst}/{protocol}: service {}, backend {} ({}; {how}, hash {:#010x}, \
         slot {slot})\n",
        flow.service, flow.backend, flow.backend_state, flow.hash
    );
    if let Some(pick) = flow.new_flow_backend.filter(|b| *b != flow.backend) {
        out.push_str(&format!("  pinned; a new flow would go to {pick}\n"));
    }
    if let Some(nat) = &flow.nat {
        out.push_str(&format!("  NAT: {nat}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use clap::{CommandFactory as _, Parser};
    use serde_json::json;

    use super::*;
    use crate::{
        api::{BackendStatsView, InterfaceView, ServiceStatsView, Traffic},
        config::{Admin, HashFields, Mode},
    };

    /// A spec from its JSON form, as the API reads it.
    fn spec<T: DeserializeOwned>(json: Value) -> T {
        serde_json::from_value(json).unwrap()
    }

    /// The shape main.rs gives the CLI.
    #[derive(Parser, Debug)]
    #[command(name = "xdplb")]
    struct TestCli {
        #[command(flatten)]
        opts: ClientOpts,
        #[command(subcommand)]
        command: CliCommand,
    }

    /// Each line of `text`, its columns one space apart.
    fn rows_of(text: &str) -> Vec<String> {
        let words = |line: &str| line.split_whitespace().collect::<Vec<_>>().join(" ");
        text.lines().map(words).collect()
    }

    fn parse(line: &str) -> TestCli {
        TestCli::try_parse_from(line.split_whitespace())
            .unwrap_or_else(|err| panic!("{line}: {err}"))
    }

    fn backend(service: &str, address: &str, state: &str) -> BackendView {
        BackendView {
            service: service.into(),
            address: address.parse().unwrap(),
            port: 80,
            weight: 100,
            admin: Admin::Up,
            health: (state != "down").into(),
            state: serde_json::from_value(json!(state)).unwrap(),
            mac: None,
            traffic: Traffic {
                packets: 1234,
                bytes: 567_890,
                new_flows: 56,
            },
            last_check: Some("ok in 2ms".into()),
            transitions: 0,
            passive: Default::default(),
        }
    }

    fn service(name: &str, vip: &str, backends: Vec<BackendView>) -> ServiceView {
        ServiceView {
            name: name.into(),
            vip: vip.parse().unwrap(),
            port: 80,
            protocol: Protocol::Tcp,
            mode: Mode::Dsr,
            table_size: 65537,
            hash: HashFields::FiveTuple,
            fingerprint: "1a2b3c4d".into(),
            traffic: Traffic {
                packets: 99,
                bytes: 9900,
                new_flows: 7,
            },
            backends,
        }
    }

    #[test]
    fn the_command_tree_is_valid() {
        TestCli::command().debug_assert();
        // What `completions` and `man_page` do, into buffers: they write to
        // stdout directly, which the test harness does not capture.
        let mut script = Vec::new();
        clap_complete::generate(Shell::Bash, &mut TestCli::command(), "xdplb", &mut script);
        assert!(String::from_utf8(script).unwrap().contains("undrain"));
        let mut page = Vec::new();
        clap_mangen::Man::new(TestCli::command())
            .render(&mut page)
            .unwrap();
        assert!(String::from_utf8(page).unwrap().contains("XDPLB_SOCKET"));
    }

    #[test]
    fn parses_commands_and_global_options() {
        let cli = parse("xdplb backend drain web 10.0.0.1 --port 8080 --socket /tmp/x.sock --json");
        assert_eq!(
            cli.opts,
            ClientOpts {
                socket: "/tmp/x.sock".into(),
                json: true
            }
        );
        assert_eq!(
            request_of(&cli.command),
            Request::Drain(BackendRef {
                service: "web".into(),
                address: "10.0.0.1".parse().unwrap(),
                port: Some(8080)
            })
        );
        for (line, watch) in [
            ("xdplb stats", None),
            ("xdplb stats --watch", Some(2)),
            ("xdplb stats --watch 5", Some(5)),
        ] {
            assert_eq!(parse(line).command, CliCommand::Stats { watch }, "{line}");
        }
        assert!(TestCli::try_parse_from(["xdplb", "stats", "--watch", "0"]).is_err());
        assert_eq!(
            request_of(&parse("xdplb flow [fd00::1]:40000 [fd00::100]:80 udp").command),
            Request::Flow {
                src: "[fd00::1]:40000".parse().unwrap(),
                dst: "[fd00::100]:80".parse().unwrap(),
                protocol: Protocol::Udp
            }
        );
        assert!(
            TestCli::try_parse_from(["xdplb", "flow", "1.1.1.1:1", "2.2.2.2:2", "icmp"]).is_err()
        );
        assert_eq!(
            request_of(&parse("xdplb backend list").command),
            Request::ListBackends { service: None }
        );
        assert_eq!(
            request_of(&parse("xdplb backend list web").command),
            Request::ListBackends {
                service: Some("web".into())
            }
        );
        assert_eq!(
            request_of(&parse("xdplb service remove web").command),
            Request::RemoveService { name: "web".into() }
        );
        assert_eq!(request_of(&parse("xdplb reload").command), Request::Reload);
        assert_eq!(request_of(&parse("xdplb status").command), Request::Status);
    }

    #[test]
    fn backend_add_builds_a_backend_table() {
        let cli = parse("xdplb backend add web 10.0.0.1 --weight 50 --state drain");
        assert_eq!(
            request_of(&cli.command),
            Request::AddBackend {
                service: "web".into(),
                backend: spec(json!({"address": "10.0.0.1", "weight": 50, "state": "drain"}))
            }
        );
        let cli = parse("xdplb backend add web fd00::1 --port 8080");
        assert_eq!(
            request_of(&cli.command),
            Request::AddBackend {
                service: "web".into(),
                backend: spec(json!({"address": "fd00::1", "port": 8080}))
            }
        );
    }

    #[test]
    fn service_add_builds_the_config_table() {
        let cli = parse(
            "xdplb service add --name web --vip 10.0.0.100 --port 80 --protocol tcp --mode dsr \
             --table-size 251 --hash source --drain-timeout 10s --check http \
             --check-interval 2s --check-timeout 1s --rise 1 --fall 5 --check-port 8080 \
             --check-method HEAD --check-path /healthz --expect-status 200,204 \
             --check-host x.example --backend 10.0.0.1:80@50 --backend 10.0.0.2",
        );
        let expected = json!({
            "name": "web", "vip": "10.0.0.100", "port": 80, "protocol": "tcp", "mode": "dsr",
            "table_size": 251, "hash": "source", "drain_timeout": "10s",
            "health_check": {"type": "http", "interval": "2s", "timeout": "1s", "rise": 1,
                "fall": 5, "port": 8080, "method": "HEAD", "path": "/healthz",
                "expect_status": [200, 204], "host": "x.example"},
            "backend": [{"address": "10.0.0.1", "port": 80, "weight": 50},
                {"address": "10.0.0.2"}],
        });
        assert_eq!(
            request_of(&cli.command),
            Request::AddService(spec(expected))
        );
    }

    #[test]
    fn service_add_leaves_out_what_was_not_given() {
        let cli =
            parse("xdplb service add --name dns6 --vip 2001:db8::53 --port 53 --protocol udp");
        let expected =
            json!({"name": "dns6", "vip": "2001:db8::53", "port": 53, "protocol": "udp"});
        assert_eq!(
            request_of(&cli.command),
            Request::AddService(spec(expected))
        );
        let cli = parse(
            "xdplb service add --name web --vip 10.0.0.1 --port 80 --protocol tcp --check none",
        );
        let CliCommand::Service(ServiceCmd::Add(spec)) = cli.command else {
            panic!()
        };
        assert_eq!(json!(spec)["health_check"], json!({"type": "none"}));
        assert!(TestCli::try_parse_from(
            "xdplb service add --name w --vip 10.0.0.1 --port 80 --protocol sctp".split(' ')
        )
        .is_err());
    }

    #[test]
    fn parses_backend_specs() {
        let spec = str::parse::<BackendSpec>;
        let parsed = |address: &str, port, weight| {
            Ok(BackendSpec {
                address: address.parse().unwrap(),
                port,
                weight,
                state: None,
            })
        };
        assert_eq!(
            spec("10.0.0.1:8080@50"),
            parsed("10.0.0.1", Some(8080), Some(50))
        );
        assert_eq!(spec("[fd00::1]:80@5"), parsed("fd00::1", Some(80), Some(5)));
        assert_eq!(spec("10.0.0.1"), parsed("10.0.0.1", None, None));
        assert_eq!(spec("10.0.0.1@0"), parsed("10.0.0.1", None, Some(0)));
        assert_eq!(spec("fd00::1"), parsed("fd00::1", None, None));
        assert_eq!(spec("[fd00::1]@7"), parsed("fd00::1", None, Some(7)));
        // Without brackets the last group belongs to the address.
        assert_eq!(spec("fd00::1:80"), parsed("fd00::1:80", None, None));
        assert!(spec("10.0.0.1:x").is_err());
        assert!(spec("10.0.0.1:70000").is_err());
        assert!(spec("[10.0.0.1]").is_err());
        assert!(spec("10.0.0.1@").unwrap_err().contains("weight"));
        assert!(spec("web1:80").unwrap_err().contains("[ADDR]:PORT"));
        assert_eq!(
            json!(spec("[fd00::1]:80@5").unwrap()),
            json!({"address": "fd00::1", "port": 80, "weight": 5})
        );
    }

    #[test]
    fn renders_backends_as_a_table() {
        let text = render_backends(&[
            backend("web", "10.0.0.11", "active"),
            backend("web", "fd00::12", "down"),
        ]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        let rows = rows_of(&text);
        assert_eq!(
            rows[0],
            "SERVICE ADDRESS PORT WEIGHT ADMIN HEALTH STATE PACKETS BYTES NEW-FLOWS SUSPECTED \
             LAST-CHECK"
        );
        assert_eq!(
            rows[1],
            "web 10.0.0.11 80 100 up up active 1234 567890 56 0 ok in 2ms"
        );
        assert!(
            lines[2].contains("fd00::12") && lines[2].contains("down"),
            "{text}"
        );
        // Aligned: every row's STATE column starts where the header's does.
        let column = lines[0].find("STATE").unwrap();
        assert_eq!(&lines[1][column..column + 6], "active");
        assert_eq!(&lines[2][column..column + 4], "down");
        assert_eq!(render_backends(&[]), "no backends\n");
    }

    #[test]
    fn renders_status_with_a_service_table() {
        let status = StatusView {
            version: "0.1.0".into(),
            pid: 4242,
            uptime_s: 93_784,
            config: "/etc/xdplb.toml".into(),
            pin_dir: "/sys/fs/bpf/xdplb".into(),
            adopted: true,
            interfaces: vec![InterfaceView {
                name: "eth0".into(),
                mode: "native".into(),
            }],
            services: 1,
            backends: 2,
            backends_active: 1,
            datapath_repairs: 0,
            datapath_problem: None,
            fingerprints: Default::default(),
            cluster: None,
            replication: None,
        };
        let services = [service(
            "web",
            "10.0.0.100",
            vec![
                backend("web", "10.0.0.11", "active"),
                backend("web", "10.0.0.12", "down"),
            ],
        )];
        let text = render_status(&status, &services);
        assert!(
            text.starts_with("xdplb 0.1.0 (pid 4242), up 1d 2h 3m 4s\n"),
            "{text}"
        );
        assert!(text.contains("interfaces:  eth0 (native)\n"), "{text}");
        assert!(text.contains("hot restart"), "{text}");
        assert!(text.contains("backends:    2 (1 active)\n"), "{text}");
        let table: Vec<String> = rows_of(&text)
            .into_iter()
            .skip_while(|l| !l.starts_with("SERVICE"))
            .collect();
        assert_eq!(
            table,
            [
                "SERVICE VIP PORT PROTO MODE BACKENDS TABLE",
                "web 10.0.0.100 80 tcp dsr 1/2 1a2b3c4d"
            ]
        );
    }

    #[test]
    fn renders_services() {
        let text = render_services(&[service(
            "web",
            "10.0.0.100",
            vec![backend("web", "10.0.0.11", "active")],
        )]);
        assert_eq!(
            rows_of(&text),
            [
                "SERVICE VIP PORT PROTO MODE HASH TABLE-SIZE BACKENDS PACKETS BYTES NEW-FLOWS \
                 TABLE",
                "web 10.0.0.100 80 tcp dsr 5-tuple 65537 1/1 99 9900 7 1a2b3c4d",
            ]
        );
        assert_eq!(render_services(&[]), "no services\n");
    }

    fn stats(scale: u64) -> StatsView {
        let traffic = Traffic {
            packets: 1000 * scale,
            bytes: 64_000 * scale,
            new_flows: 10 * scale,
        };
        StatsView {
            reasons: BTreeMap::from([
                ("tx_dsr".to_owned(), 1000 * scale),
                ("drop_no_backend".to_owned(), 0),
                ("pass_not_vip".to_owned(), 10 * scale),
            ]),
            nat: None,
            replication: None,
            services: vec![ServiceStatsView {
                name: "web".into(),
                traffic,
                backends: vec![BackendStatsView {
                    address: "fd00::11".parse().unwrap(),
                    port: 80,
                    traffic,
                }],
            }],
        }
    }

    #[test]
    fn renders_stats_without_zero_reasons() {
        let text = render_stats(&stats(1), None);
        assert!(!text.contains("drop_no_backend"), "{text}");
        assert_eq!(
            rows_of(&text),
            [
                "REASON PACKETS",
                "pass_not_vip 10",
                "tx_dsr 1000",
                "",
                "SERVICE BACKEND PACKETS BYTES NEW-FLOWS",
                "web (all) 1000 64000 10",
                "web [fd00::11]:80 1000 64000 10",
            ]
        );
    }

    #[test]
    fn renders_stats_with_rates() {
        let (before, now) = (stats(1), stats(3));
        let text = render_stats(&now, Some((&before, Duration::from_secs(2))));
        let rows = rows_of(&text);
        assert_eq!(rows[0], "REASON PACKETS PKT/S");
        assert_eq!(rows[2], "tx_dsr 3000 1000.0");
        assert_eq!(
            rows[4],
            "SERVICE BACKEND PACKETS BYTES NEW-FLOWS PKT/S BYTES/S FLOWS/S"
        );
        assert_eq!(
            rows[6],
            "web [fd00::11]:80 3000 192000 30 1000.0 64000.0 10.0"
        );
        // Counters that went backwards (a restart) have no rate.
        let text = render_stats(&before, Some((&now, Duration::from_secs(2))));
        assert!(text.lines().nth(2).unwrap().ends_with(" -"), "{text}");
    }

    #[test]
    fn renders_flows() {
        let flow = FlowView {
            service: "web".into(),
            backend: "[fd00::11]:80".parse().unwrap(),
            backend_state: DatapathState::Active,
            established: false,
            replicated: false,
            new_flow_backend: None,
            hash: 0xabc,
            slot: Some(17),
            nat: None,
        };
        assert_eq!(
            render_flow(
                "[fd00::1]:40000".parse().unwrap(),
                "[fd00::100]:80".parse().unwrap(),
                Protocol::Tcp,
                &flow
            ),
            "[fd00::1]:40000 -> [fd00::100]:80/tcp: service web, backend [fd00::11]:80 \
             (active; new flow, hash 0x00000abc, slot 17)\n"
        );
        // Pinned to a backend Maglev no longer picks: the pick is shown.
        let pinned = FlowView {
            backend: "10.0.0.11:80".parse().unwrap(),
            established: true,
            replicated: true,
            new_flow_backend: Some("10.0.0.12:80".parse().unwrap()),
            slot: None,
            nat: Some("via 10.0.0.1:32768".into()),
            ..flow
        };
        let (src, dst) = (
            "10.0.0.1:40000".parse().unwrap(),
            "10.0.0.100:80".parse().unwrap(),
        );
        assert_eq!(
            render_flow(src, dst, Protocol::Tcp, &pinned),
            "10.0.0.1:40000 -> 10.0.0.100:80/tcp: service web, backend 10.0.0.11:80 (active; \
             established flow, replicated from a peer, hash 0x00000abc, slot -)\n  \
             pinned; a new flow would go to 10.0.0.12:80\n  NAT: via 10.0.0.1:32768\n"
        );
        // Where a new flow would go too: nothing more to say.
        let same = FlowView {
            new_flow_backend: Some(pinned.backend),
            nat: None,
            ..pinned
        };
        assert!(!render_flow(src, dst, Protocol::Tcp, &same).contains("pinned"));
    }

    #[test]
    fn formats_uptimes() {
        assert_eq!(format_uptime(0), "0s");
        assert_eq!(format_uptime(59), "59s");
        assert_eq!(format_uptime(3600), "1h 0m 0s");
        assert_eq!(format_uptime(93_784), "1d 2h 3m 4s");
    }

    /// Answers every request with sample views, as the daemon would.
    struct SampleDaemon;

    impl crate::api::Handler for SampleDaemon {
        fn handle(&self, request: Request) -> Result<Value, crate::api::ApiError> {
            let web = || {
                service(
                    "web",
                    "10.0.0.100",
                    vec![backend("web", "10.0.0.11", "active")],
                )
            };
            let value = match request {
                Request::Status => json!({
                    "version": "0.1.0", "pid": 1, "uptime_s": 5, "config": "/etc/xdplb.toml",
                    "pin_dir": "/sys/fs/bpf/xdplb", "adopted": false, "interfaces": [],
                    "services": 1, "backends": 1, "backends_active": 1,
                }),
                Request::ListServices => serde_json::to_value([web()]).unwrap(),
                Request::ListBackends { .. } => serde_json::to_value(&web().backends).unwrap(),
                Request::Stats => serde_json::to_value(stats(1)).unwrap(),
                Request::Flow { .. } => json!({
                    "service": "web", "backend": "10.0.0.11:80", "backend_state": "active",
                    "established": true, "hash": 7, "slot": null,
                }),
                Request::Drain(backend) if backend.service == "web" => {
                    json!({"message": "drained"})
                }
                Request::Drain(backend) => {
                    return Err(crate::api::ApiError::not_found(format!(
                        "no service named {:?}",
                        backend.service
                    )))
                }
                other => panic!("unexpected {other:?}"),
            };
            Ok(value)
        }
    }

    #[test]
    fn executes_commands_against_a_daemon() {
        let dir = std::env::temp_dir().join(format!("xdplb-cli-{}", std::process::id()));
        let socket = dir.join("xdplb.sock");
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let path = socket.clone();
        runtime.spawn(async move {
            crate::api::server::serve(&path, std::sync::Arc::new(SampleDaemon)).await
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(Instant::now() < deadline, "the server did not start");
            std::thread::sleep(Duration::from_millis(10));
        }

        for json in [false, true] {
            let opts = ClientOpts {
                socket: socket.clone(),
                json,
            };
            for line in [
                "xdplb status",
                "xdplb service list",
                "xdplb backend list web",
                "xdplb stats",
                "xdplb flow 10.1.1.1:4000 10.0.0.100:80 tcp",
                "xdplb backend drain web 10.0.0.11",
            ] {
                execute(parse(line).command, &opts).unwrap_or_else(|err| panic!("{line}: {err:#}"));
            }
            let err =
                execute(parse("xdplb backend drain nope 10.0.0.11").command, &opts).unwrap_err();
            assert_eq!(format!("{err:#}"), "no service named \"nope\"");
        }
        drop(runtime);
        let _ = std::fs::remove_dir_all(&dir);

        let opts = ClientOpts {
            socket: socket.clone(),
            json: false,
        };
        let err = execute(CliCommand::Status, &opts).unwrap_err();
        assert!(
            format!("{err:#}").starts_with("the xdplb daemon is not running"),
            "{err:#}"
        );
    }
}
