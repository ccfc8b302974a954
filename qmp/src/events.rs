//! QMP events: the raw event, a typed view of the few the agent acts on, and
//! the bounded per-subscriber queue.
//!
//! Overflow policy: each subscriber has its own queue bounded by an event
//! count and a byte budget (sum of the events' line lengths). When a push
//! would exceed either, the **oldest** queued events are dropped and counted;
//! the subscriber then receives [`Delivery::Missed`] with that count before
//! the next event. The reader task never waits for a subscriber, so a slow or
//! absent consumer cannot delay command replies.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::types::JobStatus;

/// Default maximum number of queued events per subscriber.
pub const DEFAULT_EVENT_QUEUE_EVENTS: usize = 1024;
/// Default byte budget of queued events per subscriber (8 MiB).
pub const DEFAULT_EVENT_QUEUE_BYTES: usize = 8 * 1024 * 1024;

/// QEMU's event timestamp (host wall clock when the event was emitted).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Timestamp {
    /// Seconds since the epoch.
    pub seconds: i64,
    /// Microseconds within the second.
    pub microseconds: i64,
}

/// One QMP event, as QEMU sent it. Unknown events are delivered like any
/// other; `data` is kept as raw JSON.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Event name, e.g. `BLOCK_EXPORT_DELETED`.
    pub name: String,
    /// The `data` member, `Null` if absent.
    pub data: Value,
    /// The `timestamp` member, if present and well-formed.
    pub timestamp: Option<Timestamp>,
}

impl Event {
    pub(crate) fn from_object(mut obj: Map<String, Value>) -> Self {
        let name = match obj.remove("event") {
            Some(Value::String(s)) => s,
            _ => String::new(),
        };
        let data = obj.remove("data").unwrap_or(Value::Null);
        let timestamp = obj
            .remove("timestamp")
            .and_then(|t| serde_json::from_value(t).ok());
        Self {
            name,
            data,
            timestamp,
        }
    }

    /// A string member of `data`, if present.
    pub fn data_str(&self, key: &str) -> Option<&str> {
        self.data.get(key).and_then(Value::as_str)
    }

    /// A typed view of the event; unknown or malformed events are
    /// [`EventKind::Other`].
    pub fn kind(&self) -> EventKind {
        let s = |k: &str| self.data_str(k).map(str::to_owned);
        let b = |k: &str| self.data.get(k).and_then(Value::as_bool);
        match self.name.as_str() {
            "BLOCK_EXPORT_DELETED" => match s("id") {
                Some(id) => EventKind::BlockExportDeleted { id },
                None => EventKind::Other,
            },
            "JOB_STATUS_CHANGE" => match (s("id"), s("status")) {
                (Some(id), Some(status)) => EventKind::JobStatusChange {
                    id,
                    status: JobStatus::from(status.as_str()),
                },
                _ => EventKind::Other,
            },
            "STOP" => EventKind::Stop,
            "RESUME" => EventKind::Resume,
            "SHUTDOWN" => EventKind::Shutdown {
                guest: b("guest").unwrap_or(false),
                reason: s("reason").unwrap_or_default(),
            },
            "RESET" => EventKind::Reset {
                guest: b("guest").unwrap_or(false),
                reason: s("reason").unwrap_or_default(),
            },
            "POWERDOWN" => EventKind::Powerdown,
            "BLOCK_IO_ERROR" => EventKind::BlockIoError {
                device: s("device").unwrap_or_default(),
                node_name: s("node-name"),
                operation: s("operation").unwrap_or_default(),
                action: s("action").unwrap_or_default(),
                reason: s("reason").unwrap_or_default(),
            },
            _ => EventKind::Other,
        }
    }
}

/// Typed view of the events the agent acts on. Everything else (including
/// events this crate has never heard of) is `Other`; read [`Event::data`].
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    /// A block export is gone (after `block-export-del`).
    BlockExportDeleted {
        /// Export id.
        id: String,
    },
    /// A job changed status.
    JobStatusChange {
        /// Job id.
        id: String,
        /// New status.
        status: JobStatus,
    },
    /// The VM stopped.
    Stop,
    /// The VM resumed.
    Resume,
    /// The VM shut down (or was asked to).
    Shutdown {
        /// Whether the guest initiated it.
        guest: bool,
        /// QEMU's reason string.
        reason: String,
    },
    /// The VM was reset.
    Reset {
        /// Whether the guest initiated it.
        guest: bool,
        /// QEMU's reason string.
        reason: String,
    },
    /// `system_powerdown` was delivered to the guest.
    Powerdown,
    /// A guest device hit an I/O error.
    BlockIoError {
        /// Device name (may be empty for `-blockdev` devices).
        device: String,
        /// Node name, if QEMU sent one.
        node_name: Option<String>,
        /// `read` or `write`.
        operation: String,
        /// `ignore`, `report` or `stop`.
        action: String,
        /// QEMU's reason string.
        reason: String,
    },
    /// Any other event.
    Other,
}

/// What [`Events::recv`] hands out.
#[derive(Debug, Clone, PartialEq)]
pub enum Delivery {
    /// The next event.
    Event(Event),
    /// This many events were dropped (oldest first) because the queue was
    /// full; the events that follow are newer than the dropped ones.
    Missed(u64),
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct QueueLimits {
    pub max_events: usize,
    pub max_bytes: usize,
}

#[derive(Debug, Default)]
struct QueueState {
    items: VecDeque<(Event, usize)>,
    bytes: usize,
    missed_pending: u64,
    closed: Option<Arc<Error>>,
}

/// One subscriber's queue. The reader pushes without ever waiting.
#[derive(Debug)]
pub(crate) struct EventQueue {
    state: Mutex<QueueState>,
    notify: Notify,
    limits: QueueLimits,
}

impl EventQueue {
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        // The lock is never held across a panic-prone call; recover anyway.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn push(&self, event: &Event, size: usize) {
        let mut st = self.lock();
        if st.closed.is_some() {
            return;
        }
        while !st.items.is_empty()
            && (st.items.len() >= self.limits.max_events
                || st.bytes.saturating_add(size) > self.limits.max_bytes)
        {
            if let Some((_, old)) = st.items.pop_front() {
                st.bytes -= old;
                st.missed_pending += 1;
            }
        }
        if self.limits.max_events == 0 {
            st.missed_pending += 1;
        } else {
            st.items.push_back((event.clone(), size));
            st.bytes += size;
        }
        drop(st);
        self.notify.notify_one();
    }

    fn close(&self, cause: &Arc<Error>) {
        let mut st = self.lock();
        if st.closed.is_none() {
            st.closed = Some(Arc::clone(cause));
        }
        drop(st);
        self.notify.notify_one();
    }
}

/// The set of live subscribers.
#[derive(Debug, Default)]
pub(crate) struct Subscribers {
    queues: Mutex<Vec<Weak<EventQueue>>>,
    closed: Mutex<Option<Arc<Error>>>,
}

impl Subscribers {
    pub(crate) fn subscribe(&self, limits: QueueLimits) -> Events {
        let queue = Arc::new(EventQueue {
            state: Mutex::new(QueueState::default()),
            notify: Notify::new(),
            limits,
        });
        // Hold `queues` while reading `closed` so a concurrent close either
        // sees this queue or we see its cause.
        let mut queues = self.queues.lock().unwrap_or_else(PoisonError::into_inner);
        let closed = self
            .closed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        match closed {
            Some(cause) => queue.close(&cause),
            None => queues.push(Arc::downgrade(&queue)),
        }
        Events {
            queue,
            missed_total: 0,
        }
    }

    pub(crate) fn publish(&self, event: &Event, size: usize) {
        let mut queues = self.queues.lock().unwrap_or_else(PoisonError::into_inner);
        queues.retain(|weak| match weak.upgrade() {
            Some(queue) => {
                queue.push(event, size);
                true
            }
            None => false,
        });
    }

    pub(crate) fn close(&self, cause: &Arc<Error>) {
        let mut queues = self.queues.lock().unwrap_or_else(PoisonError::into_inner);
        {
            let mut closed = self.closed.lock().unwrap_or_else(PoisonError::into_inner);
            if closed.is_none() {
                *closed = Some(Arc::clone(cause));
            }
        }
        for queue in queues.drain(..).filter_map(|w| w.upgrade()) {
            queue.close(cause);
        }
    }
}

/// A subscriber's stream of events. Ends (`None`) when the connection is
/// closed and every queued event has been taken. Dropping it unsubscribes.
#[derive(Debug)]
pub struct Events {
    queue: Arc<EventQueue>,
    missed_total: u64,
}

impl Events {
    /// Next event or gap notice, waiting as long as needed. `None` once the
    /// connection is closed and the queue is drained.
    ///
    /// Cancel-safe: dropping the future loses nothing.
    pub async fn recv(&mut self) -> Option<Delivery> {
        loop {
            if let Some(taken) = self.try_take() {
                return taken;
            }
            self.queue.notify.notified().await;
        }
    }

    /// Next delivery if one is queued right now.
    pub fn try_recv(&mut self) -> Option<Delivery> {
        self.try_take().flatten()
    }

    /// `Some(Some(d))`: a delivery; `Some(None)`: closed and drained;
    /// `None`: nothing yet.
    fn try_take(&mut self) -> Option<Option<Delivery>> {
        let mut st = self.queue.lock();
        if st.missed_pending > 0 {
            let n = std::mem::take(&mut st.missed_pending);
            self.missed_total += n;
            return Some(Some(Delivery::Missed(n)));
        }
        if let Some((event, size)) = st.items.pop_front() {
            st.bytes -= size;
            return Some(Some(Delivery::Event(event)));
        }
        if st.closed.is_some() {
            return Some(None);
        }
        None
    }

    /// Next event, skipping gap notices (they still count in
    /// [`Events::missed_total`]).
    pub async fn next_event(&mut self) -> Option<Event> {
        loop {
            match self.recv().await? {
                Delivery::Event(e) => return Some(e),
                Delivery::Missed(_) => {}
            }
        }
    }

    /// Events this subscriber lost to overflow so far (counted when the gap
    /// notice is delivered).
    pub fn missed_total(&self) -> u64 {
        self.missed_total
    }

    /// Why the connection ended, once it has.
    pub fn close_cause(&self) -> Option<Arc<Error>> {
        self.queue.lock().closed.clone()
    }

    /// Wait until an event matching `pred` arrives, at most `timeout`.
    /// `what` names the wait in errors. Gaps are skipped: a caller that must
    /// not miss its event should also poll the state it waits for (as the
    /// crate's own helpers do).
    pub async fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&Event) -> bool,
    ) -> Result<Event> {
        let deadline = Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.next_event()).await {
                Err(_) => {
                    return Err(Error::WaitTimeout {
                        what: what.to_owned(),
                        timeout,
                    })
                }
                Ok(None) => return Err(self.lost(what)),
                Ok(Some(e)) if pred(&e) => return Ok(e),
                Ok(Some(_)) => {}
            }
        }
    }

    pub(crate) fn lost(&self, what: &str) -> Error {
        Error::ConnectionLost {
            command: format!("waiting for {what}"),
            cause: self
                .close_cause()
                .unwrap_or_else(|| Arc::new(Error::ClientShutdown)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(n: usize) -> Event {
        Event {
            name: format!("E{n}"),
            data: Value::Null,
            timestamp: None,
        }
    }

    #[tokio::test]
    async fn overflow_drops_oldest_and_reports_gap() {
        let subs = Subscribers::default();
        let mut events = subs.subscribe(QueueLimits {
            max_events: 3,
            max_bytes: 1 << 20,
        });
        for n in 0..10 {
            subs.publish(&ev(n), 10);
        }
        assert_eq!(events.recv().await, Some(Delivery::Missed(7)));
        for n in 7..10 {
            assert_eq!(events.recv().await, Some(Delivery::Event(ev(n))));
        }
        assert_eq!(events.missed_total(), 7);
        assert_eq!(events.try_recv(), None);
        subs.close(&Arc::new(Error::Eof));
        assert_eq!(events.recv().await, None);
        assert!(matches!(events.close_cause().as_deref(), Some(Error::Eof)));
    }

    #[tokio::test]
    async fn byte_budget_bounds_queue() {
        let subs = Subscribers::default();
        let mut events = subs.subscribe(QueueLimits {
            max_events: 1000,
            max_bytes: 100,
        });
        for n in 0..10 {
            subs.publish(&ev(n), 40);
        }
        // Two 40-byte events fit in 100 bytes.
        assert_eq!(events.recv().await, Some(Delivery::Missed(8)));
        assert_eq!(events.recv().await, Some(Delivery::Event(ev(8))));
        assert_eq!(events.recv().await, Some(Delivery::Event(ev(9))));
    }

    #[tokio::test]
    async fn subscribe_after_close_ends_immediately_and_drop_unsubscribes() {
        let subs = Subscribers::default();
        let limits = QueueLimits {
            max_events: 4,
            max_bytes: 1024,
        };
        let dropped = subs.subscribe(limits);
        drop(dropped);
        subs.publish(&ev(0), 1);
        assert!(subs.queues.lock().unwrap().is_empty());
        subs.close(&Arc::new(Error::Eof));
        let mut late = subs.subscribe(limits);
        assert_eq!(late.recv().await, None);
        let err = late
            .wait_for("x", Duration::from_secs(5), |_| true)
            .await
            .unwrap_err();
        assert!(err.is_retryable(), "{err:?}");
    }

    #[test]
    fn kind_parses_known_and_tolerates_unknown() {
        let e = Event::from_object(
            serde_json::json!({"event":"JOB_STATUS_CHANGE","data":{"id":"j","status":"brand-new"}})
                .as_object()
                .unwrap()
                .clone(),
        );
        assert_eq!(
            e.kind(),
            EventKind::JobStatusChange {
                id: "j".into(),
                status: JobStatus::Other("brand-new".into())
            }
        );
        let e = Event::from_object(
            serde_json::json!({"event":"BLOCK_EXPORT_DELETED","data":{"id":5}})
                .as_object()
                .unwrap()
                .clone(),
        );
        assert_eq!(e.kind(), EventKind::Other);
        assert!(e.timestamp.is_none());
    }
}
