//! The `xdplb` command: runs the load balancer and queries its datapath.

use std::{
    io::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};
use tracing::{info, warn};
use xdplb::{
    config::Config,
    dataplane::proto_name,
    controller::Controller,
    dataplane::Maps,
    loader::{self, AttachMode, Datapath},
};

#[derive(Parser)]
#[command(name = "xdplb", version, about = "XDP layer-4 load balancer with Maglev hashing")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the datapath, program it from the config, attach, and serve
    /// until SIGINT/SIGTERM (then detach and remove the pins).
    Run {
        /// The TOML configuration.
        #[arg(long, short)]
        config: PathBuf,
        /// Interface to attach to (repeatable).
        #[arg(long, short, required = true)]
        iface: Vec<String>,
        /// XDP attach mode.
        #[arg(long, value_enum, default_value = "auto")]
        xdp_mode: AttachMode,
        /// bpffs directory for the maps (default: the config's pin_dir).
        #[arg(long)]
        pin_dir: Option<PathBuf>,
    },
    /// Show which backend a flow goes to, read from the live datapath.
    Flow {
        /// Client address and port.
        src: SocketAddr,
        /// Service address (VIP) and port.
        dst: SocketAddr,
        /// Protocol: tcp or udp.
        #[arg(value_parser = parse_protocol)]
        protocol: u8,
        /// bpffs directory of the running datapath.
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Attach a pass-through XDP program to a veth and keep it attached until
    /// SIGINT/SIGTERM. A veth only receives the frames its peer sends with
    /// XDP_TX/XDP_REDIRECT if it has XDP attached itself: run this on the
    /// peer of the interface xdplb serves when that is a veth.
    PassThrough {
        #[arg(long, short)]
        iface: String,
    },
    /// Show the datapath's counters, read from its pinned maps.
    Stats {
        /// bpffs directory of the running datapath.
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check a configuration file and exit.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
}

fn parse_protocol(s: &str) -> Result<u8> {
    match s {
        "tcp" => Ok(xdp_common::PROTO_TCP),
        "udp" => Ok(xdp_common::PROTO_UDP),
        _ => bail!("unknown protocol {s:?} (expected tcp or udp)"),
    }
}

const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/xdplb";

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    match dispatch(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xdplb: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run { config, iface, xdp_mode, pin_dir } => run(&config, &iface, xdp_mode, pin_dir),
        Command::Flow { src, dst, protocol, pin_dir, json } => {
            let maps = Maps::open_pinned(&pin_dir)?;
            let route = maps.route(src, dst, protocol)?;
            if json {
                println!("{}", serde_json::to_string(&route)?);
            } else {
                let how = if route.established { "established flow" } else { "new flow" };
                let slot = route.slot.map_or_else(|| "-".into(), |s| s.to_string());
                println!("{src} -> {dst}/{}: backend {} ({how}, hash {:#010x}, slot {slot})", proto_name(protocol), route.backend, route.hash);
            }
            Ok(())
        }
        Command::PassThrough { iface } => {
            let _attached = loader::attach_passthrough(&iface)?;
            info!(%iface, "pass-through XDP program attached");
            println!("ready");
            std::io::stdout().flush()?;
            block_until_signal(|| {})?;
            Ok(())
        }
        Command::Stats { pin_dir, json } => {
            let maps = Maps::open_pinned(&pin_dir)?;
            let counts = maps.reason_counts()?;
            if json {
                let obj: serde_json::Map<String, serde_json::Value> =
                    counts.iter().map(|(r, n)| (r.name().to_owned(), (*n).into())).collect();
                println!("{}", serde_json::Value::Object(obj));
            } else {
                for (reason, n) in counts.iter().filter(|(_, n)| *n > 0) {
                    println!("{:<18} {n:>12}", reason.name());
                }
            }
            Ok(())
        }
        Command::Check { config } => {
            let cfg = Config::load(&config)?;
            println!("{}: {} service(s), configuration is valid", config.display(), cfg.services.len());
            Ok(())
        }
    }
}

/// Removes the pins when dropped, unless disarmed: a run that fails half
/// way leaves nothing behind.
struct PinGuard<'a>(&'a Path);

impl Drop for PinGuard<'_> {
    fn drop(&mut self) {
        if let Err(err) = loader::remove_pins(self.0) {
            warn!("{err:#}");
        }
    }
}

fn run(config_path: &Path, ifaces: &[String], mode: AttachMode, pin_dir: Option<PathBuf>) -> Result<()> {
    // Everything that can be checked is checked before anything is loaded.
    let config = Config::load(config_path)?;
    for iface in ifaces {
        loader::interface_index(iface)?;
    }
    let pin_dir = pin_dir.unwrap_or_else(|| config.daemon.pin_dir.clone());

    let mut datapath = Datapath::load(&pin_dir)?;
    let _pins = PinGuard(&pin_dir);
    let mut maps = Maps::take(&mut datapath.ebpf)?;
    maps.clear_services()?;
    let mut controller = Controller::new(maps);
    controller.apply(&config)?;
    for iface in ifaces {
        let attached = datapath.attach(iface, mode)?;
        info!(%iface, mode = ?attached, "XDP program attached");
    }
    println!("ready");
    std::io::stdout().flush()?;

    block_until_signal(|| {
        if let Err(err) = controller.refresh_neighbours() {
            warn!("refreshing backend next hops: {err:#}");
        }
    })?;
    info!("stopping: detaching and removing pins");
    drop(controller);
    drop(datapath);
    Ok(())
}


/// Runs `every_5s` every five seconds until SIGINT or SIGTERM.
fn block_until_signal(mut every_5s: impl FnMut()) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => break,
                _ = term.recv() => break,
                _ = tick.tick() => every_5s(),
            }
        }
        Ok(())
    })
}
