//! The guest-facing HTTP service: reads the data store the API writes and answers the guest's
//! requests as Firecracker's MMDS does.
//!
//! - `GET /path` returns the value at the JSON pointer `/path` (a trailing `/` is ignored):
//!   as JSON with `Accept: application/json` (unless `imds_compat`), otherwise in IMDS text
//!   form (an object lists its keys one a line, `/` after those holding objects; a string is
//!   itself; other types are 501).
//! - `PUT /latest/api/token` with `X-metadata-token-ttl-seconds` (or the `X-aws-ec2-...`
//!   spelling) between 1 and 21600 returns a new session token; V2 then requires a live
//!   token in `X-metadata-token` (or `X-aws-ec2-metadata-token`) on every `GET` (401
//!   otherwise). V1 serves `GET`s with or without one.
//! - Other methods are 405; malformed requests 400; requests larger than
//!   [`MAX_REQUEST_LEN`] 413; missing values 404.
//!
//! [`Mmds::serve`] is a pure function of the bytes received and the time, so the protocol is
//! tested without any network.

use std::collections::HashMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Largest request (headers and body) the service reads.
pub const MAX_REQUEST_LEN: usize = 4096;
/// Longest token lifetime, in seconds (as Firecracker and EC2).
pub const MAX_TOKEN_TTL_SECS: u64 = 21600;
/// Most live session tokens; the one closest to expiring makes room for a new one.
pub const MAX_TOKENS: usize = 1024;
/// Token path of V2 sessions.
pub const TOKEN_PATH: &str = "/latest/api/token";

const MAX_HEADERS: usize = 32;
const TTL_HEADERS: [&str; 2] = [
    "x-metadata-token-ttl-seconds",
    "x-aws-ec2-metadata-token-ttl-seconds",
];
const TOKEN_HEADERS: [&str; 2] = ["x-metadata-token", "x-aws-ec2-metadata-token"];

/// The MMDS protocol version.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Version {
    /// Plain GETs (tokens accepted, not required).
    #[default]
    V1,
    /// GETs need a session token.
    V2,
}

/// How the guest reaches MMDS and how it answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmdsOptions {
    pub version: Version,
    /// Always answer in IMDS text form, whatever `Accept` says.
    pub imds_compat: bool,
    /// The address the guest sends MMDS requests to.
    pub ipv4: Ipv4Addr,
}

impl Default for MmdsOptions {
    fn default() -> Self {
        MmdsOptions {
            version: Version::V1,
            imds_compat: false,
            ipv4: Ipv4Addr::new(169, 254, 169, 254),
        }
    }
}

/// A handle on one VM's MMDS: the shared data store, the options and the live session
/// tokens. Clones share everything; two handles are equal when they are clones.
#[derive(Clone)]
pub struct Mmds {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<Mutex<Value>>,
    options: MmdsOptions,
    tokens: Mutex<Tokens>,
}

impl fmt::Debug for Mmds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mmds")
            .field("options", &self.inner.options)
            .finish_non_exhaustive()
    }
}

impl PartialEq for Mmds {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}

impl Eq for Mmds {}

/// What [`Mmds::serve`] made of the bytes received so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Served {
    /// The request is not complete yet.
    Incomplete,
    /// A whole HTTP response to send; `consumed` request bytes were used; `close` asks to
    /// close the connection once the response is sent.
    Response {
        response: Vec<u8>,
        consumed: usize,
        close: bool,
    },
}

/// Random bytes from the kernel.
fn random_bytes(buf: &mut [u8]) -> bool {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: writes at most `rest.len()` bytes into `rest`, which we own.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n <= 0 {
            if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return false;
        }
        filled += n as usize;
    }
    true
}

/// A random 32-bit number (TCP initial sequence numbers); not secret.
pub(crate) fn random_u32() -> u32 {
    let mut b = [0u8; 4];
    if !random_bytes(&mut b) {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        return t ^ std::process::id();
    }
    u32::from_le_bytes(b)
}

/// Live session tokens and when they expire.
#[derive(Default)]
struct Tokens {
    live: HashMap<String, Instant>,
}

impl Tokens {
    /// A new token valid for `ttl`, or `None` when no random bytes could be had.
    fn issue(&mut self, now: Instant, ttl: Duration) -> Option<String> {
        let mut raw = [0u8; 32];
        if !random_bytes(&mut raw) {
            return None;
        }
        let token: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        if self.live.len() >= MAX_TOKENS {
            self.live.retain(|_, exp| *exp > now);
        }
        if self.live.len() >= MAX_TOKENS {
            let soonest = self
                .live
                .iter()
                .min_by_key(|(_, exp)| **exp)
                .map(|(t, _)| t.clone());
            if let Some(t) = soonest {
                self.live.remove(&t);
            }
        }
        self.live.insert(token.clone(), now + ttl);
        Some(token)
    }

    fn is_valid(&mut self, token: &str, now: Instant) -> bool {
        match self.live.get(token) {
            Some(exp) if *exp > now => true,
            Some(_) => {
                self.live.remove(token);
                false
            }
            None => false,
        }
    }
}

fn header<'a>(req: &'a httparse::Request<'_, '_>, names: &[&str]) -> Option<&'a [u8]> {
    req.headers
        .iter()
        .find(|h| names.iter().any(|n| h.name.eq_ignore_ascii_case(n)))
        .map(|h| h.value)
}

fn has_token_in(value: &[u8], token: &str) -> bool {
    value
        .split(|&b| b == b',')
        .any(|part| part.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// A status line and body, before the common headers are added.
struct Reply {
    status: u16,
    content_type: &'static str,
    body: Vec<u8>,
    extra: Vec<(&'static str, String)>,
}

impl Reply {
    fn text(status: u16, body: impl Into<Vec<u8>>) -> Reply {
        Reply {
            status,
            content_type: "text/plain",
            body: body.into(),
            extra: Vec::new(),
        }
    }

    fn json(body: Vec<u8>) -> Reply {
        Reply {
            status: 200,
            content_type: "application/json",
            body,
            extra: Vec::new(),
        }
    }

    fn with(mut self, name: &'static str, value: String) -> Reply {
        self.extra.push((name, value));
        self
    }

    fn into_bytes(self, close: bool) -> Vec<u8> {
        let reason = match self.status {
            200 => "OK",
            400 => "Bad Request",
            401 => "Unauthorized",
            404 => "Not Found",
            405 => "Method Not Allowed",
            413 => "Payload Too Large",
            500 => "Internal Server Error",
            501 => "Not Implemented",
            _ => "Error",
        };
        let mut head = format!(
            "HTTP/1.1 {} {reason}\r\nServer: Vessel MMDS\r\nContent-Type: {}\r\nContent-Length: {}\r\n",
            self.status,
            self.content_type,
            self.body.len()
        );
        for (n, v) in &self.extra {
            head += &format!("{n}: {v}\r\n");
        }
        if close {
            head += "Connection: close\r\n";
        }
        head += "\r\n";
        let mut out = head.into_bytes();
        out.extend_from_slice(&self.body);
        out
    }
}

/// The IMDS text form of `v`: `None` for types it cannot show.
fn imds_text(v: &Value) -> Option<Vec<u8>> {
    match v {
        Value::String(s) => Some(s.as_bytes().to_vec()),
        Value::Object(m) => {
            let lines: Vec<String> = m
                .iter()
                .map(|(k, v)| {
                    if v.is_object() {
                        format!("{k}/")
                    } else {
                        k.clone()
                    }
                })
                .collect();
            Some(lines.join("\n").into_bytes())
        }
        _ => None,
    }
}

impl Mmds {
    /// An MMDS reading `store` (the API's `MmdsStore`, shared so that the guest sees the
    /// API's later writes).
    pub fn new(store: Arc<Mutex<Value>>, options: MmdsOptions) -> Mmds {
        Mmds {
            inner: Arc::new(Inner {
                store,
                options,
                tokens: Mutex::new(Tokens::default()),
            }),
        }
    }

    pub fn options(&self) -> MmdsOptions {
        self.inner.options
    }

    fn store(&self) -> MutexGuard<'_, Value> {
        self.inner.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn tokens(&self) -> MutexGuard<'_, Tokens> {
        self.inner.tokens.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Answers the request at the start of `buf` (the bytes received on a connection and not
    /// consumed yet), at time `now`.
    pub fn serve(&self, buf: &[u8], now: Instant) -> Served {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        let fail = |status: u16, msg: &str| Served::Response {
            response: Reply::text(status, msg).into_bytes(true),
            consumed: buf.len(),
            close: true,
        };
        let head_len = match req.parse(buf) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) if buf.len() >= MAX_REQUEST_LEN => {
                return fail(413, "Request too large.")
            }
            Ok(httparse::Status::Partial) => return Served::Incomplete,
            Err(httparse::Error::TooManyHeaders) => return fail(400, "Too many headers."),
            Err(_) => return fail(400, "Malformed request."),
        };
        if header(&req, &["transfer-encoding"]).is_some() {
            return fail(501, "Transfer encodings are not supported.");
        }
        let body_len = match header(&req, &["content-length"]) {
            None => 0,
            Some(v) => match std::str::from_utf8(v)
                .ok()
                .and_then(|s| s.trim().parse().ok())
            {
                Some(n) => n,
                None => return fail(400, "Invalid Content-Length."),
            },
        };
        let consumed = match head_len.checked_add(body_len) {
            Some(n) if n <= MAX_REQUEST_LEN => n,
            _ => return fail(413, "Request too large."),
        };
        if buf.len() < consumed {
            return Served::Incomplete;
        }
        let connection = header(&req, &["connection"]);
        let close = match req.version {
            Some(1) => connection.is_some_and(|v| has_token_in(v, "close")),
            _ => !connection.is_some_and(|v| has_token_in(v, "keep-alive")),
        };
        let reply = self.reply(&req, now);
        // After a request we could not make sense of, the stream may be out of step.
        let close = close || reply.status == 400;
        Served::Response {
            response: reply.into_bytes(close),
            consumed,
            close,
        }
    }

    fn reply(&self, req: &httparse::Request<'_, '_>, now: Instant) -> Reply {
        let (Some(method), Some(uri)) = (req.method, req.path) else {
            return Reply::text(400, "Malformed request.");
        };
        let path = uri.split(['?', '#']).next().unwrap_or("");
        if !path.starts_with('/') {
            return Reply::text(400, "Invalid URI.");
        }
        match method {
            "GET" => self.get(req, path, now),
            "PUT" => self.put(req, path, now),
            _ => Reply::text(405, "Not allowed HTTP method.").with("Allow", "GET, PUT".into()),
        }
    }

    fn put(&self, req: &httparse::Request<'_, '_>, path: &str, now: Instant) -> Reply {
        if path.trim_end_matches('/') != TOKEN_PATH {
            return Reply::text(404, "Resource not found.");
        }
        if header(req, &["x-forwarded-for"]).is_some() {
            return Reply::text(400, "Invalid header: X-Forwarded-For is not accepted.");
        }
        let Some(ttl) = header(req, &TTL_HEADERS) else {
            return Reply::text(400, "Token time to live value not found.");
        };
        let ttl = match std::str::from_utf8(ttl)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
        {
            Some(t) if (1..=MAX_TOKEN_TTL_SECS).contains(&t) => t,
            _ => {
                return Reply::text(
                    400,
                    format!(
                        "Invalid time to live value: it must be an integer between 1 and {MAX_TOKEN_TTL_SECS}."
                    ),
                )
            }
        };
        match self.tokens().issue(now, Duration::from_secs(ttl)) {
            Some(t) => Reply::text(200, t).with("X-metadata-token-ttl-seconds", ttl.to_string()),
            None => Reply::text(500, "Cannot generate a token."),
        }
    }

    fn get(&self, req: &httparse::Request<'_, '_>, path: &str, now: Instant) -> Reply {
        if self.inner.options.version == Version::V2 {
            let valid = header(req, &TOKEN_HEADERS)
                .and_then(|t| std::str::from_utf8(t).ok())
                .is_some_and(|t| self.tokens().is_valid(t.trim(), now));
            if !valid {
                return Reply::text(401, "No MMDS token provided, or the token is not valid.");
            }
        }
        let json = !self.inner.options.imds_compat
            && header(req, &["accept"]).is_some_and(|v| {
                v.split(|&b| b == b',').any(|part| {
                    let media = part.split(|&b| b == b';').next().unwrap_or(&[]);
                    media.trim_ascii().eq_ignore_ascii_case(b"application/json")
                })
            });
        let pointer = path.trim_end_matches('/');
        let store = self.store();
        let Some(value) = store.pointer(pointer) else {
            return Reply::text(404, "Resource not found.");
        };
        if json {
            return match serde_json::to_vec(value) {
                Ok(body) => Reply::json(body),
                Err(_) => Reply::text(500, "Cannot serialize the value."),
            };
        }
        match imds_text(value) {
            Some(body) => Reply::text(200, body),
            None => Reply::text(
                501,
                "Cannot retrieve value. The value has an unsupported type.",
            ),
        }
    }

    /// Number of live session tokens (for tests and statistics).
    pub fn live_tokens(&self) -> usize {
        self.tokens().live.len()
    }
}

#[cfg(test)]
mod tests;
