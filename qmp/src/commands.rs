//! Typed helpers for the commands the agent uses, and the waits built on
//! them (export deletion, job conclusion).

use std::time::Duration;

use serde::de::IgnoredAny;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::time::Instant;

use crate::client::{Command, Qmp};
use crate::error::{Error, Result};
use crate::events::{Delivery, Events};
use crate::types::{
    BitmapAddOptions, BitmapSource, BlockExportInfo, BlockInfo, BlockNodeInfo, ExportRemoveMode,
    JobInfo, JobStatus, NbdExport, SetAction, StatusInfo, TransactionAction, VersionInfo,
};

/// How often a wait re-checks state by query when no event arrives. Events
/// make the common case fast; the poll makes a missed event (queue overflow)
/// cost at most this long.
const WAIT_POLL_INTERVAL: Duration = Duration::from_millis(250);

macro_rules! query_command {
    ($(#[$meta:meta])* $name:ident, $qmp:literal, $reply:ty) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, Default, Serialize)]
        pub struct $name;

        impl Command for $name {
            const NAME: &'static str = $qmp;
            type Reply = $reply;
        }
    };
}

query_command!(
    /// `query-block`.
    QueryBlock, "query-block", Vec<BlockInfo>);
query_command!(
    /// `query-status`.
    QueryStatus, "query-status", StatusInfo);
query_command!(
    /// `query-jobs`.
    QueryJobs, "query-jobs", Vec<JobInfo>);
query_command!(
    /// `query-block-exports`.
    QueryBlockExports, "query-block-exports", Vec<BlockExportInfo>);
query_command!(
    /// `query-version`.
    QueryVersion, "query-version", VersionInfo);

/// `query-named-block-nodes` with `flat: true` (no nested backing images).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct QueryNamedBlockNodes {
    /// Always true here: the nested form repeats every backing chain.
    pub flat: bool,
}

impl Default for QueryNamedBlockNodes {
    fn default() -> Self {
        Self { flat: true }
    }
}

impl Command for QueryNamedBlockNodes {
    const NAME: &'static str = "query-named-block-nodes";
    type Reply = Vec<BlockNodeInfo>;
}

/// Typed helpers. Each uses this handle's deadline
/// ([`Qmp::with_timeout`]); the `*_wait` helpers take an overall deadline
/// for the wait as well.
impl Qmp {
    // ---- queries -------------------------------------------------------

    /// `query-block`: guest devices and the root node of each.
    pub async fn query_block(&self) -> Result<Vec<BlockInfo>> {
        self.run(&QueryBlock).await
    }

    /// `query-named-block-nodes` (flat): every named node.
    pub async fn query_named_block_nodes(&self) -> Result<Vec<BlockNodeInfo>> {
        self.run(&QueryNamedBlockNodes::default()).await
    }

    /// `query-status`.
    pub async fn query_status(&self) -> Result<StatusInfo> {
        self.run(&QueryStatus).await
    }

    /// `query-version`.
    pub async fn query_version(&self) -> Result<VersionInfo> {
        self.run(&QueryVersion).await
    }

    /// `query-jobs`.
    pub async fn query_jobs(&self) -> Result<Vec<JobInfo>> {
        self.run(&QueryJobs).await
    }

    /// `query-block-exports`.
    pub async fn query_block_exports(&self) -> Result<Vec<BlockExportInfo>> {
        self.run(&QueryBlockExports).await
    }

    // ---- block graph ---------------------------------------------------

    /// `blockdev-add` with raw options (`{"driver": ..., "node-name": ...}`).
    pub async fn blockdev_add(&self, options: Value) -> Result<()> {
        self.unit("blockdev-add", options).await
    }

    /// `blockdev-del`.
    pub async fn blockdev_del(&self, node_name: &str) -> Result<()> {
        self.unit("blockdev-del", json!({ "node-name": node_name }))
            .await
    }

    /// `qom-set`: e.g. `qom_set(qdev, "drive", json!(node))` to point a
    /// device at another node.
    pub async fn qom_set(&self, path: &str, property: &str, value: Value) -> Result<()> {
        self.unit(
            "qom-set",
            json!({ "path": path, "property": property, "value": value }),
        )
        .await
    }

    /// `qom-get`, raw value.
    pub async fn qom_get(&self, path: &str, property: &str) -> Result<Value> {
        self.execute_value("qom-get", json!({ "path": path, "property": property }))
            .await
    }

    /// `transaction`: all actions or none.
    pub async fn transaction(&self, actions: &[TransactionAction]) -> Result<()> {
        self.unit("transaction", json!({ "actions": actions }))
            .await
    }

    // ---- dirty bitmaps -------------------------------------------------

    /// `block-dirty-bitmap-add`.
    pub async fn block_dirty_bitmap_add(
        &self,
        node: &str,
        name: &str,
        opts: BitmapAddOptions,
    ) -> Result<()> {
        let action = TransactionAction::bitmap_add(node, name, opts);
        self.unit("block-dirty-bitmap-add", action.data).await
    }

    /// `block-dirty-bitmap-remove`.
    pub async fn block_dirty_bitmap_remove(&self, node: &str, name: &str) -> Result<()> {
        self.bitmap_op("block-dirty-bitmap-remove", node, name)
            .await
    }

    /// `block-dirty-bitmap-clear`.
    pub async fn block_dirty_bitmap_clear(&self, node: &str, name: &str) -> Result<()> {
        self.bitmap_op("block-dirty-bitmap-clear", node, name).await
    }

    /// `block-dirty-bitmap-enable`.
    pub async fn block_dirty_bitmap_enable(&self, node: &str, name: &str) -> Result<()> {
        self.bitmap_op("block-dirty-bitmap-enable", node, name)
            .await
    }

    /// `block-dirty-bitmap-disable`.
    pub async fn block_dirty_bitmap_disable(&self, node: &str, name: &str) -> Result<()> {
        self.bitmap_op("block-dirty-bitmap-disable", node, name)
            .await
    }

    /// `block-dirty-bitmap-merge` of `sources` into `node`/`target`.
    pub async fn block_dirty_bitmap_merge(
        &self,
        node: &str,
        target: &str,
        sources: &[BitmapSource],
    ) -> Result<()> {
        let action = TransactionAction::bitmap_merge(node, target, sources);
        self.unit("block-dirty-bitmap-merge", action.data).await
    }

    async fn bitmap_op(&self, command: &str, node: &str, name: &str) -> Result<()> {
        self.unit(command, json!({ "node": node, "name": name }))
            .await
    }

    // ---- NBD server and exports ----------------------------------------

    /// `nbd-server-start` on a unix socket (legacy address form), with an
    /// optional connection limit.
    pub async fn nbd_server_start_unix(
        &self,
        socket_path: &str,
        max_connections: Option<u32>,
    ) -> Result<()> {
        let mut args = json!({ "addr": { "type": "unix", "data": { "path": socket_path } } });
        if let (Some(max), Value::Object(map)) = (max_connections, &mut args) {
            map.insert("max-connections".into(), max.into());
        }
        self.unit("nbd-server-start", args).await
    }

    /// `nbd-server-stop`.
    pub async fn nbd_server_stop(&self) -> Result<()> {
        self.unit("nbd-server-stop", Value::Null).await
    }

    /// `block-export-add` for an NBD export.
    pub async fn block_export_add(&self, export: &NbdExport) -> Result<()> {
        self.unit("block-export-add", export).await
    }

    /// `block-export-del` without waiting; the export may still be listed
    /// (`shutting-down`) until `BLOCK_EXPORT_DELETED`.
    pub async fn block_export_del(&self, id: &str, mode: ExportRemoveMode) -> Result<()> {
        self.unit("block-export-del", json!({ "id": id, "mode": mode }))
            .await
    }

    /// `block-export-del`, then wait up to `timeout` until the export is
    /// gone: `BLOCK_EXPORT_DELETED` for `id`, or `query-block-exports` no
    /// longer listing it (checked every 250 ms in case the event was missed).
    /// The node stays in use until then, so teardown must wait here.
    pub async fn block_export_del_wait(
        &self,
        id: &str,
        mode: ExportRemoveMode,
        timeout: Duration,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        // Subscribe first: the event can arrive before the reply.
        let mut events = self.subscribe();
        self.bounded(deadline).block_export_del(id, mode).await?;
        let what = format!("BLOCK_EXPORT_DELETED id={id}");
        loop {
            let gone = !self
                .bounded(deadline)
                .query_block_exports()
                .await?
                .iter()
                .any(|e| e.id == id);
            if gone {
                return Ok(());
            }
            let seen = next_matching(&mut events, deadline, &what, timeout, |e| {
                e.name == "BLOCK_EXPORT_DELETED" && e.data_str("id") == Some(id)
            })
            .await?;
            if seen {
                return Ok(());
            }
        }
    }

    // ---- VM run state --------------------------------------------------

    /// `stop` (pause vCPUs).
    pub async fn stop(&self) -> Result<()> {
        self.unit("stop", Value::Null).await
    }

    /// `cont` (resume vCPUs).
    pub async fn cont(&self) -> Result<()> {
        self.unit("cont", Value::Null).await
    }

    /// `system_powerdown` (ACPI power button).
    pub async fn system_powerdown(&self) -> Result<()> {
        self.unit("system_powerdown", Value::Null).await
    }

    /// `system_reset`.
    pub async fn system_reset(&self) -> Result<()> {
        self.unit("system_reset", Value::Null).await
    }

    /// `set-action`.
    pub async fn set_action(&self, action: &SetAction) -> Result<()> {
        self.unit("set-action", action).await
    }

    /// `quit`: QEMU exits; the connection then ends with EOF.
    pub async fn quit(&self) -> Result<()> {
        self.unit("quit", Value::Null).await
    }

    /// `human-monitor-command`: run an HMP line, return its output.
    pub async fn human_monitor_command(&self, command_line: &str) -> Result<String> {
        self.execute(
            "human-monitor-command",
            json!({ "command-line": command_line }),
        )
        .await
    }

    // ---- jobs and internal snapshots -----------------------------------

    /// `snapshot-save`: start a job saving internal snapshot `tag` of
    /// `devices`, with VM state on node `vmstate`. See
    /// [`Qmp::wait_job_and_dismiss`].
    pub async fn snapshot_save(
        &self,
        job_id: &str,
        tag: &str,
        vmstate: &str,
        devices: &[&str],
    ) -> Result<()> {
        self.unit(
            "snapshot-save",
            json!({ "job-id": job_id, "tag": tag, "vmstate": vmstate, "devices": devices }),
        )
        .await
    }

    /// `snapshot-load`: start a job loading internal snapshot `tag`.
    pub async fn snapshot_load(
        &self,
        job_id: &str,
        tag: &str,
        vmstate: &str,
        devices: &[&str],
    ) -> Result<()> {
        self.unit(
            "snapshot-load",
            json!({ "job-id": job_id, "tag": tag, "vmstate": vmstate, "devices": devices }),
        )
        .await
    }

    /// `snapshot-delete`: start a job deleting internal snapshot `tag`.
    pub async fn snapshot_delete(&self, job_id: &str, tag: &str, devices: &[&str]) -> Result<()> {
        self.unit(
            "snapshot-delete",
            json!({ "job-id": job_id, "tag": tag, "devices": devices }),
        )
        .await
    }

    /// `job-dismiss` a concluded job.
    pub async fn job_dismiss(&self, id: &str) -> Result<()> {
        self.unit("job-dismiss", json!({ "id": id })).await
    }

    /// `job-cancel`.
    pub async fn job_cancel(&self, id: &str) -> Result<()> {
        self.unit("job-cancel", json!({ "id": id })).await
    }

    /// Wait up to `timeout` until job `id` is `concluded` and return its
    /// final info. Wakes on `JOB_STATUS_CHANGE` for the job and re-checks
    /// `query-jobs` at least every 250 ms. Errors: [`Error::WaitTimeout`]
    /// (the job keeps running; cancel it if you give up),
    /// [`Error::JobVanished`].
    pub async fn wait_job(&self, id: &str, timeout: Duration) -> Result<JobInfo> {
        let deadline = Instant::now() + timeout;
        let mut events = self.subscribe();
        let what = format!("job {id} to conclude");
        loop {
            let jobs = self.bounded(deadline).query_jobs().await?;
            match jobs.into_iter().find(|j| j.id == id) {
                None => return Err(Error::JobVanished { id: id.to_owned() }),
                Some(job) if job.status == JobStatus::Concluded => return Ok(job),
                Some(_) => {}
            }
            next_matching(&mut events, deadline, &what, timeout, |e| {
                e.name == "JOB_STATUS_CHANGE" && e.data_str("id") == Some(id)
            })
            .await?;
        }
    }

    /// [`Qmp::wait_job`], then `job-dismiss`; a job that concluded with an
    /// error becomes [`Error::JobFailed`] (after it is dismissed).
    pub async fn wait_job_and_dismiss(&self, id: &str, timeout: Duration) -> Result<JobInfo> {
        let deadline = Instant::now() + timeout;
        let job = self.wait_job(id, timeout).await?;
        self.bounded(deadline).job_dismiss(id).await?;
        match &job.error {
            Some(desc) => Err(Error::JobFailed {
                id: job.id.clone(),
                job_type: job.job_type.clone(),
                desc: desc.clone(),
            }),
            None => Ok(job),
        }
    }

    // ---- plumbing ------------------------------------------------------

    /// Run a command whose reply carries nothing (`{}`).
    async fn unit(&self, command: &str, arguments: impl Serialize) -> Result<()> {
        self.execute::<IgnoredAny>(command, arguments)
            .await
            .map(|_| ())
    }

    /// This handle, with its deadline shortened so it ends by `deadline`.
    fn bounded(&self, deadline: Instant) -> Qmp {
        let remaining = deadline.saturating_duration_since(Instant::now());
        self.with_timeout(remaining.min(self.timeout()))
    }
}

/// Wait for an event matching `pred` until the next poll tick. `Ok(true)`:
/// seen; `Ok(false)`: tick or gap (re-check by query); `Err`: overall
/// deadline passed or connection lost.
async fn next_matching(
    events: &mut Events,
    deadline: Instant,
    what: &str,
    timeout: Duration,
    mut pred: impl FnMut(&crate::Event) -> bool,
) -> Result<bool> {
    let tick = (Instant::now() + WAIT_POLL_INTERVAL).min(deadline);
    loop {
        match tokio::time::timeout_at(tick, events.recv()).await {
            Err(_) if tick >= deadline => {
                return Err(Error::WaitTimeout {
                    what: what.to_owned(),
                    timeout,
                })
            }
            Err(_) | Ok(Some(Delivery::Missed(_))) => return Ok(false),
            Ok(Some(Delivery::Event(e))) if pred(&e) => return Ok(true),
            Ok(Some(Delivery::Event(_))) => {}
            Ok(None) => return Err(events.lost(what)),
        }
    }
}
