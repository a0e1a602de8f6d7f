//! The policy sources: the policy file (`file/`), the HTTP API (`api/`) and etcd (`etcd/`).
//! Exactly one owns a daemon's policy. Each turns its input into a
//! [`Change`](crate::engine::Change) and calls [`Engine::submit`]; none writes a map itself.
//!
//! [`Shared`] is what the running daemon's threads share: the engine behind its lock, the
//! runtime record, the figures readers use without the lock, drop events and metrics.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
};

use tokio::sync::broadcast;

use crate::{engine::Engine, events::EventRecord, metrics::Metrics, state::Runtime};

pub mod api;
pub mod autolock;
pub mod etcd;
pub mod file;

/// The one authoritative policy source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    File(PathBuf),
    Api,
    /// `--etcd`: the prefix the policy is read from.
    Etcd(String),
}

impl Source {
    pub fn kind(&self) -> &'static str {
        match self {
            Source::File(_) => "file",
            Source::Api => "api",
            Source::Etcd(_) => "etcd",
        }
    }
    pub fn describe(&self) -> String {
        match self {
            Source::File(p) => format!("the policy file {} (API writes get 409)", p.display()),
            Source::Api => "the API".into(),
            Source::Etcd(p) => format!("etcd {p} (API writes get 409)"),
        }
    }
}

pub struct Shared {
    pub engine: Mutex<Engine>,
    /// The engine's published figures (`Engine::published`), readable without its lock.
    pub published: Arc<Mutex<Option<crate::state::PolicyStatus>>>,
    pub runtime: Mutex<Runtime>,
    pub source: Source,
    pub pin_dir: PathBuf,
    pub state_dir: PathBuf,
    pub metrics: Arc<Metrics>,
    pub events: broadcast::Sender<EventRecord>,
    /// Why drop events are unavailable, if they are.
    pub events_error: Option<String>,
    /// Automatic locks (idle, shared) the daemon made (`autolock.rs`).
    pub overlay: Mutex<crate::autolock::Overlay>,
    pub max_body: usize,
}
