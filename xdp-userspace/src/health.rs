//! Active health checks: every backend is probed on a fixed schedule, and a
//! verdict change is reported as a [`HealthEvent`].
//!
//! Three layers, each usable on its own:
//! - [`Hysteresis`] turns probe results into a verdict: `fall` consecutive
//!   failures take a backend down, `rise` consecutive successes bring it
//!   back. A backend that fails now and then is therefore not flapped in and
//!   out of the Maglev table, where every flip moves flows.
//! - [`probe`] runs one TCP or HTTP check; a TCP check is a half-open SYN
//!   from a raw socket (`half_open.rs`) when the daemon may open one.
//! - [`HealthChecker`] starts every backend's probes on its schedule from
//!   one task, on a single-threaded runtime of its own (a half-open check's
//!   answer is recorded where it is read, with no task of its own), sends
//!   an event on every verdict change, and keeps each backend's latest
//!   results readable ([`HealthChecker::status`]) for the API.
//!
//! Detection time is bounded: probes run at a fixed rate, so the first probe
//! after a backend dies starts within one `interval`, and the `fall`-th
//! failing one ends `(fall - 1) × interval + timeout` after that. As
//! `timeout <= interval`, a dead backend is reported within
//! `(fall + 1) × interval`, plus any wait for a probe slot when more than
//! `max_concurrent` probes are due at once.

use std::{
    collections::BTreeMap,
    fmt,
    future::Future,
    hash::{DefaultHasher, Hash, Hasher},
    io,
    net::{IpAddr, SocketAddr},
    pin::{pin, Pin},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, MutexGuard, PoisonError, Weak,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use futures_util::{stream::FuturesUnordered, FutureExt as _, StreamExt as _};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
    runtime::{self, Handle},
    sync::{
        mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender},
        oneshot, Semaphore,
    },
    time,
};
use tracing::warn;

use self::half_open::{Check, HalfOpen, Waiter};
use crate::config::{CheckKind, HealthCheck};

mod half_open;

// ---------------------------------------------------------------------------
// Hysteresis.

/// A backend's health verdict, changed only by runs of equal probe results.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hysteresis {
    rise: u32,
    fall: u32,
    healthy: bool,
    ok_streak: u32,
    fail_streak: u32,
}

impl Hysteresis {
    /// A verdict that starts as `initially_healthy`. A `rise` or `fall` of 0
    /// counts as 1 (the configuration never has one).
    #[must_use]
    pub fn new(rise: u32, fall: u32, initially_healthy: bool) -> Self {
        Self {
            rise: rise.max(1),
            fall: fall.max(1),
            healthy: initially_healthy,
            ok_streak: 0,
            fail_streak: 0,
        }
    }

    /// Records one probe result. Returns the new verdict if it changed: a
    /// healthy backend goes down on its `fall`-th consecutive failure, a
    /// down one comes up on its `rise`-th consecutive success.
    pub fn record(&mut self, ok: bool) -> Option<bool> {
        let (streak, other, needed) = if ok {
            (&mut self.ok_streak, &mut self.fail_streak, self.rise)
        } else {
            (&mut self.fail_streak, &mut self.ok_streak, self.fall)
        };
        *streak = streak.saturating_add(1);
        *other = 0;
        if self.healthy != ok && *streak >= needed {
            self.healthy = ok;
            Some(ok)
        } else {
            None
        }
    }

    /// The current verdict.
    #[must_use]
    pub fn healthy(&self) -> bool {
        self.healthy
    }

    /// Takes the backend down at once (a failed probe after a suspicion):
    /// returns true if that changed the verdict.
    pub fn force_down(&mut self) -> bool {
        self.ok_streak = 0;
        self.fail_streak = self.fail_streak.max(1);
        std::mem::replace(&mut self.healthy, false)
    }

    /// How many results in a row, up to the latest, were equal to it.
    #[must_use]
    pub fn streak(&self) -> u32 {
        // One of the two is always 0: each result resets the other streak.
        self.ok_streak.max(self.fail_streak)
    }
}

// ---------------------------------------------------------------------------
// Probes.

/// The longest HTTP status line read. Real ones are about 20 bytes; the
/// limit keeps a backend that answers with something else from making the
/// checker buffer it all.
const MAX_STATUS_LINE: u64 = 256;

/// Runs one check of `target`. The whole probe, connect included, must
/// finish within `timeout`.
///
/// `Tcp` succeeds when the backend accepts a connection: with
/// `half_open`, when it answers a SYN with a SYN-ACK; without, when a
/// connection is established (and reset at once). `Http` sends one
/// `HTTP/1.1` request and succeeds when the status is one of
/// `expect_status`; only the status line is read. `None` always succeeds.
///
/// # Errors
///
/// A failed check, as a message saying which step failed and why:
/// `connect 10.0.0.1:80: connection refused`,
/// `read HTTP status line: timed out after 500ms`,
/// `HTTP status 503, expected [200]`.
pub async fn probe(
    kind: &CheckKind,
    target: SocketAddr,
    timeout: Duration,
    half_open: Option<&HalfOpen>,
) -> Result<(), String> {
    let deadline = Deadline::after(time::Instant::now(), timeout);
    match kind {
        CheckKind::None => Ok(()),
        CheckKind::Tcp => match half_open {
            Some(half_open) => half_open.probe(target, deadline).await,
            None => connect(target, deadline).await.map(drop),
        },
        CheckKind::Http {
            method,
            path,
            expect_status,
            host,
        } => {
            let host = host.clone().unwrap_or_else(|| host_header(target.ip()));
            let request = format!(
                "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nUser-Agent: \
                    xdplb-health\r\n\r\n"
            );
            let mut stream = connect(target, deadline).await?;
            deadline
                .run(Step::SendRequest, stream.write_all(request.as_bytes()))
                .await?;
            let line = deadline
                .run(Step::ReadStatusLine, read_status_line(&mut stream))
                .await?;
            check_status(&line, expect_status)
        }
    }
}

/// The end of a probe's time budget, shared by its steps so that each step's
/// error can say which one ran out of time.
#[derive(Clone, Copy)]
struct Deadline {
    at: time::Instant,
    /// The whole budget, for messages.
    timeout: Duration,
}

/// A step of a probe, as its errors name it. Formatted only on failure:
/// most probes succeed, thousands a second.
#[derive(Clone, Copy)]
enum Step {
    Connect(SocketAddr),
    SendRequest,
    ReadStatusLine,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Connect(target) => write!(f, "connect {target}"),
            Step::SendRequest => f.write_str("send HTTP request"),
            Step::ReadStatusLine => f.write_str("read HTTP status line"),
        }
    }
}

impl Deadline {
    /// `timeout` from `start`.
    fn after(start: time::Instant, timeout: Duration) -> Self {
        Self {
            at: start + timeout,
            timeout,
        }
    }

    /// When the time started running.
    fn start(&self) -> time::Instant {
        self.at - self.timeout
    }

    /// Runs one step of a probe; errors are prefixed with the step.
    async fn run<T>(
        self,
        step: Step,
        op: impl Future<Output = io::Result<T>>,
    ) -> Result<T, String> {
        match time::timeout_at(self.at, op).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(format!("{step}: {}", io_reason(&e))),
            Err(_) => Err(format!("{step}: timed out after {:?}", self.timeout)),
        }
    }
}

/// A connection that ends with a reset when it is dropped: a check has
/// nothing to say after its answer, and a normal close would leave one
/// TIME_WAIT socket per check on this host (10,000 backends checked every
/// second filled the kernel's 131,072 buckets, `tcp_max_tw_buckets`).
/// HAProxy ends its checks the same way.
async fn connect(target: SocketAddr, deadline: Deadline) -> Result<TcpStream, String> {
    let step = Step::Connect(target);
    let stream = deadline.run(step, TcpStream::connect(target)).await?;
    stream
        .set_zero_linger()
        .map_err(|e| format!("{step}: SO_LINGER: {}", io_reason(&e)))?;
    Ok(stream)
}

/// An I/O error as part of a sentence: `Connection refused (os error 111)`
/// becomes `connection refused`. The error number tells an operator nothing
/// more.
fn io_reason(e: &io::Error) -> String {
    let full = e.to_string();
    let text = full.split(" (os error ").next().unwrap_or_default();
    let mut chars = text.chars();
    chars
        .next()
        .map(|first| first.to_lowercase().chain(chars).collect())
        .unwrap_or_default()
}

/// The `Host` header naming an address: IPv6 literals go in brackets
/// (RFC 9110, `uri-host`).
fn host_header(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    }
}

/// The response's first line, at most [`MAX_STATUS_LINE`] bytes; empty if
/// the backend closed the connection without answering.
async fn read_status_line(stream: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut line = Vec::new();
    BufReader::new(stream)
        .take(MAX_STATUS_LINE)
        .read_until(b'\n', &mut line)
        .await?;
    Ok(line)
}

fn check_status(line: &[u8], expect: &[u16]) -> Result<(), String> {
    let status = parse_status_line(line)?;
    if expect.contains(&status) {
        Ok(())
    } else {
        Err(format!("HTTP status {status}, expected {expect:?}"))
    }
}

/// The status code of `HTTP/1.1 200 OK`.
fn parse_status_line(line: &[u8]) -> Result<u16, String> {
    if line.is_empty() {
        return Err("connection closed before the HTTP status line".to_owned());
    }
    let text = String::from_utf8_lossy(line);
    let text = text.trim_end();
    let mut fields = text.split(' ');
    let version = fields.next().unwrap_or_default();
    let code = fields.next().unwrap_or_default();
    let well_formed =
        version.starts_with("HTTP/") && code.len() == 3 && code.bytes().all(|b| b.is_ascii_digit());
    match code.parse() {
        Ok(status) if well_formed => Ok(status),
        _ => Err(format!("malformed HTTP status line {text:?}")),
    }
}

// ---------------------------------------------------------------------------
// The scheduler's public types.

/// One backend of one service, to be checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckTarget {
    pub service: String,
    /// The backend's address and port. The probe goes to `check.port` if
    /// set, to this port otherwise.
    pub backend: (IpAddr, u16),
    pub check: HealthCheck,
    /// The verdict to start from when the checker first sees this backend;
    /// ignored for one it already checks, which keeps its verdict.
    pub initially_healthy: bool,
}

impl CheckTarget {
    /// The order of [`TargetKey`]s, without copying the name.
    fn sort_key(&self) -> (&str, (IpAddr, u16)) {
        (&self.service, self.backend)
    }
}

/// A backend's verdict changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthEvent {
    pub service: String,
    pub backend: (IpAddr, u16),
    /// The new verdict.
    pub healthy: bool,
    /// Why: `3 consecutive failures: connect 10.0.0.1:80: connection
    /// refused`, `2 consecutive successes`, or `health checks off`.
    pub detail: String,
    /// When the deciding probe ended.
    pub at: Instant,
}

/// What the checker knows about one backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetStatus {
    pub service: String,
    pub backend: (IpAddr, u16),
    /// The current verdict; always true for `CheckKind::None`.
    pub healthy: bool,
    /// The latest probe's result; `None` before the first probe.
    pub last_result: Option<Result<(), String>>,
    /// When the latest probe ended.
    pub last_at: Option<Instant>,
    /// Verdict changes since the checker first saw the backend.
    pub transitions: u64,
    /// Probes run since the checker first saw the backend.
    pub checks: u64,
    /// Of those, the probes that failed.
    pub failures: u64,
    /// How long the latest probe took.
    pub last_duration: Option<Duration>,
}

impl TargetStatus {
    fn new(target: &CheckTarget) -> Self {
        Self {
            service: target.service.clone(),
            backend: target.backend,
            healthy: target.initially_healthy,
            last_result: None,
            last_at: None,
            transitions: 0,
            checks: 0,
            failures: 0,
            last_duration: None,
        }
    }

    /// Records a verdict change and returns the event announcing it.
    fn transition(&mut self, healthy: bool, detail: String, at: Instant) -> HealthEvent {
        self.healthy = healthy;
        self.transitions += 1;
        HealthEvent {
            service: self.service.clone(),
            backend: self.backend,
            healthy,
            detail,
            at,
        }
    }
}

// ---------------------------------------------------------------------------
// The scheduler.

/// Identity of a target: service name, backend address and port.
type TargetKey = (String, (IpAddr, u16));

/// Checks backends in the background, on a thread of its own, and sends a
/// [`HealthEvent`] whenever a verdict changes.
///
/// Dropping it stops every check, as does [`HealthChecker::shutdown`].
pub struct HealthChecker {
    targets: BTreeMap<TargetKey, Running>,
    /// Bounds the probes in flight, across all targets.
    probe_slots: Arc<Semaphore>,
    /// How TCP checks are made; `None`: by full connects.
    half_open: Option<Arc<HalfOpen>>,
    /// Hands new targets to the [`Scheduler`].
    schedule: UnboundedSender<(time::Instant, Weak<Prober>)>,
    events: UnboundedSender<HealthEvent>,
    /// Where tasks are spawned; dropped last, after every target.
    runtime: CheckThread,
}

/// Probes start on a grid of this step (from a start time jittered over
/// the interval; intervals, whole multiples of it in practice, keep them
/// there): the probes due in one step start together, and the thread wakes
/// once for them, not once per probe. At 1,000 backends, waking for every
/// probe cost more CPU than the probes' own system calls.
const PROBE_GRID: Duration = Duration::from_millis(10);

/// The checks' own single-threaded tokio runtime, on a thread of its own.
/// Thousands of probes a second, each a few wake-ups, on a multi-threaded
/// runtime kept waking and parking its other threads (at 10,000 backends
/// that cost more CPU than the probes' own system calls); here one thread
/// does them all, and nothing the daemon does delays them.
struct CheckThread {
    handle: Handle,
    /// The origin of the [`PROBE_GRID`].
    epoch: time::Instant,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl CheckThread {
    fn start() -> io::Result<Self> {
        let rt = runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = rt.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("health-checks".into())
            .spawn(move || {
                // Until the checker is dropped; dropping the runtime then
                // drops whatever tasks are left.
                let _ = rt.block_on(stopped);
            })?;
        Ok(Self {
            handle,
            epoch: time::Instant::now(),
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The first point of the probe grid at or after `at`.
    fn on_grid(&self, at: time::Instant) -> time::Instant {
        let step = PROBE_GRID.as_nanos();
        let steps = at.duration_since(self.epoch).as_nanos().div_ceil(step);
        self.epoch + Duration::from_nanos(u64::try_from(steps * step).unwrap_or(u64::MAX))
    }
}

impl Drop for CheckThread {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl HealthChecker {
    /// Starts checking `targets`, at most `max_concurrent` probes at a time
    /// (0 counts as 1), on a thread of its own. Verdict changes go to
    /// `events`; a closed channel does not stop the checks, whose status
    /// stays readable.
    ///
    /// # Errors
    ///
    /// When the thread or its runtime cannot be started.
    pub fn spawn(
        targets: Vec<CheckTarget>,
        max_concurrent: usize,
        events: UnboundedSender<HealthEvent>,
    ) -> io::Result<HealthChecker> {
        let runtime = CheckThread::start()?;
        let half_open = HalfOpen::start(&runtime.handle)
            .inspect_err(|e| {
                warn!(
                    "TCP health checks connect fully (a socket per check; half-open checks \
                     need CAP_NET_RAW): raw socket: {e}"
                );
            })
            .ok();
        let (schedule, added) = unbounded_channel();
        let scheduler = Scheduler {
            due: BTreeMap::new(),
            added,
            running: FuturesUnordered::new(),
        };
        runtime.handle.spawn(scheduler.run());
        let mut checker = HealthChecker {
            targets: BTreeMap::new(),
            probe_slots: Arc::new(Semaphore::new(max_concurrent.max(1))),
            half_open,
            schedule,
            events,
            runtime,
        };
        checker.update(targets);
        Ok(checker)
    }

    /// Makes `targets` the set checked, as after a configuration reload.
    ///
    /// A target is identified by service name and backend. One whose check
    /// is unchanged keeps running undisturbed: its verdict, streak and
    /// schedule survive. One whose check changed is restarted with the new
    /// check, keeping its verdict and counters (see below). Targets not in
    /// `targets` are stopped, new ones started from `initially_healthy`. If
    /// `targets` names a backend twice, the last entry wins.
    ///
    /// Why a restarted target keeps its verdict rather than taking
    /// `initially_healthy`: the caller's view of it was built from this
    /// checker's events, some possibly still queued, so starting from the
    /// checker's own verdict is what keeps the two in agreement.
    pub fn update(&mut self, mut targets: Vec<CheckTarget>) {
        // A merge of two sorted sequences and a map built from sorted
        // pairs, not a removal and an insertion per target: at 10,000
        // backends every reload goes through here, under the daemon's lock.
        targets.sort_by(|a, b| a.sort_key().cmp(&b.sort_key()));
        targets.dedup_by(|later, kept| {
            let same = later.sort_key() == kept.sort_key();
            if same {
                std::mem::swap(later, kept);
            }
            same
        });
        let mut previous = std::mem::take(&mut self.targets).into_iter().peekable();
        let mut next = Vec::with_capacity(targets.len());
        for target in targets {
            let at = target.sort_key();
            let order = |(key, _): &(TargetKey, Running)| (key.0.as_str(), key.1).cmp(&at);
            // Targets that disappeared: dropping them stops them.
            while previous.next_if(|entry| order(entry).is_lt()).is_some() {}
            let running = match previous.next_if(|entry| order(entry).is_eq()) {
                Some((key, running)) if running.prober.check == target.check => (key, running),
                changed => {
                    let carried = changed.map(|(_, old)| old.retire());
                    let key = (target.service.clone(), target.backend);
                    (key, self.start(target, carried))
                }
            };
            next.push(running);
        }
        self.targets = next.into_iter().collect();
    }

    /// The status of every target, ordered by service name, then backend.
    pub fn status(&self) -> Vec<TargetStatus> {
        self.targets.values().map(Running::status).collect()
    }

    /// The status of one target, if it is checked.
    pub fn status_of(&self, service: &str, backend: (IpAddr, u16)) -> Option<TargetStatus> {
        self.targets
            .get(&(service.to_owned(), backend))
            .map(Running::status)
    }

    /// The traffic says the backend may be dead (passive detection): probe
    /// it now, out of schedule, and take it down at once if that probe
    /// fails; a probe that succeeds changes nothing. Returns false when
    /// the backend is not checked (no probe can confirm the suspicion, and
    /// suspicion alone never takes a backend down).
    pub fn suspect(&self, service: &str, backend: (IpAddr, u16), why: String) -> bool {
        let Some(Running { prober }) = self.targets.get(&(service.to_owned(), backend)) else {
            return false;
        };
        if prober.check.kind == CheckKind::None {
            return false;
        }
        // A task of its own, not a wake-up of the scheduled one: waiting
        // for either a tick or a wake-up cost every scheduled probe a
        // registration. The two may probe at once; a half-open check
        // sends one SYN for both.
        let prober = Arc::clone(prober);
        self.runtime.handle.spawn(async move {
            if let Some((Err(error), took)) = prober.probe_once().await {
                prober.record(Err(error), took, Some(&why));
            }
        });
        true
    }

    /// Stops every check: no event is sent after this returns.
    pub fn shutdown(self) {
        drop(self);
    }

    /// Starts checking `target`, from `previous` status if it had one.
    fn start(&self, target: CheckTarget, previous: Option<TargetStatus>) -> Running {
        let mut status = previous.unwrap_or_else(|| TargetStatus::new(&target));
        let probed = target.check.kind != CheckKind::None;
        if !probed && !status.healthy {
            // No checks means healthy; tell the caller, which held the
            // backend down (a closed channel: see `HealthChecker::spawn`).
            let event = status.transition(true, "health checks off".to_owned(), Instant::now());
            let _ = self.events.send(event);
        }
        let hysteresis = Hysteresis::new(target.check.rise, target.check.fall, status.healthy);
        let first_probe = probed.then(|| {
            let mut rng = XorShift64::new(seed(&target.sort_key()));
            let first_probe_in = jitter(target.check.interval, &mut rng);
            self.runtime.on_grid(time::Instant::now() + first_probe_in)
        });
        let prober = Arc::new(Prober {
            probe_addr: SocketAddr::new(
                target.backend.0,
                target.check.port.unwrap_or(target.backend.1),
            ),
            check: target.check,
            shared: Mutex::new(Shared {
                status,
                hysteresis,
                retired: false,
            }),
            busy: AtomicBool::new(false),
            probe_slots: Arc::clone(&self.probe_slots),
            half_open: self.half_open.clone(),
            events: self.events.clone(),
        });
        if let Some(first_probe) = first_probe {
            // Closed only when the check thread is gone, and the checker
            // with it.
            let _ = self.schedule.send((first_probe, Arc::downgrade(&prober)));
        }
        Running { prober }
    }
}

/// A target's status and verdict, shared by its probes and the checker.
struct Shared {
    status: TargetStatus,
    hysteresis: Hysteresis,
    /// Set when the checker lets go of the target: a probe still under way
    /// checks it under the lock before it records anything or sends an
    /// event.
    retired: bool,
}

/// Locks a target's status, or the half-open checks' state. A panic
/// elsewhere while either was held cannot leave it inconsistent (every
/// update is a few plain assignments or map operations), so a poisoned lock
/// is used as is.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A target the checker looks after.
struct Running {
    /// Never scheduled for `CheckKind::None` (nothing to probe), but holds
    /// the status all the same. The only strong reference but for probes
    /// under way: the schedule lets go of the target when it is dropped.
    prober: Arc<Prober>,
}

impl Running {
    fn status(&self) -> TargetStatus {
        lock(&self.prober.shared).status.clone()
    }

    /// Stops the checks for good and returns the target's last status.
    /// After this returns, no probe of it sends an event or changes its
    /// status.
    fn retire(&self) -> TargetStatus {
        let mut shared = lock(&self.prober.shared);
        shared.retired = true;
        shared.status.clone()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.retire();
    }
}

/// What probing one target takes: its scheduled probes and any probe a
/// suspicion asks for share it. Its status is in the same allocation: a
/// check reads and writes the two together, and each target's memory is
/// cold by its next check (see [`prefetch`]).
struct Prober {
    probe_addr: SocketAddr,
    check: HealthCheck,
    shared: Mutex<Shared>,
    /// A scheduled probe is under way (one that waited long for a slot
    /// may still be when the next is due; that one is skipped).
    busy: AtomicBool,
    probe_slots: Arc<Semaphore>,
    half_open: Option<Arc<HalfOpen>>,
    events: UnboundedSender<HealthEvent>,
}

impl Prober {
    /// One scheduled probe, recorded.
    async fn scheduled(self: Arc<Self>) {
        match self.probe_once().await {
            Some((result, took)) => self.answered(result, took),
            None => self.busy.store(false, Ordering::Relaxed),
        }
    }

    /// The half-open checker, if this target's checks are half-open.
    fn half_open(&self) -> Option<&Arc<HalfOpen>> {
        let tcp = self.check.kind == CheckKind::Tcp;
        self.half_open.as_ref().filter(|_| tcp)
    }

    /// One probe, once a slot is free. The timeout starts only then: a wait
    /// for a slot is the checker's congestion, not the backend's slowness.
    /// `None` if no slot will ever be free; else the result, and how long
    /// it took.
    async fn probe_once(&self) -> Option<(Result<(), String>, Duration)> {
        // A half-open check holds no descriptor, so takes no slot. The
        // semaphore is never closed, but if it were, nothing could probe.
        let _slot = match self.half_open() {
            Some(_) => None,
            None => Some(self.probe_slots.acquire().await.ok()?),
        };
        let start = Instant::now();
        let result = probe(
            &self.check.kind,
            self.probe_addr,
            self.check.timeout,
            self.half_open().map(Arc::as_ref),
        )
        .await;
        Some((result, start.elapsed()))
    }

    /// Feeds a result to the hysteresis and the shared status, and sends an
    /// event if the verdict changed; unless the target is retired. A failed
    /// probe that a suspicion asked for (`suspected`: why) takes the backend
    /// down at once, without waiting for `fall` failures.
    fn record(&self, result: Result<(), String>, took: Duration, suspected: Option<&str>) {
        let at = Instant::now();
        let mut shared = lock(&self.shared);
        if shared.retired {
            return;
        }
        let Shared {
            status, hysteresis, ..
        } = &mut *shared;
        let change = match (suspected, &result) {
            (Some(_), Err(_)) => hysteresis.force_down().then_some(false),
            _ => hysteresis.record(result.is_ok()),
        };
        status.checks += 1;
        status.failures += u64::from(result.is_err());
        status.last_at = Some(at);
        status.last_duration = Some(took);
        if let Some(healthy) = change {
            let detail = detail(hysteresis.streak(), &result, suspected);
            let event = status.transition(healthy, detail, at);
            // Sent under the lock, so that `Running::retire` cannot slip in
            // between the status change and its event. A closed channel is
            // no reason to stop: see `HealthChecker::spawn`.
            let _ = self.events.send(event);
        }
        status.last_result = Some(result);
    }
}

impl Check for Prober {
    /// A scheduled check's result.
    fn answered(&self, result: Result<(), String>, took: Duration) {
        self.record(result, took, None);
        self.busy.store(false, Ordering::Relaxed);
    }
}

/// Starts every target's probes on its schedule: one task for all of them,
/// woken once per probe-grid step for the probes due then, with one timer.
/// A task per target woke once per probe, each with a timer of its own,
/// which at 10,000 backends cost the thread more than the probes' own
/// system calls. Half-open checks are handed to [`HalfOpen`], which records
/// each result as it reads the answer; other probes run in `running`.
struct Scheduler {
    /// Targets by the time their next probe is due.
    due: BTreeMap<time::Instant, Vec<Weak<Prober>>>,
    added: UnboundedReceiver<(time::Instant, Weak<Prober>)>,
    /// Probes under way, with their recording.
    running: FuturesUnordered<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

impl Scheduler {
    /// Until the checker is dropped.
    async fn run(mut self) {
        let timer = time::sleep_until(time::Instant::now());
        let mut timer = pin!(timer);
        let mut armed = None;
        loop {
            let first = self.due.first_key_value().map(|(at, _)| *at);
            if first != armed {
                if let Some(at) = first {
                    timer.as_mut().reset(at);
                }
                armed = first;
            }
            tokio::select! {
                added = self.added.recv() => match added {
                    Some((at, prober)) => self.due.entry(at).or_default().push(prober),
                    None => return,
                },
                () = timer.as_mut(), if armed.is_some() => {
                    armed = None;
                    self.start_due(time::Instant::now());
                }
                Some(()) = self.running.next(), if !self.running.is_empty() => {
                    // Answers come in batches: collect all that are in.
                    while let Some(Some(())) = self.running.next().now_or_never() {}
                }
            }
        }
    }

    /// Starts the probes due by `now`, and schedules each target's next:
    /// fixed rate, which is what bounds detection time, skipping the
    /// times a busy machine missed rather than catching up in a burst.
    fn start_due(&mut self, now: time::Instant) {
        // The checker's one `HalfOpen` (every prober holds it), which the
        // half-open checks due together are handed to at once.
        let mut half_open = None;
        let mut half_open_checks = Vec::new();
        while let Some(entry) = self.due.first_entry() {
            if *entry.key() > now {
                break;
            }
            let (at, batch) = entry.remove_entry();
            for target in &batch {
                prefetch(target, size_of::<Prober>());
            }
            for target in batch {
                // Gone: the checker let go of it.
                let Some(prober) = target.upgrade() else {
                    continue;
                };
                // (An interval is never zero; the grid guards the loop anyway.)
                let interval = prober.check.interval.max(PROBE_GRID);
                let mut next = at + interval;
                while next <= now {
                    next += interval;
                }
                if !prober.busy.swap(true, Ordering::Relaxed) {
                    if let Some(checker) = prober.half_open() {
                        // From `now`: one clock read per step, not per check.
                        let deadline = Deadline::after(now, prober.check.timeout);
                        let check = Waiter::Check(Arc::downgrade(&prober) as Weak<dyn Check>);
                        half_open_checks.push((prober.probe_addr, deadline, check));
                        half_open = half_open.or_else(|| Some(checker.clone()));
                    } else {
                        self.running.push(Box::pin(prober.scheduled()));
                    }
                }
                self.due.entry(next).or_default().push(target);
            }
        }
        if let Some(half_open) = half_open {
            half_open.check(half_open_checks);
        }
    }
}

/// Asks the CPU to fetch `target`'s memory (its reference counts and the
/// first `bytes` of its value) without waiting for it. A target's state is
/// touched once per interval, so it is never in the cache when its check
/// starts or ends; touching a batch of them one after the other waited for
/// memory once per target (at 10,000 targets, most of the checks' own
/// user-space time). Prefetching the whole batch first overlaps the waits.
fn prefetch<T: ?Sized>(target: &Weak<T>, bytes: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        // An `Arc`'s two counts come just before its value.
        let start = target.as_ptr().cast::<i8>().wrapping_sub(16);
        for line in (0..16 + bytes).step_by(64) {
            // SAFETY: a prefetch is a hint: it reads nothing the program
            // sees and never faults, whatever the address. (SSE, which it
            // needs, is part of x86-64.)
            unsafe { _mm_prefetch::<_MM_HINT_T0>(start.wrapping_add(line)) };
        }
    }
}

/// Why the verdict changed, on the probe that changed it, the `n`-th of
/// its kind in a row, or one that a suspicion asked for.
fn detail(n: u32, result: &Result<(), String>, suspected: Option<&str>) -> String {
    match (result, suspected) {
        (Err(e), Some(why)) => format!("suspected ({why}); the probe that followed failed: {e}"),
        (Ok(()), _) if n == 1 => "1 consecutive success".to_owned(),
        (Ok(()), _) => format!("{n} consecutive successes"),
        (Err(e), None) if n == 1 => format!("1 consecutive failure: {e}"),
        (Err(e), None) => format!("{n} consecutive failures: {e}"),
    }
}

// ---------------------------------------------------------------------------
// Start-time jitter.

/// xorshift64* (Vigna, 2016). Probe start times need spreading, not
/// cryptographic randomness; this avoids a dependency for one draw per task.
struct XorShift64(u64);

impl XorShift64 {
    fn new(seed: u64) -> Self {
        // Zero is the one state xorshift never leaves.
        Self(seed | 1)
    }

    fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// A seed from `key` and the clock: different backends, and the same
/// backend after a restart or reload, start at different offsets.
fn seed(key: &impl Hash) -> u64 {
    let mut hasher = DefaultHasher::new();
    key.hash(&mut hasher);
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default()
        .hash(&mut hasher);
    hasher.finish()
}

/// A delay in `[0, interval)`. Starting every target at once would probe all
/// backends (and, with several balancers, each backend) in bursts instead of
/// evenly.
fn jitter(interval: Duration, rng: &mut XorShift64) -> Duration {
    let range = u64::try_from(interval.as_nanos())
        .unwrap_or(u64::MAX)
        .max(1);
    Duration::from_nanos(rng.next_u64() % range)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use tokio::{io::AsyncReadExt, net::TcpListener, task::JoinHandle};

    use super::*;

    // -- Hysteresis ---------------------------------------------------------

    /// Records each result in turn; what each recording returned.
    fn record_all(h: &mut Hysteresis, results: &[bool]) -> Vec<Option<bool>> {
        results.iter().map(|&ok| h.record(ok)).collect()
    }

    #[test]
    fn failing_one_check_in_three_never_goes_down() {
        let mut h = Hysteresis::new(2, 3, true);
        for _ in 0..1000 {
            assert_eq!(record_all(&mut h, &[true, true, false]), [None; 3]);
        }
        assert!(h.healthy());
    }

    #[test]
    fn goes_down_exactly_on_the_fall_th_consecutive_failure() {
        let mut h = Hysteresis::new(2, 3, true);
        assert_eq!(record_all(&mut h, &[false; 3]), [None, None, Some(false)]);
        assert_eq!(h.record(false), None, "already down: no second transition");
        assert!(!h.healthy());
    }

    #[test]
    fn comes_up_on_the_rise_th_consecutive_success() {
        let mut h = Hysteresis::new(2, 3, false);
        assert_eq!(record_all(&mut h, &[true; 3]), [None, Some(true), None]);
        assert!(h.healthy());
    }

    #[test]
    fn an_opposite_result_resets_the_streak() {
        let mut down = Hysteresis::new(2, 3, false);
        assert_eq!(record_all(&mut down, &[true, false]), [None, None]);
        let after_reset = down.record(true);
        assert_eq!(after_reset, None, "the failure reset the success streak");
        assert_eq!(down.record(true), Some(true));

        let mut up = Hysteresis::new(2, 3, true);
        assert_eq!(
            record_all(&mut up, &[false, false, true, false, false]),
            [None; 5]
        );
        assert_eq!(up.streak(), 2);
        assert_eq!(up.record(false), Some(false));
    }

    // -- Probes -------------------------------------------------------------

    const OK: &str = "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
    const UNAVAILABLE: &str = "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n";
    const TIMEOUT: Duration = Duration::from_millis(50);

    fn http(expect_status: &[u16], host: Option<&str>) -> CheckKind {
        CheckKind::Http {
            method: "GET".to_owned(),
            path: "/healthz".to_owned(),
            expect_status: expect_status.to_vec(),
            host: host.map(str::to_owned),
        }
    }

    /// A loopback port nothing listens on (barring a race with another
    /// process taking it).
    fn free_port() -> SocketAddr {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    }

    /// A loopback server. Each connection's request head is recorded, then
    /// answered with `reply`, or never answered if `reply` is `None`.
    struct Server {
        addr: SocketAddr,
        accepted: Arc<AtomicUsize>,
        requests: Arc<Mutex<Vec<String>>>,
        task: JoinHandle<()>,
    }

    impl Server {
        async fn start(addr: SocketAddr, reply: Option<&'static str>) -> Server {
            let listener = TcpListener::bind(addr).await.unwrap();
            let addr = listener.local_addr().unwrap();
            let accepted = Arc::new(AtomicUsize::new(0));
            let requests = Arc::new(Mutex::new(Vec::new()));
            let (count, log) = (Arc::clone(&accepted), Arc::clone(&requests));
            let task = tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    count.fetch_add(1, Ordering::SeqCst);
                    tokio::spawn(serve(stream, reply, Arc::clone(&log)));
                }
            });
            Server {
                addr,
                accepted,
                requests,
                task,
            }
        }

        /// Closes the listening socket: connects are refused from the
        /// moment this returns.
        async fn kill(self) {
            self.task.abort();
            let _ = self.task.await;
        }
    }

    async fn serve(mut stream: TcpStream, reply: Option<&str>, log: Arc<Mutex<Vec<String>>>) {
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.ends_with(b"\r\n\r\n") {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return, // a TCP check: connect, close
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        log.lock()
            .unwrap()
            .push(String::from_utf8_lossy(&head).into_owned());
        match reply {
            Some(reply) => {
                let _ = stream.write_all(reply.as_bytes()).await;
            }
            None => std::future::pending().await,
        }
    }

    /// Both ways of making a TCP check: a full connect, and a half-open
    /// SYN from a raw socket (this test runs as root).
    fn tcp_probers() -> [Option<Arc<HalfOpen>>; 2] {
        let half_open = HalfOpen::start(&Handle::current()).expect("raw sockets (as root)");
        [None, Some(half_open)]
    }

    /// A TCP check: a full connect, or half-open when given the prober.
    async fn tcp_probe(addr: SocketAddr, half_open: &Option<Arc<HalfOpen>>) -> Result<(), String> {
        probe(&CheckKind::Tcp, addr, TIMEOUT, half_open.as_deref()).await
    }

    /// An HTTP check of `GET /healthz`.
    async fn http_probe(
        expect_status: &[u16],
        host: Option<&str>,
        addr: SocketAddr,
    ) -> Result<(), String> {
        probe(&http(expect_status, host), addr, TIMEOUT, None).await
    }

    #[tokio::test]
    async fn tcp_probe_succeeds_against_a_listener() {
        for half_open in tcp_probers() {
            let server = Server::start(free_port(), None).await;
            let result = tcp_probe(server.addr, &half_open).await;
            assert_eq!(result, Ok(()), "half-open: {}", half_open.is_some());
        }
    }

    /// Sockets in TIME_WAIT on this host whose remote end is `peer`, from
    /// /proc/net/tcp (hex address:port, state 06).
    fn time_wait_to(peer: SocketAddr) -> usize {
        let SocketAddr::V4(v4) = peer else {
            unreachable!("loopback IPv4 in these tests")
        };
        let remote = format!(
            "{:08X}:{:04X}",
            u32::from_le_bytes(v4.ip().octets()),
            v4.port()
        );
        std::fs::read_to_string("/proc/net/tcp")
            .unwrap()
            .lines()
            .filter(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.get(2) == Some(&remote.as_str()) && f.get(3) == Some(&"06")
            })
            .count()
    }

    #[tokio::test]
    async fn checks_end_with_a_reset_and_leave_no_time_wait() {
        let server = Server::start(free_port(), Some(OK)).await;
        let [connect, half_open] = tcp_probers();
        for (kind, half_open) in [
            (CheckKind::Tcp, connect),
            (CheckKind::Tcp, half_open),
            (http(&[200], None), None),
        ] {
            for _ in 0..20 {
                let result = probe(&kind, server.addr, TIMEOUT, half_open.as_deref()).await;
                assert_eq!(result, Ok(()));
            }
        }
        // A normal close leaves one TIME_WAIT socket per check here.
        assert_eq!(time_wait_to(server.addr), 0);
    }

    #[tokio::test]
    async fn tcp_probe_reports_a_refused_connect() {
        for half_open in tcp_probers() {
            let addr = free_port();
            let refused = Err(format!("connect {addr}: connection refused"));
            assert_eq!(tcp_probe(addr, &half_open).await, refused);
        }
    }

    /// A listener whose accept queue is full: the kernel drops its SYNs,
    /// and nothing answers them.
    pub(super) fn unanswering_listener() -> (std::net::TcpListener, std::net::TcpStream) {
        use std::os::fd::AsRawFd as _;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        // SAFETY: a listening socket; backlog 0 holds one connection.
        assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 0) }, 0);
        let queued = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        (listener, queued)
    }

    #[tokio::test]
    async fn tcp_probe_times_out_when_syns_go_unanswered() {
        let (listener, _queued) = unanswering_listener();
        let addr = listener.local_addr().unwrap();
        for half_open in tcp_probers() {
            let timed_out = Err(format!("connect {addr}: timed out after 50ms"));
            assert_eq!(tcp_probe(addr, &half_open).await, timed_out);
        }
    }

    #[tokio::test]
    async fn http_probe_sends_the_request_and_accepts_an_expected_status() {
        let server = Server::start(free_port(), Some(OK)).await;
        assert_eq!(http_probe(&[200, 204], None, server.addr).await, Ok(()));
        assert_eq!(
            server.requests.lock().unwrap().as_slice(),
            [
                "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nUser-Agent: \
                xdplb-health\r\n\r\n"
            ]
        );
        let with_host = http_probe(&[200], Some("www.example.com"), server.addr).await;
        assert_eq!(with_host, Ok(()));
        assert!(server.requests.lock().unwrap()[1].contains("\r\nHost: www.example.com\r\n"));
    }

    #[tokio::test]
    async fn http_probe_fails_on_an_unexpected_status() {
        let server = Server::start(free_port(), Some(UNAVAILABLE)).await;
        assert_eq!(
            http_probe(&[200], None, server.addr).await,
            Err("HTTP status 503, expected [200]".to_owned())
        );
        // Only the listed statuses pass, successes included: a backend
        // answering 200 where 204 is expected is failing.
        let ok = Server::start(free_port(), Some(OK)).await;
        assert_eq!(
            http_probe(&[204], None, ok.addr).await,
            Err("HTTP status 200, expected [204]".to_owned())
        );
    }

    #[tokio::test]
    async fn http_probe_times_out_on_a_silent_server() {
        let server = Server::start(free_port(), None).await;
        let started = Instant::now();
        assert_eq!(
            http_probe(&[200], None, server.addr).await,
            Err("read HTTP status line: timed out after 50ms".to_owned())
        );
        let took = started.elapsed();
        assert!(took < TIMEOUT * 4, "took {took:?}");
    }

    #[test]
    fn status_lines() {
        assert_eq!(parse_status_line(b"HTTP/1.1 204 No Content\r\n"), Ok(204));
        assert_eq!(parse_status_line(b"HTTP/1.0 200\r\n"), Ok(200));
        assert_eq!(
            parse_status_line(b""),
            Err("connection closed before the HTTP status line".to_owned())
        );
        assert_eq!(
            parse_status_line(b"SSH-2.0-OpenSSH\r\n"),
            Err("malformed HTTP status line \"SSH-2.0-OpenSSH\"".to_owned())
        );
        assert!(parse_status_line(b"HTTP/1.1 +20 OK\r\n").is_err());
        assert!(parse_status_line(b"HTTP/1.1 2000 OK\r\n").is_err());
    }

    #[test]
    fn host_header_brackets_ipv6() {
        assert_eq!(host_header("10.0.0.1".parse().unwrap()), "10.0.0.1");
        assert_eq!(host_header("2001:db8::1".parse().unwrap()), "[2001:db8::1]");
    }

    #[test]
    fn jitter_stays_below_the_interval() {
        let interval = Duration::from_millis(100);
        let mut rng = XorShift64::new(0);
        let draws: Vec<Duration> = (0..1000).map(|_| jitter(interval, &mut rng)).collect();
        assert!(draws.iter().all(|d| *d < interval));
        // Spread over the interval, not bunched at one end.
        assert!(
            draws.iter().any(|d| *d < interval / 10)
                && draws.iter().any(|d| *d > interval * 9 / 10)
        );
    }

    // -- Scheduler ----------------------------------------------------------

    const INTERVAL: Duration = Duration::from_millis(100);
    const RISE: u32 = 2;
    const FALL: u32 = 3;
    /// Allowance for scheduling on a loaded test machine: the 1 s the
    /// end-to-end tests keep too (`SCHEDULING_MARGIN` in the test kit).
    /// 50 ms failed once with the load average at 7 on 2 CPUs.
    const SLACK: Duration = Duration::from_secs(1);

    fn tcp_check() -> HealthCheck {
        HealthCheck {
            kind: CheckKind::Tcp,
            interval: INTERVAL,
            timeout: TIMEOUT,
            rise: RISE,
            fall: FALL,
            ..HealthCheck::default()
        }
    }

    fn target(
        service: &str,
        addr: SocketAddr,
        check: HealthCheck,
        initially_healthy: bool,
    ) -> CheckTarget {
        CheckTarget {
            service: service.to_owned(),
            backend: (addr.ip(), addr.port()),
            check,
            initially_healthy,
        }
    }

    fn backend(addr: SocketAddr) -> (IpAddr, u16) {
        (addr.ip(), addr.port())
    }

    /// A checker of `targets`, and the receiver of its events.
    fn spawn(targets: Vec<CheckTarget>) -> (HealthChecker, UnboundedReceiver<HealthEvent>) {
        let (tx, events) = unbounded_channel();
        (HealthChecker::spawn(targets, 8, tx).unwrap(), events)
    }

    /// Starts a server that never answers on each address, one at a time.
    async fn silent_servers(addrs: impl IntoIterator<Item = SocketAddr>) -> Vec<Server> {
        let mut servers = Vec::new();
        for addr in addrs {
            servers.push(Server::start(addr, None).await);
        }
        servers
    }

    async fn next_event(
        events: &mut UnboundedReceiver<HealthEvent>,
        within: Duration,
    ) -> Option<HealthEvent> {
        time::timeout(within, events.recv()).await.ok().flatten()
    }

    /// Waits until `ready` holds for the status of `service`/`addr`.
    async fn wait_for(
        checker: &HealthChecker,
        service: &str,
        addr: SocketAddr,
        ready: impl Fn(&TargetStatus) -> bool,
    ) {
        let deadline = Instant::now() + Duration::from_secs(2);
        while !checker
            .status_of(service, backend(addr))
            .is_some_and(|s| ready(&s))
        {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {service} {addr}"
            );
            time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn a_healthy_backend_stays_healthy_without_events() {
        let server = Server::start(free_port(), None).await;
        let (checker, mut events) = spawn(vec![target("web", server.addr, tcp_check(), true)]);
        wait_for(&checker, "web", server.addr, |s| s.checks >= 4).await;
        let status = checker.status_of("web", backend(server.addr)).unwrap();
        assert!(status.healthy);
        assert_eq!(status.last_result, Some(Ok(())));
        assert_eq!(status.transitions, 0);
        assert!(events.try_recv().is_err());
    }

    /// `health_check.port` is where the probes go: a backend whose service
    /// port refuses connections is up when its check port answers.
    #[tokio::test]
    async fn probes_go_to_the_check_port_when_one_is_set() {
        let server = Server::start(free_port(), None).await;
        let refusing = free_port();
        let check = HealthCheck {
            port: Some(server.addr.port()),
            ..tcp_check()
        };
        let (checker, mut events) = spawn(vec![target("web", refusing, check, false)]);
        wait_for(&checker, "web", refusing, |s| s.healthy).await;
        let status = checker.status_of("web", backend(refusing)).unwrap();
        assert_eq!(status.last_result, Some(Ok(())));
        assert!(events.try_recv().is_ok_and(|e| e.healthy));
    }

    /// Several backends (each with its own start jitter) die at once; each
    /// must be reported down once within `(fall + 1) × interval`, and up
    /// again within `(rise + 1) × interval` of its return.
    #[tokio::test]
    async fn a_dead_backend_is_reported_once_within_the_bound_and_its_return_too() {
        const BACKENDS: usize = 4;
        let servers = silent_servers((0..BACKENDS).map(|_| free_port())).await;
        let addrs: Vec<SocketAddr> = servers.iter().map(|s| s.addr).collect();
        let targets = addrs
            .iter()
            .map(|&a| target("web", a, tcp_check(), true))
            .collect();
        let (checker, mut events) = spawn(targets);
        for &addr in &addrs {
            wait_for(&checker, "web", addr, |s| s.checks >= 2).await;
        }

        let killed = Instant::now();
        for server in servers {
            server.kill().await;
        }
        let down_bound = INTERVAL * (FALL + 1) + SLACK;
        let mut down_latencies = Vec::new();
        for _ in 0..BACKENDS {
            let event = next_event(&mut events, down_bound)
                .await
                .expect("a down event");
            assert!(!event.healthy);
            let prefix = format!("3 consecutive failures: connect {}:", event.backend.0);
            assert!(
                event.detail.starts_with(&prefix) && event.detail.ends_with("connection refused"),
                "{event:?}"
            );
            down_latencies.push(event.at - killed);
        }
        assert!(
            next_event(&mut events, INTERVAL * 3).await.is_none(),
            "one down event per backend"
        );
        for &addr in &addrs {
            let status = checker.status_of("web", backend(addr)).unwrap();
            assert!(!status.healthy && status.transitions == 1, "{status:?}");
        }

        let restarted = Instant::now();
        let _servers = silent_servers(addrs.iter().copied()).await;
        let up_bound = INTERVAL * (RISE + 1) + SLACK;
        let mut up_latencies = Vec::new();
        for _ in 0..BACKENDS {
            let event = next_event(&mut events, up_bound)
                .await
                .expect("an up event");
            assert!(event.healthy);
            assert_eq!(event.detail, "2 consecutive successes");
            up_latencies.push(event.at - restarted);
        }
        eprintln!(
            "down after {down_latencies:?} (bound {down_bound:?}); up after {up_latencies:?} \
                (bound {up_bound:?})"
        );
        assert!(down_latencies.iter().all(|d| *d <= down_bound));
        assert!(up_latencies.iter().all(|d| *d <= up_bound));
    }

    #[tokio::test]
    async fn update_keeps_unchanged_targets_and_stops_removed_ones() {
        let dead = free_port();
        // An HTTP check, which connects: the server counts its probes (a
        // half-open TCP check never reaches it).
        let removed = Server::start(free_port(), Some(OK)).await;
        let http_check = HealthCheck {
            kind: http(&[200], None),
            ..tcp_check()
        };
        let kept = target("web", dead, tcp_check(), true);
        let (mut checker, mut events) = spawn(vec![
            kept.clone(),
            target("web", removed.addr, http_check, true),
        ]);
        let down = next_event(&mut events, INTERVAL * (FALL + 1) + SLACK)
            .await
            .expect("a down event");
        assert_eq!(down.backend, backend(dead));

        // `initially_healthy` says up, but a running target keeps its own
        // verdict.
        checker.update(vec![kept.clone()]);
        let before = checker.status_of("web", backend(dead)).unwrap();
        assert!(!before.healthy);
        assert!(checker.status_of("web", backend(removed.addr)).is_none());
        // A probe under way when the target was removed may still reach
        // the server (its connection waits in the accept queue): counted
        // once that has settled, what follows must be nothing.
        time::sleep(INTERVAL * 3).await;
        let probes_of_removed = removed.accepted.load(Ordering::SeqCst);
        time::sleep(INTERVAL * 3).await;
        assert_eq!(
            removed.accepted.load(Ordering::SeqCst),
            probes_of_removed,
            "the removed target is still probed"
        );
        let after = checker.status_of("web", backend(dead)).unwrap();
        assert!(!after.healthy && after.transitions == 1);
        assert!(after.checks > before.checks, "the kept target stopped");
        assert!(events.try_recv().is_err());

        // A changed check restarts the target from its current verdict.
        let changed = CheckTarget {
            check: HealthCheck {
                interval: INTERVAL * 2,
                ..tcp_check()
            },
            ..kept
        };
        checker.update(vec![changed]);
        let restarted = checker.status_of("web", backend(dead)).unwrap();
        assert!(
            !restarted.healthy && restarted.transitions == 1 && restarted.checks >= after.checks
        );
        time::sleep(INTERVAL * 2).await;
        assert!(events.try_recv().is_err());
        checker.shutdown();
    }

    #[tokio::test]
    async fn a_checker_dropped_with_checks_under_way_lets_go_of_its_sockets() {
        let (listener, _queued) = unanswering_listener();
        let silent = listener.local_addr().unwrap();
        let (checker, _events) = spawn(vec![target("web", silent, tcp_check(), true)]);
        let half_open = Arc::downgrade(checker.half_open.as_ref().expect("as root"));
        // Checks time out after TIMEOUT, one every INTERVAL: wait for one
        // under way. Each is under way half the time; 20 intervals leave a
        // loaded machine room to miss many (the wait ends at the first).
        let deadline = Instant::now() + INTERVAL * 20;
        while half_open.upgrade().unwrap().waiting() == 0 {
            assert!(Instant::now() < deadline, "no check under way");
            time::sleep(Duration::from_millis(5)).await;
        }
        checker.shutdown();
        assert!(
            half_open.upgrade().is_none(),
            "the raw sockets are still open"
        );
    }

    #[tokio::test]
    async fn unchecked_targets_are_healthy_without_probes() {
        let addr = free_port();
        let off = HealthCheck {
            kind: CheckKind::None,
            ..tcp_check()
        };
        let (checker, mut events) = spawn(vec![target("dns", addr, off.clone(), false)]);
        let event = events.try_recv().expect("held down, so told it is up");
        assert!(event.healthy);
        assert_eq!(event.detail, "health checks off");
        time::sleep(INTERVAL * 2).await;
        let status = checker.status_of("dns", backend(addr)).unwrap();
        assert!(status.healthy && status.checks == 0 && status.last_result.is_none());
        assert!(events.try_recv().is_err());
    }
}
