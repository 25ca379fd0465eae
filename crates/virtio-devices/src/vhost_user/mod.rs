//! vhost-user frontend: a virtio device whose queues are served by another process (a
//! vhost-user backend such as `virtiofsd`) over a Unix socket, with the rust-vmm `vhost`
//! crate's [`Frontend`] speaking the protocol.
//!
//! The VMM keeps the transport (registers, configuration space, interrupts); the backend gets
//! the guest's memory (every region of a `memfd`-backed [`vessel_memory::Backing::Shared`]
//! guest memory, by descriptor), each queue's ring addresses, the queue's kick event (the
//! same eventfd KVM writes on the driver's notify) and a call event per queue. A worker
//! thread ([`CallForwarder`]) turns the call events into the transport's interrupts, and
//! watches the socket: a backend that goes away marks the device `DEVICE_NEEDS_RESET`, and the
//! VMM keeps running.
//!
//! Devices: [`fs::Fs`] (virtio-fs), [`generic::VhostUserDevice`] (a disk or NIC an external
//! backend serves). [`virtiofsd`] finds and starts `virtiofsd`.

pub mod fs;
pub mod generic;
pub mod virtiofsd;

use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vessel_memory::GuestMemoryMmap;
use vessel_virtio::worker::{EventHandler, Worker, WorkerControl};
use vessel_virtio::{
    ActivateContext, ActivateError, ActiveQueue, DeviceHealth, InterruptCause, VirtioInterrupt,
};
use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// `VHOST_USER_F_PROTOCOL_FEATURES`: a backend feature bit that is never offered to the guest.
const PROTOCOL_FEATURES: u64 = 1 << 30;
/// The protocol features Vessel uses when the backend has them.
fn wanted_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
}

/// What went wrong talking to a vhost-user backend.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserError {
    #[error("cannot connect to the vhost-user backend at {}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: vhost::Error,
    },
    #[error("the vhost-user backend refused {what}")]
    Request {
        what: &'static str,
        #[source]
        source: vhost::Error,
    },
    #[error("the vhost-user backend serves {has} queues; the device needs {needs}")]
    TooFewQueues { has: u64, needs: usize },
    #[error("guest memory region at {0:#x} is not shared memory: vhost-user needs `--memory ...,shared=on`")]
    PrivateMemory(u64),
    #[error("queue {0}'s rings are not in guest memory")]
    RingAddress(u16),
    #[error("cannot create the queue events")]
    Events(#[source] io::Error),
    #[error("the vhost-user backend does not offer VIRTIO_F_VERSION_1")]
    NotModern,
}

fn request(what: &'static str) -> impl FnOnce(vhost::Error) -> VhostUserError {
    move |source| VhostUserError::Request { what, source }
}

/// A connected, negotiated vhost-user backend.
pub struct Connection {
    frontend: Frontend,
    /// The virtio features the backend offers (without [`PROTOCOL_FEATURES`]).
    virtio_features: u64,
    /// Whether `VHOST_USER_F_PROTOCOL_FEATURES` was negotiated (rings then start disabled
    /// and are enabled with `SET_VRING_ENABLE`).
    protocol: bool,
}

impl Connection {
    /// Connects to the backend listening at `path` and negotiates (`queues` queues needed).
    pub fn connect(path: &Path, queues: usize) -> Result<Connection, VhostUserError> {
        let frontend =
            Frontend::connect(path, queues as u64).map_err(|source| VhostUserError::Connect {
                path: path.to_path_buf(),
                source,
            })?;
        Connection::negotiate(frontend, queues)
    }

    /// Negotiates with a backend on an already connected socket.
    pub fn from_stream(sock: UnixStream, queues: usize) -> Result<Connection, VhostUserError> {
        Connection::negotiate(Frontend::from_stream(sock, queues as u64), queues)
    }

    fn negotiate(mut frontend: Frontend, queues: usize) -> Result<Connection, VhostUserError> {
        frontend.set_owner().map_err(request("SET_OWNER"))?;
        let features = frontend.get_features().map_err(request("GET_FEATURES"))?;
        let protocol = features & PROTOCOL_FEATURES != 0;
        if protocol {
            // Protocol features are negotiated before anything else is set. No SET_FEATURES
            // yet: libvhost-user backends refuse one without VIRTIO_F_VERSION_1, which only
            // the driver's choice at activation carries.
            let offered = frontend
                .get_protocol_features()
                .map_err(request("GET_PROTOCOL_FEATURES"))?;
            let chosen = offered & wanted_protocol_features();
            frontend
                .set_protocol_features(chosen)
                .map_err(request("SET_PROTOCOL_FEATURES"))?;
            if chosen.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                // Every request is then acknowledged: a refusal is seen where it happens.
                frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
            if chosen.contains(VhostUserProtocolFeatures::MQ) {
                let has = frontend.get_queue_num().map_err(request("GET_QUEUE_NUM"))?;
                if has < queues as u64 {
                    return Err(VhostUserError::TooFewQueues { has, needs: queues });
                }
            }
        }
        if features & vessel_virtio::features::VERSION_1 == 0 {
            return Err(VhostUserError::NotModern);
        }
        Ok(Connection {
            frontend,
            virtio_features: features & !PROTOCOL_FEATURES,
            protocol,
        })
    }

    /// The virtio features the backend offers.
    pub fn virtio_features(&self) -> u64 {
        self.virtio_features
    }

    /// A descriptor that reads as hung up once the backend is gone.
    fn socket_fd(&self) -> RawFd {
        self.frontend.as_raw_fd()
    }

    /// Hands the backend everything to run `queues`: the features the driver accepted, the
    /// guest memory, and per queue its size, rings, next position, events. Returns the call
    /// events, in `queues` order.
    fn start(
        &mut self,
        acked: u64,
        mem: &GuestMemoryMmap,
        queues: &[ActiveQueue],
    ) -> Result<Vec<EventFd>, VhostUserError> {
        let protocol_bit = if self.protocol { PROTOCOL_FEATURES } else { 0 };
        self.frontend
            .set_features(acked | protocol_bit)
            .map_err(request("SET_FEATURES"))?;
        let regions = memory_regions(mem)?;
        self.frontend
            .set_mem_table(&regions)
            .map_err(request("SET_MEM_TABLE"))?;
        let mut calls = Vec::with_capacity(queues.len());
        for q in queues {
            let i = usize::from(q.index);
            let config = ring_config(mem, q)?;
            self.frontend
                .set_vring_num(i, q.queue.size())
                .map_err(request("SET_VRING_NUM"))?;
            self.frontend
                .set_vring_addr(i, &config)
                .map_err(request("SET_VRING_ADDR"))?;
            self.frontend
                .set_vring_base(i, q.queue.next_avail())
                .map_err(request("SET_VRING_BASE"))?;
            let call = EventFd::new(EFD_NONBLOCK).map_err(VhostUserError::Events)?;
            self.frontend
                .set_vring_call(i, &call)
                .map_err(request("SET_VRING_CALL"))?;
            self.frontend
                .set_vring_kick(i, &q.kick)
                .map_err(request("SET_VRING_KICK"))?;
            if self.protocol {
                self.frontend
                    .set_vring_enable(i, true)
                    .map_err(request("SET_VRING_ENABLE"))?;
            }
            calls.push(call);
        }
        Ok(calls)
    }

    /// Stops the backend's processing of `queues` (`GET_VRING_BASE`); the backend finishes
    /// what it has in flight first. Errors are logged: a gone backend has stopped anyway.
    fn stop(&mut self, queues: &[u16]) {
        for &i in queues {
            if let Err(e) = self.frontend.get_vring_base(usize::from(i)) {
                log::warn!("vhost-user: cannot stop queue {i}: {e}");
                return;
            }
        }
    }
}

/// Every region of `mem`, as the backend maps it (its `memfd` and offset); a region with no
/// file behind it is the crate's only refusal.
fn memory_regions(mem: &GuestMemoryMmap) -> Result<Vec<VhostUserMemoryRegionInfo>, VhostUserError> {
    mem.iter()
        .map(|r| {
            VhostUserMemoryRegionInfo::from_guest_region(r)
                .map_err(|_| VhostUserError::PrivateMemory(r.start_addr().0))
        })
        .collect()
}

/// A queue's ring addresses as the backend takes them: addresses in the VMM's own mapping of
/// guest memory (which the backend translates through the memory table).
fn ring_config(mem: &GuestMemoryMmap, q: &ActiveQueue) -> Result<VringConfigData, VhostUserError> {
    let host = |gpa: u64| {
        mem.get_host_address(GuestAddress(gpa))
            .map(|p| p as u64)
            .map_err(|_| VhostUserError::RingAddress(q.index))
    };
    Ok(VringConfigData {
        queue_max_size: q.queue.max_size(),
        queue_size: q.queue.size(),
        flags: 0,
        desc_table_addr: host(q.queue.desc_table())?,
        used_ring_addr: host(q.queue.used_ring())?,
        avail_ring_addr: host(q.queue.avail_ring())?,
        log_addr: None,
    })
}

/// The socket's token in the forwarder's epoll; queue `i`'s call event is token `i`.
const SOCKET_TOKEN: u64 = u64::MAX - 1;

/// The worker of a running vhost-user device: raises the interrupt of each queue whose call
/// event the backend writes, and marks the device broken when the backend's socket hangs up.
struct CallForwarder {
    calls: Vec<(u16, EventFd)>,
    socket: RawFd,
    interrupt: Arc<dyn VirtioInterrupt>,
    health: DeviceHealth,
    what: &'static str,
}

impl EventHandler for CallForwarder {
    fn handle_event(
        &mut self,
        token: u64,
        _events: EventSet,
        ctl: &mut WorkerControl,
    ) -> io::Result<()> {
        if token == SOCKET_TOKEN {
            // Only hang-ups are watched (replies to the VMM's requests are read by whoever
            // sent them). The VMM and the other devices keep running.
            ctl.remove(self.socket)?;
            self.health.mark_broken(&format_args!(
                "{}: the vhost-user backend closed its socket",
                self.what
            ));
            return Ok(());
        }
        let Some((index, call)) = self.calls.get(token as usize) else {
            return Ok(());
        };
        if call.read().is_ok() {
            self.interrupt.trigger(InterruptCause::Queue(*index))?;
        }
        Ok(())
    }
}

/// A started vhost-user device: its worker and the queues the backend runs.
pub struct Running {
    worker: Worker,
    queues: Vec<u16>,
}

/// Starts the queues of `ctx` on `conn` and the worker (thread `name`) that forwards the
/// backend's calls; `what` names the device in logs.
pub fn start(
    conn: &mut Connection,
    name: &str,
    what: &'static str,
    ctx: ActivateContext,
) -> Result<Running, VhostUserError> {
    let calls = conn.start(ctx.acked_features, &ctx.mem, &ctx.queues)?;
    let indices: Vec<u16> = ctx.queues.iter().map(|q| q.index).collect();
    let calls: Vec<(u16, EventFd)> = indices.iter().copied().zip(calls).collect();
    let mut fds: Vec<(RawFd, u64, EventSet)> = calls
        .iter()
        .enumerate()
        .map(|(t, (_, e))| (e.as_raw_fd(), t as u64, EventSet::IN))
        .collect();
    let socket = conn.socket_fd();
    fds.push((socket, SOCKET_TOKEN, EventSet::READ_HANG_UP));
    let handler = CallForwarder {
        calls,
        socket,
        interrupt: ctx.interrupt,
        health: ctx.health,
        what,
    };
    let worker = Worker::spawn(name, &fds, handler).map_err(VhostUserError::Events)?;
    // The backend holds its own copies of the kick events; ours close with `ctx.queues`.
    Ok(Running {
        worker,
        queues: indices,
    })
}

/// A device's activation on its backend: stops what ran before, checks that the driver
/// enabled all `queues` queues, and starts them (see [`start`]).
pub(crate) fn activate(
    conn: &mut Connection,
    running: &mut Option<Running>,
    queues: usize,
    name: &'static str,
    ctx: ActivateContext,
) -> Result<(), ActivateError> {
    stop(conn, running);
    for i in 0..queues as u16 {
        if !ctx.queues.iter().any(|q| q.index == i) {
            return Err(ActivateError::MissingQueue(i));
        }
    }
    let r = start(conn, name, name, ctx).map_err(|e| ActivateError::Backend {
        what: "the vhost-user backend",
        source: Box::new(e),
    })?;
    *running = Some(r);
    Ok(())
}

/// Stops a device's queues on its backend, if they run.
pub(crate) fn stop(conn: &mut Connection, running: &mut Option<Running>) {
    if let Some(r) = running.take() {
        r.stop(conn);
    }
}

impl Running {
    /// Stops the backend's queues (it finishes its requests in flight, whose interrupts the
    /// worker still forwards), then the worker.
    pub fn stop(self, conn: &mut Connection) {
        conn.stop(&self.queues);
        drop(self.worker);
    }
}
