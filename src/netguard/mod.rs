//! The network guard: which addresses a delivery may reach.
//!
//! Endpoint URLs come from tenants, so by default a delivery may only reach
//! public unicast addresses: loopback, private, link-local, shared (CGNAT),
//! multicast, documentation, reserved and the other special-purpose ranges
//! are refused, and so are IPv6 addresses that carry such an IPv4 address
//! (IPv4-mapped, -compatible, -translated, NAT64, 6to4). The operator can
//! re-allow networks (`delivery.allow_networks`).
//!
//! The guard is applied where the address is final: [`GuardedResolver`] on
//! the delivery client's connections (so a name that resolves, or later
//! re-resolves, to a blocked address is refused), and [`NetGuard::check_url`]
//! for what no resolver sees: IP literals in URLs and names that are loopback
//! or metadata by definition (`localhost`, `metadata.google.internal`).

mod resolve;

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

pub use self::resolve::GuardedResolver;

/// The kind of special-purpose address that is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Range {
    /// 0.0.0.0, `::`
    Unspecified,
    /// 0.0.0.0/8
    ThisNetwork,
    /// 127.0.0.0/8, `::1`
    Loopback,
    /// 10/8, 172.16/12, 192.168/16
    Private,
    /// 100.64.0.0/10 (carrier-grade NAT)
    Shared,
    /// 169.254.0.0/16, fe80::/10
    LinkLocal,
    /// 192.0.0.0/24
    IetfProtocol,
    /// 192.0.2/24, 198.51.100/24, 203.0.113/24, 2001:db8::/32, 3fff::/20
    Documentation,
    /// 198.18.0.0/15, 2001:2::/48
    Benchmarking,
    /// 224.0.0.0/4, ff00::/8
    Multicast,
    /// 255.255.255.255
    Broadcast,
    /// 240.0.0.0/4; IPv6 outside 2000::/3 not named otherwise
    Reserved,
    /// fc00::/7
    UniqueLocal,
    /// fec0::/10
    SiteLocal,
    /// 100::/64
    Discard,
    /// 2001::/32
    Teredo,
    /// 64:ff9b:1::/48
    LocalNat64,
    /// 2001:10::/28, 2001:20::/28
    Orchid,
}

impl Range {
    /// "a loopback address", as it reads after "is".
    pub fn phrase(self) -> &'static str {
        match self {
            Range::Unspecified => "the unspecified address",
            Range::ThisNetwork => "a \"this network\" address (0.0.0.0/8)",
            Range::Loopback => "a loopback address",
            Range::Private => "a private address",
            Range::Shared => "a shared (carrier-grade NAT) address",
            Range::LinkLocal => "a link-local address",
            Range::IetfProtocol => "an IETF protocol assignment address (192.0.0.0/24)",
            Range::Documentation => "a documentation address",
            Range::Benchmarking => "a benchmarking address",
            Range::Multicast => "a multicast address",
            Range::Broadcast => "the broadcast address",
            Range::Reserved => "a reserved address",
            Range::UniqueLocal => "a unique local address",
            Range::SiteLocal => "a site-local address",
            Range::Discard => "a discard-only address",
            Range::Teredo => "a Teredo address",
            Range::LocalNat64 => "a local-use NAT64 address",
            Range::Orchid => "an ORCHID address",
        }
    }
}

/// Why an address is refused: what it is, and the IPv4 address it carries
/// when that is what was judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Class {
    pub range: Range,
    pub embedded: Option<Ipv4Addr>,
}

/// A refused destination. Carried as the error of a refused connection, so
/// the delivery can tell it apart from other failures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocked {
    /// The host name, when the address came from one.
    pub host: Option<String>,
    pub addr: IpAddr,
    pub class: Class,
}

impl fmt::Display for Blocked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("blocked: ")?;
        match &self.host {
            Some(host) => write!(f, "{host} ({})", self.addr)?,
            None => write!(f, "{}", self.addr)?,
        }
        match self.class.embedded {
            Some(v4) => write!(f, " embeds {v4}, {}", self.class.range.phrase()),
            None => write!(f, " is {}", self.class.range.phrase()),
        }
    }
}

impl std::error::Error for Blocked {}

const fn v4(a: u8, b: u8, c: u8, d: u8, len: u8) -> Ipv4Net {
    Ipv4Net::new_assert(Ipv4Addr::new(a, b, c, d), len)
}

const fn v6(segments: [u16; 8], len: u8) -> Ipv6Net {
    let [a, b, c, d, e, f, g, h] = segments;
    Ipv6Net::new_assert(Ipv6Addr::new(a, b, c, d, e, f, g, h), len)
}

/// Refused IPv4 ranges; the first match names the reason.
const V4_BLOCKED: &[(Ipv4Net, Range)] = &[
    (v4(0, 0, 0, 0, 32), Range::Unspecified),
    (v4(0, 0, 0, 0, 8), Range::ThisNetwork),
    (v4(10, 0, 0, 0, 8), Range::Private),
    (v4(100, 64, 0, 0, 10), Range::Shared),
    (v4(127, 0, 0, 0, 8), Range::Loopback),
    (v4(169, 254, 0, 0, 16), Range::LinkLocal),
    (v4(172, 16, 0, 0, 12), Range::Private),
    (v4(192, 0, 0, 0, 24), Range::IetfProtocol),
    (v4(192, 0, 2, 0, 24), Range::Documentation),
    (v4(192, 168, 0, 0, 16), Range::Private),
    (v4(198, 18, 0, 0, 15), Range::Benchmarking),
    (v4(198, 51, 100, 0, 24), Range::Documentation),
    (v4(203, 0, 113, 0, 24), Range::Documentation),
    (v4(224, 0, 0, 0, 4), Range::Multicast),
    (v4(255, 255, 255, 255, 32), Range::Broadcast),
    (v4(240, 0, 0, 0, 4), Range::Reserved),
];

/// Refused IPv6 ranges (after the forms that carry an IPv4 address); the
/// first match names the reason.
const V6_BLOCKED: &[(Ipv6Net, Range)] = &[
    (v6([0, 0, 0, 0, 0, 0, 0, 0], 128), Range::Unspecified),
    (v6([0, 0, 0, 0, 0, 0, 0, 1], 128), Range::Loopback),
    (v6([0x64, 0xff9b, 1, 0, 0, 0, 0, 0], 48), Range::LocalNat64),
    (v6([0x100, 0, 0, 0, 0, 0, 0, 0], 64), Range::Discard),
    (v6([0x2001, 0, 0, 0, 0, 0, 0, 0], 32), Range::Teredo),
    (v6([0x2001, 2, 0, 0, 0, 0, 0, 0], 48), Range::Benchmarking),
    (v6([0x2001, 0x10, 0, 0, 0, 0, 0, 0], 28), Range::Orchid),
    (v6([0x2001, 0x20, 0, 0, 0, 0, 0, 0], 28), Range::Orchid),
    (
        v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0], 32),
        Range::Documentation,
    ),
    (v6([0x3fff, 0, 0, 0, 0, 0, 0, 0], 20), Range::Documentation),
    (v6([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7), Range::UniqueLocal),
    (v6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10), Range::LinkLocal),
    (v6([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10), Range::SiteLocal),
    (v6([0xff00, 0, 0, 0, 0, 0, 0, 0], 8), Range::Multicast),
];

/// Global unicast: IPv6 outside it (and not named above) is reserved.
const V6_GLOBAL_UNICAST: Ipv6Net = v6([0x2000, 0, 0, 0, 0, 0, 0, 0], 3);

/// IPv6 forms that carry an IPv4 address, judged by that address.
const V6_MAPPED: Ipv6Net = v6([0, 0, 0, 0, 0, 0xffff, 0, 0], 96);
const V6_TRANSLATED: Ipv6Net = v6([0, 0, 0, 0, 0xffff, 0, 0, 0], 96);
const V6_COMPATIBLE: Ipv6Net = v6([0, 0, 0, 0, 0, 0, 0, 0], 96);
const V6_NAT64: Ipv6Net = v6([0x64, 0xff9b, 0, 0, 0, 0, 0, 0], 96);
const V6_6TO4: Ipv6Net = v6([0x2002, 0, 0, 0, 0, 0, 0, 0], 16);

/// Whether an address is special-purpose, and which kind; `None` for a
/// public unicast address. The allow list is not consulted.
pub fn classify(ip: IpAddr) -> Option<Class> {
    match ip {
        IpAddr::V4(ip) => classify_v4(ip).map(|range| Class {
            range,
            embedded: None,
        }),
        IpAddr::V6(ip) => classify_v6(ip),
    }
}

fn classify_v4(ip: Ipv4Addr) -> Option<Range> {
    V4_BLOCKED
        .iter()
        .find(|(net, _)| net.contains(&ip))
        .map(|(_, range)| *range)
}

fn classify_v6(ip: Ipv6Addr) -> Option<Class> {
    // `::` and `::1` sit inside the IPv4-compatible block; they are named
    // as themselves.
    if ip.is_unspecified() || ip.is_loopback() {
        return V6_BLOCKED
            .iter()
            .find(|(net, _)| net.contains(&ip))
            .map(|(_, range)| Class {
                range: *range,
                embedded: None,
            });
    }
    if let Some(embedded) = embedded_v4(ip) {
        return classify_v4(embedded).map(|range| Class {
            range,
            embedded: Some(embedded),
        });
    }
    let range = V6_BLOCKED
        .iter()
        .find(|(net, _)| net.contains(&ip))
        .map(|(_, range)| *range)
        .or_else(|| (!V6_GLOBAL_UNICAST.contains(&ip)).then_some(Range::Reserved))?;
    Some(Class {
        range,
        embedded: None,
    })
}

/// The IPv4 address an IPv6 address carries: the low 32 bits of the
/// mapped, translated, compatible and NAT64 (64:ff9b::/96) forms, bits 16
/// to 48 of 6to4.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let bits = u128::from(ip);
    if [V6_MAPPED, V6_TRANSLATED, V6_COMPATIBLE, V6_NAT64]
        .iter()
        .any(|net| net.contains(&ip))
    {
        return Some(Ipv4Addr::from(bits as u32));
    }
    if V6_6TO4.contains(&ip) {
        return Some(Ipv4Addr::from((bits >> 80) as u32));
    }
    None
}

/// Host names that are a special-purpose address by definition, checked
/// without a lookup (a proxy would otherwise resolve them for us): the
/// `localhost` names (RFC 6761) and cloud metadata services.
fn special_name(host: &str) -> Option<IpAddr> {
    let host = host.strip_suffix('.').unwrap_or(host);
    if host == "localhost" || host.ends_with(".localhost") {
        return Some(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    const METADATA: &[&str] = &[
        "metadata",
        "metadata.google.internal",
        "metadata.goog",
        "instance-data",
        "instance-data.ec2.internal",
    ];
    METADATA
        .contains(&host)
        .then_some(IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254)))
}

/// The guard: the built-in blocked ranges minus the operator's allowed
/// networks.
#[derive(Debug, Clone, Default)]
pub struct NetGuard {
    allow: Vec<IpNet>,
}

impl NetGuard {
    /// A guard that also lets these networks through.
    pub fn new(allow: Vec<IpNet>) -> Self {
        NetGuard { allow }
    }

    /// Reads a network as written in `allow_networks`: CIDR
    /// (`10.1.0.0/16`, `fd00::/8`) or a single address.
    pub fn parse_network(text: &str) -> Result<IpNet, String> {
        let text = text.trim();
        text.parse::<IpNet>()
            .map(|n| n.trunc())
            .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
            .map_err(|_| {
                "not a network: write it in CIDR form (e.g. \"10.1.0.0/16\") or as one address"
                    .to_string()
            })
    }

    /// The networks let through although they are special-purpose.
    pub fn allowed_networks(&self) -> &[IpNet] {
        &self.allow
    }

    fn allows(&self, ip: IpAddr) -> bool {
        // An IPv4-mapped address is a connection to its IPv4 address.
        let canonical = ip.to_canonical();
        self.allow
            .iter()
            .any(|net| net.contains(&ip) || net.contains(&canonical))
    }

    /// Whether a delivery may connect to `ip`.
    pub fn check(&self, ip: IpAddr) -> Result<(), Blocked> {
        if self.allows(ip) {
            return Ok(());
        }
        match classify(ip) {
            None => Ok(()),
            Some(class) => Err(Blocked {
                host: None,
                addr: ip,
                class,
            }),
        }
    }

    /// What can be judged of a URL without a lookup: an IP literal host
    /// (the resolver never sees it) and the names that are loopback or
    /// metadata by definition. Other names pass here and are judged by
    /// [`GuardedResolver`] when the connection is made.
    pub fn check_url(&self, url: &reqwest::Url) -> Result<(), Blocked> {
        let Some(host) = url.host_str() else {
            return Ok(());
        };
        // The url crate has already turned every IPv4 spelling (decimal,
        // hex, octal, shortened) into dotted form, and wraps IPv6 in [].
        let literal = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            Some(v6) => v6.parse::<Ipv6Addr>().ok().map(IpAddr::V6),
            None => host.parse::<Ipv4Addr>().ok().map(IpAddr::V4),
        };
        if let Some(ip) = literal {
            return self.check(ip);
        }
        match special_name(host) {
            Some(ip) => self.check(ip).map_err(|mut b| {
                b.host = Some(host.to_string());
                b
            }),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests;
