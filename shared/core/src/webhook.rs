//! Webhooks: settings, the signature receivers verify, and the address check that keeps
//! deliveries away from private networks (applied to every resolved address at connect time).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::error::FieldError;

/// The header carrying `t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`.
pub const SIGNATURE_HEADER: &str = "switchyard-signature";
/// Longest accepted webhook URL.
pub const MAX_URL_LEN: usize = 2048;

/// `[webhooks]` in the configuration (`SWITCHYARD_WEBHOOKS__...`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookConfig {
    /// Deliver to loopback, private, link-local and other non-public addresses (off by default:
    /// a webhook must not reach the cluster's internal services).
    pub allow_private: bool,
    /// Limit of one delivery attempt (connect + response).
    pub timeout_s: u64,
    /// Attempts before a delivery is given up (`failed`). With the default backoff (5 s
    /// doubling up to an hour) 20 attempts span about 10 hours: a receiver down for a deploy
    /// or a night still gets its events.
    pub max_attempts: u32,
    /// First retry delay; doubles per attempt, with jitter, up to `retry_max_s`.
    pub retry_base_ms: u64,
    pub retry_max_s: u64,
    /// Deliveries in flight at once per scheduler.
    pub concurrency: usize,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            allow_private: false,
            timeout_s: 10,
            max_attempts: 20,
            retry_base_ms: 5_000,
            retry_max_s: 3_600,
            concurrency: 16,
        }
    }
}

/// One webhook delivery of a job (`GET /v1/jobs/{id}/deliveries`).
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WebhookDelivery {
    pub id: uuid::Uuid,
    pub url: String,
    /// `job.succeeded`, `job.failed` or `job.cancelled`.
    pub event: String,
    /// `pending` (will be tried again at `next_attempt_at`), `delivered` or `failed` (gave up).
    pub state: String,
    pub attempts: i32,
    /// HTTP status of the last attempt, if it got one.
    pub last_status: Option<i32>,
    pub last_error: Option<String>,
    pub next_attempt_at: Option<chrono::DateTime<chrono::Utc>>,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub delivered_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Every attempt: `at`, `status` or `error`, `duration_ms`.
    #[schema(value_type = Vec<Object>)]
    pub log: serde_json::Value,
}

/// The signature header's value for `body` sent at `t` (unix seconds). Receivers recompute
/// it with their secret and reject old `t` (replay).
pub fn sign(secret: &str, t: i64, body: &[u8]) -> String {
    sign_with(&[secret], t, body)
}

/// The signature header with one `v1=` per secret (the current one first; after a rotation
/// the previous one too, so receivers may switch secrets within the overlap). A receiver
/// accepts the delivery when any `v1` matches its secret.
pub fn sign_with(secrets: &[&str], t: i64, body: &[u8]) -> String {
    let mut header = format!("t={t}");
    for secret in secrets {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
        mac.update(t.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        header.push_str(",v1=");
        header.push_str(&hex::encode(mac.finalize().into_bytes()));
    }
    header
}

/// Whether a delivery may connect to `ip`: public unicast only.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public_v4(v4);
            }
            let s = v6.segments();
            // IPv4-compatible (::a.b.c.d, deprecated), :: and ::1 included
            if s[..6] == [0; 6] {
                let o = v6.octets();
                return is_public_v4(Ipv4Addr::new(o[12], o[13], o[14], o[15]));
            }
            // NAT64 (64:ff9b::/96) embeds an IPv4 address
            if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] {
                let o = v6.octets();
                return is_public_v4(Ipv4Addr::new(o[12], o[13], o[14], o[15]));
            }
            // 6to4 (2002::/16) embeds one in its second and third groups
            if s[0] == 0x2002 {
                let o = v6.octets();
                return is_public_v4(Ipv4Addr::new(o[2], o[3], o[4], o[5]));
            }
            !(v6.is_loopback()
                // local-use NAT64 (64:ff9b:1::/48, RFC 8215): translates to private networks
                || (s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1)
                // Teredo (2001::/32): a tunnel whose far end hides the address it reaches
                || (s[0] == 0x2001 && s[1] == 0)
                // site-local (fec0::/10, deprecated but still routed inside some networks)
                || (s[0] & 0xffc0) == 0xfec0
                // discard-only (100::/64)
                || (s[0] == 0x0100 && s[1..4] == [0, 0, 0])
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local
                || (s[0] & 0xffc0) == 0xfe80 // link local
                || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
                || v6 == Ipv6Addr::from([0u8; 16]))
        }
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    !(ip.is_private()
        || ip.is_loopback()
        || ip.is_link_local() // includes 169.254.169.254, cloud metadata
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || o[0] == 0
        || (o[0] == 100 && (o[1] & 0xc0) == 64) // shared address space 100.64/10
        || (o[0] == 198 && (o[1] & 0xfe) == 18) // benchmarking 198.18/15
        || o[0] >= 240) // reserved
}

/// Checks a webhook URL's form for `field`: http(s), a host, no credentials, at most 2 KiB;
/// an IP-literal host must be public unless `allow_private`. (Names are checked again on
/// every resolution, at connect time.)
pub fn check_url(field: &str, raw: &str, allow_private: bool) -> Result<(), FieldError> {
    let bad = |m: &str| FieldError::invalid(field, m.to_string());
    if raw.len() > MAX_URL_LEN {
        return Err(bad("at most 2048 bytes"));
    }
    let rest = raw
        .strip_prefix("https://")
        .or_else(|| raw.strip_prefix("http://"))
        .ok_or_else(|| bad("must be an http:// or https:// URL"))?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if authority.is_empty() {
        return Err(bad("the URL has no host"));
    }
    if authority.contains('@') {
        return Err(bad("credentials in the URL are not allowed"));
    }
    if raw.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad("the URL contains whitespace or control characters"));
    }
    // the host as the HTTP client will read it: WHATWG parsing turns `2130706433`, `0x7f.1`
    // and `127.1` into 127.0.0.1, which the client would then dial without any lookup
    let parsed = url::Url::parse(raw).map_err(|e| bad(&format!("not a valid URL: {e}")))?;
    let ip = match parsed.host() {
        None => return Err(bad("the URL has no host")),
        Some(url::Host::Domain(_)) => None,
        Some(url::Host::Ipv4(v4)) => Some(IpAddr::V4(v4)),
        Some(url::Host::Ipv6(v6)) => Some(IpAddr::V6(v6)),
    };
    if !allow_private && ip.is_some_and(|ip| !is_public(ip)) {
        return Err(bad(
            "private, loopback and link-local addresses are not allowed",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_public_addresses_pass() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::127.0.0.1",
            "::10.0.0.1",
            "64:ff9b::a00:1",
            "64:ff9b:1::a00:5",
            "2002:a00:1::1",
            "2002:7f00:1::",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
            "fec0::1",
            "100::1",
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "8.8.8.8",
            "1.1.1.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "2002:808:808::1",
            "2001:4860::8888",
        ] {
            assert!(is_public(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn urls_are_checked() {
        assert!(check_url("u", "https://example.com/hook?x=1", false).is_ok());
        assert!(check_url("u", "http://127.0.0.1:8080/x", true).is_ok());
        for bad in [
            "ftp://example.com",
            "https://",
            "https://user:pw@example.com/",
            "http://127.0.0.1:9/x",
            "http://[::1]/x",
            "http://169.254.169.254/latest/meta-data",
            "https://exa mple.com",
            // spellings of 127.0.0.1 and 10.0.0.1 that the HTTP client would dial
            "http://2130706433/x",
            "http://0x7f.1/x",
            "http://127.1/x",
            "http://012.0.0.1/x",
            "http://[::127.0.0.1]/x",
            "http://[::ffff:7f00:1]/x",
        ] {
            assert_eq!(check_url("u", bad, false).unwrap_err().field, "u", "{bad}");
        }
    }

    #[test]
    fn signatures_are_hmac_sha256_over_time_and_body() {
        let s = sign("secret", 1_700_000_000, b"{}");
        assert!(s.starts_with("t=1700000000,v1="));
        assert_eq!(s.len(), "t=1700000000,v1=".len() + 64);
        assert_ne!(s, sign("other", 1_700_000_000, b"{}"));
        assert_ne!(s, sign("secret", 1_700_000_001, b"{}"));
    }
}
