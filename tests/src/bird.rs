//! BIRD 2 (`bird`, `birdc`) run in a test namespace, with its own config
//! file, control socket and pid file, owned like any [`Proc`]: dropping a
//! [`Bird`] kills the daemon and removes its files.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};

use crate::{netns::Netns, proc::Proc};

/// A running `bird -f` in a namespace.
pub struct Bird {
    proc: Proc,
    dir: PathBuf,
    name: String,
}

impl Bird {
    /// Writes `config` to a directory of its own (named after the unique
    /// `name`) and starts BIRD in `ns` with it; returns once its control
    /// socket answers.
    pub fn start(ns: &Netns, name: &str, config: &str) -> Result<Self> {
        let bird = crate::find_executable("bird")
            .context("`bird` not found: install BIRD 2 (Debian package bird2)")?;
        let dir = std::env::temp_dir().join(format!("bird-{name}"));
        std::fs::create_dir_all(&dir)?;
        let conf = dir.join("bird.conf");
        std::fs::write(&conf, config)?;
        let mut cmd = ns.command(bird);
        cmd.args(["-f", "-c"]).arg(&conf);
        cmd.arg("-s").arg(dir.join("ctl"));
        cmd.arg("-P").arg(dir.join("pid"));
        let proc = Proc::spawn_with(&mut cmd, name, false)?;
        let bird = Self {
            proc,
            dir,
            name: name.to_owned(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while bird.birdc(&["show", "status"]).is_err() {
            ensure!(
                Instant::now() <= deadline,
                "BIRD {name} did not answer on its control socket\n{}",
                bird.proc.output_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(bird)
    }

    /// The directory holding the config, socket and pid file.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `birdc -s CTL ARGS`: its output, or an error.
    pub fn birdc(&self, args: &[&str]) -> Result<String> {
        let out = Command::new("birdc")
            .arg("-s")
            .arg(self.dir.join("ctl"))
            .args(args)
            .output()
            .context("running birdc")?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() || text.contains("Unable to connect") {
            bail!(
                "birdc {} ({}): {text}{}",
                args.join(" "),
                self.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(text)
    }

    /// Waits until BGP protocol `protocol` is Established.
    pub fn wait_established(&self, protocol: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.birdc(&["show", "protocols", protocol])?;
            if text.contains("Established") {
                return Ok(());
            }
            ensure!(
                Instant::now() <= deadline,
                "BGP session {protocol} of {} not established: {text}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGKILL, as if the host died (the caller cuts its link too: a killed
    /// BIRD's kernel closes the TCP session, which the peer notices at once).
    pub fn kill(&mut self) -> Result<()> {
        self.proc.kill(libc::SIGKILL)?;
        self.proc.wait_timeout(Duration::from_secs(5)).map(drop)
    }
}

impl Drop for Bird {
    fn drop(&mut self) {
        let _ = self.proc.kill(libc::SIGKILL);
        let _ = self.proc.wait_timeout(Duration::from_secs(5));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
