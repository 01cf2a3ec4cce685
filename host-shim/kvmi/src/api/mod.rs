//! The management API of `kvmi run --api-socket PATH`: HTTP/1.1 over a unix socket with JSON
//! bodies, in the manner of Firecracker's and Cloud Hypervisor's APIs. Routes, bodies and
//! errors are documented in `docs/api.md`.
//!
//! - [`server`]: the listener, a thread per connection, bounded and timed reads.
//! - [`backend`]: what is served, a [`Backend`] for a fleet (the appliance VM and its
//!   targets) or for one VM.
//! - `routes`: info, pause, resume, stats, dump and its progress, add and remove targets.
//! - [`client`]: the client side (`kvmi ctl`, `kvmi dump`).

pub mod backend;
pub mod client;
mod error;
mod http;
mod routes;
pub mod server;

pub use backend::{AddTarget, Backend, FleetBackend, SingleBackend, TargetFactory};
pub use error::ApiError;
pub use http::{MAX_BODY, MAX_HEAD};
pub use server::{ApiListener, ApiServer, ServerError};
