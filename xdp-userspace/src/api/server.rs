//! Serves the control API: HTTP/1.1 (hyper) on a root-only Unix socket.
//!
//! One request per connection (every answer closes it), JSON in and out.
//! `curl --unix-socket /run/xdplb/api.sock http://localhost/v1/status`
//! works, and so does the CLI ([`super::client`]).
//!
//! Limits, so that no client can exhaust the daemon: a request head of at
//! most [`MAX_HEAD`] bytes read within [`IO_TIMEOUT`], a body read as it
//! arrives up to [`MAX_BODY`] bytes (never allocated from what
//! `Content-Length` announces), and at most [`MAX_CONNECTIONS`] connections
//! at once.
//!
//! The mapping between HTTP and [`Request`] is defined once: the `ROUTES`
//! table plus the per-endpoint encoding in [`route`] and [`path_of`], which
//! are inverses of each other (tested below).

use std::{
    collections::VecDeque,
    convert::Infallible,
    fs::{self, DirBuilder},
    io,
    os::{
        fd::AsFd as _,
        unix::fs::{DirBuilderExt as _, FileTypeExt as _, MetadataExt as _, PermissionsExt as _},
    },
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU8, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use anyhow::{bail, Context as _};
use http_body_util::{BodyExt as _, Full, LengthLimitError, Limited};
use hyper::{
    body::{Bytes, Incoming},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{UnixListener, UnixStream},
    sync::{Notify, OwnedSemaphorePermit, Semaphore},
};
use tracing::{debug, warn};

use super::{ApiError, Handler, Request};

/// Largest request head (request line plus headers) accepted.
const MAX_HEAD: usize = 16 * 1024;
/// Largest request body accepted; a whole configuration is far smaller.
const MAX_BODY: usize = 1024 * 1024;
/// How long a client may take to send its request head, and then its
/// body: a stuck client must not hold a connection forever.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// API connections served at once; more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 64;

/// Serves the API on `socket` until the returned future is dropped (or
/// fails to bind), answering each request with `handler`.
///
/// Before binding it creates the socket's directory (mode 0700 when it
/// creates it) and removes a stale socket left by a daemon that died, but
/// refuses to start when a live daemon answers on `socket`. The socket is
/// made mode 0600, and connections from peers other than root (or the
/// daemon's own user) are refused with 403 as well. The socket file is
/// removed when the future is dropped, unless another daemon has replaced
/// it since.
pub async fn serve(socket: &Path, handler: Arc<dyn Handler>) -> anyhow::Result<()> {
    let (listener, _remove_on_drop) = bind(socket)?;
    accept_loop(listener, handler, peer_allowed).await
}

/// Who may use the API: root, and the daemon's own user. The latter only
/// matters for a daemon not running as root (tests): such a user can
/// already do anything the daemon can.
fn peer_allowed(uid: u32) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    uid == 0 || uid == unsafe { libc::geteuid() }
}

/// Removes the socket file on drop if it is still the one this daemon
/// bound: a successor daemon may have replaced it in the meantime.
struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let ours = fs::symlink_metadata(&self.path)
            .is_ok_and(|meta| meta.dev() == self.dev && meta.ino() == self.ino);
        if ours {
            if let Err(err) = fs::remove_file(&self.path) {
                warn!("removing the API socket {}: {err}", self.path.display());
            }
        }
    }
}

/// Prepares the socket's directory, clears a stale socket, binds and
/// restricts the socket to its owner.
fn bind(socket: &Path) -> anyhow::Result<(UnixListener, SocketFile)> {
    if let Some(dir) = socket.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        // The mode only applies to the directories this creates: an existing
        // /run/xdplb keeps whatever mode the administrator gave it.
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating the API socket's directory {}", dir.display()))?;
    }
    match fs::symlink_metadata(socket) {
        Ok(meta) if meta.file_type().is_socket() => {
            // A socket file outlives its daemon when the daemon is killed.
            // Only connecting tells a stale one from a live one.
            let Err(err) = std::os::unix::net::UnixStream::connect(socket) else {
                bail!(
                    "another xdplb daemon is already serving {}",
                    socket.display()
                );
            };
            debug!("removing the stale API socket {} ({err})", socket.display());
            fs::remove_file(socket)
                .with_context(|| format!("removing the stale API socket {}", socket.display()))?;
        }
        // Never delete something that is not a socket: the path is probably
        // wrong, and the file may matter to someone.
        Ok(_) => bail!(
            "{} exists and is not a socket; refusing to replace it",
            socket.display()
        ),
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => {
            return Err(err)
                .with_context(|| format!("inspecting the API socket {}", socket.display()))
        }
    }
    let listener = UnixListener::bind(socket)
        .with_context(|| format!("binding the API socket {}", socket.display()))?;
    // Between bind and chmod the socket has the umask's mode; the peer
    // credential check covers that window.
    fs::set_permissions(socket, fs::Permissions::from_mode(0o600))
        .with_context(|| format!("making the API socket {} mode 0600", socket.display()))?;
    let meta = fs::symlink_metadata(socket)
        .with_context(|| format!("inspecting the API socket {}", socket.display()))?;
    Ok((
        listener,
        SocketFile {
            path: socket.to_owned(),
            dev: meta.dev(),
            ino: meta.ino(),
        },
    ))
}

/// Accepts connections forever, one task each, at most [`MAX_CONNECTIONS`]
/// at once. `allowed` decides on the peer's uid (a parameter so tests can
/// exercise the refusal).
async fn accept_loop(
    listener: UnixListener,
    handler: Arc<dyn Handler>,
    allowed: fn(u32) -> bool,
) -> anyhow::Result<()> {
    let slots = Arc::new(Slots::new(MAX_CONNECTIONS));
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let slot = Slots::take(&slots).await;
                tokio::spawn(connection(stream, Arc::clone(&handler), allowed, slot));
            }
            Err(err) => {
                // Typically EMFILE: transient, and no reason to stop serving.
                // The pause keeps a persistent error from spinning.
                warn!("accepting an API connection: {err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// The connection cap. When every slot is taken, the connection that has
/// been reading its request the longest is closed to make room: clients
/// that open connections and send nothing (or a body they never finish)
/// must not lock the operator out until their timeouts expire. A
/// connection whose request is read (its handler runs) is never evicted.
struct Slots {
    permits: Arc<Semaphore>,
    /// Connections still reading their request, oldest first.
    reading: Mutex<VecDeque<Arc<Eviction>>>,
}

/// Where a connection stands, for eviction. Both the evictor and the
/// connection move it out of `READING` with a compare-and-swap, so exactly
/// one wins: an evicted connection never runs its handler, and a
/// connection whose handler runs is never cut.
struct Eviction {
    state: AtomicU8,
    notify: Notify,
}

impl Eviction {
    /// Moves the state from `READING` to `to`, or says where it already is.
    fn leave_reading(&self, to: u8) -> Result<u8, u8> {
        self.state
            .compare_exchange(READING, to, Ordering::AcqRel, Ordering::Acquire)
    }
}

const READING: u8 = 0;
const READ: u8 = 1;
const EVICTED: u8 = 2;

/// One connection's slot: its permit, and its place in the eviction queue.
struct Slot {
    slots: Arc<Slots>,
    eviction: Arc<Eviction>,
    _permit: OwnedSemaphorePermit,
}

impl Slots {
    fn new(max: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max)),
            reading: Mutex::new(VecDeque::new()),
        }
    }

    fn reading(&self) -> std::sync::MutexGuard<'_, VecDeque<Arc<Eviction>>> {
        self.reading.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Closes the connection that has been reading its request the
    /// longest, if any.
    fn evict_oldest_reader(&self) {
        let mut reading = self.reading();
        while let Some(oldest) = reading.pop_front() {
            if oldest.leave_reading(EVICTED).is_ok() {
                debug!("API connection cap reached: closing the oldest still reading");
                oldest.notify.notify_one();
                return;
            }
        }
    }

    /// A slot for a new connection, evicting the oldest reader if all are
    /// taken; waits if every connection is past reading (handlers running).
    async fn take(slots: &Arc<Self>) -> Slot {
        let permit = match Arc::clone(&slots.permits).try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                slots.evict_oldest_reader();
                Arc::clone(&slots.permits)
                    .acquire_owned()
                    .await
                    .expect("the semaphore is never closed")
            }
        };
        let eviction = Arc::new(Eviction {
            state: AtomicU8::new(READING),
            notify: Notify::new(),
        });
        slots.reading().push_back(Arc::clone(&eviction));
        Slot {
            slots: Arc::clone(slots),
            eviction,
            _permit: permit,
        }
    }
}

impl Slot {
    /// The request is read: from now on the connection is not evicted.
    /// False if it was evicted first (its answer would go nowhere).
    fn request_read(&self) -> bool {
        let swapped = self.eviction.leave_reading(READ);
        self.slots
            .reading()
            .retain(|e| !Arc::ptr_eq(e, &self.eviction));
        swapped.is_ok() || swapped == Err(READ)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.request_read();
    }
}

/// Serves the one request of a connection (HTTP/1.1 by hyper, no
/// keep-alive).
async fn connection(
    stream: UnixStream,
    handler: Arc<dyn Handler>,
    allowed: fn(u32) -> bool,
    slot: Slot,
) {
    let permitted = match stream.peer_cred() {
        Ok(cred) if allowed(cred.uid()) => true,
        Ok(cred) => {
            // The socket's mode 0600 should make this unreachable.
            warn!(uid = cred.uid(), pid = ?cred.pid(), "refused an API connection from a non-root \
                peer");
            false
        }
        Err(err) => {
            warn!("reading an API peer's credentials: {err}");
            false
        }
    };
    // A second handle on the socket, to linger on once hyper is done with
    // it, whether it ended well or not (see `linger`).
    let kept = stream.as_fd().try_clone_to_owned().ok();
    let slot = Arc::new(slot);
    let eviction = Arc::clone(&slot.eviction);
    let service = service_fn(move |request| {
        let (handler, slot) = (Arc::clone(&handler), Arc::clone(&slot));
        async move {
            let response = if permitted {
                answer(request, handler, &slot).await
            } else {
                slot.request_read();
                Response::error(403, "the xdplb API is root-only")
            };
            Ok::<_, Infallible>(response.into_http())
        }
    });
    let serving = http1::Builder::new()
        .timer(TokioTimer::new())
        // A client that never finishes its head is dropped after this.
        .header_read_timeout(IO_TIMEOUT)
        .max_buf_size(MAX_HEAD)
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        result = serving => {
            if let Err(err) = result {
                // Mostly clients that went away, were too slow or sent too
                // much (hyper has answered those it could).
                debug!("API connection: {err}");
            }
        }
        () = eviction.notify.notified() => {
            debug!("closed an API connection to make room");
            return;
        }
    }
    if let Some(stream) = kept.and_then(|fd| UnixStream::from_std(fd.into()).ok()) {
        linger(stream).await;
    }
}

/// Closes the sending side, then reads and drops what the client still
/// sends until it closes (it does once it has read the answer), for at
/// most a second and a few MiB.
///
/// An answer can go out before the request was read whole (403, 413), and
/// closing a Unix socket with unread data in it makes the client's next
/// read fail with ECONNRESET, losing the answer.
async fn linger(mut stream: UnixStream) {
    let drain = async {
        // hyper may have shut it down already; a second time is harmless.
        let _ = stream.shutdown().await;
        let mut sink = [0u8; 16 * 1024];
        let mut left = 4 * MAX_BODY;
        while left > 0 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
}

/// Reads (with limits), routes and handles one request.
async fn answer(
    request: http::Request<Incoming>,
    handler: Arc<dyn Handler>,
    slot: &Slot,
) -> Response {
    let method = request.method().as_str().to_owned();
    let target = request.uri().path_and_query().map_or_else(
        || request.uri().path().to_owned(),
        |pq| pq.as_str().to_owned(),
    );
    // A body announced too large is refused before a byte of it is read.
    let announced = request
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok()?.parse::<u64>().ok());
    let too_large = || Response::error(413, format!("request body larger than {MAX_BODY} bytes"));
    if announced.is_some_and(|length| length > MAX_BODY as u64) {
        return too_large();
    }
    // The body is read as it arrives, never allocated from Content-Length,
    // and never past MAX_BODY whatever the client announced (or chunked).
    let limited = Limited::new(request.into_body(), MAX_BODY);
    let body = match tokio::time::timeout(IO_TIMEOUT, limited.collect()).await {
        Ok(Ok(body)) => body.to_bytes(),
        Ok(Err(err)) if err.is::<LengthLimitError>() => return too_large(),
        Ok(Err(err)) => return Response::error(400, format!("reading the request body: {err}")),
        Err(_) => return Response::error(408, "timed out reading the request"),
    };
    if !slot.request_read() {
        return Response::error(503, "closed to make room for other API connections");
    }
    let api_request = match route(&method, &target, &body) {
        Ok(api_request) => api_request,
        Err(err) => {
            let allow = allowed_method(&target).filter(|_| err.status == 405);
            return Response {
                allow,
                ..Response::error(err.status, err.message)
            };
        }
    };
    debug!(%method, %target, "API request");
    // The handler does BPF syscalls and may take tens of milliseconds: off
    // the async workers.
    match tokio::task::spawn_blocking(move || handler.handle(api_request)).await {
        Ok(Ok(value)) => Response {
            status: 200,
            body: value,
            allow: None,
        },
        Ok(Err(err)) => {
            // A handler answering an error with a non-error status is a bug;
            // the client must still see a failure.
            let status = if (400..=599).contains(&err.status) {
                err.status
            } else {
                500
            };
            Response::error(status, err.message)
        }
        Err(err) => {
            warn!("the API handler failed: {err}");
            Response::error(500, "internal error: the request handler failed")
        }
    }
}

/// An answer to send.
struct Response {
    status: u16,
    body: serde_json::Value,
    /// The `Allow` header of a 405.
    allow: Option<&'static str>,
}

impl Response {
    fn error(status: u16, message: impl Into<String>) -> Self {
        Self {
            status,
            body: serde_json::json!({ "error": message.into() }),
            allow: None,
        }
    }

    fn into_http(self) -> http::Response<Full<Bytes>> {
        let mut body = serde_json::to_vec(&self.body).expect("a JSON value always serializes");
        // For people reading answers with curl.
        body.push(b'\n');
        let mut response = http::Response::builder()
            .status(self.status)
            .header(http::header::CONTENT_TYPE, "application/json");
        if let Some(allow) = self.allow {
            response = response.header(http::header::ALLOW, allow);
        }
        response
            .body(Full::new(Bytes::from(body)))
            .expect("status and headers are valid")
    }
}

// --- The mapping between HTTP and `Request` ---------------------------------

/// The API's endpoints, one per [`Request`] variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Endpoint {
    Status,
    ListServices,
    AddService,
    RemoveService,
    ListBackends,
    AddBackend,
    RemoveBackend,
    Drain,
    Undrain,
    Reload,
    Flow,
    Stats,
    ClusterLeave,
    ClusterJoin,
}

/// The routing table: the one place paths and methods are written down.
/// [`route`] reads it forwards, [`path_of`] backwards.
const ROUTES: &[(Endpoint, &str, &str)] = &[
    (Endpoint::Status, "GET", "/v1/status"),
    (Endpoint::ListServices, "GET", "/v1/services"),
    (Endpoint::AddService, "POST", "/v1/services/add"),
    (Endpoint::RemoveService, "POST", "/v1/services/remove"),
    (Endpoint::ListBackends, "GET", "/v1/backends"),
    (Endpoint::AddBackend, "POST", "/v1/backends/add"),
    (Endpoint::RemoveBackend, "POST", "/v1/backends/remove"),
    (Endpoint::Drain, "POST", "/v1/backends/drain"),
    (Endpoint::Undrain, "POST", "/v1/backends/undrain"),
    (Endpoint::Reload, "POST", "/v1/reload"),
    (Endpoint::Flow, "GET", "/v1/flow"),
    (Endpoint::Stats, "GET", "/v1/stats"),
    (Endpoint::ClusterLeave, "POST", "/v1/cluster/leave"),
    (Endpoint::ClusterJoin, "POST", "/v1/cluster/join"),
];

/// Body of `POST /v1/services/remove`.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RemoveServiceBody {
    name: String,
}

/// Body of `POST /v1/backends/add`.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct AddBackendBody {
    service: String,
    backend: super::BackendSpec,
}

/// Turns an HTTP request into the API [`Request`] it stands for: 404 for an
/// unknown path, 405 for a known path with the wrong method, 400 for a bad
/// body or query. Pure: no I/O.
pub fn route(method: &str, target: &str, body: &[u8]) -> Result<Request, ApiError> {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let Some(&(endpoint, expected_method, _)) = ROUTES.iter().find(|(_, _, p)| *p == path) else {
        return Err(ApiError::not_found(format!("no such API endpoint: {path}")));
    };
    if method != expected_method {
        return Err(ApiError::new(
            405,
            format!("{path} takes {expected_method}, not {method}"),
        ));
    }
    let mut query = Query::parse(query)?;
    let request = match endpoint {
        Endpoint::Status => Request::Status,
        Endpoint::ListServices => Request::ListServices,
        Endpoint::AddService => Request::AddService(json_body(body)?),
        Endpoint::RemoveService => {
            let RemoveServiceBody { name } = json_body(body)?;
            Request::RemoveService { name }
        }
        Endpoint::ListBackends => Request::ListBackends {
            service: query.take("service"),
        },
        Endpoint::AddBackend => {
            let AddBackendBody { service, backend } = json_body(body)?;
            Request::AddBackend { service, backend }
        }
        Endpoint::RemoveBackend => Request::RemoveBackend(json_body(body)?),
        Endpoint::Drain => Request::Drain(json_body(body)?),
        Endpoint::Undrain => Request::Undrain(json_body(body)?),
        Endpoint::Reload => Request::Reload,
        Endpoint::Flow => Request::Flow {
            src: query.address("src")?,
            dst: query.address("dst")?,
            protocol: {
                let value = query.require("protocol")?;
                serde_json::from_value(serde_json::Value::String(value.clone())).map_err(|_| {
                    ApiError::bad_request(format!(
                        "query parameter protocol: {value:?} is not tcp or udp"
                    ))
                })?
            },
        },
        Endpoint::Stats => Request::Stats,
        Endpoint::ClusterLeave => Request::ClusterLeave,
        Endpoint::ClusterJoin => Request::ClusterJoin,
    };
    query.finish()?;
    Ok(request)
}

/// The HTTP form of `request`: method, target (path and query) and body.
/// The inverse of [`route`].
pub fn path_of(request: &Request) -> (&'static str, String, Option<Vec<u8>>) {
    fn to_json<T: Serialize>(value: &T) -> Option<Vec<u8>> {
        Some(serde_json::to_vec(value).expect("API bodies always serialize"))
    }
    let mut query: Vec<(&str, String)> = Vec::new();
    let (endpoint, body) = match request {
        Request::Status => (Endpoint::Status, None),
        Request::ListServices => (Endpoint::ListServices, None),
        Request::AddService(service) => (Endpoint::AddService, to_json(service)),
        Request::RemoveService { name } => (
            Endpoint::RemoveService,
            to_json(&RemoveServiceBody { name: name.clone() }),
        ),
        Request::ListBackends { service } => {
            query.extend(service.iter().map(|name| ("service", name.clone())));
            (Endpoint::ListBackends, None)
        }
        Request::AddBackend { service, backend } => (
            Endpoint::AddBackend,
            to_json(&AddBackendBody {
                service: service.clone(),
                backend: backend.clone(),
            }),
        ),
        Request::RemoveBackend(backend) => (Endpoint::RemoveBackend, to_json(backend)),
        Request::Drain(backend) => (Endpoint::Drain, to_json(backend)),
        Request::Undrain(backend) => (Endpoint::Undrain, to_json(backend)),
        Request::Reload => (Endpoint::Reload, None),
        Request::Flow { src, dst, protocol } => {
            query.extend([
                ("src", src.to_string()),
                ("dst", dst.to_string()),
                ("protocol", protocol.to_string()),
            ]);
            (Endpoint::Flow, None)
        }
        Request::Stats => (Endpoint::Stats, None),
        Request::ClusterLeave => (Endpoint::ClusterLeave, None),
        Request::ClusterJoin => (Endpoint::ClusterJoin, None),
    };
    let &(_, method, path) = ROUTES
        .iter()
        .find(|(e, _, _)| *e == endpoint)
        .expect("every endpoint is in ROUTES");
    let mut target = path.to_owned();
    for (i, (name, value)) in query.iter().enumerate() {
        target.push(if i == 0 { '?' } else { '&' });
        target.push_str(name);
        target.push('=');
        target.push_str(&percent_encode(value));
    }
    (method, target, body)
}

/// The method a known path takes, for the `Allow` header of a 405.
fn allowed_method(target: &str) -> Option<&'static str> {
    let path = target.split_once('?').map_or(target, |(path, _)| path);
    ROUTES
        .iter()
        .find(|(_, _, p)| *p == path)
        .map(|(_, method, _)| *method)
}

fn json_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request("this request needs a JSON body"));
    }
    serde_json::from_slice(body)
        .map_err(|err| ApiError::bad_request(format!("invalid JSON body: {err}")))
}

/// A decoded query string. Parameters are taken out as they are used, so
/// [`Query::finish`] can reject the ones no endpoint knows: a misspelt
/// parameter must not be silently ignored.
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(query: &str) -> Result<Self, ApiError> {
        let mut params: Vec<(String, String)> = Vec::new();
        for pair in query.split('&').filter(|pair| !pair.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let (name, value) = (percent_decode(name)?, percent_decode(value)?);
            if params.iter().any(|(n, _)| *n == name) {
                return Err(ApiError::bad_request(format!(
                    "query parameter {name:?} given twice"
                )));
            }
            params.push((name, value));
        }
        Ok(Self(params))
    }

    fn take(&mut self, name: &str) -> Option<String> {
        let i = self.0.iter().position(|(n, _)| n == name)?;
        Some(self.0.remove(i).1)
    }

    fn require(&mut self, name: &str) -> Result<String, ApiError> {
        self.take(name)
            .ok_or_else(|| ApiError::bad_request(format!("missing query parameter {name:?}")))
    }

    fn address(&mut self, name: &str) -> Result<std::net::SocketAddr, ApiError> {
        let value = self.require(name)?;
        value.parse().map_err(|_| {
            ApiError::bad_request(format!(
                "query parameter {name}: {value:?} is not IP:PORT (IPv6 as [IP]:PORT)"
            ))
        })
    }

    fn finish(self) -> Result<(), ApiError> {
        match self.0.first() {
            Some((name, _)) => Err(ApiError::bad_request(format!(
                "unknown query parameter {name:?}"
            ))),
            None => Ok(()),
        }
    }
}

/// Everything but RFC 3986's unreserved characters is percent-encoded, so
/// any value (an IPv6 `[addr]:port`, a service name) survives as one
/// parameter.
const ENCODED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

fn percent_encode(value: &str) -> String {
    utf8_percent_encode(value, ENCODED).to_string()
}

/// Decodes `%XX` escapes. `+` stays a plus: it only means a space in HTML
/// forms, which nothing here speaks. A `%` without two hex digits is an
/// error (the crate would keep it as it is).
fn percent_decode(value: &str) -> Result<String, ApiError> {
    let escapes_valid = value.split('%').skip(1).all(|escape| {
        escape
            .as_bytes()
            .get(..2)
            .is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit))
    });
    if !escapes_valid {
        return Err(ApiError::bad_request(format!(
            "bad percent-encoding in query {value:?}"
        )));
    }
    percent_decode_str(value)
        .decode_utf8()
        .map(|decoded| decoded.into_owned())
        .map_err(|_| ApiError::bad_request(format!("query {value:?} is not UTF-8 once decoded")))
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read as _, Write as _},
        os::unix::net::UnixStream as StdUnixStream,
        time::Instant,
    };

    use serde_json::json;

    use super::*;
    use crate::api::{client, client::ClientError, BackendRef, Done, Protocol, ServiceSpec};

    fn flow(src: &str, dst: &str, protocol: Protocol) -> Request {
        Request::Flow {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            protocol,
        }
    }

    fn backend_ref(port: Option<u16>) -> BackendRef {
        BackendRef {
            service: "web".into(),
            address: "10.0.0.1".parse().unwrap(),
            port,
        }
    }

    /// One of each variant, with the awkward values: IPv6 addresses, names
    /// that need percent-encoding.
    fn every_request() -> Vec<Request> {
        vec![
            Request::Status,
            Request::ClusterLeave,
            Request::ClusterJoin,
            Request::ListServices,
            Request::AddService(
                serde_json::from_value(
                    json!({"name": "web", "vip": "10.0.0.100", "port": 80, "protocol": "tcp",
                    "backend": [{"address": "10.0.0.1", "weight": 5}]}),
                )
                .unwrap(),
            ),
            Request::RemoveService { name: "web".into() },
            Request::ListBackends { service: None },
            Request::ListBackends {
                service: Some("web & dns/6 ?=%".into()),
            },
            Request::AddBackend {
                service: "web".into(),
                backend: serde_json::from_value(json!({"address": "10.0.0.1", "state": "drain"}))
                    .unwrap(),
            },
            Request::RemoveBackend(backend_ref(None)),
            Request::Drain(backend_ref(Some(8080))),
            Request::Undrain(BackendRef {
                service: "dns6".into(),
                address: "2001:db8::10".parse().unwrap(),
                port: Some(53),
            }),
            Request::Reload,
            flow("10.1.1.1:40000", "10.0.0.100:80", Protocol::Tcp),
            flow("[fd00::1]:40000", "[2001:db8::53]:53", Protocol::Udp),
            Request::Stats,
        ]
    }

    #[test]
    fn every_request_round_trips_through_http() {
        for request in every_request() {
            let (method, target, body) = path_of(&request);
            let back = route(method, &target, body.as_deref().unwrap_or_default());
            assert_eq!(back, Ok(request.clone()), "{method} {target}");
        }
    }

    #[test]
    fn every_endpoint_has_exactly_one_route() {
        for (i, (endpoint, _, path)) in ROUTES.iter().enumerate() {
            assert!(
                ROUTES[i + 1..]
                    .iter()
                    .all(|(e, _, p)| e != endpoint && p != path),
                "{path}"
            );
        }
    }

    #[test]
    fn routes_match_the_documented_table() {
        const ADD_WEB: &str = r#"{"name":"web","vip":"10.0.0.100","port":80,"protocol":"tcp"}"#;
        let cases: &[(&str, &str, &str, Request)] = &[
            ("GET", "/v1/status", "", Request::Status),
            ("GET", "/v1/services", "", Request::ListServices),
            (
                "POST",
                "/v1/services/add",
                ADD_WEB,
                Request::AddService(serde_json::from_str(ADD_WEB).unwrap()),
            ),
            (
                "POST",
                "/v1/services/remove",
                r#"{"name":"web"}"#,
                Request::RemoveService { name: "web".into() },
            ),
            (
                "GET",
                "/v1/backends",
                "",
                Request::ListBackends { service: None },
            ),
            (
                "GET",
                "/v1/backends?service=web",
                "",
                Request::ListBackends {
                    service: Some("web".into()),
                },
            ),
            (
                "POST",
                "/v1/backends/add",
                r#"{"service":"web","backend":{"address":"10.0.0.1"}}"#,
                Request::AddBackend {
                    service: "web".into(),
                    backend: serde_json::from_value(json!({"address": "10.0.0.1"})).unwrap(),
                },
            ),
            (
                "POST",
                "/v1/backends/remove",
                r#"{"service":"web","address":"10.0.0.1"}"#,
                Request::RemoveBackend(backend_ref(None)),
            ),
            (
                "POST",
                "/v1/backends/drain",
                r#"{"service":"web","address":"10.0.0.1","port":8080}"#,
                Request::Drain(backend_ref(Some(8080))),
            ),
            (
                "POST",
                "/v1/backends/undrain",
                r#"{"service":"web","address":"10.0.0.1"}"#,
                Request::Undrain(backend_ref(None)),
            ),
            ("POST", "/v1/reload", "", Request::Reload),
            (
                "GET",
                "/v1/flow?src=10.1.1.1:40000&dst=10.0.0.100:80&protocol=tcp",
                "",
                flow("10.1.1.1:40000", "10.0.0.100:80", Protocol::Tcp),
            ),
            (
                "GET",
                "/v1/flow?src=%5Bfd00%3A%3A1%5D%3A40000&dst=%5bfd00%3a%3a100%5d%3a80&protocol=udp",
                "",
                flow("[fd00::1]:40000", "[fd00::100]:80", Protocol::Udp),
            ),
            ("GET", "/v1/stats", "", Request::Stats),
        ];
        for (method, target, body, expected) in cases {
            assert_eq!(
                route(method, target, body.as_bytes()).as_ref(),
                Ok(expected),
                "{method} {target}"
            );
        }
    }

    #[test]
    fn ipv6_flow_query_is_percent_encoded() {
        let (method, target, body) =
            path_of(&flow("[fd00::1]:40000", "[fd00::100]:80", Protocol::Tcp));
        assert_eq!(method, "GET");
        assert_eq!(
            target,
            "/v1/flow?src=%5Bfd00%3A%3A1%5D%3A40000&dst=%5Bfd00%3A%3A100%5D%3A80&protocol=tcp"
        );
        assert_eq!(body, None);
    }

    #[test]
    fn route_rejects_bad_requests() {
        for (method, target, body, status) in [
            ("GET", "/v1/nope", "", 404),
            ("GET", "/v1/status/", "", 404),
            ("GET", "/", "", 404),
            ("POST", "/v1/status", "", 405),
            ("GET", "/v1/reload", "", 405),
            ("DELETE", "/v1/services/remove", "", 405),
            ("POST", "/v1/services/remove", "", 400),
            ("POST", "/v1/services/remove", "{", 400),
            (
                "POST",
                "/v1/services/remove",
                r#"{"name":"web","x":1}"#,
                400,
            ),
            ("POST", "/v1/services/add", "[]", 400),
            (
                "POST",
                "/v1/backends/drain",
                r#"{"service":"web","address":"nope"}"#,
                400,
            ),
            ("GET", "/v1/flow?src=10.0.0.1:1&dst=10.0.0.2:2", "", 400),
            (
                "GET",
                "/v1/flow?src=10.0.0.1&dst=10.0.0.2:2&protocol=tcp",
                "",
                400,
            ),
            (
                "GET",
                "/v1/flow?src=fd00::1:1&dst=10.0.0.2:2&protocol=tcp",
                "",
                400,
            ),
            ("GET", "/v1/backends?service=a&service=b", "", 400),
            ("GET", "/v1/backends?servce=web", "", 400),
            ("GET", "/v1/status?verbose=1", "", 400),
            ("GET", "/v1/backends?service=%zz", "", 400),
            ("GET", "/v1/backends?service=%ff", "", 400),
        ] {
            let got = route(method, target, body.as_bytes()).map_err(|err| err.status);
            assert_eq!(got, Err(status), "{method} {target} {body}");
        }
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%20b+c%2B").unwrap(), "a b+c+");
        assert_eq!(percent_decode("%5b%5D").unwrap(), "[]");
        assert!(percent_decode("%").is_err());
        assert!(percent_decode("%4").is_err());
        // u8::from_str_radix would take the sign.
        assert!(percent_decode("%+1").is_err());
        assert_eq!(
            percent_encode("[fd00::1]:80 a/b"),
            "%5Bfd00%3A%3A1%5D%3A80%20a%2Fb"
        );
    }

    // --- Over a real socket ---------------------------------------------------

    /// A handler with one service, "web".
    struct Dummy;

    impl Handler for Dummy {
        fn handle(&self, request: Request) -> Result<serde_json::Value, ApiError> {
            match request {
                Request::Status => Ok(json!({"version": "test"})),
                Request::RemoveService { name } if name == "web" => {
                    Ok(serde_json::to_value(Done {
                        message: "service web removed".into(),
                    })
                    .unwrap())
                }
                Request::RemoveService { name } => {
                    Err(ApiError::not_found(format!("no service named {name:?}")))
                }
                Request::AddService(service) => Ok(json!(service)),
                Request::Flow { src, dst, protocol } => {
                    Ok(json!({"src": src, "dst": dst, "protocol": protocol}))
                }
                Request::Stats => panic!("the dummy handler panics on stats"),
                other => Err(ApiError::internal(format!("not in the dummy: {other:?}"))),
            }
        }
    }

    /// A directory of its own for each test, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(test: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("xdplb-api-{}-{test}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// Runs `future` (a server) on its own runtime until the returned
    /// runtime is dropped, and waits for `socket` to appear.
    fn start(
        socket: &Path,
        future: impl std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
    ) -> tokio::runtime::Runtime {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.spawn(async move {
            if let Err(err) = future.await {
                panic!("server failed: {err:#}");
            }
        });
        // Connecting, not the file's existence, says it is up: a stale
        // socket file may be there before the server binds.
        let deadline = Instant::now() + Duration::from_secs(10);
        while StdUnixStream::connect(socket).is_err() {
            assert!(
                Instant::now() < deadline,
                "the server did not bind {}",
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        runtime
    }

    fn serve_dummy(socket: &Path) -> tokio::runtime::Runtime {
        let path = socket.to_owned();
        start(socket, async move { serve(&path, Arc::new(Dummy)).await })
    }

    /// Sends raw bytes, checks that the answer starts with
    /// `HTTP/1.1 {status}`, returns the raw answer.
    #[track_caller]
    fn raw(socket: &Path, request: &[u8], status: &str) -> String {
        let mut stream = StdUnixStream::connect(socket).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        // The server may answer (and close) before all is written.
        let _ = stream.write_all(request);
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        let head = format!("HTTP/1.1 {status}");
        assert!(answer.starts_with(&head), "{answer}");
        answer
    }

    /// Calls `request`, expecting the API to refuse it with `status`.
    #[track_caller]
    fn api_error(socket: &Path, request: &Request, status: u16) -> ApiError {
        match client::call(socket, request) {
            Err(ClientError::Api(err)) if err.status == status => err,
            other => panic!("expected a {status}, got {other:?}"),
        }
    }

    /// Starts another server on `path`, which must fail; returns its error.
    #[track_caller]
    fn serve_error(path: &Path) -> String {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let err = runtime.block_on(serve(path, Arc::new(Dummy))).unwrap_err();
        format!("{err:#}")
    }

    #[test]
    fn serves_requests_over_the_socket() {
        let dir = TempDir::new("serve");
        // A directory that does not exist yet: serve creates it 0700.
        let socket = dir.0.join("run").join("xdplb.sock");
        let runtime = serve_dummy(&socket);

        let mode = |path: &Path| fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&socket), 0o600);
        assert_eq!(mode(&dir.0.join("run")), 0o700);

        assert_eq!(
            client::call(&socket, &Request::Status).unwrap(),
            json!({"version": "test"})
        );
        let done = client::call(&socket, &Request::RemoveService { name: "web".into() }).unwrap();
        assert_eq!(done, json!({"message": "service web removed"}));
        let service: ServiceSpec = serde_json::from_value(json!({"name": "big",
            "vip": "10.0.0.1", "port": 1, "protocol": "tcp",
            "health_check": {"path": "x".repeat(100_000)}}))
        .unwrap();
        assert_eq!(
            client::call(&socket, &Request::AddService(Box::new(service.clone()))).unwrap(),
            json!(service)
        );
        let ipv6_flow = flow("[fd00::1]:40000", "[fd00::100]:80", Protocol::Tcp);
        assert_eq!(
            client::call(&socket, &ipv6_flow).unwrap(),
            json!({"src": "[fd00::1]:40000", "dst": "[fd00::100]:80", "protocol": "tcp"})
        );

        // Errors from the handler keep their status and message.
        let nope = Request::RemoveService {
            name: "nope".into(),
        };
        assert_eq!(
            api_error(&socket, &nope, 404),
            ApiError::not_found("no service named \"nope\"")
        );
        // A panicking handler is a 500, and the server keeps serving.
        api_error(&socket, &Request::Stats, 500);
        assert!(client::call(&socket, &Request::Status).is_ok());

        // A second daemon on the same socket is refused.
        let err = serve_error(&socket);
        assert!(
            err.contains("another xdplb daemon is already serving"),
            "{err}"
        );

        // Dropping the server removes its socket.
        drop(runtime);
        assert!(!socket.exists());
        match client::call(&socket, &Request::Status) {
            Err(err @ ClientError::NotRunning { .. }) => {
                assert!(err.to_string().contains("daemon is not running"), "{err}");
                assert!(
                    err.to_string().contains(&socket.display().to_string()),
                    "{err}"
                );
            }
            other => panic!("expected not running, got {other:?}"),
        }
    }

    #[test]
    fn answers_raw_http() {
        let dir = TempDir::new("raw");
        let socket = dir.0.join("xdplb.sock");
        let _runtime = serve_dummy(&socket);

        // Header names are compared without case: hyper writes them lower.
        let get_status = b"GET /v1/status HTTP/1.1\r\nHost: x\r\n\r\n";
        let answer = raw(&socket, get_status, "200 OK\r\n");
        let lower = answer.to_ascii_lowercase();
        assert!(
            lower.contains("\r\ncontent-type: application/json\r\n"),
            "{answer}"
        );
        assert!(lower.contains("\r\nconnection: close\r\n"), "{answer}");
        assert!(lower.contains("\r\ncontent-length: 19\r\n"), "{answer}");
        let tail = "\r\n\r\n{\"version\":\"test\"}\n";
        assert!(answer.ends_with(tail), "{answer}");

        let get_nothing = b"GET /v1/nothing HTTP/1.1\r\n\r\n";
        let answer = raw(&socket, get_nothing, "404 Not Found\r\n");
        let tail = "{\"error\":\"no such API endpoint: /v1/nothing\"}\n";
        assert!(answer.ends_with(tail), "{answer}");

        let get_reload = b"GET /v1/reload HTTP/1.1\r\n\r\n";
        let answer = raw(&socket, get_reload, "405 Method Not Allowed\r\n");
        let allow = "\r\nallow: post\r\n";
        assert!(answer.to_ascii_lowercase().contains(allow), "{answer}");

        let body = br#"{"name": "#;
        let request = format!(
            "POST /v1/services/remove HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let request = [request.as_bytes(), body].concat();
        let answer = raw(&socket, &request, "400 Bad Request\r\n");
        assert!(answer.contains("invalid JSON body"), "{answer}");

        // curl's Expect: 100-continue gets its interim answer.
        let mut stream = StdUnixStream::connect(&socket).unwrap();
        stream
            .write_all(
                b"POST /v1/services/remove HTTP/1.1\r\nExpect: 100-continue\r\n\
                  Content-Length: 14\r\n\r\n",
            )
            .unwrap();
        let mut interim = [0u8; 25];
        stream.read_exact(&mut interim).unwrap();
        assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
        stream.write_all(br#"{"name":"web"}"#).unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");

        // A chunked body is read too, within the same limit.
        raw(
            &socket,
            b"POST /v1/services/remove HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n\
              e\r\n{\"name\":\"web\"}\r\n0\r\n\r\n",
            "200 OK\r\n",
        );

        let huge_head = format!(
            "GET /v1/status HTTP/1.1\r\nX: {}\r\n\r\n",
            "a".repeat(MAX_HEAD)
        );
        raw(&socket, huge_head.as_bytes(), "431 ");

        // Announced too large: refused before the body is sent.
        let head = format!(
            "POST /v1/services/add HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY + 1
        );
        raw(&socket, head.as_bytes(), "413 ");
        // The largest body allowed is read, and judged on what it says
        // (not JSON here), not on its size.
        let largest = format!(
            "POST /v1/services/add HTTP/1.1\r\nContent-Length: {MAX_BODY}\r\n\r\n{}",
            "x".repeat(MAX_BODY)
        );
        raw(&socket, largest.as_bytes(), "400 ");

        // Sent too large without announcing it: cut at the limit.
        let chunk = format!("{:x}\r\n{}\r\n", MAX_BODY + 1, "x".repeat(MAX_BODY + 1));
        let request = format!(
            "POST /v1/services/add HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n{chunk}0\r\n\r\n"
        );
        raw(&socket, request.as_bytes(), "413 ");
    }

    #[test]
    fn caps_connections_and_evicts_the_oldest_idle_one() {
        let dir = TempDir::new("cap");
        let socket = dir.0.join("xdplb.sock");
        let _runtime = serve_dummy(&socket);
        // Twice the cap, each announcing a body it never sends.
        let idle: Vec<StdUnixStream> = (0..2 * MAX_CONNECTIONS)
            .map(|_| {
                let mut stream = StdUnixStream::connect(&socket).unwrap();
                stream
                    .write_all(b"POST /v1/services/add HTTP/1.1\r\nContent-Length: 1000\r\n\r\n")
                    .unwrap();
                stream
            })
            .collect();
        let start = Instant::now();
        assert_eq!(
            client::call(&socket, &Request::Status).unwrap(),
            json!({"version": "test"})
        );
        // Far below IO_TIMEOUT: the idle connections were evicted, not
        // waited out.
        let elapsed = start.elapsed();
        assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
        // The first ones were closed to make room.
        let mut first = &idle[0];
        first
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut rest = Vec::new();
        assert_eq!(first.read_to_end(&mut rest).unwrap_or(0), 0);
    }

    #[test]
    fn refuses_peers_that_are_not_allowed() {
        let dir = TempDir::new("refuse");
        let socket = dir.0.join("xdplb.sock");
        let path = socket.clone();
        let _runtime = start(&socket, async move {
            let (listener, _remove) = bind(&path)?;
            accept_loop(listener, Arc::new(Dummy), |_| false).await
        });
        assert_eq!(
            api_error(&socket, &Request::Status, 403).message,
            "the xdplb API is root-only"
        );
    }

    #[test]
    fn replaces_a_stale_socket_but_not_other_files() {
        let dir = TempDir::new("stale");
        let socket = dir.0.join("xdplb.sock");
        // A socket nobody listens on any more, as a killed daemon leaves.
        drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
        assert!(socket.exists());
        let _runtime = serve_dummy(&socket);
        assert!(client::call(&socket, &Request::Status).is_ok());

        let file = dir.0.join("not-a-socket");
        fs::write(&file, "keep me").unwrap();
        let err = serve_error(&file);
        assert!(err.contains("is not a socket"), "{err}");
        assert_eq!(fs::read_to_string(&file).unwrap(), "keep me");
    }
}
