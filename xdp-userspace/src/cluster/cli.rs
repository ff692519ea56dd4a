//! `xdplb cluster leave|join`: taking a node out of (and back into) the
//! routers' ECMP groups for maintenance.

use std::{
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use clap::Subcommand;
use serde_json::json;

use crate::{
    api::{client, Done, Request, StatsView, StatusView},
    cli::{print, ClientOpts},
};

/// `xdplb cluster ...`.
#[derive(Subcommand, Clone, Debug, PartialEq)]
pub enum ClusterCmd {
    /// Withdraw every VIP route, then wait until this node receives no new
    /// flows and say when it is safe to stop. Stays left (also across
    /// daemon restarts) until `xdplb cluster join`.
    Leave {
        /// Seconds the datapath's new-flow counters must stay flat.
        #[arg(long, value_name = "SECS", default_value_t = 2,
              value_parser = clap::value_parser!(u64).range(1..))]
        quiet: u64,
        /// Give up (exit status 1) when new flows still arrive after SECS.
        #[arg(long, value_name = "SECS", default_value_t = 60,
              value_parser = clap::value_parser!(u64).range(1..))]
        timeout: u64,
        /// Withdraw the routes and return at once.
        #[arg(long)]
        no_wait: bool,
    },
    /// Announce this node's VIPs again.
    Join,
}

impl ClusterCmd {
    /// The API request the command makes.
    pub fn request(&self) -> Request {
        match self {
            ClusterCmd::Leave { .. } => Request::ClusterLeave,
            ClusterCmd::Join => Request::ClusterJoin,
        }
    }
}

/// How often the counters are sampled while waiting.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);

/// Runs `command` against the daemon at `opts.socket`.
pub fn execute(command: &ClusterCmd, opts: &ClientOpts) -> Result<()> {
    let done: Done = serde_json::from_value(client::call(&opts.socket, &command.request())?)
        .context("unexpected answer from the daemon")?;
    let ClusterCmd::Leave {
        quiet,
        timeout,
        no_wait: false,
    } = *command
    else {
        return print_done(opts, &done.message, None);
    };
    if !opts.json {
        print(format!("{}; waiting for new flows to stop\n", done.message))?;
    }
    let started = Instant::now();
    let (quiet, timeout) = (Duration::from_secs(quiet), Duration::from_secs(timeout));
    let first = new_flows(opts)?;
    let (mut last, mut last_change) = (first, Instant::now());
    loop {
        sleep(SAMPLE_EVERY);
        let now = new_flows(opts)?;
        if now != last {
            (last, last_change) = (now, Instant::now());
        }
        if last_change.elapsed() >= quiet {
            ensure_still_left(opts)?;
            let msg = format!(
                "no new flow for {}s ({} new flows after the withdrawal, quiet after {:.1}s): \
                 safe to stop this node",
                quiet.as_secs(),
                last - first,
                (last_change - started).as_secs_f64()
            );
            return print_done(opts, &msg, Some((last - first, last_change - started)));
        }
        if started.elapsed() >= timeout {
            ensure_still_left(opts)?;
            bail!(
                "routes withdrawn, but new flows still arrive after {}s ({} so far): \
                 is the routing daemon running and exporting the route table?",
                timeout.as_secs(),
                last - first
            );
        }
    }
}

/// Fails when the node no longer is left: a `join` while `leave` waited
/// (another operator, a script) announces it again, and quiet counters
/// then say nothing about whether it is safe to stop.
fn ensure_still_left(opts: &ClientOpts) -> Result<()> {
    let status: StatusView = serde_json::from_value(client::call(&opts.socket, &Request::Status)?)
        .context("unexpected status answer from the daemon")?;
    match status.cluster {
        Some(c) if c.state == "left" => Ok(()),
        _ => bail!(
            "the node joined again (xdplb cluster join) while leave waited: it is announced, not \
             safe to stop"
        ),
    }
}

fn print_done(opts: &ClientOpts, message: &str, waited: Option<(u64, Duration)>) -> Result<()> {
    if !opts.json {
        return print(format!("{message}\n"));
    }
    let mut v = json!({ "message": message });
    if let Some((flows, quiet_after)) = waited {
        v["new_flows_after_leave"] = json!(flows);
        v["quiet_after_ms"] = json!(quiet_after.as_millis() as u64);
    }
    print(format!("{v}\n"))
}

/// New flows the datapath has seen: DSR picks and re-picks, NAT
/// translations.
fn new_flows(opts: &ClientOpts) -> Result<u64> {
    let stats: StatsView = serde_json::from_value(client::call(&opts.socket, &Request::Stats)?)
        .context("unexpected stats answer from the daemon")?;
    Ok(["flow_new", "flow_repick", "nat_new"]
        .iter()
        .map(|r| stats.reasons.get(*r).copied().unwrap_or(0))
        .sum())
}
