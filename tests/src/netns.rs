//! RAII network namespaces.
//!
//! Code and programs enter a namespace with `setns(2)` on the namespace's
//! bind-mount in /var/run/netns rather than with `ip netns exec`: the latter
//! also unshares the mount namespace and remounts /sys, which hides the real
//! bpffs at /sys/fs/bpf where the load balancer pins its maps.

use std::{
    ffi::OsStr,
    fs::File,
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::PathBuf,
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{bail, Context as _};

/// Directory where `ip netns add` bind-mounts named namespaces.
const NETNS_DIR: &str = "/var/run/netns";

/// A named network namespace (as created by `ip netns add`), deleted on drop.
///
/// Deleting the namespace removes its name at once; the kernel frees it (and
/// destroys its interfaces, taking veth peers in other namespaces with them)
/// once no process or open fd refers to it any more. Processes started inside
/// are not owned by `Netns`: wrap them in [`crate::proc::Proc`].
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates the namespace `name` (`ip netns add`) and brings its `lo` up.
    ///
    /// Fails if the name is taken; use [`unique_prefix`] to build names that
    /// do not collide across concurrent tests and test runs.
    pub fn new(name: &str) -> anyhow::Result<Netns> {
        run_checked(Command::new("ip").args(["netns", "add", name]))
            .with_context(|| format!("creating network namespace {name}"))?;
        // Own it from here on, so a failure below still deletes it.
        let ns = Netns {
            name: name.to_owned(),
        };
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name (as shown by `ip netns list`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Path of the namespace's bind-mount, e.g. `/var/run/netns/NAME`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(NETNS_DIR).join(&self.name)
    }

    /// Runs `args[0]` with arguments `args[1..]` inside the namespace, waits
    /// for it and returns its stdout. Meant for short commands (`ip`,
    /// `sysctl`, `ethtool`, `ping`); the error names the namespace, the
    /// command line, the exit status and stderr.
    pub fn exec(&self, args: &[&str]) -> anyhow::Result<String> {
        let (program, rest) = args.split_first().context("Netns::exec: empty command")?;
        run_checked(self.command(program).args(rest))
            .with_context(|| format!("in network namespace {}", self.name))
    }

    /// Sets a sysctl inside the namespace (`sysctl -qw key=value`).
    ///
    /// `/proc/sys/net` shows the namespace of the process that opens it, so
    /// running sysctl via [`Netns::command`] affects this namespace only.
    pub fn sysctl(&self, key: &str, value: &str) -> anyhow::Result<()> {
        self.exec(&["sysctl", "-qw", &format!("{key}={value}")])?;
        Ok(())
    }

    /// MAC address of interface `iface` in this namespace, e.g. `"aa:bb:cc:dd:ee:ff"`.
    pub fn mac(&self, iface: &str) -> anyhow::Result<String> {
        // /sys/class/net would show the namespace sysfs was mounted in, not
        // ours, so ask the kernel over netlink via `ip`.
        let out = self.exec(&["ip", "-o", "link", "show", "dev", iface])?;
        out.split_whitespace()
            .skip_while(|&w| w != "link/ether")
            .nth(1)
            .map(str::to_owned)
            .with_context(|| format!("no link/ether address for {iface} in {}: {out}", self.name))
    }

    /// A [`Command`] whose child enters this namespace (`setns(2)`, network
    /// namespace only) just before exec. Unlike `ip netns exec`, the child
    /// keeps the caller's mount namespace and so sees the real /sys/fs/bpf.
    /// Use this for long-running programs such as the load balancer.
    ///
    /// The namespace file is opened now, in the parent (opening files between
    /// fork and exec is not async-signal-safe); if that fails, the error
    /// surfaces when the command is spawned.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(program);
        let file = File::open(self.path());
        // SAFETY: the closure only calls setns(2) and builds io::Errors from
        // errno, both async-signal-safe; the fd is owned by the closure,
        // which the Command keeps alive until it is dropped. std opens files
        // with O_CLOEXEC, so the fd does not leak into the program.
        unsafe {
            cmd.pre_exec(move || {
                // No formatting here (allocating after fork is unsafe); the
                // errno of the failed open is the best we can report.
                let file = file.as_ref().map_err(|e| {
                    e.raw_os_error()
                        .map_or_else(|| e.kind().into(), std::io::Error::from_raw_os_error)
                })?;
                if libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd
    }

    /// Runs `f` on a fresh thread that first joins this namespace, waits for
    /// it and returns its result. Sockets created inside `f` belong to the
    /// namespace (a socket keeps the namespace it was created in, so it may
    /// even be returned and used from elsewhere). A panic in `f` is
    /// re-raised in the caller.
    ///
    /// A fresh thread is used because `setns` switches only the calling
    /// thread, and the caller's thread must stay where it is.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let file = File::open(self.path())
            .unwrap_or_else(|e| panic!("opening {}: {e}", self.path().display()));
        let name = &self.name;
        std::thread::scope(|s| {
            let handle = std::thread::Builder::new()
                .name(format!("netns-{name}"))
                .spawn_scoped(s, move || {
                    // SAFETY: setns on a valid fd; affects only this thread.
                    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        panic!("setns into {name}: {}", std::io::Error::last_os_error());
                    }
                    drop(file);
                    f()
                })
                .expect("spawning namespace thread");
            handle
                .join()
                .unwrap_or_else(|payload| std::panic::resume_unwind(payload))
        })
    }
}

/// Runs `line`, split at spaces (no quoting), in `ns`; panics on failure.
pub fn exec_line(ns: &Netns, line: &str) -> String {
    ns.exec(&line.split(' ').collect::<Vec<_>>()).unwrap()
}

impl Drop for Netns {
    fn drop(&mut self) {
        let result = run_checked(Command::new("ip").args(["netns", "del", &self.name]));
        if let Err(e) = result {
            eprintln!("warning: deleting network namespace {}: {e:#}", self.name);
        }
    }
}

/// A short prefix for namespace names that is unique across concurrent test
/// runs (pid) and concurrent tests within one process (counter), e.g.
/// `dsr4711n3`. Namespace names are file names, but keep them short anyway so
/// `ip netns list` stays readable.
pub fn unique_prefix(tag: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{tag}{}n{n}", std::process::id())
}

/// Names of all namespaces known to `ip netns list`.
pub fn list() -> anyhow::Result<Vec<String>> {
    let out = run_checked(Command::new("ip").args(["netns", "list"]))?;
    // Lines look like "NAME" or "NAME (id: 3)".
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

/// Runs `cmd` to completion, returning stdout or an error with the command
/// line, exit status and stderr.
pub(crate) fn run_checked(cmd: &mut Command) -> anyhow::Result<String> {
    let line = command_line(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running `{line}`"))?;
    if !out.status.success() {
        let stdout = (!out.stdout.is_empty())
            .then(|| format!(" [stdout: {}]", String::from_utf8_lossy(&out.stdout).trim()));
        bail!(
            "`{line}` failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            stdout.unwrap_or_default()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `cmd` as a shell-like string for error messages.
pub(crate) fn command_line(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}
