//! Calls the control API: a blocking client for the CLI, hyper's HTTP/1.1
//! client over the Unix socket.
//!
//! One request per connection, as the server expects ([`super::server`]);
//! the HTTP form of each request comes from [`server::path_of`], so client
//! and server cannot disagree on paths.

use std::{
    io,
    path::{Path, PathBuf},
    time::Duration,
};

use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

use super::{server, ApiError, Request};

/// How long the daemon may take to answer; a reload of a big configuration
/// takes seconds, not tens of seconds.
const TIMEOUT: Duration = Duration::from_secs(30);
/// Largest answer read: far above any real one, but bounded.
const MAX_ANSWER: usize = 256 * 1024 * 1024;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No socket, or nobody listening on it.
    #[error("the xdplb daemon is not running (no API socket at {}; start it with `xdplb \
        run`)", socket.display())]
    NotRunning { socket: PathBuf },
    /// The socket (or its directory) is root-only.
    #[error("permission denied on {}: the xdplb API is root-only (try sudo)", socket.display())]
    PermissionDenied { socket: PathBuf },
    /// The daemon took longer than the timeout.
    #[error("the xdplb daemon at {} did not answer within \
        {}s", socket.display(), TIMEOUT.as_secs())]
    Timeout { socket: PathBuf },
    /// Any other I/O failure on the socket.
    #[error("talking to the xdplb daemon at {}: {source}", socket.display())]
    Io {
        socket: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The answer is not the HTTP/JSON the API speaks.
    #[error("bad answer from the xdplb daemon at {}: {detail}", socket.display())]
    Protocol { socket: PathBuf, detail: String },
    /// The daemon answered with an error (4xx/5xx): its message.
    #[error(transparent)]
    Api(ApiError),
}

/// Sends `request` to the daemon listening on `socket` and returns the JSON
/// value it answered with.
pub fn call(socket: &Path, request: &Request) -> Result<serde_json::Value, ClientError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| ClientError::Io {
            socket: socket.to_owned(),
            source,
        })?;
    runtime.block_on(async {
        tokio::time::timeout(TIMEOUT, exchange(socket, request))
            .await
            .unwrap_or_else(|_| {
                Err(ClientError::Timeout {
                    socket: socket.to_owned(),
                })
            })
    })
}

/// One request and its answer on a fresh connection.
async fn exchange(socket: &Path, request: &Request) -> Result<serde_json::Value, ClientError> {
    let protocol = |detail: String| ClientError::Protocol {
        socket: socket.to_owned(),
        detail,
    };
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|err| classify(socket, err))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|err| protocol(format!("starting HTTP: {err}")))?;
    // Drives the connection; ends when the answer is read (or on error,
    // which `send_request` reports).
    tokio::spawn(connection);

    let (method, target, body) = server::path_of(request);
    let http_request = http::Request::builder()
        .method(method)
        .uri(target)
        .header(http::header::HOST, "localhost")
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .map_err(|err| protocol(format!("building the request: {err}")))?;
    let answer = sender
        .send_request(http_request)
        .await
        .map_err(|err| match io_cause(&err) {
            Some(kind) => classify(socket, io::Error::new(kind, err)),
            None => protocol(format!("{err}")),
        })?;
    let status = answer.status().as_u16();
    let body = Limited::new(answer.into_body(), MAX_ANSWER)
        .collect()
        .await
        .map_err(|err| protocol(format!("reading the answer: {err}")))?
        .to_bytes();
    interpret(status, &body).map_err(protocol)?
}

/// The I/O error under a hyper error, if any.
fn io_cause(err: &hyper::Error) -> Option<io::ErrorKind> {
    std::iter::successors(std::error::Error::source(err), |cause| cause.source())
        .find_map(|cause| cause.downcast_ref::<io::Error>())
        .map(io::Error::kind)
}

/// Maps the errors an operator can act on to messages that say what to do.
fn classify(socket: &Path, source: io::Error) -> ClientError {
    let socket = socket.to_owned();
    match source.raw_os_error() {
        Some(libc::ENOENT | libc::ECONNREFUSED) => ClientError::NotRunning { socket },
        Some(libc::EACCES | libc::EPERM) => ClientError::PermissionDenied { socket },
        Some(libc::EAGAIN | libc::ETIMEDOUT) => ClientError::Timeout { socket },
        _ => ClientError::Io { socket, source },
    }
}

/// Reads an answer's status and JSON body. The outer error is a malformed
/// answer; the inner result is the API's own verdict.
fn interpret(status: u16, body: &[u8]) -> Result<Result<serde_json::Value, ClientError>, String> {
    let value: Result<serde_json::Value, _> = serde_json::from_slice(body);
    if status == 200 {
        return value
            .map(Ok)
            .map_err(|err| format!("the body is not JSON: {err}"));
    }
    // An error answer should carry {"error": message}; fall back to the
    // status and raw body so nothing is lost if it does not.
    let message = match value
        .as_ref()
        .ok()
        .and_then(|value| value.get("error")?.as_str())
    {
        Some(message) => message.to_owned(),
        None => format!(
            "HTTP status {status}: {}",
            String::from_utf8_lossy(body).trim()
        ),
    };
    Ok(Err(ClientError::Api(ApiError { status, message })))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn interprets_answers() {
        assert_eq!(
            interpret(200, b"{\"a\":[1,2]}\n").unwrap().unwrap(),
            json!({"a": [1, 2]})
        );
        match interpret(404, b"{\"error\":\"no such x\"}\n").unwrap() {
            Err(ClientError::Api(err)) => assert_eq!(err, ApiError::not_found("no such x")),
            other => panic!("{other:?}"),
        }
        match interpret(502, b"oops").unwrap() {
            Err(ClientError::Api(err)) => assert_eq!(err.message, "HTTP status 502: oops"),
            other => panic!("{other:?}"),
        }
        assert!(interpret(200, b"nope").unwrap_err().contains("not JSON"));
    }

    #[test]
    fn error_messages_say_what_to_do() {
        let socket = Path::new("/run/xdplb/xdplb.sock");
        let message = |errno| classify(socket, io::Error::from_raw_os_error(errno)).to_string();
        let not_running =
            "the xdplb daemon is not running (no API socket at /run/xdplb/xdplb.sock; start it \
                with `xdplb run`)";
        assert_eq!(message(libc::ENOENT), not_running);
        assert_eq!(message(libc::ECONNREFUSED), not_running);
        assert_eq!(
            message(libc::EACCES),
            "permission denied on /run/xdplb/xdplb.sock: the xdplb API is root-only (try sudo)"
        );
        assert!(message(libc::EPERM).contains("root-only"));
        assert!(message(libc::EAGAIN).contains("did not answer within 30s"));
        assert!(message(libc::EIO)
            .starts_with("talking to the xdplb daemon at /run/xdplb/xdplb.sock: "));
        let api = ClientError::Api(ApiError::bad_request(
            "service \"web\": port: 0 is out of range",
        ));
        assert_eq!(api.to_string(), "service \"web\": port: 0 is out of range");
    }

    #[test]
    fn missing_socket_means_not_running() {
        let socket =
            std::env::temp_dir().join(format!("xdplb-client-{}-missing.sock", std::process::id()));
        let err = call(&socket, &Request::Status).unwrap_err();
        assert!(matches!(err, ClientError::NotRunning { .. }), "{err:?}");
    }
}
