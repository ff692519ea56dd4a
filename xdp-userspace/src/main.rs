//! The `xdplb` command: the daemon (`run`), datapath housekeeping, and the
//! operator CLI that talks to a running daemon through its API.

use std::{
    io::{IsTerminal as _, Write as _},
    path::{Path, PathBuf},
};

use anyhow::{bail, Result};
use clap::{CommandFactory as _, Parser, Subcommand};
use tracing::{info, warn};
use xdplb::{
    cli::{self, CliCommand, ClientOpts},
    config::{Config, DEFAULT_PIN_DIR},
    daemon, loader,
    lock::PinDirLock,
};

#[derive(Parser)]
#[command(
    name = "xdplb",
    version,
    about = "XDP layer-4 load balancer with Maglev hashing"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    client: ClientOpts,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: load (or adopt) the datapath, program it, attach,
    /// health-check backends and serve the API. SIGHUP reloads the config;
    /// SIGTERM stops the daemon and leaves the datapath forwarding (a new
    /// `run` adopts it); SIGINT detaches and removes every pin.
    Run(daemon::Options),
    /// Detach the datapath and remove its pins (after the daemon stopped:
    /// refused while a daemon holds the pin directory, unless --force).
    Detach {
        /// Interface to detach from (repeatable).
        #[arg(long, short, required_unless_present = "all", conflicts_with = "all")]
        iface: Vec<String>,
        /// Every interface, and remove the maps too.
        #[arg(long)]
        all: bool,
        /// bpffs directory of the datapath.
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// Detach even though a running daemon drives this datapath (it
        /// notices within a second and attaches again).
        #[arg(long)]
        force: bool,
    },
    /// Attach a pass-through XDP program to a veth and keep it attached until
    /// SIGINT/SIGTERM. A veth only receives the frames its peer sends with
    /// XDP_TX/XDP_REDIRECT if it has XDP attached itself: run this on the
    /// peer of the interface xdplb serves when that is a veth.
    PassThrough {
        #[arg(long, short)]
        iface: String,
    },
    /// Check a configuration file and exit.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Print shell completions.
    Completions {
        #[arg(value_enum)]
        shell: cli::Shell,
    },
    /// Print the man page (roff).
    Man,
    #[command(flatten)]
    Api(CliCommand),
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // No colour codes in a journal, a pipe or a file.
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    match dispatch(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) if err.is::<cli::StdoutClosed>() => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xdplb: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run(options) => daemon::run(options),
        Command::Detach {
            iface,
            all,
            pin_dir,
            force,
        } => {
            if let Some(holder) = PinDirLock::holder(&pin_dir)? {
                if !force {
                    bail!(
                        "a running xdplb daemon ({holder}) drives the datapath in {}: \
                         stop it first (SIGINT detaches and removes the pins), \
                         or pass --force",
                        pin_dir.display()
                    );
                }
                warn!(%holder, "detaching under a running daemon (--force)");
                // Its maps stay pinned for its successor, unless --all.
                return detach(&pin_dir, iface, all, all);
            }
            detach(&pin_dir, iface, all, true)
        }
        Command::PassThrough { iface } => {
            let _attached = loader::attach_passthrough(&iface)?;
            info!(%iface, "pass-through XDP program attached");
            println!("ready");
            std::io::stdout().flush()?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
                anyhow::Ok(())
            })
        }
        Command::Api(cmd) => cli::execute(cmd, &cli.client),
        Command::Completions { shell } => cli::completions(shell, &mut Cli::command()),
        Command::Man => cli::man_page(Cli::command()),
        Command::Check { config } => {
            let cfg = Config::load(&config)?;
            cli::print(format!(
                "{}: {} service(s), configuration is valid\n",
                config.display(),
                cfg.services.len()
            ))
        }
    }
}

/// Detaches from `ifaces` (or every pinned interface); with `remove_maps`,
/// removes the maps too once no interface is left.
fn detach(pin_dir: &Path, ifaces: Vec<String>, all: bool, remove_maps: bool) -> Result<()> {
    let ifaces = if all {
        loader::pinned_interfaces(pin_dir)?
    } else {
        ifaces
    };
    for iface in &ifaces {
        if loader::detach(pin_dir, iface)? {
            cli::print(format!("detached from {iface}\n"))?;
        } else if !all {
            bail!(
                "no xdplb datapath is attached to {iface} (no link pinned in {})",
                pin_dir.display()
            );
        }
    }
    // The maps go with the last attachment.
    if remove_maps && (all || loader::pinned_interfaces(pin_dir)?.is_empty()) {
        loader::remove_pins(pin_dir)?;
        cli::print(format!("removed {}\n", pin_dir.display()))?;
    }
    Ok(())
}
