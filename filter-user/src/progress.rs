//! Progress for long operations (a 1M-key policy, an etcd snapshot), shown only when stderr
//! is a terminal; quiet under `--json`, in pipes, logs and under systemd.

use std::{io::IsTerminal as _, time::Duration};

use indicatif::{ProgressBar, ProgressStyle};

/// A spinner with the elapsed time and `msg`, or nothing when stderr is not a terminal.
/// Finish it with [`done`].
pub fn spinner(msg: impl Into<String>) -> Option<ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let pb = ProgressBar::new_spinner();
    pb.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}")
            .expect("a valid template"),
    );
    pb.set_message(msg.into());
    pb.enable_steady_tick(Duration::from_millis(100));
    Some(pb)
}

/// A bar over `len` steps (`msg` beside it), or nothing when stderr is not a terminal.
pub fn bar(len: u64, msg: impl Into<String>) -> Option<ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template("[{elapsed_precise}] {bar:40} {pos}/{len} {msg}")
            .expect("a valid template"),
    );
    pb.set_message(msg.into());
    Some(pb)
}

/// Clears a spinner or bar from the terminal.
pub fn done(pb: Option<ProgressBar>) {
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
}
