//! S3 repositories (`s3://BUCKET/PREFIX`) through `object_store` (aws).
//!
//! A plain object store: put/get/range-get/head/list/delete. No rename, no
//! directories, no locks, no conditional PUT (servers ignore `If-None-Match`,
//! design.md): the repository coordinates through objects it writes itself
//! ([`super::coord`]). Every call is retried by object_store's
//! [`RetryConfig`] (5xx, 429, timeouts, connection errors, with exponential
//! backoff) and bounded by a request semaphore.
//!
//! Settings come from the usual AWS environment variables
//! (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`,
//! `AWS_REGION`/`AWS_DEFAULT_REGION`, `AWS_ENDPOINT_URL`), overridden by
//! `SHEAR_S3_ENDPOINT`, `SHEAR_S3_REGION`, `SHEAR_S3_VIRTUAL_HOSTED=1`.
//! With a custom endpoint, requests are path-style, and `http://` is allowed
//! when the endpoint says `http://`.
//!
//! Listings follow the server's continuation tokens page by page
//! (`SHEAR_S3_LIST_PAGE_KEYS=N` asks for N keys per page; the tests list
//! one key per page against a real server); a token the server repeats is
//! an error, never a loop or a short listing.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey, Checksum};
use object_store::list::{PaginatedListOptions, PaginatedListStore};
use object_store::path::Path as OPath;
use object_store::{BackoffConfig, ClientOptions, ObjectStore, PutPayload, RetryConfig};
use tokio::sync::Semaphore;

use super::backend::{Backend, Coordination, ListEntry, LockGuard, LockMode, LockWait, ObjectInfo};
use super::error::{RepoError, Result};
use super::immut::{self, ObjectLock, Retention, RetentionMode};
use super::s3_settings::{self, TokenBucket};
use super::s3_signed::{self, Signer};

/// Where an `s3://` repository is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Location {
    /// Bucket name.
    pub bucket: String,
    /// Key prefix (no leading or trailing `/`; may be empty).
    pub prefix: String,
}

impl S3Location {
    /// Parses `s3://BUCKET[/PREFIX]`.
    pub fn parse(url: &str) -> Result<S3Location> {
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| RepoError::invalid("repository", format!("{url}: not an s3:// URL")))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let bucket_ok = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'.');
        if !bucket_ok {
            return Err(RepoError::invalid(
                "repository",
                format!("{url}: bucket {bucket:?} is not a valid S3 bucket name"),
            ));
        }
        let prefix = prefix.trim_matches('/').to_owned();
        for c in prefix.split('/').filter(|c| !c.is_empty()) {
            if c == "." || c == ".." {
                return Err(RepoError::invalid(
                    "repository",
                    format!("{url}: bad prefix"),
                ));
            }
        }
        if prefix.contains("//") {
            return Err(RepoError::invalid(
                "repository",
                format!("{url}: empty prefix component"),
            ));
        }
        Ok(S3Location {
            bucket: bucket.to_owned(),
            prefix,
        })
    }
}

/// Whether a repository argument names a URL (`scheme://…`) rather than a
/// local path. Unknown schemes are refused by [`super::Repository::open`]
/// instead of becoming a local directory named `scheme:`.
pub fn url_scheme(repo: &str) -> Option<&str> {
    let (scheme, _) = repo.split_once("://")?;
    (!scheme.is_empty()
        && scheme
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'+' || c == b'-' || c == b'.'))
    .then_some(scheme)
}

/// A repository in an S3 bucket.
pub struct S3Backend {
    loc: S3Location,
    store: Arc<AmazonS3>,
    rt: tokio::runtime::Runtime,
    permits: Arc<Semaphore>,
    /// Object Lock requests object_store cannot make.
    signer: Arc<Signer>,
    /// Request-rate limit (one token per request).
    rps: Option<Arc<TokenBucket>>,
    /// Bandwidth limit (one token per byte, up and down).
    bw: Option<Arc<TokenBucket>>,
    /// The repository's Object Lock setting (from its config).
    lock: std::sync::Mutex<Option<ObjectLock>>,
    /// Keys per listing page to ask for (`None`: the server's default).
    page_keys: Option<usize>,
}

impl std::fmt::Debug for S3Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "S3Backend({})", self.location())
    }
}

fn env_secs(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn s3_err(op: &'static str, key: &str, e: object_store::Error) -> RepoError {
    match e {
        object_store::Error::NotFound { .. } => RepoError::not_found(key.to_owned()),
        e => RepoError::io(op, key, std::io::Error::other(crate::chain(&e))),
    }
}

/// The failpoint kind of a key (`chunk`, `index`, `manifest`, `snapshot`,
/// `file`: [`crate::failpoint::kind_of`] on the key as a path).
fn failpoint_kind(key: &str) -> &'static str {
    crate::failpoint::kind_of(std::path::Path::new(&format!("/{key}")))
}

/// Passes a test failpoint (a no-op in release builds).
fn failpoint_hit(kind: &str, step: &str, key: &str) -> Result<()> {
    crate::failpoint::hit(kind, step).map_err(|e| RepoError::io("failpoint", key, e))
}

/// F-40: whether the ETag a server returned for a single PUT says it
/// stored other bytes than `data` (an MD5 ETag that differs from the
/// body's). ETags that are not a plain MD5 (multipart, some encryption
/// modes) are not judged; `SHEAR_S3_ETAG_CHECK=0` turns the check off for
/// servers whose 32-hex ETags are not MD5s (SSE-KMS).
fn etag_mismatch(etag: Option<&str>, data: &[u8]) -> Option<String> {
    use md5::Digest as _;
    if std::env::var("SHEAR_S3_ETAG_CHECK").is_ok_and(|v| v == "0") {
        return None;
    }
    let e = etag?.trim().trim_matches('"');
    if e.len() != 32 || !e.bytes().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let want = hex::encode(md5::Md5::digest(data));
    (!e.eq_ignore_ascii_case(&want)).then(|| format!("server ETag {e}, body MD5 {want}"))
}

/// F-40: the S3 error code of a PUT the server refused because the body
/// it received does not match the checksum the request carries (damaged on
/// the way): `BadDigest` (AWS, Content-MD5 or x-amz-checksum-*),
/// `XAmzContentSHA256Mismatch` (AWS, the signed SHA-256), `InvalidDigest`
/// (Garage, either). `None`: any other answer.
fn rejected_as_damaged(answer: &str) -> Option<&'static str> {
    ["BadDigest", "XAmzContentSHA256Mismatch", "InvalidDigest"]
        .into_iter()
        .find(|code| answer.contains(&format!("<Code>{code}</Code>")))
}

impl S3Backend {
    /// Connects (lazily: no request is made here). Settings: the
    /// environment, then `[s3]` of the config file ([`s3_settings`]).
    pub fn new(loc: S3Location) -> Result<S3Backend> {
        let st = s3_settings::current();
        let env = |n: &str| std::env::var(n).ok().filter(|v| !v.is_empty());
        let mut b = AmazonS3Builder::from_env().with_bucket_name(&loc.bucket);
        let endpoint = env("SHEAR_S3_ENDPOINT")
            .or_else(|| env("AWS_ENDPOINT_URL"))
            .or_else(|| env("AWS_ENDPOINT"))
            .or_else(|| st.endpoint.clone())
            .unwrap_or_default();
        if !endpoint.is_empty() {
            b = b.with_endpoint(&endpoint);
        }
        if let Some(r) = env("SHEAR_S3_REGION") {
            b = b.with_region(r);
        } else if env("AWS_REGION").is_none() && env("AWS_DEFAULT_REGION").is_none() {
            b = b.with_region(st.region.clone().unwrap_or_else(|| "us-east-1".into()));
        }
        if env("AWS_ACCESS_KEY_ID").is_none() {
            if let Some(path) = &st.credentials_file {
                let c = s3_settings::load_credentials(path)
                    .map_err(|e| RepoError::invalid("S3 credentials", e))?;
                b = b
                    .with_access_key_id(c.key_id)
                    .with_secret_access_key(c.secret);
                if let Some(t) = c.token {
                    b = b.with_token(t);
                }
            }
        }
        let virtual_hosted = match env("SHEAR_S3_VIRTUAL_HOSTED") {
            Some(v) => v == "1",
            None => match st.addressing_style.as_deref() {
                None | Some("path") => false,
                Some("virtual") => true,
                Some(o) => {
                    return Err(RepoError::invalid(
                        "[s3] addressing_style",
                        format!("{o:?}: use \"path\" or \"virtual\""),
                    ))
                }
            },
        };
        b = b.with_virtual_hosted_style_request(virtual_hosted);
        let rps = match env("SHEAR_S3_MAX_RPS") {
            Some(v) => Some(v.parse::<u32>().map_err(|_| {
                RepoError::invalid("SHEAR_S3_MAX_RPS", format!("{v:?} is not a number"))
            })?),
            None => st.max_requests_per_second,
        }
        .filter(|r| *r > 0)
        .map(|r| Arc::new(TokenBucket::new(f64::from(r), f64::from(r))));
        let bw = match env("SHEAR_S3_BWLIMIT").or_else(|| st.bwlimit.clone()) {
            Some(v) => {
                let r = s3_settings::parse_rate(&v)
                    .map_err(|e| RepoError::invalid("S3 bandwidth limit", e))?;
                #[allow(clippy::cast_precision_loss)]
                let r = r as f64;
                Some(Arc::new(TokenBucket::new(r, r)))
            }
            None => None,
        };
        let timeout = Duration::from_secs(env_secs("SHEAR_S3_TIMEOUT", 60));
        let client = ClientOptions::new()
            .with_allow_http(endpoint.starts_with("http://"))
            .with_timeout(timeout)
            .with_connect_timeout(Duration::from_secs(10));
        // F-40: every PUT carries x-amz-checksum-sha256, which the server
        // checks against what it received (a mismatch is refused, and
        // retried).
        b = b.with_checksum_algorithm(Checksum::SHA256);
        b = b.with_client_options(client).with_retry(RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(15),
                base: 2.0,
            },
            max_retries: usize::try_from(env_secs("SHEAR_S3_RETRIES", 10)).unwrap_or(10),
            retry_timeout: Duration::from_secs(env_secs("SHEAR_S3_RETRY_TIMEOUT", 180)),
        });
        let region = b
            .get_config_value(&AmazonS3ConfigKey::Region)
            .unwrap_or_else(|| "us-east-1".into());
        let cfg_endpoint = b.get_config_value(&AmazonS3ConfigKey::Endpoint);
        let store = b
            .build()
            .map_err(|e| RepoError::invalid("S3 repository", crate::chain(&e)))?;
        let signer = Signer::new(
            cfg_endpoint.as_deref(),
            &region,
            &loc.bucket,
            virtual_hosted,
            Arc::clone(store.credentials()),
            timeout,
        )
        .map_err(|e| RepoError::invalid("S3 repository", e))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("shear-s3")
            .enable_all()
            .build()
            .map_err(|e| RepoError::io("start S3 runtime", "s3", e))?;
        let max = usize::try_from(env_secs(
            "SHEAR_S3_MAX_REQUESTS",
            st.max_requests.map_or(16, |m| m as u64),
        ))
        .unwrap_or(16)
        .max(1);
        Ok(S3Backend {
            loc,
            store: Arc::new(store),
            rt,
            permits: Arc::new(Semaphore::new(max)),
            signer: Arc::new(signer),
            lock: std::sync::Mutex::new(None),
            rps,
            bw,
            page_keys: env("SHEAR_S3_LIST_PAGE_KEYS")
                .and_then(|v| v.parse::<usize>().ok())
                .filter(|n| *n > 0),
        })
    }

    /// Bandwidth limit: waits until `bytes` may pass.
    fn throttle_bytes(&self, bytes: usize) {
        if let Some(bw) = &self.bw {
            #[allow(clippy::cast_precision_loss)]
            let w = bw.reserve(bytes as f64);
            if !w.is_zero() {
                std::thread::sleep(w);
            }
        }
    }

    fn object_lock(&self) -> Option<ObjectLock> {
        *self.lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends a signed request (repo/s3_signed.rs) on the runtime.
    fn signed(
        &self,
        method: reqwest::Method,
        key: &str,
        query: &'static str,
        headers: Vec<(&'static str, String)>,
        body: Vec<u8>,
    ) -> Result<s3_signed::Reply> {
        let full = if key.is_empty() {
            String::new()
        } else {
            self.path(key)?.as_ref().to_owned()
        };
        let signer = Arc::clone(&self.signer);
        let what = format!("{method} {key}?{query}");
        self.run(async move { signer.send(method, &full, query, &headers, body).await })?
            .map_err(|e| RepoError::io("S3 request", what, std::io::Error::other(e)))
    }

    fn reply_err(op: &'static str, key: &str, r: &s3_signed::Reply) -> RepoError {
        let body = String::from_utf8_lossy(&r.body);
        let msg = format!(
            "{}: {}",
            r.status,
            body.chars().take(300).collect::<String>()
        );
        if r.status == reqwest::StatusCode::FORBIDDEN {
            RepoError::Immutable {
                what: format!("{op} {key}: {msg}"),
            }
        } else {
            RepoError::io(op, key, std::io::Error::other(msg))
        }
    }

    /// PUT with `x-amz-object-lock-*` headers: retained for the period from
    /// now (this host's clock; the server refuses a date in its past).
    fn put_locked(&self, key: &str, data: &[u8], lock: ObjectLock) -> Result<()> {
        self.throttle_bytes(data.len());
        let now = time::OffsetDateTime::now_utc().unix_timestamp() * 1000;
        let until = now.saturating_add(lock.retention_ms());
        let headers = vec![
            ("x-amz-object-lock-mode", lock.mode.as_s3().to_owned()),
            (
                "x-amz-object-lock-retain-until-date",
                immut::format_ms(until),
            ),
            ("x-amz-sdk-checksum-algorithm", "SHA256".to_owned()),
            ("x-amz-checksum-sha256", s3_signed::sha256_b64(data)),
            ("content-type", "application/octet-stream".to_owned()),
        ];
        let mut attempt = 0;
        loop {
            let r = self.signed(
                reqwest::Method::PUT,
                key,
                "",
                headers.clone(),
                data.to_vec(),
            )?;
            attempt += 1;
            if !r.status.is_success() {
                let damaged = (r.status == reqwest::StatusCode::BAD_REQUEST)
                    .then(|| rejected_as_damaged(&String::from_utf8_lossy(&r.body)))
                    .flatten();
                match damaged {
                    Some(code) if attempt < 3 => {
                        tracing::warn!("upload of {key} arrived damaged ({code}): again");
                        continue;
                    }
                    _ => return Err(Self::reply_err("put (object lock)", key, &r)),
                }
            }
            let etag = r.headers.get("etag").and_then(|v| v.to_str().ok());
            match etag_mismatch(etag, data) {
                None => return Ok(()),
                Some(why) if attempt >= 3 => {
                    return Err(RepoError::corrupt(
                        key,
                        format!("{why} after {attempt} uploads"),
                    ))
                }
                Some(why) => tracing::warn!("upload of {key} arrived damaged ({why}): again"),
            }
        }
    }

    fn path(&self, key: &str) -> Result<OPath> {
        for comp in key.split('/') {
            if key.is_empty() {
                break;
            }
            if comp.is_empty() || comp == "." || comp == ".." || comp.contains('\0') {
                return Err(RepoError::invalid("storage key", format!("{key:?}")));
            }
        }
        let full = match (self.loc.prefix.is_empty(), key.is_empty()) {
            (true, _) => key.to_owned(),
            (false, true) => self.loc.prefix.clone(),
            (false, false) => format!("{}/{key}", self.loc.prefix),
        };
        OPath::parse(&full).map_err(|e| RepoError::invalid("storage key", e.to_string()))
    }

    fn rel(&self, p: &OPath) -> String {
        let s = p.as_ref();
        if self.loc.prefix.is_empty() {
            s.to_owned()
        } else {
            s.strip_prefix(&self.loc.prefix)
                .map(|r| r.trim_start_matches('/').to_owned())
                .unwrap_or_else(|| s.to_owned())
        }
    }

    /// Runs a request on the backend's runtime from any thread (also from
    /// inside another runtime's blocking section), bounded by the permits.
    fn run<T: Send + 'static>(&self, fut: impl Future<Output = T> + Send + 'static) -> Result<T> {
        let permits = Arc::clone(&self.permits);
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let delay = self.rps.as_ref().map_or(Duration::ZERO, |b| b.reserve(1.0));
        self.rt.spawn(async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let _p = permits.acquire_owned().await;
            let _ = tx.send(fut.await);
        });
        rx.recv().map_err(|_| {
            RepoError::io(
                "S3 request",
                "s3",
                std::io::Error::other("the S3 runtime stopped"),
            )
        })
    }

    /// The PUT itself (Object Lock headers where the repository asks).
    fn put_inner(&self, key: &str, data: &[u8]) -> Result<()> {
        if let Some(lock) = self.object_lock() {
            if immut::is_immutable_key(key) {
                return self.put_locked(key, data, lock);
            }
        }
        let p = self.path(key)?;
        let mut attempt = 0;
        loop {
            self.throttle_bytes(data.len());
            let (p, s) = (p.clone(), Arc::clone(&self.store));
            let payload = PutPayload::from(data.to_vec());
            let r = self.run(async move { s.put(&p, payload).await })?;
            attempt += 1;
            let r = match r {
                Ok(r) => r,
                // F-40: a server that checks the body against the signed
                // SHA-256 (Garage, AWS) refuses a damaged upload with a
                // 400 that is not retried for us: upload it again.
                Err(e) => match rejected_as_damaged(&crate::chain(&e)) {
                    Some(code) if attempt >= 3 => {
                        return Err(RepoError::corrupt(
                            key,
                            format!("the server refused it as damaged ({code}) {attempt} times"),
                        ))
                    }
                    Some(code) => {
                        tracing::warn!("upload of {key} arrived damaged ({code}): again");
                        continue;
                    }
                    None => return Err(s3_err("put", key, e)),
                },
            };
            match etag_mismatch(r.e_tag.as_deref(), data) {
                None => return Ok(()),
                Some(why) if attempt >= 3 => {
                    return Err(RepoError::corrupt(
                        key,
                        format!("{why} after {attempt} uploads"),
                    ))
                }
                Some(why) => tracing::warn!("upload of {key} arrived damaged ({why}): again"),
            }
        }
    }

    /// One GET: the body, or (bytes received, object size) when the body
    /// ended short without an error. A body that fails mid-way (after
    /// object_store's retries) is an error naming the object.
    fn get_once(
        &self,
        key: &str,
        max_len: usize,
    ) -> Result<std::result::Result<Vec<u8>, (u64, u64)>> {
        enum Got {
            Body(Vec<u8>, u64),
            TooLarge(u64),
            Request(object_store::Error),
            BodyFailed(object_store::Error),
        }
        let p = self.path(key)?;
        let s = Arc::clone(&self.store);
        let r = self.run(async move {
            let g = match s.get(&p).await {
                Ok(g) => g,
                Err(e) => return Got::Request(e),
            };
            let size = g.meta.size;
            if size > max_len as u64 {
                return Got::TooLarge(size);
            }
            match g.bytes().await {
                Ok(b) => Got::Body(b.to_vec(), size),
                Err(e) => Got::BodyFailed(e),
            }
        })?;
        match r {
            Got::Body(b, size) => {
                self.throttle_bytes(b.len());
                let got = b.len() as u64;
                // (size <= max_len was checked before the body was read.)
                if got != size {
                    return Ok(Err((got, size)));
                }
                Ok(Ok(b))
            }
            Got::TooLarge(size) => Err(RepoError::corrupt(
                key,
                format!("{size} bytes, larger than the limit {max_len}"),
            )),
            Got::Request(e) => Err(s3_err("get", key, e)),
            Got::BodyFailed(e) => Err(RepoError::io(
                "read the whole body of",
                key,
                std::io::Error::new(std::io::ErrorKind::UnexpectedEof, crate::chain(&e)),
            )),
        }
    }

    /// Lists under `prefix` (as a directory: `prefix/`), every page, with
    /// `/` as the delimiter when `delimiter`.
    fn list_pages(&self, prefix: &str, delimiter: bool) -> Result<object_store::ListResult> {
        let mut full = self.path(prefix)?.as_ref().to_owned();
        if !full.is_empty() {
            full.push('/');
        }
        let mut objects = Vec::new();
        let mut common = std::collections::BTreeSet::new();
        let mut token: Option<String> = None;
        let mut seen = std::collections::HashSet::new();
        loop {
            let opts = PaginatedListOptions {
                delimiter: delimiter.then_some(std::borrow::Cow::Borrowed("/")),
                max_keys: self.page_keys,
                page_token: token.take(),
                ..PaginatedListOptions::default()
            };
            let (s, pre) = (Arc::clone(&self.store), full.clone());
            let page = self
                .run(async move {
                    let pre = (!pre.is_empty()).then_some(pre);
                    s.list_paginated(pre.as_deref(), opts).await
                })?
                .map_err(|e| s3_err("list", prefix, e))?;
            objects.extend(page.result.objects);
            common.extend(page.result.common_prefixes);
            match page.page_token.filter(|t| !t.is_empty()) {
                None => break,
                Some(t) if !seen.insert(t.clone()) => {
                    return Err(RepoError::io(
                        "list",
                        prefix,
                        std::io::Error::other(format!(
                            "the server repeated the continuation token {t:?} after {} \
                             objects: the listing would never end",
                            objects.len()
                        )),
                    ))
                }
                Some(t) => token = Some(t),
            }
        }
        Ok(object_store::ListResult {
            common_prefixes: common.into_iter().collect(),
            objects,
        })
    }

    fn head_meta(&self, key: &str) -> Result<Option<object_store::ObjectMeta>> {
        let p = self.path(key)?;
        let s = Arc::clone(&self.store);
        match self.run(async move { s.head(&p).await })? {
            Ok(m) => Ok(Some(m)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(s3_err("head", key, e)),
        }
    }
}

impl Backend for S3Backend {
    fn location(&self) -> String {
        if self.loc.prefix.is_empty() {
            format!("s3://{}", self.loc.bucket)
        } else {
            format!("s3://{}/{}", self.loc.bucket, self.loc.prefix)
        }
    }

    fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        // Kill campaigns (F-31 on S3): a process killed before a PUT, or
        // right after it (before whatever would follow it).
        let kind = failpoint_kind(key);
        failpoint_hit(kind, "put", key)?;
        self.put_inner(key, data)?;
        failpoint_hit(kind, "put-done", key)
    }

    fn get(&self, key: &str, max_len: usize) -> Result<Vec<u8>> {
        // A body cut short (connection closed early) is resumed by
        // object_store's own retries (a range GET from where it stopped,
        // same ETag); a body that still ends short without an error (a
        // proxy that drops the length) is fetched again here, twice.
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.get_once(key, max_len)? {
                Ok(b) => return Ok(b),
                Err((got, want)) if attempt < 3 => {
                    tracing::warn!("{key}: body ended after {got} of {want} bytes: again");
                }
                Err((got, want)) => {
                    return Err(RepoError::io(
                        "read the whole body of",
                        key,
                        std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            format!("the body ended after {got} of {want} bytes, {attempt} times"),
                        ),
                    ))
                }
            }
        }
    }

    fn get_prefix(&self, key: &str, len: usize) -> Result<Option<Vec<u8>>> {
        let Some(m) = self.head_meta(key)? else {
            return Ok(None);
        };
        let end = m.size.min(len as u64);
        if end == 0 {
            return Ok(Some(Vec::new()));
        }
        let p = self.path(key)?;
        let s = Arc::clone(&self.store);
        match self.run(async move { s.get_range(&p, 0..end).await })? {
            Ok(b) => Ok(Some(b.to_vec())),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(s3_err("get range", key, e)),
        }
    }

    fn size(&self, key: &str) -> Result<Option<u64>> {
        Ok(self.head_meta(key)?.map(|m| m.size))
    }

    fn delete(&self, key: &str) -> Result<bool> {
        failpoint_hit(failpoint_kind(key), "delete", key)?;
        // S3 DELETE succeeds whether or not the object existed; HEAD first
        // only to report which (callers count).
        let existed = self.head_meta(key)?.is_some();
        let p = self.path(key)?;
        let s = Arc::clone(&self.store);
        match self.run(async move { s.delete(&p).await })? {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(existed),
            Err(e) => Err(s3_err("delete", key, e)),
        }
    }

    fn rename(&self, from: &str, to: &str) -> Result<()> {
        // Copy, then delete: not atomic. Used only to quarantine a corrupt
        // chunk (verify); a crash between leaves both, which verify and GC
        // handle.
        let (a, b) = (self.path(from)?, self.path(to)?);
        let s = Arc::clone(&self.store);
        self.run(async move { s.copy(&a, &b).await })?
            .map_err(|e| s3_err("copy", from, e))?;
        self.delete(from).map(|_| ())
    }

    fn list(&self, prefix: &str) -> Result<Vec<ListEntry>> {
        let r = self.list_pages(prefix, true)?;
        let mut out = Vec::new();
        for d in r.common_prefixes {
            if let Some(n) = d.filename() {
                out.push(ListEntry {
                    name: n.to_owned(),
                    is_dir: true,
                    size: 0,
                });
            }
        }
        for o in r.objects {
            if let Some(n) = o.location.filename() {
                out.push(ListEntry {
                    name: n.to_owned(),
                    is_dir: false,
                    size: o.size,
                });
            }
        }
        if out.is_empty() && !prefix.is_empty() {
            return Err(RepoError::not_found(prefix.to_owned()));
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn create_dir(&self, key: &str) -> Result<()> {
        // No directories: "new" means no object under the prefix yet. Not
        // atomic (no conditional PUT); backup ids are per-second times and
        // the in-progress marker names the writer.
        match self.list(key) {
            Ok(_) => Err(RepoError::AlreadyExists {
                what: format!("{key} in {}", self.location()),
            }),
            Err(e) if e.kind() == super::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn ensure_dir(&self, _key: &str) -> Result<()> {
        Ok(())
    }

    fn remove_tree(&self, key: &str) -> Result<()> {
        for o in self.list_objects(key)? {
            self.delete(&o.key)?;
        }
        Ok(())
    }

    fn lock(&self, _key: &str, _mode: LockMode, _wait: LockWait) -> Result<LockGuard> {
        // No locks in an object store: the callers coordinate through
        // in-progress markers and GC's condemned lists (repo/coord.rs).
        Ok(LockGuard::new(Box::new(())))
    }

    fn is_temp_name(&self, _name: &str) -> bool {
        false // PUT is atomic: there are no temp objects
    }

    fn coordination(&self) -> Coordination {
        Coordination::Markers
    }

    fn list_objects(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        let r = self.list_pages(prefix, false)?;
        let mut out = Vec::with_capacity(r.objects.len());
        for m in r.objects {
            out.push(ObjectInfo {
                key: self.rel(&m.location),
                size: m.size,
                modified_ms: m.last_modified.timestamp_millis(),
            });
        }
        Ok(out)
    }

    fn modified_ms(&self, key: &str) -> Result<Option<i64>> {
        Ok(self
            .head_meta(key)?
            .map(|m| m.last_modified.timestamp_millis()))
    }

    fn set_object_lock(&self, lock: Option<ObjectLock>) -> Result<()> {
        *self.lock.lock().unwrap_or_else(|p| p.into_inner()) = lock;
        Ok(())
    }

    fn retention(&self, key: &str) -> Result<Option<Retention>> {
        let r = self.signed(reqwest::Method::HEAD, key, "", Vec::new(), Vec::new())?;
        if r.status == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !r.status.is_success() {
            return Err(Self::reply_err("head", key, &r));
        }
        let h = |n: &str| r.headers.get(n).and_then(|v| v.to_str().ok());
        let mode = match h("x-amz-object-lock-mode") {
            Some("COMPLIANCE") => RetentionMode::Compliance,
            Some("GOVERNANCE") => RetentionMode::Governance,
            _ => return Ok(None),
        };
        let until = h("x-amz-object-lock-retain-until-date").and_then(immut::parse_ms);
        Ok(until.map(|until_ms| Retention { mode, until_ms }))
    }

    fn extend_retention(&self, key: &str, until_ms: i64) -> Result<()> {
        let Some(lock) = self.object_lock() else {
            return Err(RepoError::invalid(
                "object lock",
                format!("{key}: the repository has no Object Lock setting"),
            ));
        };
        let body = format!(
            "<Retention xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><Mode>{}</Mode>\
             <RetainUntilDate>{}</RetainUntilDate></Retention>",
            lock.mode.as_s3(),
            immut::format_ms(until_ms)
        )
        .into_bytes();
        let headers = vec![
            ("x-amz-sdk-checksum-algorithm", "SHA256".to_owned()),
            ("x-amz-checksum-sha256", s3_signed::sha256_b64(&body)),
            ("content-type", "application/xml".to_owned()),
        ];
        let r = self.signed(reqwest::Method::PUT, key, "retention", headers, body)?;
        if r.status.is_success() {
            Ok(())
        } else {
            Err(Self::reply_err("put retention", key, &r))
        }
    }

    fn check_object_lock(&self) -> Result<()> {
        let r = self.signed(
            reqwest::Method::GET,
            "",
            "object-lock",
            Vec::new(),
            Vec::new(),
        )?;
        let body = String::from_utf8_lossy(&r.body);
        if r.status.is_success() && body.contains("<ObjectLockEnabled>Enabled</ObjectLockEnabled>")
        {
            return Ok(());
        }
        Err(RepoError::invalid(
            "object lock",
            format!(
                "bucket {} has no Object Lock enabled ({}): create it with Object Lock \
                 (e.g. `aws s3api create-bucket --object-lock-enabled-for-bucket`)",
                self.loc.bucket, r.status
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn damaged_upload_codes_are_recognised_and_nothing_else() {
        let garage = "Server returned non-2xx status code: 400 Bad Request: <?xml version=\"1.0\" \
             encoding=\"UTF-8\"?><Error><Code>InvalidDigest</Code><Message>Failed to validate \
             checksum for algorithm Sha256</Message></Error>";
        assert_eq!(rejected_as_damaged(garage), Some("InvalidDigest"));
        assert_eq!(
            rejected_as_damaged("<Error><Code>BadDigest</Code></Error>"),
            Some("BadDigest")
        );
        assert_eq!(
            rejected_as_damaged("<Code>XAmzContentSHA256Mismatch</Code>"),
            Some("XAmzContentSHA256Mismatch")
        );
        for other in [
            "<Error><Code>AccessDenied</Code></Error>",
            "<Error><Code>SignatureDoesNotMatch</Code><Message>BadDigest</Message></Error>",
            "connection reset",
        ] {
            assert_eq!(rejected_as_damaged(other), None, "{other}");
        }
    }

    #[test]
    fn etag_mismatch_judges_plain_md5_etags_only() {
        let body = b"chunk bytes";
        use md5::Digest as _;
        let md5 = hex::encode(md5::Md5::digest(body));
        assert_eq!(etag_mismatch(Some(&format!("\"{md5}\"")), body), None);
        assert!(etag_mismatch(Some("\"00000000000000000000000000000000\""), body).is_some());
        // Multipart-style and absent ETags are not judged.
        assert_eq!(etag_mismatch(Some("\"abc-2\""), body), None);
        assert_eq!(etag_mismatch(None, body), None);
    }

    #[test]
    fn parses_s3_urls() {
        let l = S3Location::parse("s3://my-bucket/a/b/").unwrap();
        assert_eq!(l.bucket, "my-bucket");
        assert_eq!(l.prefix, "a/b");
        assert_eq!(S3Location::parse("s3://bkt").unwrap().prefix, "");
        S3Location::parse("s3://B_ad/x").unwrap_err();
        S3Location::parse("s3://ok-bucket/../x").unwrap_err();
        S3Location::parse("/var/x").unwrap_err();
        assert_eq!(url_scheme("s3://b/p"), Some("s3"));
        assert_eq!(url_scheme("gs://b"), Some("gs"));
        assert_eq!(url_scheme("/var/lib/shear/repo"), None);
        assert_eq!(url_scheme("./a://b"), None);
    }
}
