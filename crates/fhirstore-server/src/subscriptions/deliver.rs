//! Where notifications may go, and sending one.
//!
//! **The endpoint rule.** A subscription names a URL, and the server then makes requests to it:
//! without a rule any client could make the server probe its own network (a database port on
//! loopback, a cloud metadata address). So by default an endpoint must be `https` on a public
//! address, checked when the Subscription is written (its host) and again at each delivery (the
//! addresses the host resolves to then, which a DNS answer can change). An operator allows
//! more by URL prefix (`--subscription-endpoint http://127.0.0.1:9000/`); a prefix is trusted as
//! written, with no address check.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::http::{header, HeaderName, HeaderValue, Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Why a URL prefix cannot be configured.
pub fn check_prefix(prefix: &str) -> Result<(), String> {
    let uri: Uri = prefix
        .parse()
        .map_err(|_| "not a URL (such as http://127.0.0.1:9000/)".to_owned())?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err("must start with http:// or https://".to_owned()),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err("names no host".to_owned());
    }
    // `http://host:9000` would also allow `http://host:90001…`-like confusions only through the
    // path, so a prefix ends with its path's `/` or names a whole path.
    if uri.path().is_empty() || (uri.path() == "/" && !prefix.ends_with('/')) {
        return Err("must end with a '/' after the host and port".to_owned());
    }
    Ok(())
}

/// The certificates (DER) of a PEM file: the authorities an operator trusts for endpoints
/// under a private CA.
pub fn read_pem_certificates(path: &std::path::Path) -> Result<Vec<Vec<u8>>, String> {
    use tokio_rustls::rustls::pki_types::pem::PemObject as _;
    use tokio_rustls::rustls::pki_types::CertificateDer;
    let pem = std::fs::read(path).map_err(|e| e.to_string())?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .map(|c| {
            c.map(|c| c.to_vec())
                .map_err(|e| format!("not a PEM certificate: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if certs.is_empty() {
        return Err("holds no certificate".to_owned());
    }
    Ok(certs)
}

/// A parsed endpoint and whether an operator's prefix allowed it.
#[derive(Clone, Debug)]
pub struct Target {
    uri: Uri,
    host: String,
    port: u16,
    tls: bool,
    /// Allowed by an operator's prefix: no address check.
    trusted: bool,
}

/// The endpoint rule: the operator's prefixes, else https to public addresses.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    prefixes: Vec<String>,
}

impl Policy {
    /// The rule with these allowed prefixes.
    pub fn new(prefixes: Vec<String>) -> Self {
        Policy { prefixes }
    }

    /// Whether `endpoint` may be used, as far as the URL alone tells.
    pub fn check(&self, endpoint: &str) -> Result<Target, String> {
        let uri: Uri = endpoint
            .parse()
            .map_err(|_| format!("channel.endpoint {endpoint:?} is not a URL"))?;
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => {
                return Err(format!(
                    "channel.endpoint {endpoint:?} must be an http(s) URL"
                ))
            }
        };
        if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
            return Err(
                "channel.endpoint may not carry credentials in the URL; use channel.header"
                    .to_owned(),
            );
        }
        let host = uri
            .host()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| format!("channel.endpoint {endpoint:?} names no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let trusted = self
            .prefixes
            .iter()
            .any(|p| endpoint.starts_with(p.as_str()));
        if !trusted {
            if !tls {
                return Err(format!(
                    "channel.endpoint {endpoint:?} is refused: only https endpoints are allowed \
                     unless the operator allows the URL (serve --subscription-endpoint PREFIX)"
                ));
            }
            let local = host.eq_ignore_ascii_case("localhost")
                || host.to_ascii_lowercase().ends_with(".localhost")
                || host.parse::<IpAddr>().is_ok_and(|ip| !is_public(ip));
            if local {
                return Err(format!(
                    "channel.endpoint {endpoint:?} is refused: it names a loopback or private \
                     address, which needs the operator's leave (serve --subscription-endpoint \
                     PREFIX)"
                ));
            }
        }
        Ok(Target {
            uri,
            host,
            port,
            tls,
            trusted,
        })
    }
}

/// Whether an address is reachable on the public internet: not loopback, private, link-local
/// (cloud metadata lives there), shared, documentation, multicast or unspecified.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (64..128).contains(&o[1]))
                || (o[0] == 198 && (o[1] == 18 || o[1] == 19))
                || o[0] >= 240)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let s = v6.segments();
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
                || s[0] == 0x2001 && s[1] == 0x0db8)
        }
    }
}

/// Sends notifications: one connection per delivery, TLS for https.
#[derive(Clone)]
pub struct Sender {
    /// `None` when TLS could not be set up: https deliveries then fail with that reason.
    tls: Option<tokio_rustls::TlsConnector>,
}

impl Default for Sender {
    fn default() -> Self {
        Self::with_roots(Vec::new())
    }
}

impl Sender {
    /// A sender trusting the public web's roots and `extra` (DER certificates), for endpoints
    /// under a private certificate authority.
    pub fn with_roots(extra: Vec<Vec<u8>>) -> Self {
        use tokio_rustls::rustls;
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        for der in extra {
            if let Err(e) = roots.add(rustls::pki_types::CertificateDer::from(der)) {
                tracing::warn!(error = %e, "an extra root certificate was not accepted");
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = match rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
        {
            Ok(b) => Some(tokio_rustls::TlsConnector::from(Arc::new(
                b.with_root_certificates(roots).with_no_client_auth(),
            ))),
            Err(e) => {
                tracing::error!(error = %e, "TLS is unavailable for subscription delivery");
                None
            }
        };
        Sender { tls }
    }

    /// POSTs `body` to the target within `timeout`: `Ok` on a 2xx, else why not.
    pub async fn post(
        &self,
        target: &Target,
        headers: &[String],
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<u16, String> {
        match tokio::time::timeout(timeout, self.post_now(target, headers, body)).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
        }
    }

    async fn post_now(
        &self,
        target: &Target,
        headers: &[String],
        body: Vec<u8>,
    ) -> Result<u16, String> {
        let stream = connect(target).await?;
        let path = target
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(path)
            .header(header::CONTENT_TYPE, "application/fhir+json")
            .header(header::USER_AGENT, "fhirstore-subscriptions");
        let host = match target.uri.port_u16() {
            Some(p) => format!("{}:{p}", target.uri.host().unwrap_or(&target.host)),
            None => target.uri.host().unwrap_or(&target.host).to_owned(),
        };
        req = req.header(header::HOST, host);
        for line in headers {
            if let Some((name, value)) = line.split_once(':') {
                let name = HeaderName::from_bytes(name.trim().as_bytes());
                let value = HeaderValue::from_str(value.trim());
                if let (Ok(n), Ok(v)) = (name, value) {
                    req = req.header(n, v);
                }
            }
        }
        let req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| format!("building the request: {e}"))?;
        let status = if target.tls {
            let name = tokio_rustls::rustls::pki_types::ServerName::try_from(target.host.clone())
                .map_err(|_| format!("{:?} is not a TLS server name", target.host))?;
            let connector = self
                .tls
                .as_ref()
                .ok_or_else(|| "TLS is unavailable in this server".to_owned())?;
            let tls = connector
                .connect(name, stream)
                .await
                .map_err(|e| format!("TLS with {}: {e}", target.host))?;
            exchange(TokioIo::new(tls), req).await?
        } else {
            exchange(TokioIo::new(stream), req).await?
        };
        if (200..300).contains(&status) {
            Ok(status)
        } else {
            Err(format!("the endpoint answered {status}"))
        }
    }
}

/// Opens a TCP connection to the target; unless an operator's prefix allowed it, only to a
/// public address, whatever the host resolves to now.
async fn connect(target: &Target) -> Result<TcpStream, String> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((target.host.as_str(), target.port))
        .await
        .map_err(|e| format!("resolving {}: {e}", target.host))?
        .collect();
    let allowed: Vec<SocketAddr> = addrs
        .iter()
        .copied()
        .filter(|a| target.trusted || is_public(a.ip()))
        .collect();
    if allowed.is_empty() {
        return Err(if addrs.is_empty() {
            format!("{} resolves to no address", target.host)
        } else {
            format!(
                "{} resolves only to loopback or private addresses, which need the operator's \
                 leave",
                target.host
            )
        });
    }
    let mut last = String::new();
    for a in allowed {
        match TcpStream::connect(a).await {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) => last = format!("connecting to {}: {e}", target.host),
        }
    }
    Err(last)
}

/// One HTTP/1.1 request on a fresh connection; the status, with the body drained.
async fn exchange<T>(io: T, req: Request<Full<Bytes>>) -> Result<u16, String>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut send, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("HTTP handshake: {e}"))?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let resp = send.send_request(req).await;
    let result = match resp {
        Ok(resp) => {
            let status = resp.status().as_u16();
            // A receiver's answer is not read beyond a bound: it cannot make us hold memory.
            let mut body = resp.into_body();
            let mut seen = 0usize;
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(f) => {
                        seen += f.data_ref().map_or(0, |d| d.len());
                        if seen > 64 << 10 {
                            break;
                        }
                    }
                    Err(_) => break,
                }
            }
            Ok(status)
        }
        Err(e) => Err(format!("sending: {e}")),
    };
    driver.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_what_the_default_rule_forbids() {
        let p = Policy::default();
        assert!(p.check("https://hooks.example.org/fhir").is_ok());
        for bad in [
            "http://hooks.example.org/fhir",
            "https://127.0.0.1/x",
            "https://localhost/x",
            "https://10.1.2.3/x",
            "https://169.254.169.254/latest/meta-data",
            "https://[::1]/x",
            "https://[fd00::1]/x",
            "https://user:pw@hooks.example.org/x",
            "ftp://hooks.example.org/x",
            "not a url",
        ] {
            assert!(p.check(bad).is_err(), "{bad} was allowed");
        }
        let p = Policy::new(vec!["http://127.0.0.1:9000/".to_owned()]);
        assert!(p.check("http://127.0.0.1:9000/hook").is_ok());
        assert!(p.check("http://127.0.0.1:9001/hook").is_err());
        assert!(p.check("http://127.0.0.1:90000/hook").is_err());
    }

    #[test]
    fn prefixes_must_end_their_authority() {
        assert!(check_prefix("http://127.0.0.1:9000/").is_ok());
        assert!(check_prefix("http://127.0.0.1:9000").is_err());
        assert!(check_prefix("https://hooks.example.org/tenant-a/").is_ok());
        assert!(check_prefix("mailto:x@example.org").is_err());
    }
}
