//! Vessel's management API, compatible with Firecracker's (v1.x): an HTTP/1.1 server on a Unix
//! socket, the route table, the pre-boot configuration (`VmResources`, also built from a
//! Firecracker `--config-file`), API metrics, and the boundary to the VMM ([`VmmBackend`]).
//!
//! How the VMM plugs in:
//! 1. implement [`VmmBackend`] on its main-thread object;
//! 2. `let (backend, jobs) = backend::channel(wake)` and
//!    `let ctl = Arc::new(Mutex::new(ApiController::new(backend, id, version)))`;
//! 3. `ApiServer::start(socket_path, ctl, ServerConfig::default())`;
//! 4. in its main loop, when woken, `while let Ok(job) = jobs.try_recv() { job.run(&mut vmm) }`.
//!
//! The document of what is served is `crates/api/openapi.json` ([`openapi::DOCUMENT`]); the
//! route table ([`routes::table`]) is checked against it by the tests.

pub mod backend;
pub mod client;
pub mod controller;
pub mod error;
pub mod fcconfig;
pub mod fcmetrics;
pub mod fs;
pub mod hotplug;
pub mod http;
pub mod memory_hotplug;
pub mod metrics;
pub mod openapi;
pub mod pmem;
pub mod resources;
pub mod routes;
pub mod server;
pub mod types;

pub use backend::{Backend, BackendJob, ChannelBackend, VmmBackend};
pub use controller::{ApiController, FIRECRACKER_API_VERSION};
pub use error::ApiError;
pub use metrics::Metrics;
pub use resources::{FullVmConfig, MmdsStore, VmResources};
pub use server::{ApiServer, ApiThread, ServerConfig};
