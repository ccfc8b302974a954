//! The few S3 requests `object_store` 0.12 cannot make: a PUT with Object
//! Lock headers, HEAD for an object's retention, PutObjectRetention and
//! GetObjectLockConfiguration (repo/immut.rs). Signed with object_store's
//! own SigV4 [`AwsAuthorizer`] and credentials, sent with reqwest, retried
//! with backoff on 5xx/429 and transport errors.
//!
//! (moto 5.2.5 answers GetObjectRetention with a 500, so the retention is
//! read from HEAD's `x-amz-object-lock-*` headers, which AWS also sends.)

use std::time::Duration;

use base64::Engine as _;
use object_store::aws::{AwsAuthorizer, AwsCredentialProvider};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::{Method, StatusCode};
use sha2::Digest as _;

/// Where and as whom to send signed requests.
#[derive(Debug)]
pub(crate) struct Signer {
    client: reqwest::Client,
    /// URL of the bucket (`http://host:port/bucket` path-style, or the
    /// virtual host), without a trailing `/`.
    base: String,
    region: String,
    creds: AwsCredentialProvider,
    retries: u32,
}

/// A response: status, headers, body.
pub(crate) struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

/// Percent-encodes a key for a URL path (every byte but RFC 3986
/// unreserved characters and `/`), as SigV4's canonical URI wants.
pub(crate) fn encode_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'/') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `x-amz-checksum-sha256` of a body (F-40: every PUT carries a checksum
/// the server verifies).
pub(crate) fn sha256_b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(data))
}

impl Signer {
    /// `endpoint`: the configured endpoint, if any; `virtual_hosted` as
    /// object_store was configured.
    pub fn new(
        endpoint: Option<&str>,
        region: &str,
        bucket: &str,
        virtual_hosted: bool,
        creds: AwsCredentialProvider,
        timeout: Duration,
    ) -> Result<Signer, String> {
        let base = match (endpoint, virtual_hosted) {
            // object_store's convention: a virtual-hosted custom endpoint
            // already names the bucket.
            (Some(e), true) => e.trim_end_matches('/').to_owned(),
            (Some(e), false) => format!("{}/{bucket}", e.trim_end_matches('/')),
            (None, true) => format!("https://{bucket}.s3.{region}.amazonaws.com"),
            (None, false) => format!("https://s3.{region}.amazonaws.com/{bucket}"),
        };
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| crate::chain(&e))?;
        Ok(Signer {
            client,
            base,
            region: region.to_owned(),
            creds,
            retries: 6,
        })
    }

    /// Sends one signed request for `key` (full key, prefix included; ""
    /// = the bucket) with the query string `query` ("" = none).
    pub async fn send(
        &self,
        method: Method,
        key: &str,
        query: &str,
        headers: &[(&'static str, String)],
        body: Vec<u8>,
    ) -> Result<Reply, String> {
        let mut url = self.base.clone();
        if !key.is_empty() {
            url.push('/');
            url.push_str(&encode_key(key));
        }
        if !query.is_empty() {
            url.push('?');
            url.push_str(query);
        }
        let uri: hyper::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
        let mut attempt = 0u32;
        loop {
            let cred = self
                .creds
                .get_credential()
                .await
                .map_err(|e| crate::chain(&e))?;
            let mut req = object_store::client::HttpRequest::new(body.clone().into());
            *req.method_mut() = method.clone();
            *req.uri_mut() = uri.clone();
            for (k, v) in headers {
                req.headers_mut().insert(
                    HeaderName::from_static(k),
                    HeaderValue::from_str(v).map_err(|e| format!("header {k}: {e}"))?,
                );
            }
            AwsAuthorizer::new(&cred, "s3", &self.region).authorize(&mut req, None);
            let sent = self
                .client
                .request(method.clone(), &url)
                .headers(req.headers().clone())
                .body(body.clone())
                .send()
                .await;
            let retry_why = match sent {
                Ok(r) => {
                    let status = r.status();
                    let headers = r.headers().clone();
                    match r.bytes().await {
                        Ok(b)
                            if !(status.is_server_error()
                                || status == StatusCode::TOO_MANY_REQUESTS) =>
                        {
                            return Ok(Reply {
                                status,
                                headers,
                                body: b.to_vec(),
                            })
                        }
                        Ok(b) => format!("{status}: {}", String::from_utf8_lossy(&b)),
                        Err(e) => crate::chain(&e),
                    }
                }
                Err(e) => crate::chain(&e),
            };
            attempt += 1;
            if attempt > self.retries {
                return Err(format!(
                    "{method} {url}: {retry_why} (after {attempt} attempts)"
                ));
            }
            let ms = (100u64 << attempt.min(6)).min(5000);
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_encoded_for_sigv4() {
        assert_eq!(
            encode_key("p/backups/vm/100/2026-01-01T00:00:00Z/manifest.blob"),
            "p/backups/vm/100/2026-01-01T00%3A00%3A00Z/manifest.blob"
        );
        assert_eq!(encode_key("a b+c"), "a%20b%2Bc");
    }

    #[test]
    fn checksum_is_base64_sha256() {
        // sha256("") = e3b0c442...; its base64:
        assert_eq!(
            sha256_b64(b""),
            "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="
        );
    }
}
