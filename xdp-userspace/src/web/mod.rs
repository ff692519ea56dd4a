//! The observability listener on `[daemon] metrics_listen` (TCP): Prometheus
//! metrics at `/metrics`, a live status page at `/` and the JSON it polls at
//! `/api/status`. Everything here is read-only.
//!
//! There is one source of truth: every answer is built from the control
//! API's own views (`Status`, `ListServices`, `Stats`, asked of the same
//! [`Handler`]), plus the health checker's per-probe figures that the API
//! does not show (check counts and latency).

pub mod metrics;

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use axum::{
    extract::State,
    http::{header, HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Json, Router,
};
use hyper::server::conn::http1;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use serde::Serialize;
use serde_json::Value;
use tokio::{
    net::TcpListener,
    sync::{Mutex, Semaphore},
};

use crate::{
    api::{ApiError, Handler, Request},
    health::TargetStatus,
};

/// The status page: one self-contained file (inline CSS and JS).
const STATUS_PAGE: &str = include_str!("status.html");

/// The health checker's current figures, one per checked backend.
pub type HealthSource = Arc<dyn Fn() -> Vec<TargetStatus> + Send + Sync>;

/// What the routes read from.
#[derive(Clone)]
pub struct Sources {
    /// The API's handler: the views come from it.
    pub handler: Arc<dyn Handler>,
    pub health: HealthSource,
}

/// Binds `addr` (before the daemon loads anything, so a taken address is
/// a start-up error that changes nothing).
pub fn bind(addr: SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr)
        .with_context(|| format!("binding the metrics listener {addr} (daemon.metrics_listen)"))?;
    listener
        .set_nonblocking(true)
        .context("making the metrics listener non-blocking")?;
    Ok(listener)
}

/// Connections served at once; more wait in the listen backlog. The page
/// and a scraper or two need a handful.
const MAX_CONNECTIONS: usize = 64;
/// How long a client may take to send a request head: a stalled client
/// frees its connection slot after this.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection may live, its answer delivered: a client that
/// does not read its answer (megabytes at thousands of backends) frees its
/// slot and the answer's memory after this. Building the answer takes
/// seconds at the datapath's limits, and a scraper gives up sooner
/// (Prometheus after 10 s); the rest is margin for a slow link.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// A snapshot and when it was started.
type Dated = (Instant, Arc<Snapshot>);

/// What the routes share: the sources, and the latest snapshot.
#[derive(Clone)]
struct Shared {
    sources: Sources,
    /// Held while a snapshot is taken, so at most one is taken at a time,
    /// and requests that arrive meanwhile wait for it and answer from the
    /// next: taking one holds the daemon's lock for a while at thousands of
    /// backends, so one per client at once would keep API changes and
    /// health verdicts waiting.
    latest: Arc<Mutex<Option<Dated>>>,
}

/// Serves on `listener` (from [`bind`]) until the future is dropped: the
/// router over hyper's HTTP/1.1, one request per connection, with a head
/// timeout, a connection lifetime and a connection cap (`axum::serve` has
/// none of them).
pub async fn serve(listener: std::net::TcpListener, sources: Sources) -> anyhow::Result<()> {
    let listener = TcpListener::from_std(listener).context("registering the metrics listener")?;
    let addr = listener
        .local_addr()
        .context("reading the metrics address")?;
    tracing::info!(%addr, "serving metrics and the status page");
    let router = Router::new()
        .route("/", get(page))
        .route("/metrics", get(metrics_text))
        .route("/api/status", get(status_json))
        .with_state(Shared {
            sources,
            latest: Arc::default(),
        });
    let service = TowerToHyperService::new(router);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let slot = Arc::clone(&slots)
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                // Typically EMFILE: transient. The pause keeps a persistent
                // error from spinning.
                tracing::warn!("accepting a metrics connection: {err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let service = service.clone();
        tokio::spawn(async move {
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                // A kept-alive connection would reach the lifetime limit,
                // and lose an answer, sooner or later.
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            match tokio::time::timeout(CONNECTION_TIMEOUT, connection).await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => tracing::debug!("metrics connection: {err}"),
                Err(_) => tracing::debug!(
                    "metrics connection: closed after {CONNECTION_TIMEOUT:?}, its answer unread"
                ),
            }
            drop(slot);
        });
    }
}

/// One consistent read of the API's views.
#[derive(Clone, Debug, Serialize)]
pub struct Snapshot {
    /// `GET /v1/status`.
    pub status: Value,
    /// `GET /v1/services`: services with their backends.
    pub services: Value,
    /// `GET /v1/stats`: datapath reasons, NAT occupancy.
    pub stats: Value,
    /// Per checked backend: probes run, failed, and the last one's latency.
    pub checks: Vec<CheckFigures>,
}

/// The health checker's figures for one backend.
#[derive(Clone, Debug, Serialize)]
pub struct CheckFigures {
    pub service: String,
    /// `IP:PORT` (IPv6 as `[IP]:PORT`), as in the metrics' labels.
    pub backend: String,
    pub checks: u64,
    pub failures: u64,
    pub last_duration_s: Option<f64>,
}

impl Snapshot {
    /// Asks the handler for its views. Blocking (BPF map reads).
    pub fn take(sources: &Sources) -> Result<Self, ApiError> {
        let handler = &sources.handler;
        let checks = (sources.health)()
            .into_iter()
            .map(|t| CheckFigures {
                backend: SocketAddr::new(t.backend.0, t.backend.1).to_string(),
                service: t.service,
                checks: t.checks,
                failures: t.failures,
                last_duration_s: t.last_duration.map(|d| d.as_secs_f64()),
            })
            .collect();
        Ok(Self {
            status: handler.handle(Request::Status)?,
            services: handler.handle(Request::ListServices)?,
            stats: handler.handle(Request::Stats)?,
            checks,
        })
    }
}

/// A snapshot started after the request arrived (so an answer never shows
/// an older state than the one asked about), taken off the async workers,
/// or shared with the requests that waited for the same one.
async fn snapshot(shared: Shared) -> Result<Arc<Snapshot>, Response> {
    let asked = Instant::now();
    let mut latest = shared.latest.lock().await;
    if let Some((started, snapshot)) = latest.as_ref() {
        if *started >= asked {
            return Ok(Arc::clone(snapshot));
        }
    }
    let started = Instant::now();
    let sources = shared.sources;
    match tokio::task::spawn_blocking(move || Snapshot::take(&sources)).await {
        Ok(Ok(snapshot)) => {
            let snapshot = Arc::new(snapshot);
            *latest = Some((started, Arc::clone(&snapshot)));
            Ok(snapshot)
        }
        Ok(Err(err)) => Err((StatusCode::INTERNAL_SERVER_ERROR, err.message).into_response()),
        Err(err) => Err((StatusCode::INTERNAL_SERVER_ERROR, err.to_string()).into_response()),
    }
}

async fn page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        STATUS_PAGE,
    )
}

/// OpenMetrics for scrapers that ask for it (Prometheus does), the classic
/// text format otherwise.
async fn metrics_text(
    State(shared): State<Shared>,
    headers: HeaderMap,
) -> Result<impl IntoResponse, Response> {
    let openmetrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .any(|value| value.contains("application/openmetrics-text"));
    let text = metrics::encode(&*snapshot(shared).await?);
    let (content_type, text) = if openmetrics {
        (metrics::OPENMETRICS, text)
    } else {
        (metrics::CLASSIC, metrics::to_classic(&text))
    };
    Ok(([(header::CONTENT_TYPE, content_type)], text))
}

async fn status_json(State(shared): State<Shared>) -> Result<Response, Response> {
    let snapshot = snapshot(shared).await?;
    Ok(([(header::CACHE_CONTROL, "no-store")], Json(&*snapshot)).into_response())
}
