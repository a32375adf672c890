//! Where webhook tools may connect: public addresses, plus the private networks the operator names.
//!
//! A tenant admin chooses a webhook's URL, so without this a tenant could make the gateway call its
//! own loopback services, the cloud metadata endpoint (169.254.169.254) or the operator's internal
//! network (server-side request forgery). The check runs where the address is known for certain:
//! in the HTTP client's DNS resolver, so a name that resolves to a private address is refused at
//! connect time however it resolved at declaration (no DNS-rebinding gap), and before sending for a
//! URL whose host is an address literal (which no resolver sees). The client follows no redirects
//! and uses no proxy, so neither can route around it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// A network in CIDR form, such as `10.0.0.0/8` or `fd00::/8`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Network {
    addr: IpAddr,
    prefix: u8,
}

/// Why a network did not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NetworkError {
    /// Not `address/prefix`.
    #[error("{0:?} is not a network in CIDR form (like 10.0.0.0/8)")]
    Malformed(String),
    /// The prefix is longer than the address.
    #[error("{0:?} has a prefix longer than its address")]
    PrefixTooLong(String),
}

impl FromStr for Network {
    type Err = NetworkError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || NetworkError::Malformed(s.to_owned());
        let (addr, prefix) = s.trim().split_once('/').ok_or_else(bad)?;
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(NetworkError::PrefixTooLong(s.to_owned()));
        }
        Ok(Network { addr, prefix })
    }
}

impl std::fmt::Display for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Network {
    /// Whether `ip` lies in this network (IPv4 networks also hold IPv4-mapped IPv6 addresses).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) is the IPv4 address it carries.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Whether `ip` is a public unicast address, reachable on the internet.
fn is_public(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            !(v4.is_unspecified()
                || v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || a == 0
                // Shared address space (carrier-grade NAT), 100.64.0.0/10.
                || (a == 100 && (64..128).contains(&b))
                // IETF protocol assignments, 192.0.0.0/24.
                || (a == 192 && b == 0 && c == 0)
                // Benchmarking, 198.18.0.0/15.
                || (a == 198 && (18..20).contains(&b))
                // Reserved, 240.0.0.0/4.
                || a >= 240
                // Azure's platform address (WireServer: instance metadata, health probes,
                // DNS), public in form but answering only inside Azure, as 169.254.169.254 does.
                || v4.octets() == [168, 63, 129, 16])
        }
        IpAddr::V6(v6) => {
            let seg = v6.segments();
            !(v6.is_unspecified()
                || v6.is_loopback()
                || v6.is_multicast()
                // Unique local, fc00::/7.
                || (seg[0] & 0xfe00) == 0xfc00
                // Link-local, fe80::/10, and the deprecated site-local, fec0::/10.
                || (seg[0] & 0xffc0) == 0xfe80
                || (seg[0] & 0xffc0) == 0xfec0
                // Local-use NAT64, 64:ff9b:1::/48 (translates into the operator's own network).
                || (seg[0] == 0x64 && seg[1] == 0xff9b && seg[2] == 1)
                // Documentation, 2001:db8::/32.
                || (seg[0] == 0x2001 && seg[1] == 0x0db8)
                // NAT64, 64:ff9b::/96, carries an IPv4 address: judge that one.
                || (seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0]
                    && !is_public(IpAddr::V4(Ipv4Addr::new(
                        (seg[6] >> 8) as u8,
                        seg[6] as u8,
                        (seg[7] >> 8) as u8,
                        seg[7] as u8,
                    ))))
                // IPv4-compatible (deprecated), ::/96.
                || (seg[..6] == [0; 6] && v6 != Ipv6Addr::UNSPECIFIED))
        }
    }
}

/// The egress policy of webhook tools.
#[derive(Clone, Debug, Default)]
pub struct Egress {
    allowed: Vec<Network>,
}

/// A webhook address the policy refuses.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("the webhook's address {0} is not public and not in an allowed network")]
pub struct Refused(pub IpAddr);

impl Egress {
    /// Public addresses, plus `allowed` (which may name private ones).
    pub fn new(allowed: Vec<Network>) -> Self {
        Egress { allowed }
    }

    /// The networks allowed beside the public internet.
    pub fn allowed(&self) -> &[Network] {
        &self.allowed
    }

    /// Whether a webhook may connect to `ip`.
    ///
    /// # Errors
    /// [`Refused`] for an address that is not public and not in an allowed network.
    pub fn check(&self, ip: IpAddr) -> Result<(), Refused> {
        if is_public(ip) || self.allowed.iter().any(|n| n.contains(ip)) {
            Ok(())
        } else {
            Err(Refused(ip))
        }
    }

    /// Checks a URL whose host is an address literal; names are checked when they resolve.
    ///
    /// # Errors
    /// [`Refused`] as [`Egress::check`].
    pub fn check_url(&self, url: &reqwest::Url) -> Result<(), Refused> {
        match url.host() {
            Some(url::Host::Ipv4(v4)) => self.check(IpAddr::V4(v4)),
            Some(url::Host::Ipv6(v6)) => self.check(IpAddr::V6(v6)),
            _ => Ok(()),
        }
    }

    /// An HTTP client for webhooks that resolves names through this policy, follows no
    /// redirects and uses no proxy.
    pub fn client(&self) -> reqwest::Client {
        reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .dns_resolver(Arc::new(Resolver(self.clone())))
            .build()
            .expect("a TLS backend is compiled in")
    }
}

/// The HTTP client webhook tools use, with the policy it enforces.
#[derive(Clone, Debug)]
pub struct WebhookClient {
    /// Resolves through the policy, follows no redirects, uses no proxy.
    pub http: reqwest::Client,
    /// The policy, for URLs whose host is an address literal.
    pub egress: Egress,
}

impl WebhookClient {
    /// A client under `egress`.
    pub fn new(egress: Egress) -> Self {
        WebhookClient {
            http: egress.client(),
            egress,
        }
    }
}

/// Whether `err` (a reqwest error) comes from the policy refusing the address.
pub fn is_refusal(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut e = Some(err);
    while let Some(cur) = e {
        if cur.downcast_ref::<Refused>().is_some() {
            return true;
        }
        e = cur.source();
    }
    false
}

/// Resolves with the system resolver, then keeps only the addresses the policy allows.
struct Resolver(Egress);

impl Resolve for Resolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.0.clone();
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut refused = None;
            let allowed: Vec<SocketAddr> = found
                .into_iter()
                .filter(|a| match policy.check(a.ip()) {
                    Ok(()) => true,
                    Err(r) => {
                        refused = Some(r);
                        false
                    }
                })
                .collect();
            if allowed.is_empty() {
                let err: Box<dyn std::error::Error + Send + Sync> = match refused {
                    Some(r) => Box::new(r),
                    None => format!("{host} has no address").into(),
                };
                return Err(err);
            }
            Ok(Box::new(allowed.into_iter()) as Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn private_and_special_addresses_are_refused_by_default() {
        let egress = Egress::default();
        for bad in [
            "127.0.0.1",
            "127.8.9.10",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "0.1.2.3",
            "255.255.255.255",
            "224.0.0.1",
            "198.18.0.1",
            "192.0.0.8",
            "240.0.0.1",
            "168.63.129.16",
            "::ffff:168.63.129.16",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "fc00::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "::127.0.0.1",
            "2001:db8::1",
            "fec0::1",
            "64:ff9b:1::808:808",
        ] {
            assert_eq!(egress.check(ip(bad)), Err(Refused(ip(bad))), "{bad}");
        }
        for good in [
            "8.8.8.8",
            "1.1.1.1",
            "172.32.0.1",
            "100.128.0.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
        ] {
            assert_eq!(egress.check(ip(good)), Ok(()), "{good}");
        }
    }

    #[test]
    fn allowed_networks_open_exactly_their_range() {
        let egress = Egress::new(vec![
            "127.0.0.0/8".parse().unwrap(),
            "10.20.0.0/16".parse().unwrap(),
            "fd12:3456::/32".parse().unwrap(),
        ]);
        assert!(egress.check(ip("127.0.0.1")).is_ok());
        assert!(egress.check(ip("::ffff:127.0.0.1")).is_ok());
        assert!(egress.check(ip("10.20.255.1")).is_ok());
        assert!(egress.check(ip("10.21.0.1")).is_err());
        assert!(egress.check(ip("fd12:3456::9")).is_ok());
        assert!(egress.check(ip("fd12:3457::9")).is_err());
        assert!(egress.check(ip("169.254.169.254")).is_err());
        assert!(
            egress.check(ip("::1")).is_err(),
            "an IPv4 network holds no IPv6 loopback"
        );
    }

    #[test]
    fn networks_parse_strictly() {
        assert_eq!(
            "10.0.0.0/8".parse::<Network>().unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert!("0.0.0.0/0"
            .parse::<Network>()
            .unwrap()
            .contains(ip("10.0.0.1")));
        for bad in [
            "10.0.0.0",
            "10.0.0.0/",
            "/8",
            "10.0.0/8",
            "x/8",
            "10.0.0.0/x",
        ] {
            assert_eq!(
                bad.parse::<Network>(),
                Err(NetworkError::Malformed(bad.into())),
                "{bad}"
            );
        }
        assert_eq!(
            "10.0.0.0/33".parse::<Network>(),
            Err(NetworkError::PrefixTooLong("10.0.0.0/33".into()))
        );
        assert!("::/129".parse::<Network>().is_err());
    }

    #[test]
    fn address_literals_in_urls_are_checked_and_names_are_left_to_the_resolver() {
        let egress = Egress::default();
        let url = |s: &str| reqwest::Url::parse(s).unwrap();
        assert!(egress
            .check_url(&url("http://127.0.0.1:8080/hook"))
            .is_err());
        assert!(egress.check_url(&url("http://[::1]/hook")).is_err());
        assert!(egress
            .check_url(&url("http://169.254.169.254/latest"))
            .is_err());
        assert!(egress.check_url(&url("https://8.8.8.8/hook")).is_ok());
        assert!(egress
            .check_url(&url("https://hooks.example.com/x"))
            .is_ok());
    }

    #[tokio::test]
    async fn a_name_that_resolves_to_loopback_is_refused_at_connect_time() {
        // `localhost` resolves to loopback without any network; nothing listens on port 9.
        let refused = Egress::default()
            .client()
            .post("http://localhost:9/hook")
            .send()
            .await
            .unwrap_err();
        let mut chain = String::new();
        let mut e: Option<&dyn std::error::Error> = Some(&refused);
        while let Some(err) = e {
            chain.push_str(&err.to_string());
            chain.push('\n');
            e = err.source();
        }
        assert!(chain.contains("not public"), "{chain}");
        // Allowed, the same request gets as far as connecting (and finds nothing listening).
        let allowed = Egress::new(vec![
            "127.0.0.0/8".parse().unwrap(),
            "::1/128".parse().unwrap(),
        ])
        .client()
        .post("http://localhost:9/hook")
        .send()
        .await
        .unwrap_err();
        assert!(allowed.is_connect(), "{allowed:?}");
        assert!(!format!("{allowed:?}").contains("not public"));
    }
}
