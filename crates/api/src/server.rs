//! The API server: one thread accepts on the Unix socket, one short-lived thread per
//! connection reads requests under a deadline and answers them through the route table.
//!
//! A slow or half-closed client only ever holds its own thread: reads have a deadline per
//! request (408 then close) and an idle limit between keep-alive requests, writes have a
//! timeout, and the number of open connections is capped (503 beyond it). The controller lock
//! is only taken once a whole request has arrived.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::controller::ApiController;
use crate::http::{parse_request, Limits, Parsed, Response};
use crate::metrics::Metrics;
use crate::routes;

/// Server tuning.
#[derive(Debug, Clone, Copy)]
pub struct ServerConfig {
    /// Size limits of a request.
    pub limits: Limits,
    /// Longest time from the first byte of a request to its last.
    pub request_timeout: Duration,
    /// Longest wait for the next request on a kept-alive connection.
    pub idle_timeout: Duration,
    /// Longest time a response write may block.
    pub write_timeout: Duration,
    /// Most connections open at once.
    pub max_connections: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            request_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            write_timeout: Duration::from_secs(5),
            max_connections: 64,
        }
    }
}

type Connections = Arc<Mutex<HashMap<u64, UnixStream>>>;

/// How long shutting down waits for requests being answered.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// What the accept thread needs to serve.
struct Serve {
    listener: UnixListener,
    controller: Arc<Mutex<ApiController>>,
    metrics: Arc<Metrics>,
    config: ServerConfig,
    stop: Arc<AtomicBool>,
    connections: Connections,
    in_flight: Arc<AtomicUsize>,
}

/// The API server's accept thread, started before there is a socket to serve: it installs
/// the API's seccomp filter first thing (compiled here, then checked and JIT-compiled by the
/// kernel: a few tenths of a millisecond for a filter this size), so that a caller who
/// starts it early has that done while it sets up the rest, then waits for
/// [`ApiThread::start`] or [`ApiThread::serve`]. The connection threads inherit the filter.
/// Dropped unused, the thread ends.
#[derive(Debug)]
pub struct ApiThread {
    handle: JoinHandle<()>,
    serve: mpsc::SyncSender<Serve>,
    filtered: mpsc::Receiver<Result<(), vessel_seccomp::Error>>,
}

impl ApiThread {
    /// Starts the accept thread.
    pub fn spawn() -> io::Result<ApiThread> {
        let (filtered_tx, filtered) = mpsc::channel();
        let (serve, to_serve) = mpsc::sync_channel::<Serve>(1);
        let handle = thread::Builder::new()
            .name("vessel-api".into())
            .spawn(move || {
                let r = vessel_seccomp::apply(vessel_seccomp::ThreadKind::Api);
                let ok = r.is_ok();
                let _ = filtered_tx.send(r);
                if let (true, Ok(s)) = (ok, to_serve.recv()) {
                    accept_loop(s);
                }
            })?;
        Ok(ApiThread {
            handle,
            serve,
            filtered,
        })
    }

    /// Binds `path` (which must not exist) and serves `controller` on it.
    pub fn start(
        self,
        path: impl AsRef<Path>,
        controller: Arc<Mutex<ApiController>>,
        config: ServerConfig,
    ) -> io::Result<ApiServer> {
        let listener = UnixListener::bind(path.as_ref())?;
        self.serve(listener, path.as_ref(), controller, config)
    }

    /// Serves `controller` on an already bound listener (whose path is `path`), once the
    /// thread's filter is on; a failure to install it fails the start.
    pub fn serve(
        self,
        listener: UnixListener,
        path: &Path,
        controller: Arc<Mutex<ApiController>>,
        config: ServerConfig,
    ) -> io::Result<ApiServer> {
        let ended = || io::Error::other("the API thread ended");
        self.filtered
            .recv()
            .map_err(|_| ended())?
            .map_err(io::Error::other)?;
        let stop = Arc::new(AtomicBool::new(false));
        let connections: Connections = Arc::default();
        let in_flight = Arc::new(AtomicUsize::new(0));
        let metrics = controller
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .metrics()
            .clone();
        self.serve
            .send(Serve {
                listener,
                controller,
                metrics,
                config,
                stop: stop.clone(),
                connections: connections.clone(),
                in_flight: in_flight.clone(),
            })
            .map_err(|_| ended())?;
        Ok(ApiServer {
            path: path.to_path_buf(),
            stop,
            connections,
            in_flight,
            accept: Some(self.handle),
        })
    }
}

/// A running API server. Dropping it (or [`ApiServer::shutdown`]) stops it.
#[derive(Debug)]
pub struct ApiServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    connections: Connections,
    /// Requests being answered: shutting down waits for them (a request that ends the VM,
    /// such as a migration, still gets its answer).
    in_flight: Arc<AtomicUsize>,
    accept: Option<JoinHandle<()>>,
}

impl ApiServer {
    /// Binds `path` (which must not exist) and serves `controller` on it.
    pub fn start(
        path: impl AsRef<Path>,
        controller: Arc<Mutex<ApiController>>,
        config: ServerConfig,
    ) -> io::Result<ApiServer> {
        ApiThread::spawn()?.start(path, controller, config)
    }

    /// Serves on an already bound listener (whose path is `path`).
    pub fn from_listener(
        listener: UnixListener,
        path: &Path,
        controller: Arc<Mutex<ApiController>>,
        config: ServerConfig,
    ) -> io::Result<ApiServer> {
        ApiThread::spawn()?.serve(listener, path, controller, config)
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops accepting, closes every connection and removes the socket.
    pub fn shutdown(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        if let Some(accept) = self.accept.take() {
            self.stop.store(true, Ordering::SeqCst);
            // Wake the accept call.
            let _ = UnixStream::connect(&self.path);
            let _ = accept.join();
            // Nobody can connect any more: the socket goes now, before the wait below.
            let _ = std::fs::remove_file(&self.path);
            let deadline = Instant::now() + SHUTDOWN_GRACE;
            while self.in_flight.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(1));
            }
            for (_, s) in self
                .connections
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .drain()
            {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop_now();
    }
}

fn accept_loop(s: Serve) {
    let Serve {
        listener,
        controller,
        metrics,
        config,
        stop,
        connections,
        in_flight,
    } = s;
    let next_id = AtomicU64::new(0);
    for stream in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let Ok(mut stream) = stream else {
            // EMFILE and friends: back off a little rather than spin.
            thread::sleep(Duration::from_millis(10));
            continue;
        };
        let _ = stream.set_write_timeout(Some(config.write_timeout));
        let id = next_id.fetch_add(1, Ordering::Relaxed);
        {
            let mut open = connections.lock().unwrap_or_else(|e| e.into_inner());
            if open.len() >= config.max_connections {
                metrics.server.connections_refused.inc();
                refuse(&mut stream);
                continue;
            }
            match stream.try_clone() {
                Ok(clone) => {
                    open.insert(id, clone);
                }
                Err(_) => continue,
            }
        }
        metrics.server.connections.inc();
        let (ctl, m, conns) = (controller.clone(), metrics.clone(), connections.clone());
        let busy = in_flight.clone();
        let spawned = thread::Builder::new()
            .name("vessel-api-conn".into())
            .spawn(move || {
                serve_connection(stream, &ctl, &m, &config, &busy);
                conns.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
            });
        if spawned.is_err() {
            connections
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
        }
    }
}

enum ReadOutcome {
    Data,
    Closed,
    TimedOut,
}

fn read_some(stream: &mut UnixStream, buf: &mut Vec<u8>, deadline: Instant) -> ReadOutcome {
    let now = Instant::now();
    if now >= deadline {
        return ReadOutcome::TimedOut;
    }
    if stream.set_read_timeout(Some(deadline - now)).is_err() {
        return ReadOutcome::Closed;
    }
    let mut chunk = [0u8; 4096];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => return ReadOutcome::Closed,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                return ReadOutcome::Data;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut =>
            {
                return ReadOutcome::TimedOut
            }
            Err(_) => return ReadOutcome::Closed,
        }
    }
}

/// Serves requests on one connection until it closes, errs or times out.
fn serve_connection(
    mut stream: UnixStream,
    controller: &Mutex<ApiController>,
    metrics: &Metrics,
    config: &ServerConfig,
    in_flight: &AtomicUsize,
) {
    let mut buf: Vec<u8> = Vec::new();
    loop {
        // Wait for the first byte of the next request (unless pipelined bytes are there).
        if buf.is_empty() {
            match read_some(&mut stream, &mut buf, Instant::now() + config.idle_timeout) {
                ReadOutcome::Data => {}
                ReadOutcome::Closed | ReadOutcome::TimedOut => return,
            }
        }
        let deadline = Instant::now() + config.request_timeout;
        let mut sent_continue = false;
        let request = loop {
            match parse_request(&buf, &config.limits) {
                Ok(Parsed::Request(req, used)) => {
                    buf.drain(..used);
                    break req;
                }
                Ok(Parsed::NeedBody { expect_continue }) => {
                    if expect_continue && !sent_continue {
                        sent_continue = true;
                        if stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").is_err() {
                            return;
                        }
                    }
                }
                Ok(Parsed::NeedHead) => {}
                Err(e) => {
                    if let Some((size, limit)) = e.oversize {
                        metrics.server.payload_too_large.inc();
                        let _ = stream
                            .write_all(&crate::http::firecracker_payload_too_large(size, limit));
                        return;
                    }
                    metrics.server.bad_requests.inc();
                    let _ = Response::fault(e.status, e.message).write_to(&mut stream, false);
                    return;
                }
            }
            match read_some(&mut stream, &mut buf, deadline) {
                ReadOutcome::Data => {}
                ReadOutcome::Closed => return,
                ReadOutcome::TimedOut => {
                    metrics.server.timeouts.inc();
                    let _ = Response::fault(408, "Timed out waiting for the whole request.")
                        .write_to(&mut stream, false);
                    return;
                }
            }
        };
        in_flight.fetch_add(1, Ordering::SeqCst);
        let began = Instant::now();
        let response = routes::dispatch(controller, metrics, &request);
        // Firecracker's line, which its tests pair with the request's line: logged before
        // the answer goes out, so the client's next request (maybe on another connection,
        // served by another thread) cannot log its line in between.
        log::debug!(
            "Total previous API call duration: {} us.",
            began.elapsed().as_micros()
        );
        let written = response.write_to(&mut stream, request.keep_alive);
        in_flight.fetch_sub(1, Ordering::SeqCst);
        if written.is_err() || !request.keep_alive {
            let _ = stream.shutdown(Shutdown::Both);
            return;
        }
    }
}

/// Answers a connection over the limit with a 503. The request is read first (briefly): a
/// socket closed with unread data sends a reset, which can destroy the 503 before the client
/// reads it.
fn refuse(stream: &mut UnixStream) {
    use std::io::Read;
    let _ = stream.set_read_timeout(Some(REFUSE_READ_TIMEOUT));
    let mut scratch = [0u8; 4096];
    let _ = stream.read(&mut scratch);
    let _ = Response::fault(503, "Too many open API connections.").write_to(stream, false);
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let _ = stream.read(&mut scratch);
}

/// How long a refused connection may take to send its request.
const REFUSE_READ_TIMEOUT: Duration = Duration::from_millis(100);
