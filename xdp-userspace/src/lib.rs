//! xdplb: loader, control plane and CLI of the XDP load balancer.
pub mod addr;
pub mod config;
pub mod controller;
pub mod dataplane;
pub mod loader;
pub mod maglev;
pub mod neigh;
pub mod program;
