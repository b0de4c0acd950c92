//! Admission to the instance pool, fair between apps.
//!
//! A call needs two permits: one of its app's share (`app_max_instances`)
//! and one of the engine's calls in flight (`max_instances`). The app permit
//! is taken first, so an app over its share waits on its own semaphore and
//! never holds an engine permit another app could use. (Idle warm
//! instances have their own room in the instance pool, and the warm pool
//! keeps at most a share of them per app: see [`super::warm`].)
//!
//! Calls wait rather than fail: no app can make another app's calls fail,
//! and an app can make another wait only for an engine permit, of which it
//! holds at most its share.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, SemaphorePermit};

pub(super) struct Slots {
    engine: Semaphore,
    share: usize,
    apps: Mutex<HashMap<Arc<str>, Arc<Semaphore>>>,
}

/// A permit of one app's share.
pub(super) type AppPermit = OwnedSemaphorePermit;

impl Slots {
    pub fn new(max_instances: usize, app_share: usize) -> Self {
        Slots {
            engine: Semaphore::new(max_instances),
            share: app_share.clamp(1, max_instances.max(1)),
            apps: Mutex::new(HashMap::new()),
        }
    }

    /// The app's semaphore (made on first use; apps come from the config).
    fn app(&self, app: &str) -> Arc<Semaphore> {
        let mut apps = self.apps.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = apps.get(app) {
            return s.clone();
        }
        let s = Arc::new(Semaphore::new(self.share));
        apps.insert(app.into(), s.clone());
        s
    }

    /// A permit of the app's share, once one is free.
    pub async fn app_permit(&self, app: &str) -> AppPermit {
        self.app(app)
            .acquire_owned()
            .await
            .expect("the app semaphores are never closed")
    }

    /// A permit of the engine's calls in flight.
    pub async fn engine_permit(&self) -> SemaphorePermit<'_> {
        self.engine
            .acquire()
            .await
            .expect("the engine semaphore is never closed")
    }

    /// Permits of the app's share now free.
    #[cfg(test)]
    pub fn app_available(&self, app: &str) -> usize {
        self.app(app).available_permits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn an_app_over_its_share_waits_while_others_go() {
        let slots = Slots::new(8, 2);
        let a1 = slots.app_permit("a").await;
        let _a2 = slots.app_permit("a").await;
        assert_eq!(slots.app_available("a"), 0);
        // Another app is not held up by a's share.
        let b = tokio::time::timeout(Duration::from_secs(1), slots.app_permit("b")).await;
        assert!(b.is_ok());
        // A third call of a waits until one is given back.
        let third = tokio::time::timeout(Duration::from_millis(50), slots.app_permit("a")).await;
        assert!(third.is_err());
        drop(a1);
        let third = tokio::time::timeout(Duration::from_secs(1), slots.app_permit("a")).await;
        assert!(third.is_ok());
    }

    #[test]
    fn the_share_is_at_least_one_and_at_most_the_pool() {
        assert_eq!(Slots::new(4, 0).share, 1);
        assert_eq!(Slots::new(4, 100).share, 4);
    }
}
