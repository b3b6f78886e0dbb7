//! The recorder: every usage event, durably into the database, exactly once.
//!
//! ```text
//! data plane ──record()──► channel ──► spooler: batch (batch_size | flush_interval),
//!                                       append to the spool, fsync, notify
//!                                       (refused: write to the database now)
//!                                           │
//!                                         spool (files, and its last batches in memory)
//!                                           │
//!                                           ▼
//!                                       writer: read on from its position, write
//!                                       to the database, checkpoint when due
//! ```
//!
//! The spool is the only queue between the two tasks: the writer follows
//! it from where it has written, taking the batches the spool still keeps
//! in memory and reading the others back from disk. A batch is
//! checkpointed only after the database committed it, and the database
//! ignores ids it already has, so a batch can be written again at any time
//! without double counting. That is what lets the writer simply retry, and
//! lets start-up replay whatever the spool still holds.
//!
//! # Failure behaviour
//! - Database down: batches keep going to the spool; the writer retries
//!   every `RETRY_INTERVAL` (500 ms) with the rows it holds (one transaction's
//!   worth) and then reads on through the spool. Nothing is lost; memory
//!   stays bounded (the spool keeps only its last few batches in memory).
//! - Database slow (a write blocked on a lock, say): the spooler never
//!   waits for the writer; the writer reads back from disk what the spool
//!   no longer keeps in memory.
//! - Spool full (`spool_max`) while the database is down: [`Recorder::accepting`]
//!   turns false and the data plane answers 503 `metering_unavailable`
//!   instead of serving unmetered requests (unless configured to accept).
//! - Crash or SIGKILL: events not yet appended to the spool are lost; that
//!   is at most the requests that finished within the last `flush_interval`
//!   (a batch is appended early enough for its fsync to be done by then,
//!   as long as the disk keeps up: not when one fsync takes far longer than
//!   the ones before it, nor when more than a batch of events is waiting
//!   behind a slow append).
//!   Everything appended is replayed on the next start.
//! - Spool write failure (disk full, I/O error): logged; the spooler writes
//!   the batch straight to the database instead, and keeps trying the spool
//!   first for every batch, so appends resume as soon as the disk has room
//!   (a spool that filled the disk frees it itself once the writer has
//!   drained it into the database). A batch is in the spool or written
//!   directly, never both, so nothing is replayed that was written here.
//!   Rows written directly are as durable as any committed row, but while
//!   the database is slower than `flush_interval` a crash loses more.
//! - Spool write failure with the database down too: the spooler holds the
//!   batch (its requests already had their 200) and retries both every
//!   `RETRY_INTERVAL` at most; [`Recorder::accepting`] is false until one
//!   of them takes it, so new requests get 503 `metering_unavailable`
//!   rather than go unmetered. Memory stays bounded: only requests already
//!   in flight add rows.
//! - Shutdown: [`RecorderHandle::shutdown`] ends within its grace
//!   whatever the disk does. Rows still held then (disk refusing, database
//!   down) are lost: counted in `rows_lost` and `rows_failed` and logged as
//!   an error with their number. A row counted lost may still have reached
//!   the spool or the database if an append or write it was waiting for
//!   completed as the process stopped. Rows in the spool that the writer
//!   had not written by then stay there for the next start.
//! - A checkpoint the disk cannot persist still deletes the segments
//!   before it (their rows are in the database); a restart then replays
//!   from the older checkpoint file, which the database ignores.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::store::{StoreError, UsageSink};
use crate::telemetry::emit;
use crate::usage::events::{self, Task};
use crate::usage::spool::{Spool, SpoolError};
use crate::usage::spooler::Spooler;
use crate::usage::writer::Writer;
use crate::usage::UsageEvent;

/// How the recorder batches and where it spools.
#[derive(Clone, Debug)]
pub struct RecorderConfig {
    pub batch_size: usize,
    pub flush_interval: Duration,
    pub spool_dir: PathBuf,
    pub spool_max: u64,
    /// Answer 503 `metering_unavailable` when the spool is full and the
    /// database is down (true), or keep serving and let the spool grow past
    /// `spool_max` (false).
    pub reject_when_full: bool,
    /// Where the recorder reports each database write.
    pub flush_metrics: FlushMetrics,
}

/// Histograms of the recorder's database writes (`tollgate_usage_flush_*`);
/// no-ops by default.
#[derive(Clone, Debug)]
pub struct FlushMetrics {
    /// Seconds per write, failed ones included.
    pub duration: metrics::Histogram,
    /// Rows per write.
    pub rows: metrics::Histogram,
}

impl Default for FlushMetrics {
    fn default() -> FlushMetrics {
        FlushMetrics {
            duration: metrics::Histogram::noop(),
            rows: metrics::Histogram::noop(),
        }
    }
}

impl FlushMetrics {
    /// One database write of `rows` that took `took`.
    pub(super) fn observe(&self, rows: usize, took: Duration) {
        self.duration.record(took.as_secs_f64());
        self.rows.record(rows as f64);
    }
}

/// Called with every batch committed to the database (not with the rows
/// replayed at start, which happen before anything is counted):
/// the limiter's multi-instance sync needs to know what this instance has
/// committed.
pub type CommitHook = Arc<dyn Fn(&[UsageEvent]) + Send + Sync>;

/// How many batches' worth of rows the writer puts in one transaction at
/// most. Under light load it writes each batch as soon as it is spooled;
/// when the database falls behind, the batches that wait are written
/// together, and a transaction's fixed cost and its rollup upserts (one
/// per day × customer × key × route × model group, which a bigger batch
/// repeats less) are shared by more rows, so the writer speeds up exactly
/// when it has to (`benches/usage_write.rs`).
pub(super) const WRITE_MERGE: usize = 16;

/// Events queued for the spooler beyond which no new request is admitted:
/// 16 batches, and at least 100,000 events (some 30 MB), so that a burst
/// never trips it and only a stalled disk does.
fn max_pending(batch_size: usize) -> u64 {
    (batch_size as u64).saturating_mul(16).max(100_000)
}
/// How often the writer checkpoints while batches keep coming (and at
/// most this long after the last commit when they stop). A checkpoint is an
/// fsync that would otherwise sit between every two database writes; a
/// checkpoint that lags only means that a crash replays a few more rows,
/// which the database ignores.
pub(super) const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(250);
/// How often the writer retries a failed write, and the longest a spooler
/// holding a batch that neither the spool nor the database took waits
/// before it tries both again.
pub(super) const RETRY_INTERVAL: Duration = Duration::from_millis(500);

/// How long [`RecorderHandle::shutdown`] may take to save what it holds:
/// rows still only in memory then are counted lost and logged, and rows in
/// the spool wait there for the next start.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Counters the recorder publishes (read by the metrics endpoint).
#[derive(Debug, Default)]
pub struct RecorderStats {
    /// Events recorded but not yet in the spool.
    pub pending: AtomicU64,
    /// Bytes in the spool not yet checkpointed.
    pub spool_bytes: AtomicU64,
    pub rows_spooled: AtomicU64,
    pub rows_written: AtomicU64,
    pub rows_replayed: AtomicU64,
    /// Database writes that failed, and the rows they held (those rows stay
    /// in the spool, or with the spooler, and are written later); plus the
    /// rows lost (below).
    pub write_failures: AtomicU64,
    pub rows_failed: AtomicU64,
    /// Rows of finished requests that were saved neither to the spool nor
    /// to the database: those still unsaved at the shutdown deadline.
    pub rows_lost: AtomicU64,
    pub database_up: AtomicBool,
}

/// What the recorder's parts share: the spool, the counters, and the
/// state that admission reads.
pub(super) struct Shared {
    pub(super) spool: Mutex<Spool>,
    pub(super) stats: Arc<RecorderStats>,
    /// The spool holds `spool_max` bytes or more.
    pub(super) spool_full: AtomicBool,
    /// The spooler holds a batch that neither the spool nor the database
    /// took at its last attempt; no new request is admitted meanwhile.
    pub(super) unsaved: AtomicBool,
    /// Wakes the writer after each append.
    pub(super) appended: Notify,
    /// Requests under way whose rows are still to be recorded
    /// ([`Recorder::begin_row`]), and a wake-up when none is left.
    pub(super) owed: AtomicU64,
    pub(super) all_recorded: Notify,
}

impl Shared {
    pub(super) fn lock(&self) -> Result<MutexGuard<'_, Spool>, SpoolError> {
        self.spool.lock().map_err(|_| SpoolError::Poisoned)
    }

    /// Publishes the spool's size, for metrics and admission.
    pub(super) fn publish(&self, spool: &Spool) {
        let stats = &self.stats;
        stats
            .spool_bytes
            .store(spool.pending_bytes(), Ordering::Relaxed);
        self.spool_full.store(spool.is_full(), Ordering::Relaxed);
    }
}

/// An event and when it was recorded (its flush deadline counts from then).
pub(super) type Recorded = (Instant, UsageEvent);

/// The data plane's handle: cheap to clone, never blocks.
#[derive(Clone)]
pub struct Recorder {
    events: mpsc::UnboundedSender<Recorded>,
    shared: Arc<Shared>,
    reject_when_full: bool,
    max_pending: u64,
}

impl Recorder {
    /// Queues one event. Never blocks and never fails while the recorder
    /// runs; after shutdown began the event is logged as lost (the gateway
    /// has stopped accepting requests by then).
    pub fn record(&self, event: UsageEvent) {
        let stats = &self.shared.stats;
        stats.pending.fetch_add(1, Ordering::Relaxed);
        if let Err(error) = self.events.send((Instant::now(), event)) {
            stats.pending.fetch_sub(1, Ordering::Relaxed);
            emit(events::EventAfterShutdown {
                id: (error.0).1.id,
                stats,
            });
        }
    }

    /// A request has started that will record a row: shutdown waits for
    /// it (within its grace) before it stops taking rows. Each call is
    /// matched by one [`Recorder::end_row`], once the row is recorded or
    /// turns out not to be owed.
    pub fn begin_row(&self) {
        self.shared.owed.fetch_add(1, Ordering::Relaxed);
    }

    /// See [`Recorder::begin_row`].
    pub fn end_row(&self) {
        if self.shared.owed.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.shared.all_recorded.notify_waiters();
        }
    }

    /// Waits until no row is owed, or `deadline`; whether none is.
    async fn all_recorded(&self, deadline: Instant) -> bool {
        loop {
            let notified = self.shared.all_recorded.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            if self.shared.owed.load(Ordering::Acquire) == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return false;
            }
        }
    }

    /// Whether new requests may be served (false: 503 `metering_unavailable`).
    ///
    /// The queue in front of the spooler is bounded this way rather than by
    /// a bounded channel: a request that was admitted must always get its
    /// row, so `record` never waits and never drops; instead no new request
    /// is admitted while the spooler is `max_pending` events behind (only a
    /// stalled disk gets it there), nor while it holds a batch that neither
    /// the spool nor the database takes (true again as soon as one does).
    pub fn accepting(&self) -> bool {
        let shared = &self.shared;
        if shared.unsaved.load(Ordering::Relaxed)
            || shared.stats.pending.load(Ordering::Relaxed) >= self.max_pending
        {
            return false;
        }
        !(self.reject_when_full
            && shared.spool_full.load(Ordering::Relaxed)
            && !shared.stats.database_up.load(Ordering::Relaxed))
    }

    pub fn stats(&self) -> &Arc<RecorderStats> {
        &self.shared.stats
    }
}

/// The running recorder tasks.
pub struct RecorderHandle {
    recorder: Recorder,
    close: oneshot::Sender<()>,
    spooler: JoinHandle<()>,
    writer: JoinHandle<()>,
    /// The thread the tasks run on, when they have one of their own.
    _thread: OwnRuntime,
}

/// A runtime the recorder started for its tasks. Dropped (however the
/// handle goes) without waiting: by then the tasks have ended or been
/// given up on.
struct OwnRuntime(Option<tokio::runtime::Runtime>);

impl Drop for OwnRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// Why the recorder could not start.
#[derive(Debug, thiserror::Error)]
pub enum RecorderError {
    #[error("usage spool: {0}")]
    Spool(#[from] SpoolError),
    #[error("replaying the usage spool: {0}")]
    Replay(#[from] StoreError),
    #[error("usage spool task failed: {0}")]
    Task(String),
}

/// Opens the spool, replays what it holds into the database, and starts the
/// recorder. Replay happens before this returns (so counters loaded after it
/// include those rows); it fails if the database does not take them.
pub async fn start(
    config: RecorderConfig,
    database: Arc<dyn UsageSink>,
    on_commit: Option<CommitHook>,
) -> Result<RecorderHandle, RecorderError> {
    start_on(config, database, on_commit, OwnRuntime(None)).await
}

/// [`start`], with the spooler and the writer on a thread of their own
/// (`tollgate-recorder`, a one-worker runtime), as the gateway runs them:
/// encoding and committing a batch of thousands of rows takes milliseconds
/// of CPU, which on the data plane's workers would hold up the requests
/// queued behind it. Handing a row over stays a push onto a channel, from
/// any thread.
pub async fn start_on_own_thread(
    config: RecorderConfig,
    database: Arc<dyn UsageSink>,
    on_commit: Option<CommitHook>,
) -> Result<RecorderHandle, RecorderError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("tollgate-recorder")
        .enable_all()
        .build()
        .map_err(|error| RecorderError::Task(format!("cannot start its thread: {error}")))?;
    start_on(config, database, on_commit, OwnRuntime(Some(runtime))).await
}

async fn start_on(
    config: RecorderConfig,
    database: Arc<dyn UsageSink>,
    on_commit: Option<CommitHook>,
    thread: OwnRuntime,
) -> Result<RecorderHandle, RecorderError> {
    let (dir, max) = (config.spool_dir.clone(), config.spool_max);
    let (spool, pending) = tokio::task::spawn_blocking(move || Spool::open_counting(&dir, max))
        .await
        .map_err(|error| RecorderError::Task(error.to_string()))??;
    let stats = Arc::new(RecorderStats::default());
    stats.database_up.store(true, Ordering::Relaxed);
    let shared = Arc::new(Shared {
        spool: Mutex::new(spool),
        stats: stats.clone(),
        spool_full: AtomicBool::new(false),
        unsaved: AtomicBool::new(false),
        appended: Notify::new(),
        owed: AtomicU64::new(0),
        all_recorded: Notify::new(),
    });
    shared.publish(&*shared.lock()?);
    let mut writes = Writes {
        database,
        hook: None,
        flush: config.flush_metrics.clone(),
        stats,
    };
    let (running, spooler_running) = watch::channel(());
    let mut writer = Writer::new(shared.clone(), writes.clone(), spooler_running, &config);
    writer.replay(pending).await?;
    writes.hook = on_commit.clone();
    writer.writes.hook = on_commit;

    let (events, receiver) = mpsc::unbounded_channel();
    let (close, closed) = oneshot::channel();
    let recorder = Recorder {
        events,
        shared: shared.clone(),
        reject_when_full: config.reject_when_full,
        max_pending: max_pending(config.batch_size),
    };
    let spooler = Spooler::new(receiver, closed, shared, writes, &config, running);
    let (spooler, writer) = match &thread.0 {
        Some(runtime) => (runtime.spawn(spooler.run()), runtime.spawn(writer.run())),
        None => (tokio::spawn(spooler.run()), tokio::spawn(writer.run())),
    };
    Ok(RecorderHandle {
        recorder,
        close,
        spooler,
        writer,
        _thread: thread,
    })
}

impl RecorderHandle {
    pub fn recorder(&self) -> Recorder {
        self.recorder.clone()
    }

    /// Flushes everything recorded so far and stops, within `grace`
    /// whatever the disk and the database do: every event is in the spool
    /// or the database, and in the database unless it is down (then the
    /// spool keeps it for the next start). Rows that at the deadline are
    /// in neither (the disk refuses them and the database is down) are
    /// counted in `rows_lost` and logged as an error. Call after the data
    /// plane stopped serving; events recorded after this call are lost
    /// (and logged).
    pub async fn shutdown(self, grace: Duration) {
        let RecorderHandle {
            recorder,
            close,
            mut spooler,
            mut writer,
            _thread,
        } = self;
        let started = Instant::now();
        let deadline = started + grace;
        // The requests cut off as the server stopped record their rows as
        // their tasks end, which may be just after: those rows are waited
        // for, with half the grace, the other half left to save them.
        if !recorder.all_recorded(started + grace / 2).await {
            emit(events::RowsStillOwedAtShutdown {
                rows: recorder.shared.owed.load(Ordering::Relaxed),
                waited: grace / 2,
            });
        }
        let stats = recorder.stats().clone();
        drop(recorder);
        // The spooler closes its channel, saves what is buffered and ends;
        // the writer ends once it has written what the spool holds.
        let _ = close.send(());
        let spooled = match tokio::time::timeout_at(deadline, &mut spooler).await {
            Ok(ended) => ended,
            Err(_) => {
                // Still retrying a batch that neither the spool nor the
                // database takes. Once it is stopped (and awaited, so that
                // nothing is saved behind the count), the events it had not
                // saved are lost: its batch and its channel's.
                spooler.abort();
                let ended = spooler.await;
                let rows = stats.pending.load(Ordering::Relaxed);
                emit(events::RowsLostAtShutdown {
                    stats: &stats,
                    rows,
                    grace,
                });
                ended
            }
        };
        let written = match tokio::time::timeout_at(deadline, &mut writer).await {
            Ok(ended) => ended,
            Err(_) => {
                emit(events::WriterStoppedAtDeadline { grace });
                writer.abort();
                writer.await
            }
        };
        for (task, ended) in [(Task::Spooler, spooled), (Task::Writer, written)] {
            if let Err(error) = ended {
                if !error.is_cancelled() {
                    emit(events::TaskFailed {
                        task,
                        error: &error,
                    });
                }
            }
        }
    }
}

/// Runs `f` on a blocking thread: spool I/O, and anything that locks the
/// spool (an append holds it through its fsync).
pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, SpoolError> + Send + 'static,
) -> Result<T, SpoolError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|error| Err(SpoolError::Task(error.to_string())))
}

/// Database writes, as both tasks make them: timed, counted, and passed to
/// the commit hook.
#[derive(Clone)]
pub(super) struct Writes {
    database: Arc<dyn UsageSink>,
    pub(super) hook: Option<CommitHook>,
    flush: FlushMetrics,
    pub(super) stats: Arc<RecorderStats>,
}

impl Writes {
    /// Writes `rows` in one transaction; `again`: they may be in the
    /// database already.
    pub(super) async fn write(&self, rows: &[UsageEvent], again: bool) -> Result<(), StoreError> {
        let started = Instant::now();
        // The recorder's one call into the database.
        let written = if again {
            self.database.write_usage_deduplicated(rows).await
        } else {
            self.database.write_usage(rows).await
        }
        .map(|_new_rows| ());
        if let (Ok(()), Some(hook)) = (&written, &self.hook) {
            hook(rows);
        }
        emit(events::UsageFlushed {
            flush: &self.flush,
            stats: &self.stats,
            rows: rows.len(),
            took: started.elapsed(),
            failed: written.as_ref().err(),
        });
        written
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap (STYLE.md)
mod tests {
    use std::collections::HashSet;

    use async_trait::async_trait;

    use super::*;
    use crate::usage::spool::tests::events;

    /// A database that keeps what it is given, and refuses it while down.
    #[derive(Default)]
    struct FakeDatabase {
        rows: Mutex<Vec<UsageEvent>>,
        down: AtomicBool,
        /// When each write was attempted.
        attempts: Mutex<Vec<Instant>>,
        /// A write holding this id takes [`SLOW_FAILURE`], then fails.
        refuse: Mutex<Option<uuid::Uuid>>,
    }

    const SLOW_FAILURE: Duration = Duration::from_millis(100);

    #[async_trait]
    impl UsageSink for FakeDatabase {
        async fn write_usage(&self, rows: &[UsageEvent]) -> Result<u64, StoreError> {
            self.attempts.lock().unwrap().push(Instant::now());
            if self.down.load(Ordering::Relaxed) {
                return Err(StoreError::Unavailable("down".into()));
            }
            let refused = *self.refuse.lock().unwrap();
            if refused.is_some_and(|id| rows.iter().any(|row| row.id == id)) {
                tokio::time::sleep(SLOW_FAILURE).await;
                return Err(StoreError::Unavailable("refused".into()));
            }
            // Idempotent on id, as the stores are.
            let mut kept = self.rows.lock().unwrap();
            let before = kept.len();
            for row in rows {
                if !kept.iter().any(|have| have.id == row.id) {
                    kept.push(row.clone());
                }
            }
            Ok((kept.len() - before) as u64)
        }
    }

    impl FakeDatabase {
        fn ids(&self) -> Vec<uuid::Uuid> {
            self.rows.lock().unwrap().iter().map(|row| row.id).collect()
        }
    }

    fn config(dir: &std::path::Path) -> RecorderConfig {
        RecorderConfig {
            batch_size: 10,
            flush_interval: Duration::from_millis(80),
            spool_dir: dir.join("spool"),
            spool_max: u64::MAX,
            reject_when_full: true,
            flush_metrics: FlushMetrics::default(),
        }
    }

    async fn started(dir: &std::path::Path, database: &Arc<FakeDatabase>) -> RecorderHandle {
        start(config(dir), database.clone(), None).await.unwrap()
    }

    fn ids(rows: &[UsageEvent]) -> Vec<uuid::Uuid> {
        rows.iter().map(|row| row.id).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_is_spooled_before_its_flush_interval_is_out() {
        let dir = tempfile::tempdir().unwrap();
        let database = Arc::new(FakeDatabase::default());
        let running = started(dir.path(), &database).await;
        let recorder = running.recorder();
        let flush = config(dir.path()).flush_interval;
        recorder.record(events(0..1).remove(0));
        tokio::time::sleep(flush / 2).await;
        recorder.record(events(1..2).remove(0));
        assert_eq!(recorder.stats().rows_spooled.load(Ordering::Relaxed), 0);
        // Due an eighth of flush_interval early, the second event with it.
        tokio::time::sleep(flush / 2 - flush / 8 + Duration::from_millis(1)).await;
        assert_eq!(recorder.stats().rows_spooled.load(Ordering::Relaxed), 2);
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(database.ids(), ids(&events(0..2)));
        running.shutdown(SHUTDOWN_GRACE).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_database_outage_is_retried_every_retry_interval_and_loses_and_doubles_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let database = Arc::new(FakeDatabase::default());
        database.down.store(true, Ordering::Relaxed);
        let running = started(dir.path(), &database).await;
        let recorder = running.recorder();
        let all = events(0..95);
        for (i, event) in all.iter().enumerate() {
            recorder.record(event.clone());
            if i % 7 == 0 {
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        let stats = recorder.stats().clone();
        assert!(!stats.database_up.load(Ordering::Relaxed));
        assert_eq!(stats.rows_spooled.load(Ordering::Relaxed), 95);
        let attempts = database.attempts.lock().unwrap().clone();
        assert!(attempts.len() >= 4, "{}", attempts.len());
        for pair in attempts.windows(2) {
            assert!(
                pair[1] - pair[0] >= RETRY_INTERVAL,
                "{:?}",
                pair[1] - pair[0]
            );
        }

        database.down.store(false, Ordering::Relaxed);
        tokio::time::sleep(RETRY_INTERVAL + CHECKPOINT_INTERVAL).await;
        assert_eq!(database.ids(), ids(&all));
        assert!(stats.database_up.load(Ordering::Relaxed));
        assert_eq!(stats.rows_written.load(Ordering::Relaxed), 95);
        assert!(stats.rows_failed.load(Ordering::Relaxed) > 0);
        // Checkpointed soon after: a restart replays nothing.
        assert_eq!(stats.spool_bytes.load(Ordering::Relaxed), 0);
        drop(recorder);
        running.shutdown(SHUTDOWN_GRACE).await;
        let (_, pending) = Spool::open_counting(&dir.path().join("spool"), u64::MAX).unwrap();
        assert_eq!(pending, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_that_fails_while_the_next_commits_holds_the_checkpoint_until_it_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let database = Arc::new(FakeDatabase::default());
        let all = events(0..20);
        *database.refuse.lock().unwrap() = Some(all[0].id);
        let running = started(dir.path(), &database).await;
        let recorder = running.recorder();
        let stats = recorder.stats().clone();
        // The first batch (batch_size is 10) goes to the database, which
        // takes its time to refuse it; the second arrives meanwhile and
        // goes in a second write, which commits first.
        for event in all[..10].iter().cloned() {
            recorder.record(event);
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(database.attempts.lock().unwrap().len(), 1);
        for event in all[10..].iter().cloned() {
            recorder.record(event);
        }
        tokio::time::sleep(SLOW_FAILURE / 2).await;
        assert_eq!(
            database.attempts.lock().unwrap().len(),
            2,
            "two writes at once"
        );
        assert_eq!(database.ids(), ids(&all[10..]));
        // The checkpoint does not pass the first batch while it is not
        // written, however long that takes, although the second is.
        tokio::time::sleep(CHECKPOINT_INTERVAL * 4).await;
        assert_eq!(database.ids(), ids(&all[10..]));
        assert!(stats.spool_bytes.load(Ordering::Relaxed) > 0);
        // A crash now: the spool's files as they are, opened by another
        // process, replay both batches.
        let crashed = tempfile::tempdir().unwrap();
        for file in std::fs::read_dir(dir.path().join("spool")).unwrap() {
            let path = file.unwrap().path();
            std::fs::copy(&path, crashed.path().join(path.file_name().unwrap())).unwrap();
        }
        let (_, pending) = Spool::open_counting(crashed.path(), u64::MAX).unwrap();
        assert_eq!(pending, 20, "a crash now replays both batches");

        // Once the database takes it, it is written once and checkpointed.
        *database.refuse.lock().unwrap() = None;
        tokio::time::sleep(RETRY_INTERVAL + CHECKPOINT_INTERVAL * 2).await;
        let mut written = database.ids();
        written.sort();
        assert_eq!(written, ids(&all));
        assert_eq!(stats.rows_written.load(Ordering::Relaxed), 20);
        assert_eq!(stats.spool_bytes.load(Ordering::Relaxed), 0);
        drop(recorder);
        running.shutdown(SHUTDOWN_GRACE).await;
        let (_, pending) = Spool::open_counting(&dir.path().join("spool"), u64::MAX).unwrap();
        assert_eq!(pending, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_checkpoint_follows_the_writes_within_the_checkpoint_interval() {
        let dir = tempfile::tempdir().unwrap();
        let database = Arc::new(FakeDatabase::default());
        let running = started(dir.path(), &database).await;
        let recorder = running.recorder();
        let stats = recorder.stats().clone();
        for event in events(0..30) {
            recorder.record(event);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Written as they come, checkpointed at most this late after.
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert_eq!(database.ids(), ids(&events(0..30)));
        tokio::time::sleep(CHECKPOINT_INTERVAL).await;
        assert_eq!(stats.spool_bytes.load(Ordering::Relaxed), 0);
        running.shutdown(SHUTDOWN_GRACE).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_stop_with_the_database_down_ends_at_once_and_the_next_start_replays_once() {
        let dir = tempfile::tempdir().unwrap();
        let database = Arc::new(FakeDatabase::default());
        database.down.store(true, Ordering::Relaxed);
        let running = started(dir.path(), &database).await;
        let recorder = running.recorder();
        for event in events(0..25) {
            recorder.record(event);
        }
        let stats = recorder.stats().clone();
        drop(recorder);
        let began = Instant::now();
        running.shutdown(SHUTDOWN_GRACE).await;
        assert!(began.elapsed() <= RETRY_INTERVAL, "{:?}", began.elapsed());
        assert_eq!(stats.rows_spooled.load(Ordering::Relaxed), 25);
        assert_eq!(stats.rows_lost.load(Ordering::Relaxed), 0);
        assert!(database.ids().is_empty());

        // The next start replays the spool before it returns, and only
        // once; the replayed rows are a previous process's, which the
        // commit hook (this process's limiter) is never shown.
        database.down.store(false, Ordering::Relaxed);
        let hooked = Arc::new(AtomicU64::new(0));
        let hook: CommitHook = {
            let hooked = hooked.clone();
            Arc::new(move |rows: &[UsageEvent]| {
                hooked.fetch_add(rows.len() as u64, Ordering::Relaxed);
            })
        };
        let running = start(config(dir.path()), database.clone(), Some(hook))
            .await
            .unwrap();
        let stats = running.recorder().stats().clone();
        assert_eq!(stats.rows_replayed.load(Ordering::Relaxed), 25);
        assert_eq!(stats.rows_written.load(Ordering::Relaxed), 0);
        running.recorder().record(events(30..31).remove(0));
        running.shutdown(SHUTDOWN_GRACE).await;
        assert_eq!(hooked.load(Ordering::Relaxed), 1, "only this process's row");
        let running = started(dir.path(), &database).await;
        running.shutdown(SHUTDOWN_GRACE).await;
        assert_eq!(
            database.ids(),
            ids(&[events(0..25), events(30..31)].concat())
        );
        let distinct: HashSet<_> = database.ids().into_iter().collect();
        assert_eq!(distinct.len(), 26);
    }
}
