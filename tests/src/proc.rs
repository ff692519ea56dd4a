//! RAII child processes with captured output.

use std::{
    io::{BufRead as _, BufReader, Read},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        mpsc::{self, Receiver, RecvTimeoutError, Sender},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};

/// How long [`Proc::terminate`] (and `Drop`) waits after SIGTERM before SIGKILL.
pub const TERM_GRACE: Duration = Duration::from_secs(2);

/// A child process that is terminated (SIGTERM, then SIGKILL after
/// [`TERM_GRACE`]) and reaped on drop, so a failing test leaves no load
/// balancer or backend running (which would also keep its namespace alive).
///
/// Its stdout and stderr are read by background threads: every line is kept
/// (see [`Proc::output`]) and stdout lines are also queued for
/// [`Proc::wait_for_stdout_line`]. When dropped during a panic, the captured
/// output is printed to stderr, so a failed test shows what the process said.
pub struct Proc {
    child: Child,
    label: String,
    log: Arc<Mutex<Vec<String>>>,
    stdout_lines: Receiver<String>,
    readers: Vec<JoinHandle<()>>,
}

impl Proc {
    /// Spawns `cmd` with stdin from /dev/null and stdout/stderr captured.
    /// The process is labelled with its program's file name.
    pub fn spawn(cmd: &mut Command) -> anyhow::Result<Proc> {
        let label = std::path::Path::new(cmd.get_program())
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| cmd.get_program().to_string_lossy().into_owned());
        Self::spawn_with(cmd, &label, false)
    }

    /// Like [`Proc::spawn`] with an explicit `label` for messages; with
    /// `echo`, every output line is also printed to stderr as `[label] line`
    /// as it arrives (the test harness captures it unless `--nocapture`).
    pub fn spawn_with(cmd: &mut Command, label: &str, echo: bool) -> anyhow::Result<Proc> {
        let line = crate::netns::command_line(cmd);
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawning `{line}`"))?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        // Readers are never joined unconditionally: they end when the pipes
        // close, which a grandchild holding the pipe could delay forever.
        let readers = [
            spawn_reader(stdout, label, "", echo, log.clone(), Some(tx)),
            spawn_reader(stderr, label, "stderr: ", echo, log.clone(), None),
        ]
        .into_iter()
        .flatten()
        .collect();
        Ok(Proc {
            child,
            label: label.to_owned(),
            log,
            stdout_lines: rx,
            readers,
        })
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The label used in messages (program name unless given).
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Sends `signal` (e.g. `libc::SIGHUP`) to the process. Fails if it has
    /// already exited (its pid may have been reused).
    pub fn kill(&mut self, signal: i32) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} already exited ({status})", self.label);
        }
        let pid = libc::pid_t::try_from(self.pid()).context("pid out of range")?;
        // SAFETY: plain syscall; the child is not reaped yet (checked above),
        // so the pid still names it.
        if unsafe { libc::kill(pid, signal) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("kill({pid}, {signal}) for {}", self.label));
        }
        Ok(())
    }

    /// Kills the process with SIGKILL and reaps it. Once this returns, the
    /// kernel has closed its sockets: a server's host now refuses
    /// connections. (Right after [`Proc::kill`] it may still complete
    /// handshakes, and reset them when the process dies.)
    pub fn crash(&mut self) -> anyhow::Result<ExitStatus> {
        self.kill(libc::SIGKILL)?;
        Ok(self.child.wait()?)
    }

    /// Waits until the process prints a stdout line containing `needle` and
    /// returns that line. Lines before it are skipped (but stay in
    /// [`Proc::output`]). Fails on timeout or if stdout closes first; the
    /// error includes everything the process printed so far.
    pub fn wait_for_stdout_line(
        &mut self,
        needle: &str,
        timeout: Duration,
    ) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stdout_lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return Ok(line),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => bail!(
                    "timed out after {timeout:?} waiting for {:?} on stdout of {}; \
                     output so far:\n{}",
                    needle,
                    self.label,
                    self.output_text()
                ),
                Err(RecvTimeoutError::Disconnected) => {
                    // Give the process a moment to exit and stderr to drain,
                    // so the message says why it stopped.
                    let status = self.wait_timeout(Duration::from_millis(500)).ok().flatten();
                    self.drain_output(Duration::from_millis(500));
                    let status =
                        status.map_or_else(|| "still running".to_owned(), |s| s.to_string());
                    bail!(
                        "{} closed stdout ({status}) before printing {:?}; output:\n{}",
                        self.label,
                        needle,
                        self.output_text()
                    )
                }
            }
        }
    }

    /// Returns the exit status if the process has exited, without blocking.
    pub fn try_wait(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// Waits up to `timeout` for the process to exit; `None` if still running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> anyhow::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the process: SIGTERM, then SIGKILL if it is still running after
    /// [`TERM_GRACE`]; reaps it and returns its exit status.
    pub fn terminate(&mut self) -> anyhow::Result<ExitStatus> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(status);
        }
        // Ignore failure: it may exit between try_wait and kill.
        let _ = self.kill(libc::SIGTERM);
        if let Some(status) = self.wait_timeout(TERM_GRACE)? {
            return Ok(status);
        }
        eprintln!(
            "{} ignored SIGTERM for {TERM_GRACE:?}; sending SIGKILL",
            self.label
        );
        self.child.kill()?;
        Ok(self.child.wait()?)
    }

    /// Waits up to `timeout` for the output readers to reach end of file
    /// (they do once the process, and any child sharing its pipes, exited),
    /// so [`Proc::output`] is complete.
    pub fn drain_output(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.readers.iter().all(JoinHandle::is_finished) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// All output lines so far, in arrival order; stderr lines are prefixed
    /// with `stderr: `.
    pub fn output(&self) -> Vec<String> {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// [`Proc::output`] as one string, each line prefixed with `[label] `.
    pub fn output_text(&self) -> String {
        self.output()
            .iter()
            .map(|l| format!("[{}] {l}\n", self.label))
            .collect()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let status = self.terminate();
        if std::thread::panicking() {
            self.drain_output(Duration::from_millis(500));
            eprintln!(
                "--- output of {} (pid {}, {}) ---\n{}--- end of {} ---",
                self.label,
                self.pid(),
                match &status {
                    Ok(s) => s.to_string(),
                    Err(e) => format!("{e:#}"),
                },
                self.output_text(),
                self.label
            );
        } else if let Err(e) = status {
            eprintln!(
                "warning: stopping {} (pid {}): {e:#}",
                self.label,
                self.pid()
            );
        }
    }
}

impl std::fmt::Debug for Proc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proc")
            .field("label", &self.label)
            .field("pid", &self.pid())
            .finish()
    }
}

fn spawn_reader(
    pipe: impl Read + Send + 'static,
    label: &str,
    prefix: &'static str,
    echo: bool,
    log: Arc<Mutex<Vec<String>>>,
    tx: Option<Sender<String>>,
) -> Option<JoinHandle<()>> {
    let echo_label = label.to_owned();
    let spawned = std::thread::Builder::new()
        .name(format!("{label}-output"))
        .spawn(move || {
            let mut reader = BufReader::new(pipe);
            let mut buf = Vec::new();
            // read_until + lossy conversion rather than lines(): a non-UTF-8
            // line must not stop the reader, or the child blocks on a full pipe.
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let line = String::from_utf8_lossy(&buf)
                    .trim_end_matches(['\n', '\r'])
                    .to_owned();
                if echo {
                    eprintln!("[{echo_label}] {prefix}{line}");
                }
                log.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(format!("{prefix}{line}"));
                if let Some(tx) = &tx {
                    // Nobody waiting any more is fine.
                    let _ = tx.send(line);
                }
            }
        });
    spawned
        .map_err(|e| eprintln!("warning: cannot start output reader for {label}: {e}"))
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_for_lines_and_reports_output() {
        let mut p = Proc::spawn(
            Command::new("sh").args(["-c", "echo one; echo oops >&2; echo ready now; sleep 30"]),
        )
        .unwrap();
        assert_eq!(
            p.wait_for_stdout_line("ready", Duration::from_secs(5))
                .unwrap(),
            "ready now"
        );
        let start = Instant::now();
        // sh dies from SIGTERM at once.
        let status = p.terminate().unwrap();
        assert!(start.elapsed() < TERM_GRACE, "{status}");
        let out = p.output();
        assert!(
            out.contains(&"one".to_owned()) && out.contains(&"stderr: oops".to_owned()),
            "{out:?}"
        );

        let mut p = Proc::spawn(Command::new("sh").args(["-c", "echo bad >&2; exit 3"])).unwrap();
        let err = format!(
            "{:#}",
            p.wait_for_stdout_line("ready", Duration::from_secs(5))
                .unwrap_err()
        );
        assert!(
            err.contains("exit status: 3") && err.contains("stderr: bad"),
            "{err}"
        );

        // A process ignoring SIGTERM is killed after the grace period.
        let mut p = Proc::spawn(
            Command::new("sh").args(["-c", "trap '' TERM; echo up; while :; do sleep 0.1; done"]),
        )
        .unwrap();
        p.wait_for_stdout_line("up", Duration::from_secs(5))
            .unwrap();
        let pid = p.pid();
        drop(p);
        // SAFETY: signal 0 only checks existence.
        assert_ne!(
            unsafe { libc::kill(pid as i32, 0) },
            0,
            "pid {pid} survived drop"
        );
    }
}
