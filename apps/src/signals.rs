//! SIGINT / SIGTERM as a channel message, so every program can shut down cleanly.

use crossbeam_channel::Receiver;

/// A receiver that gets one message per SIGINT or SIGTERM.
///
/// Only one handler can be installed per process; a second call returns a receiver that
/// never fires (and logs why).
pub fn shutdown_channel() -> Receiver<()> {
    let (tx, rx) = crossbeam_channel::bounded(4);
    if let Err(e) = ctrlc::set_handler(move || {
        let _ = tx.try_send(());
    }) {
        tracing::warn!(error = %e, "cannot install the SIGINT/SIGTERM handler");
    }
    rx
}
