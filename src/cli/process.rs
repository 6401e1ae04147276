//! Process-wide setup the commands need but do not own: the log filter, and what Ctrl-C (or SIGTERM)
//! does while stages run. Apart from the commands so that `run` and `sweep` install the same handler.

use crate::engine::{runner, slurm};

/// Logs go to stderr, filtered by `PIPE_LOG` (tracing's env-filter syntax); without it warnings and
/// errors, or errors only under `--quiet`.
pub(super) fn init_tracing(quiet: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PIPE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(if quiet { "error" } else { "warn" }));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).without_time().try_init();
}

/// An interrupted run removes the partial output of the stage it was in (the runner tracks its temp
/// dir), says so, and exits 130 like a shell would; a finished stage's artifact is already in the store.
/// A `pipe run` waiting for Slurm jobs cancels them.
pub(super) fn install_interrupt_handler() {
    let _ = ctrlc::set_handler(|| {
        let cancelled = slurm::cancel_in_flight();
        if !cancelled.is_empty() {
            let ids: Vec<String> = cancelled.iter().map(u64::to_string).collect();
            eprintln!("\npipe: interrupted; cancelled slurm job(s) {}", ids.join(" "));
        }
        let removed = runner::cleanup_on_interrupt();
        if removed.is_empty() {
            eprintln!("\npipe: interrupted");
        }
        for tmp in removed {
            eprintln!("\npipe: interrupted; removed the partial output {}", tmp.display());
        }
        std::process::exit(130);
    });
}
