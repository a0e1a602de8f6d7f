//! keywall's userspace. Its rooms, bottom up: `policy` (the pure model), `dataplane` (the
//! kernel boundary: every map write and every decoding of the kernel layout), `engine` (the
//! one write path), `source` (the policy file, the API, etcd: each submits to the engine),
//! `daemon` (`keywall run`) and `cli` (the operator verbs). HACKING.md has the map.
pub mod activity;
pub mod autolock;
pub mod chain;
pub mod cli;
pub mod daemon;
pub mod dataplane;
pub mod engine;
pub mod events;
pub mod fleet;
pub mod host;
pub mod metrics;
pub mod policy;
pub mod prefilter;
pub mod progress;
pub mod risk;
pub mod source;
pub mod state;
pub mod status;
