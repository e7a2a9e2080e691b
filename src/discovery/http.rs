//! A small HTTP/1 GET over hyper, shared by the etcd v2 source and the Patroni REST check.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::header::{HeaderMap, AUTHORIZATION};
use hyper::{Request, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

pub type HttpClient = Client<HttpConnector, Empty<Bytes>>;

pub fn client() -> HttpClient {
    let mut c = HttpConnector::new();
    c.set_nodelay(true);
    c.set_connect_timeout(Some(Duration::from_secs(2)));
    Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(30)).build(c)
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

/// GET `url`, with optional basic auth, the whole exchange bounded by `timeout`.
pub async fn get(
    client: &HttpClient,
    url: &str,
    basic: Option<&str>,
    timeout: Duration,
) -> Result<Response, HttpError> {
    let uri: hyper::Uri = url.parse().map_err(|_| HttpError::Url { url: url.to_owned() })?;
    let mut req = Request::get(uri);
    if let Some(b) = basic {
        req = req.header(AUTHORIZATION, b);
    }
    let req = req.body(Empty::new()).map_err(|e| HttpError::Request { url: url.to_owned(), reason: e.to_string() })?;
    let fut = async {
        let resp =
            client.request(req).await.map_err(|e| HttpError::Request { url: url.to_owned(), reason: e.to_string() })?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| HttpError::Request { url: url.to_owned(), reason: e.to_string() })?
            .to_bytes();
        Ok(Response { status, headers, body })
    };
    tokio::time::timeout(timeout, fut).await.map_err(|_| HttpError::Timeout { url: url.to_owned(), timeout })?
}

/// The value of a basic `Authorization` header.
pub fn basic_auth(user: &str, password: &str) -> String {
    use base64::Engine;
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")))
}
