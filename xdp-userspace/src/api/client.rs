//! Calls the control API: a blocking client for the CLI.
//!
//! One request per connection, as the server expects ([`super::server`]);
//! the HTTP form of each request comes from [`server::path_of`], so client
//! and server cannot disagree on paths.

use std::{
    io::{self, Read as _, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use super::{server, ApiError, Request};

/// How long the daemon may take to answer; a reload of a big configuration
/// takes seconds, not tens of seconds.
const TIMEOUT: Duration = Duration::from_secs(30);
/// Largest answer read: far above any real one, but bounded.
const MAX_ANSWER: u64 = 256 * 1024 * 1024;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No socket, or nobody listening on it.
    #[error("the xdplb daemon is not running (no API socket at {}; start it with `xdplb run`)", socket.display())]
    NotRunning { socket: PathBuf },
    /// The socket (or its directory) is root-only.
    #[error("permission denied on {}: the xdplb API is root-only (try sudo)", socket.display())]
    PermissionDenied { socket: PathBuf },
    /// The daemon took longer than the timeout.
    #[error("the xdplb daemon at {} did not answer within {}s", socket.display(), TIMEOUT.as_secs())]
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
    let io_error = |source: io::Error| classify(socket, source);
    let mut stream = UnixStream::connect(socket).map_err(io_error)?;
    stream.set_read_timeout(Some(TIMEOUT)).map_err(io_error)?;
    stream.set_write_timeout(Some(TIMEOUT)).map_err(io_error)?;

    let (method, target, body) = server::path_of(request);
    let body = body.unwrap_or_default();
    let mut message = format!(
        "{method} {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    message.extend_from_slice(&body);
    match stream.write_all(&message) {
        Ok(()) => {}
        // The daemon may refuse (403) and close before reading the request;
        // its answer is still there to read.
        Err(err) if err.kind() == io::ErrorKind::BrokenPipe => {}
        Err(err) => return Err(io_error(err)),
    }

    let mut answer = Vec::new();
    stream
        .take(MAX_ANSWER)
        .read_to_end(&mut answer)
        .map_err(io_error)?;
    parse_answer(&answer).map_err(|detail| ClientError::Protocol {
        socket: socket.to_owned(),
        detail,
    })?
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

/// Splits an HTTP answer into status and JSON body. The outer error is a
/// malformed answer; the inner result is the API's own verdict.
fn parse_answer(answer: &[u8]) -> Result<Result<serde_json::Value, ClientError>, String> {
    let Some(head_len) = answer.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Err(if answer.is_empty() {
            "the connection closed without an answer".to_owned()
        } else {
            "no end of the HTTP head".to_owned()
        });
    };
    let head = std::str::from_utf8(&answer[..head_len])
        .map_err(|_| "HTTP head is not UTF-8".to_owned())?;
    let mut body = &answer[head_len + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = match status_line.split(' ').collect::<Vec<_>>()[..] {
        [version, status, ..] if version.starts_with("HTTP/1.") => status
            .parse()
            .map_err(|_| format!("bad status line {status_line:?}"))?,
        _ => return Err(format!("bad status line {status_line:?}")),
    };
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                let length: usize = value
                    .trim()
                    .parse()
                    .map_err(|_| format!("bad Content-Length {:?}", value.trim()))?;
                body = body.get(..length).ok_or_else(|| {
                    format!(
                        "the answer was cut short ({} of {length} body bytes)",
                        body.len()
                    )
                })?;
            }
        }
    }
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
    fn parses_answers() {
        let ok = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 12\r\n\r\n{\"a\":[1,2]}\n";
        assert_eq!(parse_answer(ok).unwrap().unwrap(), json!({"a": [1, 2]}));

        let not_found =
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 22\r\n\r\n{\"error\":\"no such x\"}\n";
        match parse_answer(not_found).unwrap() {
            Err(ClientError::Api(err)) => assert_eq!(err, ApiError::not_found("no such x")),
            other => panic!("{other:?}"),
        }

        let not_json = b"HTTP/1.1 502 Bad Gateway\r\n\r\noops";
        match parse_answer(not_json).unwrap() {
            Err(ClientError::Api(err)) => assert_eq!(err.message, "HTTP status 502: oops"),
            other => panic!("{other:?}"),
        }

        assert!(parse_answer(b"").unwrap_err().contains("without an answer"));
        assert!(
            parse_answer(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}")
                .unwrap_err()
                .contains("cut short")
        );
        assert!(parse_answer(b"SSH-2.0\r\n\r\n")
            .unwrap_err()
            .contains("status line"));
        assert!(parse_answer(b"HTTP/1.1 200 OK\r\n\r\nnope")
            .unwrap_err()
            .contains("not JSON"));
    }

    #[test]
    fn error_messages_say_what_to_do() {
        let socket = Path::new("/run/xdplb/xdplb.sock");
        let message = |errno| classify(socket, io::Error::from_raw_os_error(errno)).to_string();
        let not_running =
            "the xdplb daemon is not running (no API socket at /run/xdplb/xdplb.sock; start it with `xdplb run`)";
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
