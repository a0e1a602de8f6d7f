//! keywall's userspace: policy model, the kernel boundary, the daemon and operator views.
pub mod daemon;
pub mod dataplane;
pub mod policy;
pub mod prefilter;
pub mod state;
pub mod stats;
pub mod status;
