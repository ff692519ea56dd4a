#![no_std]
// Lets xdp-userspace name this crate as a build dependency (see its build.rs).
