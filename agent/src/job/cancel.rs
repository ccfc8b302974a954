//! Cancellation of a running job: set by signal handlers (CLI) or a
//! scheduler, checked between phases and per chunk.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use super::JobError;

/// A cancellation flag shared by the control and data planes.
#[derive(Debug, Clone, Default)]
pub struct Cancel(Arc<AtomicBool>, Arc<Mutex<Option<&'static str>>>);

impl Cancel {
    /// Request cancellation, naming the cause (`SIGINT`, …). The first
    /// cause is kept.
    pub fn cancel(&self, why: &'static str) {
        if let Ok(mut w) = self.1.lock() {
            w.get_or_insert(why);
        }
        self.0.store(true, Ordering::SeqCst);
    }
    /// Whether cancellation was requested.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
    /// `Err(Interrupted)` once cancelled.
    pub fn check(&self) -> Result<(), JobError> {
        if self.is_cancelled() {
            let why = self.1.lock().ok().and_then(|w| *w).unwrap_or("a signal");
            return Err(JobError::Interrupted(why));
        }
        Ok(())
    }
}
