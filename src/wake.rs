//! A set of task wakers woken together.

use std::sync::{Arc, Mutex};
use std::task::{Wake, Waker};

/// Tasks waiting for one event, each registered once, all woken by it. As
/// a [`Waker`] itself (through `Arc`), waking it wakes them all.
#[derive(Debug, Default)]
pub(crate) struct WakerSet(Mutex<Vec<Waker>>);

impl WakerSet {
    /// Registers `waker` for the next [`wake_all`](Self::wake_all).
    pub(crate) fn add(&self, waker: &Waker) {
        let mut list = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if !list.iter().any(|w| w.will_wake(waker)) {
            list.push(waker.clone());
        }
    }

    /// Wakes, and forgets, every registered task (outside the lock).
    pub(crate) fn wake_all(&self) {
        let list = std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()));
        for w in list {
            w.wake();
        }
    }
}

impl Wake for WakerSet {
    fn wake(self: Arc<Self>) {
        self.wake_all();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.wake_all();
    }
}
