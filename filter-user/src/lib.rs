//! keywall's userspace: policy model, the kernel boundary, the daemon and operator views.
pub mod api;
pub mod chain;
pub mod client;
pub mod daemon;
pub mod dataplane;
pub mod engine;
pub mod etcd;
pub mod events;
pub mod host;
pub mod metrics;
pub mod policy;
pub mod prefilter;
pub mod progress;
pub mod state;
pub mod stats;
pub mod status;
