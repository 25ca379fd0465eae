//! A small blocking HTTP/1.1 client over a Unix socket, for tests, end-to-end checks and the
//! `vessel api` CLI. It keeps the connection open between requests (keep-alive) and reconnects
//! when the server closed it.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A response as the client sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientResponse {
    /// Status code.
    pub status: u16,
    /// Header fields, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Vec<u8>,
}

impl ClientResponse {
    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON (`Null` when empty or not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// A header value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A keep-alive connection to an API socket.
#[derive(Debug)]
pub struct Client {
    path: PathBuf,
    timeout: Duration,
    stream: Option<UnixStream>,
    buf: Vec<u8>,
}

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

impl Client {
    /// A client for the socket at `path`; every read and write is bounded by `timeout`.
    pub fn new(path: impl AsRef<Path>, timeout: Duration) -> Self {
        Self {
            path: path.as_ref().to_path_buf(),
            timeout,
            stream: None,
            buf: Vec::new(),
        }
    }

    fn connect(&mut self) -> io::Result<&mut UnixStream> {
        if self.stream.is_none() {
            let s = UnixStream::connect(&self.path)?;
            s.set_read_timeout(Some(self.timeout))?;
            s.set_write_timeout(Some(self.timeout))?;
            self.buf.clear();
            self.stream = Some(s);
        }
        self.stream
            .as_mut()
            .ok_or_else(|| io::Error::other("not connected"))
    }

    /// Sends `method path` with an optional JSON body and reads the response.
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> io::Result<ClientResponse> {
        let reused = self.stream.is_some();
        match self.try_request(method, path, body) {
            // The server may have closed an idle kept-alive connection: retry once afresh.
            Err(e)
                if reused
                    && e.kind() != io::ErrorKind::TimedOut
                    && e.kind() != io::ErrorKind::WouldBlock =>
            {
                self.stream = None;
                self.try_request(method, path, body)
            }
            r => r,
        }
    }

    fn try_request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> io::Result<ClientResponse> {
        let mut req =
            format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n");
        if let Some(b) = body {
            req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                b.len()
            ));
        }
        req.push_str("\r\n");
        if let Some(b) = body {
            req.push_str(b);
        }
        let stream = self.connect()?;
        stream.write_all(req.as_bytes())?;
        let r = self.read_response();
        if r.is_err() {
            self.stream = None;
        }
        r
    }

    fn fill(&mut self) -> io::Result<()> {
        let stream = self
            .stream
            .as_mut()
            .ok_or_else(|| io::Error::other("not connected"))?;
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed by the server",
            ));
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    /// Reads one response (skipping `100 Continue`).
    pub fn read_response(&mut self) -> io::Result<ClientResponse> {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut resp = httparse::Response::new(&mut headers);
            let head_len = match resp.parse(&self.buf) {
                Ok(httparse::Status::Complete(n)) => n,
                Ok(httparse::Status::Partial) => {
                    self.fill()?;
                    continue;
                }
                Err(_) => return Err(invalid("malformed response")),
            };
            let status = resp.code.unwrap_or(0);
            let headers: Vec<(String, String)> = resp
                .headers
                .iter()
                .map(|h| {
                    (
                        h.name.to_ascii_lowercase(),
                        String::from_utf8_lossy(h.value).trim().to_string(),
                    )
                })
                .collect();
            if status == 100 {
                self.buf.drain(..head_len);
                continue;
            }
            let len = headers
                .iter()
                .find(|(n, _)| n == "content-length")
                .map(|(_, v)| {
                    v.parse::<usize>()
                        .map_err(|_| invalid("bad Content-Length"))
                })
                .transpose()?
                .unwrap_or(0);
            while self.buf.len() < head_len + len {
                self.fill()?;
            }
            let body = self.buf[head_len..head_len + len].to_vec();
            self.buf.drain(..head_len + len);
            let close = headers
                .iter()
                .any(|(n, v)| n == "connection" && v.eq_ignore_ascii_case("close"));
            if close {
                self.stream = None;
            }
            return Ok(ClientResponse {
                status,
                headers,
                body,
            });
        }
    }

    /// Writes raw bytes on the connection (for tests of malformed input).
    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.connect()?.write_all(bytes)
    }
}

/// One request on a fresh connection.
pub fn request(
    socket: impl AsRef<Path>,
    method: &str,
    path: &str,
    body: Option<&str>,
    timeout: Duration,
) -> io::Result<ClientResponse> {
    Client::new(socket, timeout).request(method, path, body)
}
