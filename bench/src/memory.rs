use anyhow::Result;
use crate::harness::{Opts, Section};
pub const GROUP: &str = "memory";
pub const DESCRIPTION: &str = "";
pub fn run(_opts: &Opts) -> Result<Section> { anyhow::bail!("todo") }
