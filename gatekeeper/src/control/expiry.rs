//! Rule expiry: a rule with `expires` stops matching at that second, whatever created it (the
//! policy file, `POST /apply`, `PUT /rules`). A thread of its own sleeps until the next expiry
//! in force and recompiles then; every change wakes it, so a rule added later is not missed.

use std::{
    sync::{Condvar, Mutex, PoisonError},
    time::Duration,
};

use chrono::Utc;

use super::Handle;

/// The longest sleep without looking again (the daemon may have stopped).
const MAX_SLEEP: Duration = Duration::from_secs(60);

/// Tells the expiry thread that the policy changed.
#[derive(Debug, Default)]
pub struct ExpiryClock {
    changes: Mutex<u64>,
    cv: Condvar,
}

impl ExpiryClock {
    pub(super) fn changed(&self) {
        *self.changes.lock().unwrap_or_else(PoisonError::into_inner) += 1;
        self.cv.notify_all();
    }

    fn seen(&self) -> u64 {
        *self.changes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until a change after `seen`, or `timeout`.
    fn wait(&self, seen: u64, timeout: Duration) {
        let guard = self.changes.lock().unwrap_or_else(PoisonError::into_inner);
        let _ = self.cv.wait_timeout_while(guard, timeout, |n| *n == seen);
    }
}

/// Starts the expiry thread over `control`; it ends once the control state is dropped.
pub fn spawn(control: &Handle) -> std::io::Result<std::thread::JoinHandle<()>> {
    let weak = control.downgrade();
    let clock = control.lock().expiry_clock();
    std::thread::Builder::new().name("gk-expiry".into()).spawn(move || {
        loop {
            let seen = clock.seen();
            let Some(control) = weak.upgrade() else { return };
            let next = control.lock().enforcer().policy().next_expiry(Utc::now());
            drop(control);
            let wait = next.map_or(MAX_SLEEP, |t| (t - Utc::now()).to_std().unwrap_or_default().min(MAX_SLEEP));
            clock.wait(seen, wait);
            if next.is_none_or(|t| t > Utc::now()) {
                continue;
            }
            let Some(control) = weak.upgrade() else { return };
            let mut c = control.lock();
            match c.refresh() {
                Ok(report) => tracing::info!(
                    reason = "rule expiry",
                    epoch = report.epoch,
                    changed_entries = report.entries,
                    elapsed_ms = report.total.as_secs_f64() * 1e3,
                    "applied policy"
                ),
                Err(e) => tracing::error!(
                    error = %e,
                    "recompiling after a rule expired failed; the previous policy stays in force"
                ),
            }
        }
    })
}
