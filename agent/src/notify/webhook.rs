//! Webhook target: an HTTP(S) POST of the JSON rendering.

use std::collections::BTreeMap;
use std::time::Duration;

use super::{Notification, NotifyError};

/// Header carrying the body's HMAC-SHA256 under the target's secret.
pub const SIGNATURE_HEADER: &str = "X-Shear-Signature";

/// Longest part of an error answer's body quoted in the error.
const BODY_QUOTE: usize = 200;

/// `sha256=<hex HMAC-SHA256(secret, body)>` (GitHub's form).
pub fn signature(secret: &str, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    format!(
        "sha256={}",
        hex::encode(ring::hmac::sign(&key, body).as_ref())
    )
}

/// The URL without user:password, for messages.
fn shown(url: &reqwest::Url) -> String {
    let mut u = url.clone();
    let _ = u.set_password(None);
    let _ = u.set_username("");
    u.to_string()
}

pub(super) async fn post(
    url: &str,
    headers: &BTreeMap<String, String>,
    secret: Option<&str>,
    n: &Notification,
    deadline: Duration,
) -> Result<(), NotifyError> {
    let parsed = reqwest::Url::parse(url).map_err(|e| NotifyError::Webhook {
        url: url.to_string(),
        message: format!("bad URL: {e}"),
    })?;
    let url_shown = shown(&parsed);
    let fail = |message: String| NotifyError::Webhook {
        url: url_shown.clone(),
        message,
    };
    let client = reqwest::Client::builder()
        .timeout(deadline)
        .connect_timeout(deadline)
        // A POST redirected becomes a GET elsewhere: say so instead.
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("shear/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| fail(format!("HTTP client: {}", crate::chain(&e))))?;
    let body = n.render_json();
    let mut req = client
        .post(parsed)
        .header(reqwest::header::CONTENT_TYPE, "application/json");
    for (k, v) in headers {
        req = req.header(k.as_str(), v.as_str());
    }
    if let Some(s) = secret {
        req = req.header(SIGNATURE_HEADER, signature(s, body.as_bytes()));
    }
    let resp = req
        .body(body)
        .send()
        .await
        .map_err(|e| fail(crate::chain(&e)))?;
    let status = resp.status();
    if status.is_success() {
        return Ok(());
    }
    let text = resp.text().await.unwrap_or_default();
    let quote: String = text.chars().take(BODY_QUOTE).collect();
    Err(fail(format!(
        "answered {status}{}",
        if quote.trim().is_empty() {
            String::new()
        } else {
            format!(": {}", quote.trim())
        }
    )))
}
