//! The daemon's JSON HTTP API (docs/api.md), with axum on hyper 1.
//!
//! - A unix socket (mode 0600) without authentication: whoever may open it
//!   is root or the daemon's user.
//! - TCP listeners only with an API token (`Authorization: Bearer
//!   NAME:SECRET`, see [`super::tokens`]); without a valid one (unknown,
//!   wrong, disabled, expired) every request gets 401 and a body that says
//!   nothing more. A valid token's [`Scope`] is checked next, before any
//!   resource is looked up: a read-only token gets 403 on every other
//!   method, a VM-limited token 403 on host-wide views (status, repos,
//!   metrics) and sees only its VMs elsewhere — another VM's backup, job
//!   or task is answered exactly as one that does not exist (F-48).
//! - Only typed operations: no route passes QMP or QGA through, and no
//!   path from a request reaches QEMU or the file system (a repository is
//!   chosen among the configured ones).
//! - Every connection is its own task: a slow client never blocks others.
//!   Request headers must arrive within [`HEADER_TIMEOUT`], a whole request
//!   is answered within [`REQUEST_TIMEOUT`] (408 otherwise), bodies are
//!   limited to [`MAX_BODY`] (413), connections per listener to
//!   [`MAX_CONNECTIONS`].
//! - Errors are JSON objects `{"error": "...", "kind": "..."}`.

use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Extension, Path, Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::task::JoinHandle;

use super::config::DaemonConfig;
use super::scheduler::Trigger;
use super::tokens::Scope;
use super::{Shared, StartError};
use crate::repo::{BackupId, Repository, VmId};

/// Largest request body.
pub const MAX_BODY: usize = 64 * 1024;
/// Time a client has to send its request headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a request may take in all (body included).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Concurrent connections per listener (more wait in the kernel's queue).
pub const MAX_CONNECTIONS: usize = 128;
/// Longest task log returned.
const MAX_LOG: u64 = 16 << 20;

/// An API error: status, kind, message.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    msg: String,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, msg: impl Into<String>) -> ApiError {
        ApiError {
            status,
            kind,
            msg: msg.into(),
        }
    }
    fn bad(msg: impl Into<String>) -> ApiError {
        Self::new(StatusCode::BAD_REQUEST, "bad-request", msg)
    }
    fn not_found(msg: impl Into<String>) -> ApiError {
        Self::new(StatusCode::NOT_FOUND, "not-found", msg)
    }
    fn internal(msg: impl Into<String>) -> ApiError {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", msg)
    }
    fn repo(e: &crate::repo::RepoError) -> ApiError {
        use crate::repo::ErrorKind as K;
        let msg = crate::chain(e);
        match e.kind() {
            K::NotFound => Self::not_found(msg),
            K::InvalidInput => Self::bad(msg),
            K::Key => Self::new(StatusCode::CONFLICT, "locked", msg),
            K::Busy => Self::new(StatusCode::CONFLICT, "busy", msg),
            K::Corrupt => Self::new(StatusCode::CONFLICT, "damaged", msg),
            _ => Self::internal(msg),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(json!({"error": self.msg, "kind": self.kind})),
        )
            .into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;

impl From<PathRejection> for ApiError {
    fn from(e: PathRejection) -> Self {
        ApiError::bad(format!("bad path: {e}"))
    }
}

impl From<QueryRejection> for ApiError {
    fn from(e: QueryRejection) -> Self {
        ApiError::bad(format!("bad query: {e}"))
    }
}

/// The listeners' accept loops; aborted on drop.
#[derive(Debug)]
pub struct Servers(Vec<JoinHandle<()>>);

impl Drop for Servers {
    fn drop(&mut self) {
        for h in &self.0 {
            h.abort();
        }
    }
}

/// The routes (`tcp`: token auth in front).
pub fn router(shared: Arc<Shared>, tcp: bool) -> Router {
    let r = Router::new()
        .route("/api/v1/status", get(status))
        .route("/api/v1/jobs", get(jobs))
        .route("/api/v1/jobs/{id}", get(job))
        .route("/api/v1/jobs/{id}/run", post(run_job))
        .route("/api/v1/tasks", get(tasks))
        .route("/api/v1/tasks/{id}", get(task))
        .route("/api/v1/tasks/{id}/log", get(task_log))
        .route("/api/v1/backups", get(backups))
        .route("/api/v1/backups/vm/{vmid}/{time}", get(backup))
        .route("/api/v1/vms", get(vms))
        .route("/api/v1/repos", get(repos))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method-not-allowed",
                "method not allowed on this endpoint",
            )
        })
        .layer(middleware::from_fn(timeout));
    let r = if tcp {
        r.layer(middleware::from_fn_with_state(shared.clone(), auth))
    } else {
        r.layer(Extension(Scope::full()))
    };
    r.with_state(shared)
}

async fn timeout(req: Request, next: Next) -> Response {
    match tokio::time::timeout(REQUEST_TIMEOUT, next.run(req)).await {
        Ok(r) => r,
        Err(_) => ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "timeout",
            "the request took too long",
        )
        .into_response(),
    }
}

async fn auth(State(shared): State<Arc<Shared>>, mut req: Request, next: Next) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    let state_dir = shared.config().state_dir.clone();
    let scope = match presented {
        Some(p) => tokio::task::spawn_blocking(move || {
            super::tokens::load(&state_dir)
                .ok()
                .and_then(|t| super::tokens::authenticate(&t, &p, jiff::Timestamp::now()))
        })
        .await
        .ok()
        .flatten(),
        None => None,
    };
    let Some(scope) = scope else {
        let mut r =
            ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "unauthorized").into_response();
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return r;
    };
    // Privileges before any lookup: the answer cannot depend on whether
    // the resource exists.
    let reading = matches!(
        *req.method(),
        axum::http::Method::GET | axum::http::Method::HEAD
    );
    let host_wide = matches!(
        req.uri().path(),
        "/api/v1/status" | "/api/v1/repos" | "/metrics"
    );
    if (scope.read_only && !reading) || (host_wide && !scope.is_host_wide()) {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this token may not do that",
        )
        .into_response();
    }
    req.extensions_mut().insert(scope);
    next.run(req).await
}

/// Bind the unix socket and the TCP listeners and start serving.
pub async fn start(shared: Arc<Shared>, cfg: &DaemonConfig) -> anyhow::Result<Servers> {
    let mut handles = Vec::new();
    let unix = Arc::new(bind_unix(&cfg.api_socket)?);
    let app = router(shared.clone(), false);
    handles.push(tokio::spawn(accept_loop(
        move || {
            let unix = unix.clone();
            async move { unix.accept().await.map(|(s, _)| s) }
        },
        app,
        "API socket",
    )));
    for addr in &cfg.api_listen {
        let l = Arc::new(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?,
        );
        let app = router(shared.clone(), true);
        tracing::info!(%addr, "API listening on TCP (tokens required)");
        handles.push(tokio::spawn(accept_loop(
            move || {
                let l = l.clone();
                async move { l.accept().await.map(|(s, _)| s) }
            },
            app,
            "API TCP",
        )));
    }
    Ok(Servers(handles))
}

/// Serve every accepted connection on its own task, at most
/// MAX_CONNECTIONS at once; an accept error is logged and retried.
async fn accept_loop<A, F, I>(accept: A, app: Router, what: &'static str)
where
    A: Fn() -> F,
    F: std::future::Future<Output = std::io::Result<I>>,
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let sem = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = sem.clone().acquire_owned().await else {
            return;
        };
        match accept().await {
            Ok(s) => {
                let app = app.clone();
                tokio::spawn(async move {
                    serve_conn(s, app).await;
                    drop(permit);
                });
            }
            Err(e) => {
                tracing::warn!("{what} accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

fn bind_unix(path: &FsPath) -> anyhow::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Some(parent) = path.parent() {
        if !parent.exists() {
            super::private_dir(parent)?;
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(md) if md.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                anyhow::bail!(
                    "another daemon answers on {}; stop it first",
                    path.display()
                );
            }
            // A stale socket of a daemon that died.
            std::fs::remove_file(path)?;
        }
        Ok(_) => anyhow::bail!(
            "{} exists and is not a socket; not touching it",
            path.display()
        ),
        Err(_) => {}
    }
    let l = tokio::net::UnixListener::bind(path)
        .map_err(|e| anyhow::anyhow!("cannot bind {}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

async fn serve_conn<I>(io: I, app: Router)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper_util::service::TowerToHyperService::new(app);
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_BODY)
        .serve_connection(hyper_util::rt::TokioIo::new(io), svc);
    // A keep-alive connection lives at most this long.
    let _ = tokio::time::timeout(Duration::from_secs(600), conn).await;
}

// ---- handlers -----------------------------------------------------------

async fn status(State(s): State<Arc<Shared>>) -> Json<Value> {
    let cfg = s.config();
    Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "config": s.config_path.display().to_string(),
        "jobs": cfg.jobs.len(),
        "running": s.running().len(),
        "shutting_down": s.is_shutting_down(),
    }))
}

fn job_json(s: &Shared, cfg: &DaemonConfig, j: &super::config::Job) -> Value {
    let mut v = serde_json::to_value(j).unwrap_or(Value::Null);
    let last = s.lock_state().jobs.get(&j.id).cloned();
    if let Value::Object(m) = &mut v {
        m.insert(
            "next_run".into(),
            json!(s.next_of(&j.id).map(|z| z.to_string())),
        );
        m.insert("last".into(), json!(last));
        m.insert(
            "running_task".into(),
            json!(s.running().get(&j.id).map(|r| r.task.clone())),
        );
        if let Some(b) = &j.backup {
            m.insert("vms".into(), json!(super::run::job_vms(cfg, &b.vms)));
        }
    }
    v
}

/// The VMs of `j` that `scope` sees, or `None` when the job is not
/// visible to it at all (a VM-limited token sees only backup jobs that
/// cover one of its VMs).
fn visible_vms(
    cfg: &DaemonConfig,
    scope: &Scope,
    j: &super::config::Job,
) -> Option<Option<Vec<String>>> {
    let covered = j.backup.as_ref().map(|b| super::run::job_vms(cfg, &b.vms));
    if scope.is_host_wide() {
        return Some(covered);
    }
    let mine: Vec<String> = covered?.into_iter().filter(|v| scope.sees_vm(v)).collect();
    (!mine.is_empty()).then_some(Some(mine))
}

fn scoped_job_json(
    s: &Shared,
    cfg: &DaemonConfig,
    scope: &Scope,
    j: &super::config::Job,
) -> Option<Value> {
    let vms = visible_vms(cfg, scope, j)?;
    let mut v = job_json(s, cfg, j);
    if !scope.is_host_wide() {
        if let Value::Object(m) = &mut v {
            m.insert("vms".into(), json!(vms));
            // The configured selection may name other tenants' VMs.
            if let Some(Value::Object(b)) = m.get_mut("backup") {
                b.insert("vms".into(), json!(vms));
            }
        }
    }
    Some(v)
}

async fn jobs(State(s): State<Arc<Shared>>, Extension(scope): Extension<Scope>) -> Json<Value> {
    let cfg = s.config();
    Json(Value::Array(
        cfg.jobs
            .iter()
            .filter_map(|j| scoped_job_json(&s, &cfg, &scope, j))
            .collect(),
    ))
}

async fn job(
    State(s): State<Arc<Shared>>,
    Extension(scope): Extension<Scope>,
    id: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<Value>> {
    let Path(id) = id?;
    let cfg = s.config();
    cfg.job(&id)
        .and_then(|j| scoped_job_json(&s, &cfg, &scope, j))
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no job {id:?}")))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RunBody {
    /// Only these VMs of the job.
    vmids: Option<Vec<String>>,
}

async fn read_body(body: Body) -> ApiResult<bytes_like::Bytes> {
    axum::body::to_bytes(body, MAX_BODY).await.map_err(|e| {
        let too_big = std::error::Error::source(&e)
            .is_some_and(|s| s.to_string().contains("length limit"))
            || e.to_string().contains("length limit");
        if too_big {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too-large",
                format!("request body over {MAX_BODY} bytes"),
            )
        } else {
            ApiError::bad(format!("cannot read the request body: {e}"))
        }
    })
}

mod bytes_like {
    pub type Bytes = axum::body::Bytes;
}

async fn run_job(
    State(s): State<Arc<Shared>>,
    Extension(scope): Extension<Scope>,
    id: Result<Path<String>, PathRejection>,
    body: Body,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let Path(id) = id?;
    let bytes = read_body(body).await?;
    let mut req: RunBody = if bytes.iter().all(u8::is_ascii_whitespace) {
        RunBody::default()
    } else {
        serde_json::from_slice(&bytes).map_err(|e| ApiError::bad(format!("bad JSON body: {e}")))?
    };
    let cfg = s.config();
    let (job, visible) = cfg
        .job(&id)
        .and_then(|j| Some((j, visible_vms(&cfg, &scope, j)?)))
        .ok_or_else(|| ApiError::not_found(format!("no job {id:?}")))?;
    if let Some(v) = &req.vmids {
        let Some(b) = &job.backup else {
            return Err(ApiError::bad("vmids only apply to backup jobs"));
        };
        let covered = super::run::job_vms(&cfg, &b.vms);
        for x in v {
            // Another tenant's VM reads like one the job does not cover.
            if !covered.contains(x) || !scope.sees_vm(x) {
                return Err(ApiError::bad(format!("job {id:?} does not cover VM {x:?}")));
            }
        }
    } else if !scope.is_host_wide() {
        // A VM-limited token runs the job for its own VMs only.
        req.vmids = visible;
    }
    match s.start_job(&id, Trigger::Api, None, req.vmids) {
        Ok(t) => Ok((StatusCode::ACCEPTED, Json(json!(t)))),
        Err(e @ StartError::NoSuchJob(_)) => Err(ApiError::not_found(e.to_string())),
        Err(e @ StartError::AlreadyRunning { .. }) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            e.to_string(),
        )),
        Err(e @ StartError::ShuttingDown) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting-down",
            e.to_string(),
        )),
        Err(e @ StartError::Task(_)) => Err(ApiError::internal(e.to_string())),
    }
}

/// A task as `scope` may see it: a VM-limited token sees the tasks of the
/// jobs it sees, with only its VMs' results.
fn scoped_task(
    cfg: &DaemonConfig,
    scope: &Scope,
    mut t: super::tasks::TaskInfo,
) -> Option<super::tasks::TaskInfo> {
    if scope.is_host_wide() {
        return Some(t);
    }
    visible_vms(cfg, scope, cfg.job(&t.job)?)?;
    let n = t.vms.len();
    t.vms.retain(|v| scope.sees_vm(&v.vmid));
    if t.vms.len() != n {
        t.summary = None;
    }
    Some(t)
}

async fn tasks(State(s): State<Arc<Shared>>, Extension(scope): Extension<Scope>) -> Json<Value> {
    let cfg = s.config();
    let list: Vec<_> = s
        .tasks
        .list()
        .into_iter()
        .filter_map(|t| scoped_task(&cfg, &scope, t))
        .collect();
    Json(json!(list))
}

async fn task(
    State(s): State<Arc<Shared>>,
    Extension(scope): Extension<Scope>,
    id: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<Value>> {
    let Path(id) = id?;
    let cfg = s.config();
    s.tasks
        .get(&id)
        .and_then(|t| scoped_task(&cfg, &scope, t))
        .map(|t| Json(json!(t)))
        .ok_or_else(|| ApiError::not_found(format!("no task {id:?}")))
}

async fn task_log(
    State(s): State<Arc<Shared>>,
    Extension(scope): Extension<Scope>,
    id: Result<Path<String>, PathRejection>,
) -> ApiResult<Response> {
    use std::io::Read;
    let Path(id) = id?;
    let no_task = || ApiError::not_found(format!("no task {id:?}"));
    if !scope.is_host_wide() {
        // The log speaks of every VM of the run: only for a task whose
        // VMs are all this token's.
        let cfg = s.config();
        let t = s.tasks.get(&id).ok_or_else(no_task)?;
        let whole = t.vms.iter().all(|v| scope.sees_vm(&v.vmid));
        scoped_task(&cfg, &scope, t)
            .filter(|_| whole)
            .ok_or_else(no_task)?;
    }
    let path = s.tasks.log_path(&id).ok_or_else(no_task)?;
    let text = tokio::task::spawn_blocking(move || {
        let mut v = Vec::new();
        std::fs::File::open(&path).and_then(|f| f.take(MAX_LOG).read_to_end(&mut v))?;
        Ok::<_, std::io::Error>(v)
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?
    .map_err(|e| ApiError::not_found(format!("task log: {e}")))?;
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RepoQuery {
    repo: Option<String>,
    vmid: Option<String>,
}

/// The configured repository a request names (never an arbitrary path).
fn pick_repo(cfg: &DaemonConfig, asked: Option<&str>) -> ApiResult<PathBuf> {
    let repos = cfg.repos();
    match asked {
        Some(a) => repos
            .into_iter()
            .find(|r| r.as_os_str() == a)
            .ok_or_else(|| ApiError::not_found(format!("no repository {a:?} in the config"))),
        None if repos.len() == 1 => Ok(repos.into_iter().next().unwrap_or_default()),
        None => Err(ApiError::bad(format!(
            "name the repository: ?repo=PATH, one of {repos:?}"
        ))),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> ApiResult<T> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
}

async fn backups(
    State(s): State<Arc<Shared>>,
    Extension(scope): Extension<Scope>,
    q: Result<Query<RepoQuery>, QueryRejection>,
) -> ApiResult<Json<Value>> {
    let Query(q) = q?;
    let cfg = s.config();
    let repo = pick_repo(&cfg, q.repo.as_deref())?;
    let vmid = match q.vmid.as_deref().map(VmId::new) {
        None => None,
        Some(Ok(v)) => Some(v),
        Some(Err(e)) => return Err(ApiError::repo(&e)),
    };
    blocking(move || {
        let key = cfg
            .key_for(&repo)
            .map_err(|m| ApiError::new(StatusCode::CONFLICT, "locked", m))?;
        let r = Repository::open(&repo, key).map_err(|e| ApiError::repo(&e))?;
        let mut list = r
            .list_backups(vmid.as_ref())
            .map_err(|e| ApiError::repo(&e))?;
        // Another tenant's VM lists like a VM without backups.
        list.retain(|b| scope.sees_vm(b.id.vmid().as_str()));
        Ok(Json(json!(list)))
    })
    .await
}

async fn backup(
    State(s): State<Arc<Shared>>,
    Extension(scope): Extension<Scope>,
    p: Result<Path<(String, String)>, PathRejection>,
    q: Result<Query<RepoQuery>, QueryRejection>,
) -> ApiResult<Json<Value>> {
    let Path((vmid, time)) = p?;
    let Query(q) = q?;
    let cfg = s.config();
    let repo = pick_repo(&cfg, q.repo.as_deref())?;
    let id: BackupId = format!("vm/{vmid}/{time}")
        .parse()
        .map_err(|e: crate::repo::RepoError| ApiError::repo(&e))?;
    // One answer for "not there" and "not yours".
    let no_backup = {
        let id = id.to_string();
        move || ApiError::not_found(format!("no backup {id}"))
    };
    if !scope.sees_vm(&vmid) {
        return Err(no_backup());
    }
    blocking(move || {
        let key = cfg
            .key_for(&repo)
            .map_err(|m| ApiError::new(StatusCode::CONFLICT, "locked", m))?;
        let r = Repository::open(&repo, key).map_err(|e| ApiError::repo(&e))?;
        let m = r.load_manifest(&id).map_err(|e| match e.kind() {
            crate::repo::ErrorKind::NotFound => no_backup(),
            _ => ApiError::repo(&e),
        })?;
        let verify = r.verify_state(&id).ok().flatten();
        Ok(Json(
            json!({"backup_id": id.to_string(), "manifest": m, "verify": verify}),
        ))
    })
    .await
}

async fn vms(
    State(s): State<Arc<Shared>>,
    Extension(scope): Extension<Scope>,
) -> ApiResult<Json<Value>> {
    let cfg = s.config();
    let list = blocking(move || Ok(super::vms::known_vms(&cfg))).await?;
    let out: Vec<Value> = list
        .into_iter()
        .filter(|v| scope.sees_vm(&v.vmid))
        .map(|v| {
            let st = s.lock_state().vms.get(&v.vmid).cloned();
            let mut j = json!(v);
            if let Value::Object(m) = &mut j {
                m.insert("newest_good_backup".into(), json!(s.newest_good(&v.vmid)));
                m.insert(
                    "rpo_seconds".into(),
                    json!(s.config().rpo_of(&v.vmid).map(|d| d.as_secs())),
                );
                m.insert("last".into(), json!(st));
            }
            j
        })
        .collect();
    Ok(Json(Value::Array(out)))
}

async fn repos(State(s): State<Arc<Shared>>) -> Json<Value> {
    Json(json!(s.repo_status().into_values().collect::<Vec<_>>()))
}

async fn metrics(State(s): State<Arc<Shared>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        super::metrics::render(&s),
    )
        .into_response()
}
