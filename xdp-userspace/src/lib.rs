//! xdplb: loader, control plane and CLI of the XDP load balancer.
pub mod addr;
pub mod api;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod controller;
pub mod daemon;
pub mod dataplane;
pub mod health;
pub mod loader;
pub mod lock;
pub mod maglev;
pub(crate) mod neigh;
pub(crate) mod passive;
pub mod program;
mod state;
pub mod systemd;
pub mod web;
