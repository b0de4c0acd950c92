//! The delivery client's resolver: resolves with the system resolver and
//! hands the connector only the addresses the guard allows.
//!
//! Blocked addresses are filtered out; when none remain, resolution fails
//! with [`Blocked`] (the first blocked address) as its error, which the
//! delivery finds in the error's source chain. Because the connector can
//! only connect to what this returns, a name that resolves to a blocked
//! address is refused however it got there (DNS rebinding included), while
//! a name with both public and blocked addresses (`localhost` when only
//! 127.0.0.0/8 is allowed, say) is connected to its allowed ones.

use std::net::SocketAddr;
use std::sync::Arc;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

use super::{Blocked, NetGuard};

pub struct GuardedResolver {
    guard: Arc<NetGuard>,
    /// The outbound proxy's host name: the operator's own, so not judged.
    exempt: Option<String>,
}

impl GuardedResolver {
    pub fn new(guard: Arc<NetGuard>, exempt: Option<String>) -> Self {
        GuardedResolver {
            guard,
            exempt: exempt.map(|h| h.to_ascii_lowercase()),
        }
    }
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let guard = self.guard.clone();
        let host = name.as_str().to_ascii_lowercase();
        let exempt = self.exempt.as_deref() == Some(host.as_str());
        Box::pin(async move {
            // Port 0: the connector puts in the URL's port.
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if exempt {
                return Ok(Box::new(found.into_iter()) as Addrs);
            }
            let (allowed, first_blocked) = filter(&guard, &host, found);
            match (allowed.is_empty(), first_blocked) {
                (true, Some(blocked)) => Err(Box::new(blocked) as _),
                _ => Ok(Box::new(allowed.into_iter()) as Addrs),
            }
        })
    }
}

/// The allowed addresses, and the first blocked one (named after `host`).
fn filter(
    guard: &NetGuard,
    host: &str,
    found: Vec<SocketAddr>,
) -> (Vec<SocketAddr>, Option<Blocked>) {
    let mut first_blocked = None;
    let allowed = found
        .into_iter()
        .filter(|addr| match guard.check(addr.ip()) {
            Ok(()) => true,
            Err(mut blocked) => {
                blocked.host = Some(host.to_string());
                first_blocked.get_or_insert(blocked);
                false
            }
        })
        .collect();
    (allowed, first_blocked)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_allowed_addresses_and_reports_the_first_blocked() {
        let guard = NetGuard::default();
        let found: Vec<SocketAddr> = vec![
            "10.0.0.5:0".parse().unwrap(),
            "93.184.215.14:0".parse().unwrap(),
            "[::1]:0".parse().unwrap(),
        ];
        let (allowed, blocked) = filter(&guard, "mixed.example", found);
        assert_eq!(allowed, vec!["93.184.215.14:0".parse().unwrap()]);
        assert_eq!(
            blocked.unwrap().to_string(),
            "blocked: mixed.example (10.0.0.5) is a private address"
        );
    }

    #[tokio::test]
    async fn a_name_for_loopback_is_refused_with_the_guards_reason() {
        let resolver = GuardedResolver::new(Arc::new(NetGuard::default()), None);
        let err = match resolver.resolve("localhost".parse().unwrap()).await {
            Ok(addrs) => panic!("resolved: {:?}", addrs.collect::<Vec<_>>()),
            Err(e) => e,
        };
        let blocked = err.downcast_ref::<Blocked>().expect("a Blocked error");
        assert_eq!(blocked.host.as_deref(), Some("localhost"));
        assert!(blocked.addr.is_loopback(), "{blocked}");
    }

    #[tokio::test]
    async fn allowed_networks_pass_and_an_exempt_name_is_not_judged() {
        let loopback = NetGuard::new(vec!["127.0.0.0/8".parse().unwrap()]);
        let resolver = GuardedResolver::new(Arc::new(loopback), None);
        let addrs: Vec<SocketAddr> = resolver
            .resolve("localhost".parse().unwrap())
            .await
            .unwrap()
            .collect();
        assert!(!addrs.is_empty());
        assert!(addrs.iter().all(|a| a.is_ipv4() && a.ip().is_loopback()));

        let exempt = GuardedResolver::new(Arc::new(NetGuard::default()), Some("LocalHost".into()));
        let addrs: Vec<SocketAddr> = exempt
            .resolve("localhost".parse().unwrap())
            .await
            .unwrap()
            .collect();
        assert!(addrs.iter().any(|a| a.ip().is_loopback()));
    }
}
