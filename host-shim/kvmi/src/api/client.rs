//! A small client of the API: one request per connection, the response's status and body.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The largest response the client takes.
const MAX_RESPONSE: usize = 16 << 20;

/// A response.
#[derive(Debug, Clone)]
pub struct Response {
    /// The HTTP status.
    pub status: u16,
    /// The body (JSON).
    pub body: Vec<u8>,
}

impl Response {
    /// Whether the status is 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The body as JSON (`null` when it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// The message of an error response's `{"error": ...}`, else the body as text.
    pub fn error_message(&self) -> String {
        match self.json().get("error").and_then(|e| e.as_str()) {
            Some(m) => m.to_string(),
            None => String::from_utf8_lossy(&self.body).into_owned(),
        }
    }
}

/// Why a request got no response.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket cannot be reached.
    #[error("connecting to {path}: {source}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Sending or receiving failed (a timeout included).
    #[error("talking to the API: {0}")]
    Io(#[from] std::io::Error),
    /// The response is not HTTP, or too large.
    #[error("bad response: {0}")]
    Malformed(String),
}

/// Sends `method route` with the JSON `body` on a new connection to `socket` and reads the
/// response; `timeout` bounds each read and write (`None`: wait as long as the server works,
/// e.g. for a dump).
pub fn request(
    socket: &Path,
    method: &str,
    route: &str,
    body: Option<&[u8]>,
    timeout: Option<Duration>,
) -> Result<Response, ClientError> {
    let mut stream = UnixStream::connect(socket).map_err(|source| ClientError::Connect {
        path: socket.to_owned(),
        source,
    })?;
    stream.set_read_timeout(timeout)?;
    stream.set_write_timeout(timeout)?;
    let body = body.unwrap_or_default();
    let mut out = format!(
        "{method} {route} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
         Connection: close\r\n"
    );
    if !body.is_empty() {
        out.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    out.extend_from_slice(body);
    stream.write_all(&out)?;
    read_response(&mut stream)
}

/// Reads one response: its head, then `Content-Length` bytes (or up to the end of stream).
fn read_response(stream: &mut UnixStream) -> Result<Response, ClientError> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let mut eof = false;
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        let parsed = resp
            .parse(&buf)
            .map_err(|e| ClientError::Malformed(e.to_string()))?;
        if let httparse::Status::Complete(head) = parsed {
            let status = resp.code.unwrap_or(0);
            let length = resp
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .and_then(|h| {
                    std::str::from_utf8(h.value)
                        .ok()?
                        .trim()
                        .parse::<usize>()
                        .ok()
                });
            match length {
                Some(n) if n > MAX_RESPONSE => {
                    return Err(ClientError::Malformed(format!("a body of {n} bytes")));
                }
                Some(n) if buf.len() >= head + n => {
                    return Ok(Response {
                        status,
                        body: buf[head..head + n].to_vec(),
                    });
                }
                None if eof || status == 204 => {
                    return Ok(Response {
                        status,
                        body: buf[head..].to_vec(),
                    });
                }
                _ if eof => {
                    return Err(ClientError::Malformed("the body was cut short".into()));
                }
                _ => {}
            }
        } else if eof {
            return Err(ClientError::Malformed(
                "the connection closed before a whole response".into(),
            ));
        }
        if buf.len() > MAX_RESPONSE {
            return Err(ClientError::Malformed("the response is too large".into()));
        }
        match stream.read(&mut chunk) {
            Ok(0) => eof = true,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
}
