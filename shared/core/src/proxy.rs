//! Reverse proxies the API trusts (nginx, an ingress): a request that comes through one is
//! attributed to the client its `X-Forwarded-For` names, so that per-source limits (failed
//! authentication) and the audit trail's `source` see clients, not the proxy.

use std::net::IpAddr;

use ipnet::IpNet;

/// Addresses and networks (`10.0.0.0/8`, `fd00::/8`, `127.0.0.1`) of trusted proxies.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    /// Parses a list; the error names the entry.
    pub fn parse(list: &[String]) -> Result<TrustedProxies, String> {
        list.iter()
            .map(|entry| {
                let e = entry.trim();
                if e.contains('/') {
                    e.parse::<IpNet>().map_err(|_| {
                        format!(
                            "`{entry}` is not a network (CIDR; the prefix length is 0 to 32 for \
                             IPv4, 0 to 128 for IPv6)"
                        )
                    })
                } else {
                    e.parse::<IpAddr>()
                        .map(IpNet::from)
                        .map_err(|_| format!("`{entry}` is not an address or a network (CIDR)"))
                }
            })
            .collect::<Result<_, _>>()
            .map(TrustedProxies)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `ip` is one of the trusted proxies (an IPv4-mapped IPv6 peer as its IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|net| net.contains(&ip))
    }

    /// The client of a request from `peer` carrying `forwarded_for` (`X-Forwarded-For`): the
    /// peer itself unless it is a trusted proxy; else the nearest address in the header (read
    /// from the right) that is not a trusted proxy. An entry that is not an address ends the
    /// walk (what lies left of it may be forged): the last address taken stands.
    pub fn client(&self, peer: IpAddr, forwarded_for: Option<&str>) -> IpAddr {
        if !self.contains(peer) {
            return peer;
        }
        let mut client = peer;
        for hop in forwarded_for.unwrap_or("").rsplit(',') {
            let Ok(ip) = hop.trim().parse::<IpAddr>() else {
                break;
            };
            client = ip;
            if !self.contains(ip) {
                break;
            }
        }
        client
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn forwarded_clients_behind_trusted_proxies_only() {
        let t = TrustedProxies::parse(&["10.0.0.0/8".into(), "::1".into()]).unwrap();
        assert!(t.contains(ip("10.1.2.3")) && !t.contains(ip("11.0.0.1")));
        assert!(t.contains(ip("::1")) && t.contains(ip("::ffff:10.0.0.1")));
        // a client straight to the API: its own address, whatever it claims
        assert_eq!(
            t.client(ip("203.0.113.9"), Some("1.2.3.4")),
            ip("203.0.113.9")
        );
        // through the proxy: the address the proxy saw
        assert_eq!(
            t.client(ip("10.0.0.5"), Some("198.51.100.7")),
            ip("198.51.100.7")
        );
        // a forged entry left of the real one is not taken
        assert_eq!(
            t.client(ip("10.0.0.5"), Some("1.1.1.1, 198.51.100.7")),
            ip("198.51.100.7")
        );
        // through two proxies
        assert_eq!(
            t.client(ip("10.0.0.5"), Some("198.51.100.7, 10.9.9.9")),
            ip("198.51.100.7")
        );
        // garbage ends the walk; no header: the proxy itself
        assert_eq!(t.client(ip("10.0.0.5"), Some("nonsense")), ip("10.0.0.5"));
        assert_eq!(t.client(ip("10.0.0.5"), None), ip("10.0.0.5"));
        for bad in ["10.0.0.0/33", "example.com", "::/129"] {
            assert!(TrustedProxies::parse(&[bad.into()]).is_err(), "{bad}");
        }
        assert!(TrustedProxies::parse(&["0.0.0.0/0".into()])
            .unwrap()
            .contains(ip("8.8.8.8")));
    }
}
