//! The SSRF guard: an observer file must not be able to point a webhook at the worker's own
//! network (metadata services, admin ports, databases). Before each HTTP action the destination
//! host is resolved and every address it resolves to is checked; loopback, private, link-local,
//! unspecified and similar addresses are refused unless allow-listed (CIDRs or host names) in
//! `service.ssrf_allow`. A refusal is permanent: retrying cannot change the answer.
//!
//! Redirects are not followed (see `http.rs`), so a public receiver cannot bounce a request
//! inward. The check resolves separately from the connection, so a host whose DNS answer flips
//! between the two (rebinding) is not caught; allow-listing by CIDR keeps that window small.

use std::net::IpAddr;

use ipnet::IpNet;
use url::Url;

use crate::error::ActionError;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("`{0}` is neither a CIDR, an IP address nor a host name")]
pub struct BadAllowEntry(pub String);

/// Which internal destinations are nevertheless allowed.
#[derive(Debug, Clone, Default)]
pub struct SsrfGuard {
    networks: Vec<IpNet>,
    hosts: Vec<String>,
}

impl SsrfGuard {
    /// Entries are CIDRs (`10.1.0.0/16`), single addresses (`127.0.0.1`) or host names.
    pub fn new(allow: &[String]) -> Result<Self, BadAllowEntry> {
        let mut guard = Self::default();
        for entry in allow {
            if let Ok(net) = entry.parse::<IpNet>() {
                guard.networks.push(net);
            } else if let Ok(ip) = entry.parse::<IpAddr>() {
                guard.networks.push(IpNet::from(ip));
            } else if !entry.is_empty() && Url::parse(&format!("http://{entry}/")).is_ok() {
                guard.hosts.push(entry.to_ascii_lowercase());
            } else {
                return Err(BadAllowEntry(entry.clone()));
            }
        }
        Ok(guard)
    }

    /// Resolves the URL's host and refuses it if any address is internal and not allow-listed.
    pub async fn check(&self, url: &Url) -> Result<(), ActionError> {
        let host = url
            .host_str()
            .ok_or_else(|| ActionError::permanent(format!("URL `{url}` has no host")))?;
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        if self.hosts.iter().any(|h| h.eq_ignore_ascii_case(bare)) {
            return Ok(());
        }
        let port = url.port_or_known_default().unwrap_or(80);
        let addresses: Vec<IpAddr> = match bare.parse::<IpAddr>() {
            Ok(ip) => vec![ip],
            Err(_) => tokio::net::lookup_host((bare, port))
                .await
                .map_err(|e| ActionError::transient(format!("cannot resolve `{bare}`: {e}")))?
                .map(|a| a.ip())
                .collect(),
        };
        for ip in addresses {
            if let Some(what) = internal(ip)
                && !self.networks.iter().any(|n| n.contains(&ip))
            {
                return Err(ActionError::permanent(format!(
                    "destination `{bare}` resolves to {ip}, a {what} address; refused by the SSRF \
                     guard (allow-list it in service.ssrf_allow to permit it)"
                )));
            }
        }
        Ok(())
    }
}

/// What kind of internal address `ip` is, or `None` for a public one.
fn internal(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => {
            if v4.is_loopback() {
                Some("loopback")
            } else if v4.is_private() {
                Some("private")
            } else if v4.is_link_local() {
                Some("link-local")
            } else if v4.is_unspecified() {
                Some("unspecified")
            } else if v4.is_broadcast() || v4.is_multicast() {
                Some("broadcast or multicast")
            } else if v4.octets()[0] == 100 && (64..128).contains(&v4.octets()[1]) {
                Some("shared (carrier-grade NAT)")
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return internal(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            if v6.is_loopback() {
                Some("loopback")
            } else if v6.is_unspecified() {
                Some("unspecified")
            } else if first & 0xfe00 == 0xfc00 {
                Some("private (unique local)")
            } else if first & 0xffc0 == 0xfe80 {
                Some("link-local")
            } else if v6.is_multicast() {
                Some("multicast")
            } else {
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> Url {
        Url::parse(s).expect("test URL")
    }

    #[tokio::test]
    async fn internal_addresses_are_refused_by_default() {
        let guard = SsrfGuard::default();
        for target in [
            "http://127.0.0.1/",
            "http://10.0.0.5/",
            "http://192.168.1.1/",
            "http://169.254.169.254/latest/meta-data",
            "http://0.0.0.0/",
            "http://[::1]/",
            "http://[fd00::1]/",
            "http://[::ffff:127.0.0.1]/",
            "http://localhost/",
        ] {
            let err = guard.check(&url(target)).await.expect_err(target);
            assert!(matches!(err, ActionError::Permanent(_)), "{target}: {err}");
            assert!(err.to_string().contains("SSRF"), "{err}");
        }
    }

    #[tokio::test]
    async fn allow_listed_networks_and_hosts_pass_and_public_addresses_always_do() {
        let guard = SsrfGuard::new(&[
            "127.0.0.1".into(),
            "10.0.0.0/8".into(),
            "internal.example".into(),
        ])
        .expect("valid allow list");
        for target in [
            "http://127.0.0.1:8080/",
            "http://10.9.9.9/",
            "http://internal.example/",
            "http://93.184.216.34/",
        ] {
            guard.check(&url(target)).await.expect(target);
        }
        assert!(guard.check(&url("http://127.0.0.2/")).await.is_err());
    }

    #[test]
    fn a_malformed_allow_entry_is_named() {
        assert_eq!(
            SsrfGuard::new(&["not a host/99".into()]).expect_err("bad entry"),
            BadAllowEntry("not a host/99".into())
        );
    }
}
