//! The systemd notification protocol (`Type=notify`, `WatchdogSec=`):
//! datagrams such as `READY=1` sent to the socket named by $NOTIFY_SOCKET.
//! Outside systemd the variable is unset and every call does nothing.

use std::{
    os::{linux::net::SocketAddrExt as _, unix::net::UnixDatagram},
    time::Duration,
};

use tracing::warn;

/// Sends `state` (e.g. "READY=1") to the service manager, if there is one.
/// A failure is logged, never fatal: the daemon works without systemd.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let send = || -> std::io::Result<()> {
        let socket = UnixDatagram::unbound()?;
        let bytes = path.as_encoded_bytes();
        // "@name" is a socket in the abstract namespace.
        if let Some(name) = bytes.strip_prefix(b"@") {
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            socket.send_to_addr(state.as_bytes(), &addr)?;
        } else {
            socket.send_to(state.as_bytes(), &path)?;
        }
        Ok(())
    };
    if let Err(err) = send() {
        warn!(
            "notifying systemd ({state}) at {}: {err}",
            path.to_string_lossy()
        );
    }
}

/// How often to send `WATCHDOG=1`: half of $WATCHDOG_USEC, when the
/// watchdog is on and meant for this process ($WATCHDOG_PID, if set).
pub fn watchdog_period() -> Option<Duration> {
    if let Some(pid) = std::env::var_os("WATCHDOG_PID") {
        if pid.to_str()?.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}
