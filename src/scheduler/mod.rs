//! A worker's slots: how many jobs it has in flight, for each app and each
//! endpoint, against their caps. The queue's `take` is told how much room is
//! left, so a slow endpoint never holds more than its `max_in_flight` of a
//! worker's slots and no app more than its own cap; the jobs beyond wait in
//! the queue, holding no slot, task or connection.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use crate::app::Apps;
use crate::queue::TakeRequest;

/// Caps from the config; replaced whole on a reload.
#[derive(Debug, Default)]
pub struct Caps {
    pub app_default: usize,
    pub endpoint_default: usize,
    pub apps: HashMap<String, usize>,
    pub endpoints: HashMap<(String, String), usize>,
    /// Endpoints with a rate limit: their jobs always go through the queue.
    pub limited: HashSet<(String, String)>,
    /// Each app's endpoints.
    pub app_endpoints: HashMap<String, Vec<String>>,
    /// Batched endpoints: their `max_events`.
    pub batched: HashMap<(String, String), usize>,
}

impl Caps {
    pub fn from_apps(apps: &Apps, app_default: usize, endpoint_default: usize) -> Caps {
        let mut caps = Caps {
            app_default,
            endpoint_default,
            ..Caps::default()
        };
        for app in apps.iter() {
            caps.app_endpoints.insert(
                app.id.clone(),
                app.endpoints.iter().map(|e| e.id.clone()).collect(),
            );
            if app.max_in_flight != app_default {
                caps.apps.insert(app.id.clone(), app.max_in_flight);
            }
            for e in &app.endpoints {
                let key = (app.id.clone(), e.id.clone());
                if e.max_in_flight != endpoint_default {
                    caps.endpoints.insert(key.clone(), e.max_in_flight);
                }
                if let Some(b) = e.batch {
                    caps.batched.insert(key.clone(), b.max_events);
                }
                if e.rate_limit.is_some() {
                    caps.limited.insert(key);
                }
            }
        }
        caps
    }

    fn app(&self, app: &str) -> usize {
        self.apps.get(app).copied().unwrap_or(self.app_default)
    }

    fn endpoint(&self, key: &(String, String)) -> usize {
        self.endpoints
            .get(key)
            .copied()
            .unwrap_or(self.endpoint_default)
    }
}

#[derive(Default)]
struct Counts {
    total: usize,
    apps: HashMap<String, usize>,
    /// New events taken and not yet routed to an endpoint, per app.
    routing: HashMap<String, usize>,
    endpoints: HashMap<(String, String), usize>,
    caps: Caps,
}

pub struct Scheduler {
    slots: usize,
    counts: Mutex<Counts>,
    released: Notify,
}

impl Scheduler {
    pub fn new(slots: usize, caps: Caps) -> Arc<Scheduler> {
        Arc::new(Scheduler {
            slots,
            counts: Mutex::new(Counts {
                caps,
                ..Counts::default()
            }),
            released: Notify::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn replace_caps(&self, caps: Caps) {
        self.lock().caps = caps;
    }

    pub fn in_flight(&self) -> usize {
        self.lock().total
    }

    /// Slots not holding a job.
    pub fn free(&self) -> usize {
        self.slots.saturating_sub(self.lock().total)
    }

    /// What to ask the queue for: the free slots, and the room left for the
    /// apps and endpoints that have jobs in flight here.
    pub fn request(&self) -> TakeRequest {
        let c = self.lock();
        // What routing can hand an endpoint: its room here; for a batched
        // endpoint (whose events always wait in its partition to be batched),
        // a batch's worth per slot of its cap, in flight or not, so that its
        // batches in flight do not stop the events that fill the next ones.
        let endpoint_room = |app: &String, e: &String| {
            let key = (app.clone(), e.clone());
            if let Some(events) = c.caps.batched.get(&key) {
                return c.caps.endpoint(&key).saturating_mul(*events);
            }
            let n = c.endpoints.get(&key).copied().unwrap_or(0);
            c.caps.endpoint(&key).saturating_sub(n)
        };
        TakeRequest {
            max: self.slots.saturating_sub(c.total),
            intake_room: c
                .apps
                .keys()
                .map(|app| {
                    let room: usize = c
                        .caps
                        .app_endpoints
                        .get(app)
                        .map_or(0, |eps| eps.iter().map(|e| endpoint_room(app, e)).sum());
                    // New events being routed will take some of it.
                    let routing = c.routing.get(app).copied().unwrap_or(0);
                    (app.clone(), room.saturating_sub(routing))
                })
                .collect(),
            app_room: c
                .apps
                .iter()
                .map(|(app, n)| (app.clone(), c.caps.app(app).saturating_sub(*n)))
                .collect(),
            endpoint_room: c
                .endpoints
                .iter()
                .map(|(key, n)| (key.clone(), c.caps.endpoint(key).saturating_sub(*n)))
                .collect(),
        }
    }

    /// A slot for a job the queue handed out: counted against its app, and
    /// against its endpoint when it came from the endpoint's partition.
    pub fn admit(self: &Arc<Self>, app: &str, endpoint: Option<&str>) -> Slot {
        let mut c = self.lock();
        c.total += 1;
        *c.apps.entry(app.to_string()).or_default() += 1;
        let endpoint = endpoint.map(|e| {
            let key = (app.to_string(), e.to_string());
            *c.endpoints.entry(key.clone()).or_default() += 1;
            key
        });
        let routing = endpoint.is_none();
        if routing {
            *c.routing.entry(app.to_string()).or_default() += 1;
        }
        Slot {
            scheduler: self.clone(),
            app: app.to_string(),
            endpoint,
            routing,
        }
    }

    /// Returns once some slot was given back since the last call.
    pub async fn released(&self) {
        self.released.notified().await
    }

    fn release(&self, app: &str, endpoint: Option<&(String, String)>, routing: bool) {
        let mut c = self.lock();
        c.total = c.total.saturating_sub(1);
        decrement(&mut c.apps, app);
        if routing {
            decrement(&mut c.routing, app);
        }
        if let Some(key) = endpoint {
            decrement(&mut c.endpoints, key);
        }
        drop(c);
        self.released.notify_one();
    }
}

fn decrement<K: std::hash::Hash + Eq + ?Sized, Q>(map: &mut HashMap<Q, usize>, key: &K)
where
    Q: std::borrow::Borrow<K> + std::hash::Hash + Eq,
{
    if let Some(n) = map.get_mut(key) {
        *n -= 1;
        if *n == 0 {
            map.remove(key);
        }
    }
}

/// One job's hold on the worker's capacity; given back on drop.
pub struct Slot {
    scheduler: Arc<Scheduler>,
    app: String,
    endpoint: Option<(String, String)>,
    /// A new event not yet routed (counted in `Counts::routing`).
    routing: bool,
}

impl Slot {
    /// For a new event routed to one endpoint: may it be delivered at once,
    /// within this slot? Only when the endpoint has room here, is not busy
    /// fleet-wide (jobs waiting, held, breaker not closed) and has no rate
    /// limit (those always go through the queue). On yes the endpoint is
    /// counted until the slot is dropped.
    pub fn try_endpoint(&mut self, endpoint: &str, busy: bool) -> bool {
        let mut c = self.scheduler.lock();
        if self.routing {
            // Routed, whatever comes of it.
            self.routing = false;
            decrement(&mut c.routing, &self.app);
        }
        if busy || self.endpoint.is_some() {
            return false;
        }
        let key = (self.app.clone(), endpoint.to_string());
        if c.caps.limited.contains(&key) {
            return false;
        }
        let n = c.endpoints.get(&key).copied().unwrap_or(0);
        if n >= c.caps.endpoint(&key) {
            return false;
        }
        *c.endpoints.entry(key.clone()).or_default() += 1;
        drop(c);
        self.endpoint = Some(key);
        true
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.scheduler
            .release(&self.app, self.endpoint.as_ref(), self.routing);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps() -> Caps {
        let mut caps = Caps {
            app_default: 3,
            endpoint_default: 2,
            ..Caps::default()
        };
        caps.endpoints.insert(("a".into(), "one".into()), 1);
        caps.limited.insert(("a".into(), "limited".into()));
        caps
    }

    #[test]
    fn room_shrinks_as_slots_are_taken_and_grows_back_on_drop() {
        let s = Scheduler::new(10, caps());
        assert_eq!(s.request().max, 10);
        assert!(s.request().app_room.is_empty());
        let a = s.admit("a", Some("x"));
        let b = s.admit("a", None);
        let r = s.request();
        assert_eq!(r.max, 8);
        assert_eq!(r.app_room, vec![("a".to_string(), 1)]);
        assert_eq!(r.endpoint_room, vec![(("a".into(), "x".into()), 1)]);
        drop(a);
        drop(b);
        let r = s.request();
        assert_eq!((r.max, r.app_room.len(), r.endpoint_room.len()), (10, 0, 0));
        assert_eq!(s.in_flight(), 0);
    }

    #[test]
    fn new_events_are_asked_for_only_as_far_as_their_endpoints_have_room() {
        let mut caps = caps();
        caps.app_endpoints
            .insert("a".into(), vec!["one".into(), "two".into()]);
        let s = Scheduler::new(10, caps);
        let intake = |s: &Scheduler| s.request().intake_room;
        let mut routing = s.admit("a", None);
        // one (cap 1) + two (cap 2), less the event being routed.
        assert_eq!(intake(&s), vec![("a".to_string(), 2)]);
        assert!(routing.try_endpoint("one", false));
        assert_eq!(
            intake(&s),
            vec![("a".to_string(), 2)],
            "routed: it holds `one` now"
        );
        let other = s.admit("a", Some("two"));
        assert_eq!(intake(&s), vec![("a".to_string(), 1)]);
        drop((routing, other));
        assert!(
            intake(&s).is_empty(),
            "nothing in flight: the queue's caps apply"
        );
    }

    #[test]
    fn batches_in_flight_do_not_stop_the_events_that_fill_the_next_ones() {
        let mut caps = caps();
        caps.app_endpoints.insert("a".into(), vec!["b".into()]);
        caps.batched.insert(("a".into(), "b".into()), 100);
        let s = Scheduler::new(10, caps);
        let full: Vec<Slot> = (0..2).map(|_| s.admit("a", Some("b"))).collect();
        assert_eq!(
            s.request().endpoint_room,
            vec![(("a".into(), "b".into()), 0)],
            "its two batches fill the endpoint's cap"
        );
        assert_eq!(
            s.request().intake_room,
            vec![("a".to_string(), 200)],
            "a batch's worth of new events per slot of its cap"
        );
        drop(full);
    }

    #[test]
    fn an_inline_delivery_needs_room_and_a_quiet_unlimited_endpoint() {
        let s = Scheduler::new(10, caps());
        let mut first = s.admit("a", None);
        assert!(first.try_endpoint("one", false));
        let mut second = s.admit("a", None);
        assert!(!second.try_endpoint("one", false), "cap 1 is taken");
        assert!(!second.try_endpoint("two", true), "busy fleet-wide");
        assert!(!second.try_endpoint("limited", false), "rate-limited");
        assert!(second.try_endpoint("two", false));
        assert!(
            !second.try_endpoint("three", false),
            "one endpoint per slot"
        );
        drop(first);
        let mut third = s.admit("a", None);
        assert!(
            third.try_endpoint("one", false),
            "room again after the drop"
        );
    }
}
