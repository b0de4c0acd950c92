//! wasmhook: a webhook processor. Producers put events on a durable queue
//! (Redis, or the HTTP ingest); workers take each job through the pipeline
//! (plugins, routing), sign it and deliver it over HTTP, retrying with backoff
//! until it lands or is dead-lettered.
//!
//! The flow, module by module (ARCHITECTURE.md has the long form):
//! [`ingest`] → [`queue`] → [`worker`] ([`scheduler`]) → [`pipeline`] → [`signing`] →
//! [`delivery`]; [`breaker`] and [`ratelimit`] guard endpoints; [`netguard`]
//! keeps deliveries off internal networks; [`metrics`] counts what happens.

pub mod app;
pub mod breaker;
pub mod cli;
pub mod config;
pub mod delivery;
pub mod event;
pub mod ingest;
pub mod metrics;
pub mod netguard;
pub mod pipeline;
pub mod plugin;
pub mod producer;
pub mod queue;
pub mod ratelimit;
pub mod scheduler;
pub mod service;
pub mod signing;
pub mod telemetry;
pub mod worker;

/// rustls (HTTPS deliveries, rediss://) needs one process-wide crypto
/// provider; ring is the one built in. Installing it again is a no-op.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// mimalloc instead of the system allocator: the delivery path allocates a
/// lot of small, short-lived buffers, and glibc's malloc was a quarter of the
/// worker's time (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
