//! The CLI's observer of a backup job: a progress bar per disk on a
//! terminal (indicatif), warnings to the log. The job layer knows nothing
//! of terminals; it sends [`JobEvent`]s.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::job::events::{JobEvent, JobObserver, LogObserver, Phase};

/// Draws bars when `bars` is set; always logs warnings through tracing.
///
/// A bar counts bytes actually read, so its rate and ETA are real: when
/// the job knows up front how much it will read (an incremental read: the
/// dirty bytes) the bar runs over that; otherwise (a full read learns what
/// is allocated as it goes) the bar shows how much of the disk has been
/// scanned, and the bytes read with their rate, without an ETA.
#[derive(Debug)]
pub struct CliObserver {
    bars: Option<Mutex<HashMap<String, DiskBar>>>,
    /// The job reached the hold phase (the guest was frozen, paused or
    /// stopped, or about to be).
    touched: AtomicBool,
}

#[derive(Debug)]
struct DiskBar {
    bar: indicatif::ProgressBar,
    /// The bar counts read bytes (the total to read is known).
    counts_read: bool,
    read: u64,
    started: Instant,
}

impl CliObserver {
    /// An observer; `bars`: draw progress bars on stderr.
    pub fn new(bars: bool) -> Self {
        CliObserver {
            bars: bars.then(|| Mutex::new(HashMap::new())),
            touched: AtomicBool::new(false),
        }
    }

    /// Whether the job got as far as holding the guest.
    pub fn guest_touched(&self) -> bool {
        self.touched.load(Ordering::Relaxed)
    }
}

fn new_bar(disk: &str, virtual_size: u64, to_read: Option<u64>) -> DiskBar {
    let (total, template) = match to_read {
        Some(n) => (
            n,
            "{prefix:>10} [{bar:30}] {bytes}/{total_bytes} read, {bytes_per_sec}, ETA {eta}",
        ),
        None => (
            virtual_size,
            "{prefix:>10} [{bar:30}] {percent:>3}% of {total_bytes} scanned, {msg}",
        ),
    };
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(template)
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_prefix(disk.to_string());
    DiskBar {
        bar,
        counts_read: to_read.is_some(),
        read: 0,
        started: Instant::now(),
    }
}

impl JobObserver for CliObserver {
    fn event(&self, event: &JobEvent<'_>) {
        LogObserver.event(event);
        if let JobEvent::Phase { phase, .. } = event {
            if *phase == Phase::Hold {
                self.touched.store(true, Ordering::Relaxed);
            }
        }
        let Some(bars) = &self.bars else { return };
        let Ok(mut bars) = bars.lock() else { return };
        match event {
            JobEvent::DiskStarted {
                disk,
                virtual_size,
                to_read,
            } => {
                bars.insert((*disk).to_string(), new_bar(disk, *virtual_size, *to_read));
            }
            JobEvent::DiskProgress { disk, bytes, read } => {
                if let Some(b) = bars.get_mut(*disk) {
                    b.read += read;
                    if b.counts_read {
                        b.bar.inc(*read);
                    } else {
                        b.bar.inc(*bytes);
                        b.bar.set_message(read_message(b.read, b.started.elapsed()));
                    }
                }
            }
            JobEvent::DiskFinished { disk } => {
                if let Some(b) = bars.remove(*disk) {
                    b.bar.finish_and_clear();
                }
            }
            JobEvent::Phase { .. } | JobEvent::Warning { .. } => {}
        }
    }
}

/// "12.0 MiB read, 8.0 MiB/s": bytes read and their rate since the start.
fn read_message(read: u64, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64();
    #[allow(clippy::cast_precision_loss)]
    let rate = if secs > 0.0 { read as f64 / secs } else { 0.0 };
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let rate = rate as u64;
    format!(
        "{} read, {}/s",
        indicatif::HumanBytes(read),
        indicatif::HumanBytes(rate)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_message_counts_read_bytes_not_scanned_ones() {
        assert_eq!(
            read_message(16 << 20, Duration::from_secs(2)),
            "16.00 MiB read, 8.00 MiB/s"
        );
    }
}
