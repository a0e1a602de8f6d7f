//! The state directory: the last applied policy and what the daemon attached, written so a
//! crash at any moment leaves either the old or the new file, never a torn one.

use std::{
    collections::BTreeMap,
    fs,
    io::Write as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

use crate::policy::Policy;

const POLICY_FILE: &str = "applied-policy.json";
const RUNTIME_FILE: &str = "runtime.json";

/// The applied policy and where it came from.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Applied {
    pub revision: u64,
    /// `file:PATH` or `api` (later `etcd`): the one source that owns the policy.
    pub source: String,
    pub applied_unix: u64,
    pub policy: Policy,
}

/// What the running daemon attached (for `status`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Runtime {
    pub pid: u32,
    pub ifaces: BTreeMap<String, String>,
    pub pin_dir: String,
    pub audit_override: bool,
    pub policy_error: Option<String>,
}

/// Writes `bytes` to `path` atomically: temp file, fsync, rename, fsync the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp: PathBuf = dir.join(format!(
        ".{}.tmp",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    ));
    {
        let mut f =
            fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

pub fn save_applied(state_dir: &Path, a: &Applied) -> Result<()> {
    // Compact: at 1M keys pretty printing costs more than the write.
    write_atomic(&state_dir.join(POLICY_FILE), &serde_json::to_vec(a)?)
}

pub fn load_applied(state_dir: &Path) -> Result<Option<Applied>> {
    let p = state_dir.join(POLICY_FILE);
    match fs::read(&p) {
        Ok(b) => Ok(Some(
            serde_json::from_slice(&b).with_context(|| format!("parsing {}", p.display()))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
    }
}

pub fn save_runtime(state_dir: &Path, r: &Runtime) -> Result<()> {
    write_atomic(
        &state_dir.join(RUNTIME_FILE),
        &serde_json::to_vec_pretty(r)?,
    )
}

pub fn load_runtime(state_dir: &Path) -> Option<Runtime> {
    serde_json::from_slice(&fs::read(state_dir.join(RUNTIME_FILE)).ok()?).ok()
}

pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp() {
        let dir = std::env::temp_dir().join(format!("kw-state-{}", std::process::id()));
        let p = dir.join("x.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names.len(), 1, "temp file left behind: {names:?}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
