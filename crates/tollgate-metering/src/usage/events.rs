//! What the recorder reports about itself, one [`Event`] each: the log
//! line and the counters it moves, in one call.
//!
//! The counters are [`RecorderStats`], which the metrics endpoint reads at
//! each scrape (`tollgate_usage_rows_total{result}`, `tollgate_database_up`,
//! the `tollgate_usage_flush_*` histograms of [`FlushMetrics`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use uuid::Uuid;

use crate::store::StoreError;
use crate::telemetry::Event;
use crate::usage::recorder::{FlushMetrics, RecorderStats};
use crate::usage::spool::SpoolError;

/// The `result` label of `tollgate_usage_rows_total`, and `rows_lost`
/// (which the metric counts under `failed`).
#[derive(Clone, Copy, Debug)]
enum Rows {
    Written,
    Spooled,
    Replayed,
    Failed,
    Lost,
}

impl Rows {
    fn counter(self, stats: &RecorderStats) -> &AtomicU64 {
        match self {
            Rows::Written => &stats.rows_written,
            Rows::Spooled => &stats.rows_spooled,
            Rows::Replayed => &stats.rows_replayed,
            Rows::Failed => &stats.rows_failed,
            Rows::Lost => &stats.rows_lost,
        }
    }

    fn add(self, stats: &RecorderStats, rows: usize) {
        self.counter(stats)
            .fetch_add(rows as u64, Ordering::Relaxed);
    }
}

/// Rows that reached neither the spool nor the database: counted lost,
/// and failed.
fn lose(stats: &RecorderStats, rows: usize) {
    Rows::Lost.add(stats, rows);
    Rows::Failed.add(stats, rows);
}

/// A database write of `rows` that took `took`: committed, or `failed`
/// (its rows stay in the spool, or with the spooler, and are written
/// again later; logged once per outage).
pub(super) struct UsageFlushed<'a> {
    pub flush: &'a FlushMetrics,
    pub stats: &'a RecorderStats,
    pub rows: usize,
    pub took: Duration,
    pub failed: Option<&'a StoreError>,
}

impl Event for UsageFlushed<'_> {
    fn emit(self) {
        self.flush.observe(self.rows, self.took);
        let Some(error) = self.failed else {
            Rows::Written.add(self.stats, self.rows);
            self.stats.database_up.store(true, Ordering::Relaxed);
            return;
        };
        self.stats.write_failures.fetch_add(1, Ordering::Relaxed);
        Rows::Failed.add(self.stats, self.rows);
        if self.stats.database_up.swap(false, Ordering::Relaxed) {
            tracing::warn!(
                message = "Usage write failed; rows stay in the spool until the database answers.",
                %error,
            );
        }
    }
}

/// A batch of `rows` appended to the spool.
pub(super) struct RowsSpooled<'a> {
    pub stats: &'a RecorderStats,
    pub rows: usize,
}

impl Event for RowsSpooled<'_> {
    fn emit(self) {
        Rows::Spooled.add(self.stats, self.rows);
    }
}

/// An append took longer than `flush_interval` (logged when the disk
/// turns slow, not at every slow append).
pub(super) struct SlowSpoolAppend {
    pub took: Duration,
}

impl Event for SlowSpoolAppend {
    fn emit(self) {
        tracing::warn!(
            message = "A usage spool append took longer than flush_interval; until the disk is faster, a crash loses more than flush_interval of rows.",
            took_ms = self.took.as_millis(),
        );
    }
}

/// The spool refused a batch (logged when it starts refusing).
pub(super) struct SpoolAppendFailed<'a> {
    pub error: &'a SpoolError,
    pub rows: usize,
}

impl Event for SpoolAppendFailed<'_> {
    fn emit(self) {
        tracing::error!(
            message = "Usage spool append failed; usage rows go straight to the database until the spool takes them again.",
            error = %self.error,
            rows = self.rows,
        );
    }
}

/// The spool takes batches again after refusing some.
pub(super) struct SpoolAppendsResumed;

impl Event for SpoolAppendsResumed {
    fn emit(self) {
        tracing::info!(message = "Usage spool appends succeed again.");
    }
}

/// Neither the spool nor the database took a batch of `rows` (logged when
/// it starts; new requests are refused meanwhile).
pub(super) struct RowsUnsaved {
    pub rows: usize,
}

impl Event for RowsUnsaved {
    fn emit(self) {
        tracing::error!(
            message = "Usage rows can be saved neither to the spool nor to the database; new requests are refused until one of them takes them.",
            rows = self.rows,
        );
    }
}

/// The blocking task appending a batch died (a panic, so a bug) and the
/// batch with it.
pub(super) struct SpoolTaskDied<'a> {
    pub stats: &'a RecorderStats,
    pub rows: usize,
    pub error: &'a tokio::task::JoinError,
}

impl Event for SpoolTaskDied<'_> {
    fn emit(self) {
        lose(self.stats, self.rows);
        tracing::error!(message = "Usage spool task died; a batch is lost.", error = %self.error, rows = self.rows);
    }
}

/// Rows of finished requests still unsaved at the shutdown deadline.
pub(super) struct RowsLostAtShutdown<'a> {
    pub stats: &'a RecorderStats,
    pub rows: u64,
    pub grace: Duration,
}

impl Event for RowsLostAtShutdown<'_> {
    fn emit(self) {
        lose(self.stats, usize::try_from(self.rows).unwrap_or(usize::MAX));
        tracing::error!(
            message = "Usage rows of finished requests could be saved neither to the spool nor to the database before the shutdown deadline; they are lost.",
            rows = self.rows,
            grace_secs = self.grace.as_secs_f64(),
        );
    }
}

/// An event recorded after the recorder shut down: lost.
pub(super) struct EventAfterShutdown<'a> {
    pub id: Uuid,
    pub stats: &'a RecorderStats,
}

impl Event for EventAfterShutdown<'_> {
    fn emit(self) {
        lose(self.stats, 1);
        tracing::error!(message = "Usage event after recorder shutdown; it is lost.", id = %self.id);
    }
}

/// Shutdown stopped waiting for the rows of requests still ending.
pub(super) struct RowsStillOwedAtShutdown {
    pub rows: u64,
    pub waited: Duration,
}

impl Event for RowsStillOwedAtShutdown {
    fn emit(self) {
        tracing::error!(
            message = "Requests still ending at shutdown; their rows will be lost.",
            rows = self.rows,
            waited_ms = u64::try_from(self.waited.as_millis()).unwrap_or(u64::MAX)
        );
    }
}

/// Start-up found `rows` in the spool to replay.
pub(super) struct SpoolReplaying {
    pub rows: u64,
}

impl Event for SpoolReplaying {
    fn emit(self) {
        tracing::info!(message = "Replaying the usage spool.", rows = self.rows);
    }
}

/// The replay is done: the rows it wrote count as replayed, not written.
pub(super) struct SpoolReplayed<'a> {
    pub stats: &'a RecorderStats,
}

impl Event for SpoolReplayed<'_> {
    fn emit(self) {
        let rows = self.stats.rows_written.swap(0, Ordering::Relaxed);
        Rows::Replayed.add(self.stats, usize::try_from(rows).unwrap_or(usize::MAX));
        tracing::info!(message = "Usage spool replayed.", rows);
    }
}

/// The writer could not read the spool back; it tries again.
pub(super) struct SpoolUnreadable<'a> {
    pub error: &'a SpoolError,
}

impl Event for SpoolUnreadable<'_> {
    fn emit(self) {
        tracing::warn!(message = "Cannot read the usage spool; retrying.", error = %self.error);
    }
}

/// A checkpoint could not be persisted (the rows are in the database; a
/// restart replays them, and the database ignores them).
pub(super) struct CheckpointFailed<'a> {
    pub error: &'a SpoolError,
}

impl Event for CheckpointFailed<'_> {
    fn emit(self) {
        tracing::warn!(message = "Usage spool checkpoint failed.", error = %self.error);
    }
}

/// The writer wrote everything the spool held after its writes had failed.
pub(super) struct WriterCaughtUp;

impl Event for WriterCaughtUp {
    fn emit(self) {
        tracing::info!(message = "Usage writer caught up from the spool.");
    }
}

/// The writer was still writing at the shutdown deadline.
pub(super) struct WriterStoppedAtDeadline {
    pub grace: Duration,
}

impl Event for WriterStoppedAtDeadline {
    fn emit(self) {
        tracing::warn!(
            message = "Usage writer stopped at the shutdown deadline; the rows it had not written wait in the spool for the next start.",
            grace_secs = self.grace.as_secs_f64(),
        );
    }
}

/// One of the recorder's two tasks.
#[derive(Clone, Copy, Debug)]
pub(super) enum Task {
    Spooler,
    Writer,
}

/// A recorder task panicked.
pub(super) struct TaskFailed<'a> {
    pub task: Task,
    pub error: &'a tokio::task::JoinError,
}

impl Event for TaskFailed<'_> {
    fn emit(self) {
        match self.task {
            Task::Spooler => {
                tracing::error!(message = "Usage spooler failed.", error = %self.error)
            }
            Task::Writer => tracing::error!(message = "Usage writer failed.", error = %self.error),
        }
    }
}
