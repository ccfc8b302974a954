//! The CLI's observer of a backup job: a progress bar per disk on a
//! terminal (indicatif), warnings to the log. The job layer knows nothing
//! of terminals; it sends [`JobEvent`]s.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::job::events::{JobEvent, JobObserver, LogObserver};

/// Draws bars when `bars` is set; always logs warnings through tracing.
#[derive(Debug)]
pub struct CliObserver {
    bars: Option<Mutex<HashMap<String, indicatif::ProgressBar>>>,
}

impl CliObserver {
    /// An observer; `bars`: draw progress bars on stderr.
    pub fn new(bars: bool) -> Self {
        CliObserver {
            bars: bars.then(|| Mutex::new(HashMap::new())),
        }
    }
}

fn new_bar(disk: &str, total: u64) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix:>10} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_prefix(disk.to_string());
    bar
}

impl JobObserver for CliObserver {
    fn event(&self, event: &JobEvent<'_>) {
        LogObserver.event(event);
        let Some(bars) = &self.bars else { return };
        let Ok(mut bars) = bars.lock() else { return };
        match event {
            JobEvent::DiskStarted { disk, virtual_size } => {
                bars.insert((*disk).to_string(), new_bar(disk, *virtual_size));
            }
            JobEvent::DiskProgress { disk, bytes } => {
                if let Some(b) = bars.get(*disk) {
                    b.inc(*bytes);
                }
            }
            JobEvent::DiskFinished { disk } => {
                if let Some(b) = bars.remove(*disk) {
                    b.finish_and_clear();
                }
            }
            JobEvent::Phase { .. } | JobEvent::Warning { .. } => {}
        }
    }
}
