use super::*;

fn range(ip: &str) -> Option<Range> {
    classify(ip.parse().unwrap()).map(|c| c.range)
}

fn url(text: &str) -> reqwest::Url {
    text.parse().unwrap()
}

#[test]
fn ipv4_special_ranges_are_blocked_with_their_reason() {
    use Range::*;
    let cases = [
        ("0.0.0.0", Unspecified),
        ("0.1.2.3", ThisNetwork),
        ("0.255.255.255", ThisNetwork),
        ("10.0.0.0", Private),
        ("10.0.0.5", Private),
        ("10.255.255.255", Private),
        ("100.64.0.0", Shared),
        ("100.127.255.255", Shared),
        ("127.0.0.1", Loopback),
        ("127.255.255.254", Loopback),
        ("169.254.0.0", LinkLocal),
        ("169.254.169.254", LinkLocal),
        ("169.254.255.255", LinkLocal),
        ("172.16.0.0", Private),
        ("172.31.255.255", Private),
        ("192.0.0.0", IetfProtocol),
        ("192.0.0.255", IetfProtocol),
        ("192.0.2.0", Documentation),
        ("192.0.2.255", Documentation),
        ("192.168.0.0", Private),
        ("192.168.255.255", Private),
        ("198.18.0.0", Benchmarking),
        ("198.19.255.255", Benchmarking),
        ("198.51.100.7", Documentation),
        ("203.0.113.255", Documentation),
        ("224.0.0.0", Multicast),
        ("239.255.255.255", Multicast),
        ("240.0.0.0", Reserved),
        ("254.255.255.255", Reserved),
        ("255.255.255.254", Reserved),
        ("255.255.255.255", Broadcast),
    ];
    for (ip, want) in cases {
        assert_eq!(range(ip), Some(want), "{ip}");
    }
}

#[test]
fn ipv4_neighbours_of_the_blocked_ranges_are_public() {
    for ip in [
        "1.0.0.0",
        "8.8.8.8",
        "9.255.255.255",
        "11.0.0.0",
        "100.63.255.255",
        "100.128.0.0",
        "126.255.255.255",
        "128.0.0.0",
        "169.253.255.255",
        "169.255.0.0",
        "172.15.255.255",
        "172.32.0.0",
        "191.255.255.255",
        "192.0.1.0",
        "192.0.3.0",
        "192.167.255.255",
        "192.169.0.0",
        "198.17.255.255",
        "198.20.0.0",
        "198.51.99.255",
        "198.51.101.0",
        "203.0.112.255",
        "203.0.114.0",
        "223.255.255.255",
    ] {
        assert_eq!(range(ip), None, "{ip}");
    }
}

#[test]
fn ipv6_special_ranges_are_blocked_with_their_reason() {
    use Range::*;
    let cases = [
        ("::", Unspecified),
        ("::1", Loopback),
        ("64:ff9b:1::", LocalNat64),
        ("64:ff9b:1:ffff:ffff:ffff:ffff:ffff", LocalNat64),
        ("100::", Discard),
        ("100::ffff:ffff:ffff:ffff", Discard),
        ("2001::", Teredo),
        ("2001:0:ffff:ffff:ffff:ffff:ffff:ffff", Teredo),
        ("2001:2::", Benchmarking),
        ("2001:2:0:ffff::", Benchmarking),
        ("2001:10::1", Orchid),
        ("2001:20::1", Orchid),
        ("2001:2f:ffff::", Orchid),
        ("2001:db8::", Documentation),
        ("2001:db8:ffff:ffff:ffff:ffff:ffff:ffff", Documentation),
        ("3fff::", Documentation),
        ("3fff:fff::", Documentation),
        ("fc00::", UniqueLocal),
        ("fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", UniqueLocal),
        ("fe80::", LinkLocal),
        ("fe80::1", LinkLocal),
        ("febf:ffff::", LinkLocal),
        ("fec0::", SiteLocal),
        ("feff:ffff::", SiteLocal),
        ("ff00::", Multicast),
        ("ff02::1", Multicast),
        ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", Multicast),
        // Outside global unicast (2000::/3).
        ("100:0:0:1::", Reserved),
        ("4000::1", Reserved),
        ("5f00::1", Reserved),
        ("1fff:ffff::", Reserved),
        ("64:ff9b:2::", Reserved),
    ];
    for (ip, want) in cases {
        assert_eq!(range(ip), Some(want), "{ip}");
    }
}

#[test]
fn ipv6_neighbours_of_the_blocked_ranges_are_public() {
    for ip in [
        "2000::",
        "2001:1::1",
        "2001:3::",
        "2001:2:1::",
        "2001:db7:ffff:ffff:ffff:ffff:ffff:ffff",
        "2001:db9::",
        "2001:4860:4860::8888",
        "2606:4700:4700::1111",
        "3ffe:ffff::",
        "3fff:1000::",
        "64:ff9b::808:808",
        "2002:808:808::",
        "::ffff:8.8.8.8",
        "::8.8.8.8",
        "::ffff:0:8.8.8.8",
        "3fff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
    ] {
        assert_eq!(range(ip), None, "{ip}");
    }
}

#[test]
fn ipv6_forms_carrying_ipv4_are_judged_by_that_address() {
    let cases = [
        ("::ffff:127.0.0.1", "127.0.0.1", Range::Loopback),
        ("::ffff:10.0.0.5", "10.0.0.5", Range::Private),
        (
            "::ffff:169.254.169.254",
            "169.254.169.254",
            Range::LinkLocal,
        ),
        ("::ffff:0.0.0.0", "0.0.0.0", Range::Unspecified),
        ("::127.0.0.1", "127.0.0.1", Range::Loopback),
        ("::192.168.1.1", "192.168.1.1", Range::Private),
        ("::ffff:0:127.0.0.1", "127.0.0.1", Range::Loopback),
        ("64:ff9b::127.0.0.1", "127.0.0.1", Range::Loopback),
        ("64:ff9b::a00:5", "10.0.0.5", Range::Private),
        ("2002:7f00:1::", "127.0.0.1", Range::Loopback),
        ("2002:a9fe:a9fe::1", "169.254.169.254", Range::LinkLocal),
        ("2002:c0a8:101:1::1", "192.168.1.1", Range::Private),
    ];
    for (ip, embedded, want) in cases {
        let class = classify(ip.parse().unwrap()).unwrap_or_else(|| panic!("{ip} allowed"));
        assert_eq!(class.range, want, "{ip}");
        assert_eq!(class.embedded, Some(embedded.parse().unwrap()), "{ip}");
    }
}

#[test]
fn the_reason_names_the_address_and_its_range() {
    let guard = NetGuard::default();
    let err = guard.check("10.0.0.5".parse().unwrap()).unwrap_err();
    assert_eq!(err.to_string(), "blocked: 10.0.0.5 is a private address");
    let err = guard
        .check("::ffff:127.0.0.1".parse().unwrap())
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "blocked: ::ffff:127.0.0.1 embeds 127.0.0.1, a loopback address"
    );
}

#[test]
fn allowed_networks_let_their_addresses_through_and_nothing_else() {
    let guard = NetGuard::new(vec![
        NetGuard::parse_network("127.0.0.0/8").unwrap(),
        NetGuard::parse_network("10.1.0.0/16").unwrap(),
        NetGuard::parse_network("fd00::1").unwrap(),
    ]);
    for ok in [
        "127.0.0.1",
        "127.9.9.9",
        "10.1.0.0",
        "10.1.255.255",
        "::ffff:127.0.0.1",
        "::ffff:10.1.2.3",
        "fd00::1",
        "8.8.8.8",
    ] {
        assert!(guard.check(ok.parse().unwrap()).is_ok(), "{ok}");
    }
    for blocked in [
        "10.0.255.255",
        "10.2.0.0",
        "::1",
        "fd00::2",
        "169.254.169.254",
        "2002:7f00:1::",
    ] {
        assert!(guard.check(blocked.parse().unwrap()).is_err(), "{blocked}");
    }
}

#[test]
fn allow_networks_entries_are_validated() {
    assert_eq!(
        NetGuard::parse_network("10.1.2.3/16").unwrap().to_string(),
        "10.1.0.0/16"
    );
    assert_eq!(
        NetGuard::parse_network("::1").unwrap().to_string(),
        "::1/128"
    );
    for bad in ["", "10.0.0.0/33", "10.0.0/8", "localhost", "fe80::/129"] {
        let err = NetGuard::parse_network(bad).unwrap_err();
        assert!(err.contains("CIDR"), "{bad}: {err}");
    }
}

#[test]
fn every_spelling_of_a_literal_address_in_a_url_is_judged() {
    let guard = NetGuard::default();
    for (text, addr) in [
        ("http://127.0.0.1:8080/x", "127.0.0.1"),
        ("http://2130706433/", "127.0.0.1"),
        ("http://0x7f.1/", "127.0.0.1"),
        ("http://0177.0.0.1/", "127.0.0.1"),
        ("http://127.1/", "127.0.0.1"),
        ("http://0x7f000001/", "127.0.0.1"),
        ("https://0/", "0.0.0.0"),
        ("http://0.0.0.0:80/", "0.0.0.0"),
        (
            "http://169.254.169.254/latest/meta-data/",
            "169.254.169.254",
        ),
        ("http://[::1]:80/", "::1"),
        ("http://[::]/", "::"),
        ("http://[::ffff:127.0.0.1]:9/", "::ffff:127.0.0.1"),
        ("http://[::ffff:7f00:1]/", "::ffff:127.0.0.1"),
        ("http://[fe80::1]/", "fe80::1"),
        ("http://[64:ff9b::a9fe:a9fe]/", "64:ff9b::a9fe:a9fe"),
    ] {
        let err = guard
            .check_url(&url(text))
            .expect_err(&format!("{text} refused"));
        assert_eq!(err.addr, addr.parse::<IpAddr>().unwrap(), "{text}");
        assert_eq!(err.host, None, "{text}");
    }
    for ok in [
        "https://8.8.8.8/",
        "http://134744072/",
        "https://[2606:4700:4700::1111]/",
        "https://example.com/",
        "https://10.0.0.5.nip.io/",
    ] {
        assert!(guard.check_url(&url(ok)).is_ok(), "{ok}");
    }
}

#[test]
fn loopback_and_metadata_names_are_refused_without_a_lookup() {
    let guard = NetGuard::default();
    for (text, range) in [
        ("http://localhost:8080/", Range::Loopback),
        ("http://LOCALHOST/", Range::Loopback),
        ("http://localhost./", Range::Loopback),
        ("http://api.localhost/", Range::Loopback),
        (
            "http://metadata.google.internal/computeMetadata/v1/",
            Range::LinkLocal,
        ),
        ("http://metadata/", Range::LinkLocal),
        ("http://instance-data.ec2.internal/", Range::LinkLocal),
    ] {
        let err = guard.check_url(&url(text)).expect_err(text);
        assert_eq!(err.class.range, range, "{text}");
        assert!(err.host.is_some(), "{text}");
    }
    let err = guard.check_url(&url("http://localhost:1/")).unwrap_err();
    assert_eq!(
        err.to_string(),
        "blocked: localhost (127.0.0.1) is a loopback address"
    );
    let loopback = NetGuard::new(vec![NetGuard::parse_network("127.0.0.0/8").unwrap()]);
    assert!(loopback.check_url(&url("http://localhost:1/")).is_ok());
    assert!(guard.check_url(&url("http://notlocalhost/")).is_ok());
    assert!(
        guard
            .check_url(&url("http://localhost.example.com/"))
            .is_ok()
    );
}
