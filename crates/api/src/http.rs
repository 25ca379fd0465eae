//! HTTP/1.1 framing: parsing a request head (with `httparse`) under size limits, and writing
//! responses. Bodies are framed by `Content-Length` only; `Transfer-Encoding` is refused
//! (400, connection closed), as Firecracker's server does.

use std::io::{self, Write};

use serde::Serialize;

use crate::types::ErrorBody;

/// Request methods. Anything else is kept as `Other` and answered by the router with 400.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Method {
    /// GET
    Get,
    /// PUT
    Put,
    /// PATCH
    Patch,
    /// DELETE (hot-unplug, as Firecracker 1.16).
    Delete,
    /// Any other token.
    Other(String),
}

impl Method {
    fn parse(s: &str) -> Self {
        match s {
            "GET" => Method::Get,
            "PUT" => Method::Put,
            "PATCH" => Method::Patch,
            "DELETE" => Method::Delete,
            other => Method::Other(other.to_string()),
        }
    }

    /// The method token.
    pub fn as_str(&self) -> &str {
        match self {
            Method::Get => "GET",
            Method::Put => "PUT",
            Method::Patch => "PATCH",
            Method::Delete => "DELETE",
            Method::Other(s) => s,
        }
    }
}

/// Size limits of a request.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Request line plus headers, in bytes.
    pub max_head_bytes: usize,
    /// Number of header fields.
    pub max_headers: usize,
    /// Body bytes.
    pub max_body_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_head_bytes: 8 * 1024,
            max_headers: 32,
            max_body_bytes: 64 * 1024,
        }
    }
}

/// A parsed request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// Method.
    pub method: Method,
    /// Request target (path and query).
    pub target: String,
    /// Bytes of the head, including the blank line.
    pub head_len: usize,
    /// Body length.
    pub content_length: usize,
    /// The client wants the connection kept open.
    pub keep_alive: bool,
    /// The client sent `Expect: 100-continue`.
    pub expect_continue: bool,
}

/// A complete request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Method.
    pub method: Method,
    /// Request target.
    pub target: String,
    /// Body (possibly empty).
    pub body: Vec<u8>,
    /// Keep the connection open after answering.
    pub keep_alive: bool,
}

impl Request {
    /// The path without the query string.
    pub fn path(&self) -> &str {
        self.target.split(['?', '#']).next().unwrap_or("")
    }
}

/// A framing error: the status to answer with; the connection is closed afterwards when
/// `close` (the end of the request is unknown).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FramingError {
    /// HTTP status.
    pub status: u16,
    /// The fault message.
    pub message: String,
    /// Close the connection after the answer.
    pub close: bool,
    /// A body over the limit: its declared size and the limit.
    pub oversize: Option<(usize, usize)>,
}

fn framing(status: u16, message: impl Into<String>) -> FramingError {
    FramingError {
        status,
        message: message.into(),
        close: true,
        oversize: None,
    }
}

/// Firecracker's answer to a body over the limit, byte for byte (its HTTP library's: a 400
/// with no reason phrase and an `error` body), which clients and Firecracker's tests compare
/// whole.
pub fn firecracker_payload_too_large(size: usize, limit: usize) -> Vec<u8> {
    let body = format!(
        "{{ \"error\": \"Request payload with size {size} is larger than the limit of {limit} \
         allowed by server.\nAll previous unanswered requests will be dropped.\" }}"
    );
    format!(
        "HTTP/1.1 400 \r\nServer: Firecracker API\r\nConnection: keep-alive\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Parses the head at the start of `buf`. `Ok(None)`: incomplete, read more.
pub fn parse_head(buf: &[u8], limits: &Limits) -> Result<Option<Head>, FramingError> {
    let mut headers = vec![httparse::EMPTY_HEADER; limits.max_headers];
    let mut req = httparse::Request::new(&mut headers);
    let status = match req.parse(buf) {
        Ok(s) => s,
        Err(httparse::Error::TooManyHeaders) => {
            return Err(framing(
                400,
                format!("Too many headers (at most {}).", limits.max_headers),
            ))
        }
        Err(e) => return Err(framing(400, format!("Invalid HTTP request: {e}."))),
    };
    let head_len = match status {
        httparse::Status::Partial => {
            if buf.len() > limits.max_head_bytes {
                return Err(framing(
                    400,
                    format!("Request head exceeds {} bytes.", limits.max_head_bytes),
                ));
            }
            return Ok(None);
        }
        httparse::Status::Complete(n) => n,
    };
    if head_len > limits.max_head_bytes {
        return Err(framing(
            400,
            format!("Request head exceeds {} bytes.", limits.max_head_bytes),
        ));
    }
    let version = req.version.unwrap_or(1);
    let mut keep_alive = version >= 1;
    let mut content_length: Option<usize> = None;
    let mut expect_continue = false;
    for h in req.headers.iter() {
        let value = std::str::from_utf8(h.value)
            .map_err(|_| framing(400, "Invalid header value."))?
            .trim();
        if h.name.eq_ignore_ascii_case("content-length") {
            let n: usize = value
                .parse()
                .map_err(|_| framing(400, format!("Invalid Content-Length: {value:?}.")))?;
            if content_length.is_some_and(|c| c != n) {
                return Err(framing(400, "Conflicting Content-Length headers."));
            }
            content_length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(framing(
                400,
                "Transfer-Encoding is not supported: send the body with a Content-Length.",
            ));
        } else if h.name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    keep_alive = false;
                } else if token.eq_ignore_ascii_case("keep-alive") {
                    keep_alive = true;
                }
            }
        } else if h.name.eq_ignore_ascii_case("expect") {
            if value.eq_ignore_ascii_case("100-continue") {
                expect_continue = true;
            } else {
                return Err(framing(417, format!("Unsupported expectation: {value:?}.")));
            }
        }
    }
    Ok(Some(Head {
        method: Method::parse(req.method.unwrap_or("")),
        target: req.path.unwrap_or("").to_string(),
        head_len,
        content_length: content_length.unwrap_or(0),
        keep_alive,
        expect_continue,
    }))
}

/// What a successful parse of a buffer gives.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A complete request, and how many bytes of the buffer it used.
    Request(Request, usize),
    /// The head is complete but the body is not: `expect_continue` tells whether the client
    /// waits for `100 Continue` before sending it.
    NeedBody {
        /// The client sent `Expect: 100-continue`.
        expect_continue: bool,
    },
    /// The head is incomplete.
    NeedHead,
}

/// Parses one request from the start of `buf`, checking the body limit before the body is
/// read (413 without waiting for it).
pub fn parse_request(buf: &[u8], limits: &Limits) -> Result<Parsed, FramingError> {
    let Some(head) = parse_head(buf, limits)? else {
        return Ok(Parsed::NeedHead);
    };
    if head.content_length > limits.max_body_bytes {
        let mut e = framing(
            413,
            format!(
                "Request body of {} bytes exceeds the limit of {} bytes.",
                head.content_length, limits.max_body_bytes
            ),
        );
        e.oversize = Some((head.content_length, limits.max_body_bytes));
        return Err(e);
    }
    let end = head.head_len + head.content_length;
    if buf.len() < end {
        return Ok(Parsed::NeedBody {
            expect_continue: head.expect_continue,
        });
    }
    Ok(Parsed::Request(
        Request {
            method: head.method,
            target: head.target,
            body: buf[head.head_len..end].to_vec(),
            keep_alive: head.keep_alive,
        },
        end,
    ))
}

/// A response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Content type of a non-empty body.
    pub content_type: &'static str,
    /// Body.
    pub body: Vec<u8>,
    /// The request used a deprecated endpoint or field (`Deprecation: true`).
    pub deprecated: bool,
}

/// The reason phrase of the status codes this server uses.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        408 => "Request Timeout",
        413 => "Payload Too Large",
        417 => "Expectation Failed",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "",
    }
}

impl Response {
    /// 204.
    pub fn no_content() -> Self {
        Self {
            status: 204,
            content_type: "application/json",
            body: Vec::new(),
            deprecated: false,
        }
    }

    /// 200 with a JSON body.
    pub fn json<T: Serialize + ?Sized>(value: &T) -> Self {
        match serde_json::to_vec(value) {
            Ok(body) => Self {
                status: 200,
                content_type: "application/json",
                body,
                deprecated: false,
            },
            Err(e) => Self::fault(500, format!("Cannot serialize the response: {e}")),
        }
    }

    /// 200 with a text body.
    pub fn text(body: String, content_type: &'static str) -> Self {
        Self {
            status: 200,
            content_type,
            body: body.into_bytes(),
            deprecated: false,
        }
    }

    /// An error with Firecracker's `{"fault_message": ...}` body.
    pub fn fault(status: u16, message: impl Into<String>) -> Self {
        let body = serde_json::to_vec(&ErrorBody {
            fault_message: message.into(),
        })
        .unwrap_or_default();
        Self {
            status,
            content_type: "application/json",
            body,
            deprecated: false,
        }
    }

    /// Serializes the response; `keep_alive` picks the `Connection` header.
    pub fn to_bytes(&self, keep_alive: bool) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nServer: Vessel API\r\nConnection: {}\r\n",
            self.status,
            reason(self.status),
            if keep_alive { "keep-alive" } else { "close" }
        );
        if self.deprecated {
            out.push_str("Deprecation: true\r\n");
        }
        if self.status != 204 {
            out.push_str(&format!(
                "Content-Type: {}\r\nContent-Length: {}\r\n",
                self.content_type,
                self.body.len()
            ));
        }
        out.push_str("\r\n");
        let mut bytes = out.into_bytes();
        if self.status != 204 {
            bytes.extend_from_slice(&self.body);
        }
        bytes
    }

    /// Writes the response.
    pub fn write_to(&self, w: &mut impl Write, keep_alive: bool) -> io::Result<()> {
        w.write_all(&self.to_bytes(keep_alive))?;
        w.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lim() -> Limits {
        Limits::default()
    }

    #[test]
    fn an_oversized_body_gets_firecracker_s_bytes() {
        // What Firecracker's tests expect for a 260-byte body over a 250-byte limit.
        let want = "HTTP/1.1 400 \r\nServer: Firecracker API\r\nConnection: keep-alive\r\n\
                    Content-Type: application/json\r\nContent-Length: 145\r\n\r\n\
                    { \"error\": \"Request payload with size 260 is larger than the limit of 250 \
                    allowed by server.\nAll previous unanswered requests will be dropped.\" }";
        assert_eq!(
            String::from_utf8(firecracker_payload_too_large(260, 250)).unwrap(),
            want
        );
        let limits = Limits {
            max_body_bytes: 250,
            ..Limits::default()
        };
        let Err(e) = parse_request(
            b"PUT /mmds HTTP/1.1\r\nContent-Length: 260\r\n\r\n",
            &limits,
        ) else {
            panic!("an oversized body was accepted");
        };
        assert_eq!(e.oversize, Some((260, 250)));
    }

    #[test]
    fn parses_pipelined_requests_one_at_a_time() {
        let buf = b"PUT /vm HTTP/1.1\r\nContent-Length: 18\r\n\r\n{\"state\":\"Paused\"}GET / HTTP/1.1\r\n\r\n";
        let Ok(Parsed::Request(r1, n1)) = parse_request(buf, &lim()) else {
            panic!("first request not parsed");
        };
        assert_eq!(r1.method, Method::Put);
        assert_eq!(r1.body, b"{\"state\":\"Paused\"}");
        assert!(r1.keep_alive);
        let Ok(Parsed::Request(r2, n2)) = parse_request(&buf[n1..], &lim()) else {
            panic!("second request not parsed");
        };
        assert_eq!(r2.method, Method::Get);
        assert_eq!(r2.path(), "/");
        assert_eq!(n1 + n2, buf.len());
    }

    #[test]
    fn methods_parse_and_print() {
        let Ok(Parsed::Request(r, _)) =
            parse_request(b"DELETE /drives/d1 HTTP/1.1\r\n\r\n", &lim())
        else {
            panic!("DELETE not parsed");
        };
        assert_eq!(r.method, Method::Delete);
        assert_eq!(r.method.as_str(), "DELETE");
        assert_eq!(r.path(), "/drives/d1");
        assert!(r.body.is_empty());
        for m in ["GET", "PUT", "PATCH", "DELETE", "POST"] {
            assert_eq!(Method::parse(m).as_str(), m);
        }
        assert_eq!(Method::parse("POST"), Method::Other("POST".into()));
        // Method tokens are case-sensitive.
        assert_eq!(Method::parse("delete"), Method::Other("delete".into()));
    }

    #[test]
    fn incomplete_head_and_body_ask_for_more() {
        assert_eq!(parse_request(b"GET / HT", &lim()), Ok(Parsed::NeedHead));
        assert_eq!(
            parse_request(b"PUT /x HTTP/1.1\r\nContent-Length: 5\r\n\r\nab", &lim()),
            Ok(Parsed::NeedBody {
                expect_continue: false
            })
        );
        assert_eq!(
            parse_request(
                b"PUT /x HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n",
                &lim()
            ),
            Ok(Parsed::NeedBody {
                expect_continue: true
            })
        );
    }

    #[test]
    fn refuses_chunked_bodies_and_bad_lengths() {
        let e = parse_request(
            b"PUT /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            &lim(),
        )
        .unwrap_err();
        assert_eq!((e.status, e.close), (400, true));
        assert_eq!(
            parse_request(b"PUT /x HTTP/1.1\r\nContent-Length: x\r\n\r\n", &lim())
                .unwrap_err()
                .status,
            400
        );
        assert_eq!(
            parse_request(
                b"PUT /x HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                &lim()
            )
            .unwrap_err()
            .status,
            400
        );
    }

    #[test]
    fn enforces_limits() {
        let big = format!(
            "PUT /mmds HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            64 * 1024 + 1
        );
        assert_eq!(
            parse_request(big.as_bytes(), &lim()).unwrap_err().status,
            413
        );
        let long_head = format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(9000));
        assert_eq!(
            parse_request(long_head.as_bytes(), &lim())
                .unwrap_err()
                .status,
            400
        );
        let many: String = (0..40).map(|i| format!("X-{i}: y\r\n")).collect();
        let req = format!("GET / HTTP/1.1\r\n{many}\r\n");
        assert_eq!(
            parse_request(req.as_bytes(), &lim()).unwrap_err().status,
            400
        );
    }

    #[test]
    fn malformed_request_lines_are_400() {
        for bad in [
            &b"GET / HTTP/1.1 extra\r\n\r\n"[..],
            b"\x00\x01\x02 / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/9.9\r\n\r\n",
            b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
        ] {
            assert_eq!(
                parse_request(bad, &lim()).unwrap_err().status,
                400,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn connection_semantics() {
        let Ok(Parsed::Request(r, _)) =
            parse_request(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n", &lim())
        else {
            panic!("not parsed");
        };
        assert!(!r.keep_alive);
        let Ok(Parsed::Request(r, _)) = parse_request(b"GET / HTTP/1.0\r\n\r\n", &lim()) else {
            panic!("not parsed");
        };
        assert!(!r.keep_alive);
        let Ok(Parsed::Request(r, _)) = parse_request(
            b"GET /a?b=c HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
            &lim(),
        ) else {
            panic!("not parsed");
        };
        assert!(r.keep_alive);
        assert_eq!(r.path(), "/a");
    }

    #[test]
    fn responses_are_framed() {
        let r = Response::fault(400, "bad").to_bytes(true);
        let s = String::from_utf8(r).unwrap_or_default();
        assert!(s.starts_with("HTTP/1.1 400 Bad Request\r\n"));
        assert!(s.contains("Content-Length: 23\r\n"));
        assert!(s.ends_with("\r\n\r\n{\"fault_message\":\"bad\"}"));
        let s = String::from_utf8(Response::no_content().to_bytes(false)).unwrap_or_default();
        assert!(s.contains("Connection: close\r\n") && !s.contains("Content-Length"));
    }
}
