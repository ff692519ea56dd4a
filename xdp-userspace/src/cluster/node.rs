//! This node's part in a cluster, as the daemon drives it: which frames
//! the datapath accepts ([`IfMacs`]) and which VIPs it announces
//! ([`Announcer`]), both re-derived from the configuration and the
//! controller's state after every change and health transition.

use std::{collections::BTreeSet, net::IpAddr, path::Path};

use anyhow::Result;

use super::{
    announce::{Announcer, ClusterView},
    macs::{IfMacs, Mac},
};
use crate::{config::Config, controller::Controller};

/// The daemon's cluster state.
pub struct Node {
    macs: IfMacs,
    /// (ifindex, own MAC) of every interface the datapath is attached to.
    interfaces: Vec<(u32, Mac)>,
    /// The extra MACs the table was last synced with: it changes only with
    /// them or with `interfaces`, so it is not rewritten on every tick.
    extra: Vec<Mac>,
    announcer: Announcer,
}

impl Node {
    /// A node with no interface yet; `state_file` locates the "left" marker.
    pub fn new(macs: IfMacs, state_file: &Path) -> Self {
        Self {
            macs,
            interfaces: Vec::new(),
            extra: Vec::new(),
            announcer: Announcer::new(state_file),
        }
    }

    /// Accepts frames to `mac` (and the configured extra MACs) on
    /// `ifindex`: call before attaching the program there.
    pub fn add_interface(&mut self, ifindex: u32, mac: Mac, config: &Config) -> Result<()> {
        self.interfaces.push((ifindex, mac));
        self.macs
            .sync(&self.interfaces, &config.cluster.extra_macs)?;
        self.extra.clone_from(&config.cluster.extra_macs);
        Ok(())
    }

    /// Brings the MAC table and the announced routes in line with `config`
    /// and the controller's backend states. Call only while the datapath is
    /// attached: a VIP is announced only when this node forwards it.
    pub fn sync(&mut self, config: &Config, controller: &Controller) -> Result<()> {
        if self.extra != config.cluster.extra_macs {
            self.macs
                .sync(&self.interfaces, &config.cluster.extra_macs)?;
            self.extra.clone_from(&config.cluster.extra_macs);
        }
        self.announcer
            .sync(config.cluster.route_table, servable(controller))
    }

    /// `xdplb cluster leave`.
    pub fn leave(&mut self) -> Result<()> {
        self.announcer.leave()
    }

    /// `xdplb cluster join`.
    pub fn join(&mut self) -> Result<()> {
        self.announcer.join()
    }

    /// Whether announcement is configured.
    pub fn announcing(&self) -> bool {
        self.announcer.view().is_some()
    }

    /// Withdraws every route: the datapath is about to be detached.
    pub fn withdraw_all(&mut self) -> Result<()> {
        self.announcer.withdraw_all()
    }

    /// What `xdplb status` shows (`None`: no `[cluster] route_table`).
    pub fn view(&self) -> Option<ClusterView> {
        self.announcer.view()
    }
}

/// The VIPs this node can serve: those of every service with a backend
/// taking new flows (failing open counts: the datapath then spreads over
/// every backend). A VIP shared by several services (ports) is servable
/// when any of them is.
pub fn servable(controller: &Controller) -> BTreeSet<IpAddr> {
    controller
        .services()
        .filter(|s| s.active() > 0 || s.failing_open)
        .map(|s| s.config.vip)
        .collect()
}
