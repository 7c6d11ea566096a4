//! The connection cap: every open connection has a slot, oldest first; at
//! the cap, the idle one (no request being answered) open longest is closed
//! before the next connection is accepted, and closing ones count until
//! their descriptor is gone, so held-open connections never shut out the
//! probes and the process never runs out of descriptors for them.

use std::sync::Arc;

/// The open connections, oldest first, for the cap.
pub(super) struct Connections {
    cap: usize,
    open: std::sync::Mutex<std::collections::BTreeMap<u64, Arc<ConnSlot>>>,
    /// Evicted connections whose task has not closed them yet: they still
    /// hold a descriptor, so they count against the cap.
    closing: std::sync::atomic::AtomicUsize,
    next: std::sync::atomic::AtomicU64,
    /// The cap was reached and open connections have not fallen below
    /// three quarters of it since: one log line per episode.
    at_cap: std::sync::atomic::AtomicBool,
    /// Signalled whenever a connection closes.
    closed: tokio::sync::Notify,
    metrics: crate::metrics::ConnectionMetrics,
}

/// One open connection.
pub(super) struct ConnSlot {
    pub(super) id: u64,
    /// Requests being answered on it.
    pub(super) busy: std::sync::atomic::AtomicUsize,
    /// Close it now (it was idle when chosen).
    pub(super) evict: tokio::sync::Notify,
}

/// A request being answered on a connection.
pub(super) struct Busy(Arc<ConnSlot>);

impl Busy {
    pub(super) fn enter(slot: &Arc<ConnSlot>) -> Busy {
        slot.busy.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Busy(slot.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0
            .busy
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

impl Connections {
    pub(super) fn new(cap: usize, metrics: crate::metrics::ConnectionMetrics) -> Connections {
        Connections {
            cap: cap.max(1),
            open: std::sync::Mutex::new(std::collections::BTreeMap::new()),
            closing: std::sync::atomic::AtomicUsize::new(0),
            next: std::sync::atomic::AtomicU64::new(0),
            at_cap: std::sync::atomic::AtomicBool::new(false),
            closed: tokio::sync::Notify::new(),
            metrics,
        }
    }

    pub(super) fn open(&self) -> usize {
        self.open.lock().map_or(0, |o| o.len())
    }

    /// Take a slot for a connection just accepted.
    pub(super) fn admit(&self) -> Arc<ConnSlot> {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let slot = Arc::new(ConnSlot {
            id,
            busy: std::sync::atomic::AtomicUsize::new(0),
            evict: tokio::sync::Notify::new(),
        });
        if let Ok(mut open) = self.open.lock() {
            open.insert(id, slot.clone());
            self.metrics
                .open
                .set(i64::try_from(open.len()).unwrap_or(i64::MAX));
        }
        slot
    }

    /// Resolves once one more connection fits under the cap: at the cap it
    /// closes the idle connection open longest (one at a time) and waits
    /// for it, or for any connection, to go.
    pub(super) async fn room(&self) {
        use std::sync::atomic::Ordering;
        loop {
            let closed = self.closed.notified();
            {
                let Ok(mut open) = self.open.lock() else {
                    return;
                };
                let closing = self.closing.load(Ordering::Acquire);
                if open.len() + closing < self.cap {
                    return;
                }
                if !self.at_cap.swap(true, Ordering::AcqRel) {
                    self.metrics.limit_reached.inc();
                    tracing::warn!(
                        max_connections = self.cap,
                        "connection limit reached: each new connection closes the idle one open longest \
                         (`[http] max_connections`; logged once until the load falls)"
                    );
                }
                if closing == 0 {
                    let idle = open
                        .iter()
                        .find(|(_, c)| c.busy.load(Ordering::Acquire) == 0)
                        .map(|(id, _)| *id);
                    if let Some(victim) = idle.and_then(|id| open.remove(&id)) {
                        self.closing.fetch_add(1, Ordering::AcqRel);
                        victim.evict.notify_one();
                        self.metrics.evicted.inc();
                    }
                }
            }
            closed.await;
        }
    }

    pub(super) fn close(&self, id: u64) {
        use std::sync::atomic::Ordering;
        if let Ok(mut open) = self.open.lock() {
            if open.remove(&id).is_none() {
                // An evicted one.
                self.closing.fetch_sub(1, Ordering::AcqRel);
            }
            self.metrics
                .open
                .set(i64::try_from(open.len()).unwrap_or(i64::MAX));
            if open.len() < self.cap * 3 / 4 {
                self.at_cap.store(false, Ordering::Release);
            }
        }
        self.closed.notify_waiters();
    }

    /// Resolves once no connection is open.
    pub(super) async fn all_closed(&self) {
        loop {
            let closed = self.closed.notified();
            if self.open() == 0 && self.closing.load(std::sync::atomic::Ordering::Acquire) == 0 {
                return;
            }
            closed.await;
        }
    }
}
