//! Warm instances: an instance that finished a call cleanly is kept for the
//! next call of the same plugin version and the same app, so that call skips
//! instantiation and the memory reset that follows a fresh instance.
//!
//! What keeps this safe:
//! - the key is (plugin version, app): an instance never sees another app's
//!   events, and a reloaded plugin never reuses the old version's instances;
//! - an instance goes back only after a clean return (a decision or the
//!   plugin's own error) with nothing on stderr; a trap, timeout, fuel or
//!   memory limit, or a bad decision retires it;
//! - it is retired after `max_reuse` calls, and once its linear memory has
//!   grown past half of its cap (so a leak is recycled, not fatal);
//! - every call gets its own deadline, fuel budget and log allowance.
//!
//! The pool holds at most `capacity` idle instances over all plugins and
//! apps, and at most `per_app` of one app's (its share of instances, so one
//! app cannot push every other app's warm instances out); when either is
//! full, the least recently used one (of that app, or of all) is dropped. Idle instances have
//! their own room in the engine's instance pool, so they never keep a call
//! from instantiating.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use wasmtime::Store;

use super::bindings::PluginWorld;
use super::state::State;

/// A live instance and the store that owns it.
pub(super) struct Warm {
    pub store: Store<State>,
    pub instance: PluginWorld,
    /// Calls this instance has served.
    pub calls: u32,
}

#[derive(Clone, PartialEq, Eq)]
struct Key {
    plugin: u64,
    app: Arc<str>,
}

/// Idle instances, oldest first.
pub(super) struct WarmPool {
    capacity: usize,
    per_app: usize,
    idle: Mutex<VecDeque<(Key, Warm)>>,
}

impl WarmPool {
    pub fn new(capacity: usize, per_app: usize) -> Self {
        WarmPool {
            capacity,
            per_app: per_app.max(1),
            idle: Mutex::new(VecDeque::new()),
        }
    }

    /// The most recently returned idle instance of this plugin version for
    /// this app, if any.
    pub fn take(&self, plugin: u64, app: &str) -> Option<Warm> {
        let mut idle = self.lock();
        let at = idle
            .iter()
            .rposition(|(k, _)| k.plugin == plugin && *k.app == *app)?;
        idle.remove(at).map(|(_, warm)| warm)
    }

    /// Keeps an instance for later; drops the least recently used one when
    /// the pool is full (outside the lock: dropping a store resets memory).
    pub fn put(&self, plugin: u64, app: Arc<str>, warm: Warm) {
        if self.capacity == 0 {
            return;
        }
        let evicted = {
            let mut idle = self.lock();
            let mine = idle.iter().filter(|(k, _)| k.app == app).count();
            let out = if mine >= self.per_app {
                let at = idle.iter().position(|(k, _)| k.app == app);
                at.and_then(|at| idle.remove(at))
            } else if idle.len() >= self.capacity {
                idle.pop_front()
            } else {
                None
            };
            idle.push_back((Key { plugin, app }, warm));
            out
        };
        drop(evicted);
    }

    /// Drops every idle instance of a plugin version (it was replaced or
    /// removed).
    pub fn purge(&self, plugin: u64) {
        let purged: VecDeque<_> = {
            let mut idle = self.lock();
            let (gone, kept) = std::mem::take(&mut *idle)
                .into_iter()
                .partition(|(k, _)| k.plugin == plugin);
            *idle = kept;
            gone
        };
        drop(purged);
    }

    /// Idle instances held, over all plugins and apps.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<(Key, Warm)>> {
        // Nothing panics while holding the lock; recover the data if it did.
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }
}
