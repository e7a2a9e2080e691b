//! A small HTTP/1 GET over hyper, shared by the etcd v2 source and the Patroni REST check (and
//! a body-less POST for `pgfront drain` / `resume`), and the TLS client configuration for etcd
//! over `https://`.
//!
//! Two client types: `HttpClient` (plain TCP, used by the Patroni checks every few ms and by
//! etcd v2 without TLS: nothing about TLS is on its path) and `HttpsClient` (rustls, for etcd
//! v2 with `tls_*` set; it refuses `http://` URLs so credentials never go out in clear when
//! TLS is configured). `get` serves both.
//!
//! Invariants: rustls' crypto provider is always passed explicitly (`ring`, the one
//! etcd-client's tonic already uses), never taken from the process default, so a second
//! provider compiled in by some dependency cannot make rustls panic at run time. The TLS
//! configuration is built by one function, `tls_client_config`, which config validation calls
//! too: a file that passes `pgfront config check` is one the client can use.

use std::error::Error as StdError;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::header::{HeaderMap, AUTHORIZATION};
use hyper::{Request, StatusCode};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::{Connect, HttpConnector};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

pub type HttpClient = Client<HttpConnector, Empty<Bytes>>;

/// An HTTP client that speaks `https://` only, for etcd v2 with TLS.
pub type HttpsClient = Client<HttpsConnector<HttpConnector>, Empty<Bytes>>;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

fn connector() -> HttpConnector {
    let mut c = HttpConnector::new();
    c.set_nodelay(true);
    c.set_connect_timeout(Some(CONNECT_TIMEOUT));
    c
}

pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).pool_idle_timeout(POOL_IDLE_TIMEOUT).build(connector())
}

/// A client for `https://` URLs with `tls` (from `tls_client_config`); `http://` URLs fail.
pub fn https_client(tls: Arc<rustls::ClientConfig>) -> HttpsClient {
    let mut tcp = connector();
    // The TLS layer checks the scheme; the TCP connector must accept `https://` URIs.
    tcp.enforce_http(false);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(Arc::unwrap_or_clone(tls))
        .https_only()
        .enable_http1()
        .wrap_connector(tcp);
    Client::builder(TokioExecutor::new()).pool_idle_timeout(POOL_IDLE_TIMEOUT).build(https)
}

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("bad URL {url:?}")]
    Url { url: String },
    #[error("{url}: {reason}")]
    Request { url: String, reason: String },
    #[error("{url}: no answer within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
}

pub struct Response {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// GET `url`, with optional basic auth, the whole exchange (TCP and TLS handshakes included)
/// bounded by `timeout`.
pub async fn get<C>(
    client: &Client<C, Empty<Bytes>>,
    url: &str,
    basic: Option<&str>,
    timeout: Duration,
) -> Result<Response, HttpError>
where
    C: Connect + Clone + Send + Sync + 'static,
{
    send(client, hyper::Method::GET, url, basic, timeout).await
}

/// POST to `url` without a body, with an optional `Authorization` value, bounded by `timeout`.
pub async fn post<C>(
    client: &Client<C, Empty<Bytes>>,
    url: &str,
    authorization: Option<&str>,
    timeout: Duration,
) -> Result<Response, HttpError>
where
    C: Connect + Clone + Send + Sync + 'static,
{
    send(client, hyper::Method::POST, url, authorization, timeout).await
}

async fn send<C>(
    client: &Client<C, Empty<Bytes>>,
    method: hyper::Method,
    url: &str,
    authorization: Option<&str>,
    timeout: Duration,
) -> Result<Response, HttpError>
where
    C: Connect + Clone + Send + Sync + 'static,
{
    let uri: hyper::Uri = url.parse().map_err(|_| HttpError::Url { url: url.to_owned() })?;
    let mut req = Request::builder().method(method).uri(uri);
    if let Some(b) = authorization {
        req = req.header(AUTHORIZATION, b);
    }
    let req = req.body(Empty::new()).map_err(|e| HttpError::Request { url: url.to_owned(), reason: e.to_string() })?;
    let fut = async {
        let resp =
            client.request(req).await.map_err(|e| HttpError::Request { url: url.to_owned(), reason: chain(&e) })?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| HttpError::Request { url: url.to_owned(), reason: chain(&e) })?
            .to_bytes();
        Ok(Response { status, headers, body })
    };
    tokio::time::timeout(timeout, fut).await.map_err(|_| HttpError::Timeout { url: url.to_owned(), timeout })?
}

/// An error with its causes, `outer: inner: …`: hyper's own message ("client error
/// (Connect)") says nothing of a refused certificate; its sources do. A cause whose text
/// its wrapper already shows is skipped.
fn chain(e: &dyn StdError) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let msg = s.to_string();
        if !out.ends_with(&msg) {
            out.push_str(": ");
            out.push_str(&msg);
        }
        cur = s.source();
    }
    out
}

/// The value of a basic `Authorization` header.
pub fn basic_auth(user: &str, password: &str) -> String {
    use base64::Engine;
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")))
}

/// The TLS files of a cluster's etcd (named in `[[cluster]]`: `tls_ca`, `tls_cert`, `tls_key`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: Option<PathBuf>,
    /// Client certificate and key, both or neither.
    pub identity: Option<(PathBuf, PathBuf)>,
}

/// Why the TLS files of a cluster cannot be used. `field` is the config field that names the
/// file, so config validation can point at its line.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: {reason}", path.display())]
    File { field: &'static str, path: PathBuf, reason: String },
    #[error("{} and {}: {reason}", cert.display(), key.display())]
    Identity { cert: PathBuf, key: PathBuf, reason: String },
    #[error("{0}")]
    Rustls(rustls::Error),
}

impl TlsError {
    /// The config field the error is about.
    pub fn field(&self) -> &'static str {
        match self {
            TlsError::File { field, .. } => field,
            TlsError::Identity { .. } => "tls_key",
            TlsError::Rustls(_) => "tls_ca",
        }
    }
}

fn read(field: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::File {
        field,
        path: path.to_owned(),
        reason: format!("cannot read: {e}"),
    })
}

fn certificates(field: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(field, path)?;
    let bad = |reason: String| TlsError::File { field, path: path.to_owned(), reason };
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("not valid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(bad("no PEM certificate (-----BEGIN CERTIFICATE-----) in it".into()));
    }
    Ok(certs)
}

/// rustls' client configuration for `tls`: the CA as the only trust anchors (no system
/// roots: etcd clusters use their own CA, and etcd v3 through tonic trusts no system roots
/// either), and the client certificate if given. Reads the files each time it is called, so
/// a reconnect picks up renewed certificates.
pub fn tls_client_config(tls: &TlsFiles) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Rustls)?;
    let mut roots = rustls::RootCertStore::empty();
    if let Some(ca) = &tls.ca {
        for cert in certificates("tls_ca", ca)? {
            roots.add(cert).map_err(|e| TlsError::File {
                field: "tls_ca",
                path: ca.clone(),
                reason: format!("not a usable CA certificate: {e}"),
            })?;
        }
    }
    let builder = builder.with_root_certificates(roots);
    let config = match &tls.identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = certificates("tls_cert", cert)?;
            let pem = read("tls_key", key)?;
            let der = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::File {
                field: "tls_key",
                path: key.clone(),
                reason: match e {
                    rustls::pki_types::pem::Error::NoItemsFound => {
                        "no unencrypted PEM private key (PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY) in it".into()
                    }
                    e => format!("not valid PEM: {e}"),
                },
            })?;
            builder.with_client_auth_cert(chain, der).map_err(|e| TlsError::Identity {
                cert: cert.clone(),
                key: key.clone(),
                reason: format!("not a usable certificate and key pair: {e}"),
            })?
        }
    };
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(dir: &Path, ca: &str, cert_key: Option<(&str, &str)>) -> TlsFiles {
        let write = |name: &str, text: &str| {
            let p = dir.join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        TlsFiles {
            ca: Some(write("ca.pem", ca)),
            identity: cert_key.map(|(c, k)| (write("cert.pem", c), write("key.pem", k))),
        }
    }

    #[test]
    fn unusable_files_name_the_field_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let e = tls_client_config(&files(dir.path(), "not a certificate\n", None)).unwrap_err();
        assert_eq!(e.field(), "tls_ca");
        assert!(e.to_string().contains("ca.pem: no PEM certificate"), "{e}");

        let e = tls_client_config(&files(dir.path(), "-----BEGIN CERTIFICATE-----\n!!!\n", None)).unwrap_err();
        assert_eq!(e.field(), "tls_ca");
        assert!(e.to_string().contains("not valid PEM"), "{e}");

        let bogus_der = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        let e = tls_client_config(&files(dir.path(), bogus_der, None)).unwrap_err();
        assert!(e.to_string().contains("not a usable CA certificate"), "{e}");

        let missing = TlsFiles { ca: Some(dir.path().join("absent.pem")), identity: None };
        let e = tls_client_config(&missing).unwrap_err();
        assert!(e.to_string().contains("absent.pem: cannot read"), "{e}");
    }

    #[test]
    fn error_chain_shows_causes_once() {
        #[derive(Debug)]
        struct Outer(std::io::Error);
        impl std::fmt::Display for Outer {
            fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("client error (Connect)")
            }
        }
        impl StdError for Outer {
            fn source(&self) -> Option<&(dyn StdError + 'static)> {
                Some(&self.0)
            }
        }
        let e = Outer(std::io::Error::other("invalid peer certificate: UnknownIssuer"));
        assert_eq!(chain(&e), "client error (Connect): invalid peer certificate: UnknownIssuer");
    }
}
