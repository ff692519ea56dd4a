//! placeholder
use crate::harness::{Figure, Opts};

pub fn run(opts: &Opts) -> anyhow::Result<Vec<Figure>> {
    let _ = opts;
    Ok(vec![])
}
