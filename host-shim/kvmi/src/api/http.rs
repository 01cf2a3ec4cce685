//! HTTP/1.1 framing on one connection: bounded request reading (httparse for the head,
//! `Content-Length` bodies) and response writing.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use super::error::{ApiError, reason};

/// The largest request line plus headers.
pub const MAX_HEAD: usize = 8 << 10;
/// The largest request body.
pub const MAX_BODY: usize = 64 << 10;
/// Most headers in a request.
const MAX_HEADERS: usize = 32;

/// One parsed request.
#[derive(Debug)]
pub struct Request {
    /// The method (`GET`, `PUT`, ...).
    pub method: String,
    /// The path, without a query.
    pub path: String,
    /// The body (empty without `Content-Length`).
    pub body: Vec<u8>,
    /// Whether the client keeps the connection open for another request.
    pub keep_alive: bool,
}

/// Why no request came.
#[derive(Debug)]
pub enum ReadError {
    /// The client closed the connection before sending a byte of a request.
    Closed,
    /// A bad or too slow request: answer with this error, then close.
    Reply(ApiError),
}

/// Reads requests from one connection; bytes after a request stay for the next one.
pub struct Reader {
    buf: Vec<u8>,
    /// Time a whole request may take, from its first wait.
    timeout: Duration,
}

impl Reader {
    /// A reader giving each request `timeout` to arrive whole.
    pub fn new(timeout: Duration) -> Reader {
        Reader {
            buf: Vec::new(),
            timeout,
        }
    }

    /// Reads more bytes before `deadline`; false at end of stream.
    fn fill(&mut self, stream: &mut UnixStream, deadline: Instant) -> Result<bool, ReadError> {
        let timeout = || {
            ReadError::Reply(ApiError::Timeout(
                "the request did not arrive in time".into(),
            ))
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(timeout());
        }
        stream
            .set_read_timeout(Some(left))
            .map_err(|e| ReadError::Reply(ApiError::Internal(e.to_string())))?;
        let mut chunk = [0u8; 4096];
        loop {
            return match stream.read(&mut chunk) {
                Ok(0) => Ok(false),
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    Ok(true)
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    Err(timeout())
                }
                Err(_) => Err(ReadError::Closed),
            };
        }
    }

    /// The next request: its head at most [`MAX_HEAD`] bytes, its body at most [`MAX_BODY`],
    /// all of it within the reader's timeout.
    pub fn next(&mut self, stream: &mut UnixStream) -> Result<Request, ReadError> {
        let deadline = Instant::now() + self.timeout;
        let (head_len, method, path, length, keep_alive) = loop {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut req = httparse::Request::new(&mut headers);
            match req.parse(&self.buf) {
                Ok(httparse::Status::Complete(n)) => {
                    let head = parse_head(&req)?;
                    break (n, head.0, head.1, head.2, head.3);
                }
                Ok(httparse::Status::Partial) => {
                    if self.buf.len() > MAX_HEAD {
                        return Err(ReadError::Reply(ApiError::HeadersTooLarge(format!(
                            "the request line and headers are larger than {MAX_HEAD} bytes"
                        ))));
                    }
                }
                Err(e) => {
                    return Err(ReadError::Reply(ApiError::BadRequest(format!(
                        "malformed HTTP request: {e}"
                    ))));
                }
            }
            if !self.fill(stream, deadline)? {
                return Err(if self.buf.is_empty() {
                    ReadError::Closed
                } else {
                    ReadError::Reply(ApiError::BadRequest(
                        "the connection closed in the middle of a request".into(),
                    ))
                });
            }
        };
        if head_len > MAX_HEAD {
            return Err(ReadError::Reply(ApiError::HeadersTooLarge(format!(
                "the request line and headers are larger than {MAX_HEAD} bytes"
            ))));
        }
        if length > MAX_BODY {
            return Err(ReadError::Reply(ApiError::TooLarge(format!(
                "the body of {length} bytes is larger than the limit of {MAX_BODY}"
            ))));
        }
        while self.buf.len() < head_len + length {
            if !self.fill(stream, deadline)? {
                return Err(ReadError::Reply(ApiError::BadRequest(
                    "the connection closed before the whole body arrived".into(),
                )));
            }
        }
        let body = self.buf[head_len..head_len + length].to_vec();
        self.buf.drain(..head_len + length);
        Ok(Request {
            method,
            path,
            body,
            keep_alive,
        })
    }
}

/// Method, path, body length and keep-alive of a complete head.
fn parse_head(req: &httparse::Request<'_, '_>) -> Result<(String, String, usize, bool), ReadError> {
    let bad = |m: String| ReadError::Reply(ApiError::BadRequest(m));
    let method = req.method.unwrap_or_default().to_string();
    let target = req.path.unwrap_or_default();
    let path = target.split('?').next().unwrap_or_default().to_string();
    // HTTP/1.1 keeps the connection by default, HTTP/1.0 closes it.
    let mut keep_alive = req.version == Some(1);
    let mut length = None;
    for h in req.headers.iter() {
        let value = std::str::from_utf8(h.value).unwrap_or("").trim();
        if h.name.eq_ignore_ascii_case("content-length") {
            let n: usize = value
                .parse()
                .map_err(|_| bad(format!("bad Content-Length `{value}`")))?;
            if length.is_some_and(|l| l != n) {
                return Err(bad("two different Content-Length headers".into()));
            }
            length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(ReadError::Reply(ApiError::LengthRequired(
                "Transfer-Encoding is not supported: send the body with a Content-Length".into(),
            )));
        } else if h.name.eq_ignore_ascii_case("connection") {
            if value.eq_ignore_ascii_case("close") {
                keep_alive = false;
            } else if value.eq_ignore_ascii_case("keep-alive") {
                keep_alive = true;
            }
        }
    }
    Ok((method, path, length.unwrap_or(0), keep_alive))
}

/// Writes a response with a JSON `body` (none for 204); `allow` names the methods of a 405.
pub fn write_response(
    stream: &mut UnixStream,
    status: u16,
    body: &[u8],
    keep_alive: bool,
    allow: Option<&str>,
) -> std::io::Result<()> {
    let mut head = format!("HTTP/1.1 {status} {}\r\nServer: kvmi\r\n", reason(status));
    if status != 204 {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    if let Some(allow) = allow {
        head.push_str(&format!("Allow: {allow}\r\n"));
    }
    head.push_str(if keep_alive {
        "Connection: keep-alive\r\n\r\n"
    } else {
        "Connection: close\r\n\r\n"
    });
    let mut out = head.into_bytes();
    if status != 204 {
        out.extend_from_slice(body);
    }
    stream.write_all(&out)?;
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (UnixStream, UnixStream) {
        UnixStream::pair().unwrap()
    }

    #[test]
    fn reads_pipelined_requests_with_bodies() {
        let (mut a, mut b) = pair();
        a.write_all(b"PUT /vm/pause HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}GET /vm/info?x=1 HTTP/1.1\r\nConnection: close\r\n\r\n").unwrap();
        let mut r = Reader::new(Duration::from_secs(2));
        let one = r.next(&mut b).unwrap();
        assert_eq!(
            (one.method.as_str(), one.path.as_str()),
            ("PUT", "/vm/pause")
        );
        assert_eq!(one.body, b"{}");
        assert!(one.keep_alive);
        let two = r.next(&mut b).unwrap();
        assert_eq!(
            (two.method.as_str(), two.path.as_str()),
            ("GET", "/vm/info")
        );
        assert!(two.body.is_empty() && !two.keep_alive);
        drop(a);
        assert!(matches!(r.next(&mut b), Err(ReadError::Closed)));
    }

    #[test]
    fn refuses_garbage_large_bodies_chunks_and_silence() {
        let status = |bytes: &[u8]| {
            let (mut a, mut b) = pair();
            a.write_all(bytes).unwrap();
            match Reader::new(Duration::from_millis(200)).next(&mut b) {
                Err(ReadError::Reply(e)) => e.status(),
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(status(b"\x00\x01garbage\r\n\r\n"), 400);
        assert_eq!(
            status(b"PUT /vm/targets HTTP/1.1\r\nContent-Length: 999999\r\n\r\n"),
            413
        );
        assert_eq!(
            status(b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            411
        );
        assert_eq!(status(b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n"), 400);
        assert_eq!(status(b""), 408, "nothing sent");
        assert_eq!(status(b"GET /vm/info HTTP/1.1\r\n"), 408, "half a head");
        let mut long = b"GET / HTTP/1.1\r\nX: ".to_vec();
        long.extend(std::iter::repeat_n(b'a', MAX_HEAD + 10));
        assert_eq!(status(&long), 431);
    }
}
