//! The recorder: every usage event, durably into the database, exactly once.
//!
//! ```text
//! data plane ──record()──► channel ──► spooler: batch (batch_size | flush_interval),
//!                                       append to the spool, fsync
//!                                       (refused: Store::write_usage now)
//!                                           │ Spooled { events, start, end }
//!                                           │ (or, when 16 are queued, left on disk)
//!                                           ▼
//!                                       writer: read back any gap, Store::write_usage,
//!                                       then checkpoint
//! ```
//!
//! A batch is acknowledged (checkpointed) only after the database committed
//! it, and the database ignores ids it already has, so a batch can be
//! written again at any time without double counting. That is what lets the
//! writer simply retry, and lets start-up replay whatever the spool still
//! holds.
//!
//! # Failure behaviour
//! - Database down: batches keep going to the spool; the writer stops
//!   keeping them in memory and, once the database answers again, drains
//!   the spool from its checkpoint. Nothing is lost; memory stays bounded.
//! - Database slow (a write blocked on a lock, say): the spooler never
//!   waits for the writer; batches beyond what the writer has queued stay
//!   on disk only and the writer reads them back from the spool.
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
//!   [`RETRY_INTERVAL`] at most; [`Recorder::accepting`] is false until one
//!   of them takes it, so new requests get 503 `metering_unavailable`
//!   rather than go unmetered. Memory stays bounded: only requests already
//!   in flight add rows.
//! - Shutdown: [`RecorderHandle::shutdown_within`] ends within its grace
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
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::store::{Store, StoreError};
use crate::usage::spool::{Spool, SpoolError, SpoolPosition};
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
    /// Where the writer reports each database write.
    pub flush_metrics: FlushMetrics,
}

/// Histograms of the writer's database writes (`tollgate_usage_flush_*`);
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
    /// One database write of `rows`, timed and counted. `rows_failed`
    /// counts the rows of every failed attempt (a batch retried during an
    /// outage counts again each time).
    /// `again`: the rows may be in the database already
    /// ([`UsageSink::write_usage_deduplicated`](crate::store::UsageSink::write_usage_deduplicated)).
    async fn write(
        &self,
        store: &dyn Store,
        rows: &[UsageEvent],
        again: bool,
        stats: &RecorderStats,
    ) -> Result<u64, StoreError> {
        let started = std::time::Instant::now();
        let result = if again {
            store.write_usage_deduplicated(rows).await
        } else {
            store.write_usage(rows).await
        };
        self.duration.record(started.elapsed().as_secs_f64());
        self.rows.record(rows.len() as f64);
        if result.is_ok() {
            stats.database_up.store(true, Ordering::Relaxed);
        }
        if let Err(error) = &result {
            stats.write_failures.fetch_add(1, Ordering::Relaxed);
            stats
                .rows_failed
                .fetch_add(rows.len() as u64, Ordering::Relaxed);
            if stats.database_up.swap(false, Ordering::Relaxed) {
                tracing::warn!(
                    message = "Usage write failed; rows stay in the spool until the database answers.",
                    %error,
                );
            }
        }
        result
    }
}

/// Where rows go once they are safe, shared by the writer (what the spool
/// holds) and the spooler (rows the spool refused): the store, with the
/// commit hook, the write metrics and the counters.
#[derive(Clone)]
struct Sink {
    store: Arc<dyn Store>,
    hook: Option<CommitHook>,
    flush: FlushMetrics,
    stats: Arc<RecorderStats>,
}

impl Sink {
    /// Writes `rows` in one transaction; `again`: they may be in the
    /// database already.
    async fn write(&self, rows: &[UsageEvent], again: bool) -> Result<(), StoreError> {
        self.flush
            .write(&*self.store, rows, again, &self.stats)
            .await?;
        if let Some(hook) = &self.hook {
            hook(rows);
        }
        self.stats
            .rows_written
            .fetch_add(rows.len() as u64, Ordering::Relaxed);
        Ok(())
    }
}

/// Called with every batch committed to the database (not with the rows
/// replayed at start, which happen before anything is counted):
/// the limiter's multi-instance sync needs to know what this instance has
/// committed.
pub type CommitHook = Arc<dyn Fn(&[UsageEvent]) + Send + Sync>;

/// Batches the writer may hold in memory before it relies on the spool.
const MAX_BATCHES_IN_MEMORY: usize = 16;

/// How many batches' worth of rows the writer puts in one transaction when
/// it is behind (see [`take_queued`]), and reads at once when draining the
/// spool.
const WRITE_MERGE: usize = 16;

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
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(250);
/// How often a writer that is behind retries the database, and the
/// longest a spooler holding a batch that neither the spool nor the
/// database took waits before it tries both again.
const RETRY_INTERVAL: Duration = Duration::from_millis(500);

/// How long [`RecorderHandle::shutdown`] may take to save what it holds:
/// rows still only in memory then are counted lost and logged, and rows in
/// the spool wait there for the next start.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Counters the recorder publishes (for metrics and admission).
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
    spool_full: AtomicBool,
    /// The spooler holds a batch that neither the spool nor the database
    /// took at its last attempt; no new request is admitted meanwhile.
    unsaved: AtomicBool,
    /// Set by the spooler when it left a batch on disk only (the writer's
    /// queue was full), before it queues any later batch; the writer checks
    /// it after taking batches from the queue and, when set, writes from
    /// the spool (from where it got to) instead of from the queue.
    left_on_disk: AtomicBool,
    /// Wakes a writer waiting for batches when one was left on disk.
    left_on_disk_wake: tokio::sync::Notify,
}

impl RecorderStats {
    /// Counts `rows` lost, also under `rows_failed` (the metric's
    /// `result="failed"`); the caller logs why.
    fn lose(&self, rows: u64) {
        self.rows_lost.fetch_add(rows, Ordering::Relaxed);
        self.rows_failed.fetch_add(rows, Ordering::Relaxed);
    }

    fn leave_on_disk(&self) {
        self.left_on_disk.store(true, Ordering::Release);
        self.left_on_disk_wake.notify_one();
    }

    fn take_left_on_disk(&self) -> bool {
        self.left_on_disk.swap(false, Ordering::AcqRel)
    }
}

/// An event and when it was recorded (its flush deadline counts from then).
type Recorded = (Instant, UsageEvent);

/// The data plane's handle: cheap to clone, never blocks.
#[derive(Clone)]
pub struct Recorder {
    events: mpsc::UnboundedSender<Recorded>,
    stats: Arc<RecorderStats>,
    reject_when_full: bool,
    max_pending: u64,
}

impl Recorder {
    /// Queues one event. Never blocks and never fails while the recorder
    /// runs; after shutdown began the event is logged as lost (the gateway
    /// has stopped accepting requests by then).
    pub fn record(&self, event: UsageEvent) {
        self.stats.pending.fetch_add(1, Ordering::Relaxed);
        if let Err(error) = self.events.send((Instant::now(), event)) {
            self.stats.pending.fetch_sub(1, Ordering::Relaxed);
            tracing::error!(message = "Usage event after recorder shutdown; it is lost.", id = %(error.0).1.id);
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
        if self.stats.unsaved.load(Ordering::Relaxed)
            || self.stats.pending.load(Ordering::Relaxed) >= self.max_pending
        {
            return false;
        }
        !(self.reject_when_full
            && self.stats.spool_full.load(Ordering::Relaxed)
            && !self.stats.database_up.load(Ordering::Relaxed))
    }

    pub fn stats(&self) -> &Arc<RecorderStats> {
        &self.stats
    }
}

/// The running recorder tasks.
pub struct RecorderHandle {
    recorder: Recorder,
    close: oneshot::Sender<()>,
    spooler: JoinHandle<()>,
    writer: JoinHandle<()>,
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
    store: Arc<dyn Store>,
    on_commit: Option<CommitHook>,
) -> Result<RecorderHandle, RecorderError> {
    let dir = config.spool_dir.clone();
    let max = config.spool_max;
    let (spool, pending) = blocking(move || Spool::open_counting(&dir, max)).await??;
    let stats = Arc::new(RecorderStats::default());
    stats.database_up.store(true, Ordering::Relaxed);
    let checkpoint = spool.checkpoint_position();
    let spool = Arc::new(Mutex::new(spool));
    let mut writer = Writer {
        spool: spool.clone(),
        stats: stats.clone(),
        batch_size: config.batch_size,
        sink: Sink {
            store,
            hook: None,
            flush: config.flush_metrics,
            stats: stats.clone(),
        },
        written: checkpoint,
        unsaved: None,
        last_checkpoint: tokio::time::Instant::now(),
        unsure: pending > 0,
    };
    if pending > 0 {
        tracing::info!(message = "Replaying the usage spool.", rows = pending);
        writer.drain().await?;
        let replayed = stats.rows_written.swap(0, Ordering::Relaxed);
        stats.rows_replayed.fetch_add(replayed, Ordering::Relaxed);
        tracing::info!(message = "Usage spool replayed.", rows = replayed);
    }
    // Everything in the spool is in the database now; the spooler's first
    // batch starts at its end.
    writer.written = lock(&spool)?.end_position();
    writer.sink.hook = on_commit;
    publish_spool(&spool, &stats);

    let (events, receiver) = mpsc::unbounded_channel();
    let (close, closed) = oneshot::channel();
    let (batches, batch_receiver) = mpsc::channel(MAX_BATCHES_IN_MEMORY);
    let recorder = Recorder {
        events,
        stats: stats.clone(),
        reject_when_full: config.reject_when_full,
        max_pending: max_pending(config.batch_size),
    };
    let spooler = tokio::spawn(spooler(
        receiver,
        closed,
        batches,
        spool.clone(),
        writer.sink.clone(),
        config.batch_size,
        config.flush_interval,
    ));
    let writer = tokio::spawn(writer.run(batch_receiver));
    Ok(RecorderHandle {
        recorder,
        close,
        spooler,
        writer,
    })
}

impl RecorderHandle {
    pub fn recorder(&self) -> Recorder {
        self.recorder.clone()
    }

    /// [`RecorderHandle::shutdown_within`] the [`SHUTDOWN_GRACE`].
    pub async fn shutdown(self) {
        self.shutdown_within(SHUTDOWN_GRACE).await;
    }

    /// Flushes everything recorded so far and stops, within `grace`
    /// whatever the disk and the database do: every event is in the spool
    /// or the database, and in the database unless it is down (then the
    /// spool keeps it for the next start). Rows that at the deadline are
    /// in neither (the disk refuses them and the database is down) are
    /// counted in `rows_lost` and logged as an error. Call after the data
    /// plane stopped serving; events recorded after this call are lost
    /// (and logged).
    pub async fn shutdown_within(self, grace: Duration) {
        let RecorderHandle {
            recorder,
            close,
            mut spooler,
            mut writer,
        } = self;
        let deadline = tokio::time::Instant::now() + grace;
        let stats = recorder.stats.clone();
        drop(recorder);
        // The spooler closes its channel, saves what is buffered and ends;
        // the writer ends when the spooler's batches stop.
        let _ = close.send(());
        let ended = match tokio::time::timeout_at(deadline, &mut spooler).await {
            Ok(ended) => ended,
            Err(_) => {
                // Still retrying a batch that neither the spool nor the
                // database takes. Once it is stopped (and awaited, so that
                // nothing is saved behind the count), the events it had not
                // saved are lost: its batch and its channel's.
                spooler.abort();
                let ended = spooler.await;
                let lost = stats.pending.load(Ordering::Relaxed);
                stats.lose(lost);
                tracing::error!(
                    message = "Usage rows of finished requests could be saved neither to the spool nor to the database before the shutdown deadline; they are lost.",
                    rows = lost,
                    grace_secs = grace.as_secs_f64(),
                );
                ended
            }
        };
        if let Err(error) = ended {
            if !error.is_cancelled() {
                tracing::error!(message = "Usage spooler failed.", %error);
            }
        }
        let ended = match tokio::time::timeout_at(deadline, &mut writer).await {
            Ok(ended) => ended,
            Err(_) => {
                tracing::warn!(
                    message = "Usage writer stopped at the shutdown deadline; the rows it had not written wait in the spool for the next start.",
                    grace_secs = grace.as_secs_f64(),
                );
                writer.abort();
                writer.await
            }
        };
        if let Err(error) = ended {
            if !error.is_cancelled() {
                tracing::error!(message = "Usage writer failed.", %error);
            }
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, RecorderError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|error| RecorderError::Task(error.to_string()))
}

fn publish_spool(spool: &Mutex<Spool>, stats: &RecorderStats) {
    if let Ok(spool) = spool.lock() {
        stats
            .spool_bytes
            .store(spool.pending_bytes(), Ordering::Relaxed);
        stats.spool_full.store(spool.is_full(), Ordering::Relaxed);
    }
}

fn lock(spool: &Mutex<Spool>) -> Result<std::sync::MutexGuard<'_, Spool>, SpoolError> {
    spool.lock().map_err(|_| SpoolError::Poisoned)
}

/// Collects events into batches, appends each to the spool (fsync), and
/// hands it to the writer; a batch the spool refuses goes straight to the
/// database instead ([`save`]). On `close` it stops taking new events,
/// saves what is buffered, and ends.
///
/// A batch is appended early enough that its oldest event is on disk
/// within `flush_interval` of being recorded: the wait for more events
/// ends an eighth of `flush_interval` early (room for a late timer on a
/// busy machine), and earlier still by what appends have been taking
/// lately ([`AppendTime`]). The spooler never waits for the writer either:
/// when the writer has [`MAX_BATCHES_IN_MEMORY`] batches queued, the new
/// one is left on disk only and the writer reads it back from there; and
/// the writer's reads and checkpoint fsyncs are made without holding the
/// spool.
async fn spooler(
    mut events: mpsc::UnboundedReceiver<Recorded>,
    mut close: oneshot::Receiver<()>,
    batches: mpsc::Sender<Spooled>,
    spool: Arc<Mutex<Spool>>,
    sink: Sink,
    batch_size: usize,
    flush_interval: Duration,
) {
    let stats = sink.stats.clone();
    let mut closing = false;
    let mut refusing = false;
    // Only this task appends, so the spool ends where its last batch did.
    let mut last_end = spool
        .lock()
        .map(|spool| spool.end_position())
        .unwrap_or_default();
    let mut append_time = AppendTime::default();
    let mut slow_disk = false;
    loop {
        // Wait for the first event of the next batch, then give the batch
        // until its deadline to fill (no wait at all when closing).
        let first = if closing {
            events.recv().await
        } else {
            tokio::select! {
                event = events.recv() => event,
                _ = &mut close => {
                    closing = true;
                    events.close();
                    events.recv().await
                }
            }
        };
        let Some((recorded_at, first)) = first else {
            return;
        };
        let mut batch = Vec::with_capacity(batch_size.min(8192));
        batch.push(first);
        let deadline = tokio::time::Instant::from_std(
            recorded_at
                + flush_interval
                    .saturating_sub(flush_interval / 8)
                    .saturating_sub(append_time.estimate()),
        );
        while batch.len() < batch_size {
            let next = if closing {
                events.recv().await
            } else {
                tokio::select! {
                    event = tokio::time::timeout_at(deadline, events.recv()) => match event {
                        Ok(event) => event,
                        Err(_) => break,
                    },
                    _ = &mut close => {
                        closing = true;
                        events.close();
                        continue;
                    }
                }
            };
            match next {
                Some((_, event)) => batch.push(event),
                None => break,
            }
        }
        let count = batch.len() as u64;
        let started = Instant::now();
        let saved = save(&spool, &sink, &mut refusing, batch).await;
        stats.pending.fetch_sub(count, Ordering::Relaxed);
        let Saved::Spooled(events, end) = saved else {
            // Written to the database, or lost (logged): the spool holds
            // nothing of it, so the writer is not told.
            continue;
        };
        let took = started.elapsed();
        append_time.observe(took);
        if took > flush_interval && !slow_disk {
            slow_disk = true;
            tracing::warn!(
                message = "A usage spool append took longer than flush_interval; until the disk is faster, a crash loses more than flush_interval of rows.",
                took_ms = took.as_millis(),
            );
        } else if took <= flush_interval / 2 {
            slow_disk = false;
        }
        stats.rows_spooled.fetch_add(count, Ordering::Relaxed);
        let start = std::mem::replace(&mut last_end, end.clone());
        match batches.try_send(Spooled { events, start, end }) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => stats.leave_on_disk(),
            Err(mpsc::error::TrySendError::Closed(_)) => return,
        }
    }
}

/// How long spool appends have been taking: the longest recent one,
/// forgotten by an eighth per append, so that one slow fsync makes the
/// next batches go early at once and a disk that got fast again is
/// trusted again after a few dozen appends.
#[derive(Debug, Default)]
struct AppendTime {
    recent: Duration,
}

impl AppendTime {
    fn observe(&mut self, took: Duration) {
        self.recent = took.max(self.recent - self.recent / 8);
    }

    fn estimate(&self) -> Duration {
        self.recent
    }
}

/// What became of a batch the spooler saved.
enum Saved {
    /// Appended to the spool: its events, and where its record ends.
    Spooled(Vec<UsageEvent>, SpoolPosition),
    /// Refused by the spool and written to the database instead.
    Written,
    /// Lost with a blocking task that died (a bug); counted and logged.
    Lost,
}

/// Saves a batch: appends it to the spool or, when the disk refuses it
/// (full, I/O errors), writes it straight to the database; retried until
/// one of them takes it, and meanwhile no new request is admitted. An event
/// that was recorded must be saved: its request may have had its 200.
///
/// A batch is never in both places: a failed append is cut back off the
/// spool before the next one, so the writer never reads back, nor a
/// restart replays, rows written here. (A crash between a failed append
/// and that cut may leave it whole in the file, to be replayed: the
/// database ignores the ids it has.) `refusing` is whether the spool's last
/// append failed, for the log.
async fn save(
    spool: &Arc<Mutex<Spool>>,
    sink: &Sink,
    refusing: &mut bool,
    batch: Vec<UsageEvent>,
) -> Saved {
    let stats = &sink.stats;
    let mut batch = batch;
    // After a failed write the batch may have committed unseen.
    let mut again = false;
    let mut delay = Duration::from_millis(100);
    loop {
        let count = batch.len() as u64;
        let spool_ref = spool.clone();
        let attempt = blocking(move || {
            let result = lock(&spool_ref).and_then(|mut spool| spool.append(&batch));
            (batch, result)
        })
        .await;
        publish_spool(spool, stats);
        let error = match attempt {
            Ok((events, Ok(end))) => {
                stats.unsaved.store(false, Ordering::Relaxed);
                if std::mem::take(refusing) {
                    tracing::info!(message = "Usage spool appends succeed again.");
                }
                return Saved::Spooled(events, end);
            }
            Ok((returned, Err(error))) => {
                batch = returned;
                error
            }
            Err(error) => {
                // The blocking task itself died (a panic): the batch is gone
                // with it. This is a bug; say so loudly.
                stats.lose(count);
                tracing::error!(message = "Usage spool task died; a batch is lost.", %error, rows = count);
                return Saved::Lost;
            }
        };
        if !std::mem::replace(refusing, true) {
            tracing::error!(
                message = "Usage spool append failed; usage rows go straight to the database until the spool takes them again.",
                %error,
                rows = count,
            );
        }
        if sink.write(&batch, again).await.is_ok() {
            stats.unsaved.store(false, Ordering::Relaxed);
            return Saved::Written;
        }
        again = true;
        if !stats.unsaved.swap(true, Ordering::Relaxed) {
            tracing::error!(
                message = "Usage rows can be saved neither to the spool nor to the database; new requests are refused until one of them takes them.",
                rows = count,
            );
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(RETRY_INTERVAL);
    }
}

/// A batch on its way from the spooler to the writer: its events and where
/// its record lies in the spool. `start` is where the batch before it
/// ended, so a batch the spooler left on disk only shows as a gap between
/// one batch's `end` and the next one's `start`.
#[derive(Debug)]
struct Spooled {
    events: Vec<UsageEvent>,
    start: SpoolPosition,
    end: SpoolPosition,
}

/// Writes spooled batches to the database and checkpoints them, reading
/// back from the spool whatever it did not get in memory.
struct Writer {
    spool: Arc<Mutex<Spool>>,
    stats: Arc<RecorderStats>,
    batch_size: usize,
    sink: Sink,
    /// Everything in the spool before this is in the database.
    written: SpoolPosition,
    /// The part of `written` not checkpointed yet.
    unsaved: Option<SpoolPosition>,
    last_checkpoint: tokio::time::Instant,
    /// The rows after `written` may be in the database already: at start
    /// (those committed after the last checkpoint before a crash), and
    /// after a failed write (it may have committed unseen). The next write
    /// says so to the store.
    unsure: bool,
}

/// Why the writer reads the spool instead of the spooler's batches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Behind {
    /// A database write failed; retried every [`RETRY_INTERVAL`].
    Failed,
    /// The spooler left a batch on disk only and queued none after it.
    Lagged,
}

impl Writer {
    /// Rows in one transaction (at most, give or take a batch).
    fn limit(&self) -> usize {
        self.batch_size.saturating_mul(WRITE_MERGE)
    }

    async fn run(mut self, mut batches: mpsc::Receiver<Spooled>) {
        let mut behind = None;
        loop {
            if let Some(why) = behind {
                match self.drain().await {
                    Ok(()) => {
                        behind = None;
                        if why == Behind::Failed {
                            tracing::info!(message = "Usage writer caught up from the spool.");
                        }
                    }
                    Err(_) => {
                        behind = Some(Behind::Failed);
                        // Keep taking batches off the channel (they are on
                        // disk; the next drain writes them) until it is time
                        // to retry.
                        let retry = tokio::time::sleep(RETRY_INTERVAL);
                        tokio::pin!(retry);
                        loop {
                            tokio::select! {
                                () = &mut retry => break,
                                received = batches.recv() => {
                                    if received.is_none() {
                                        // Shutting down with the database
                                        // away: one last attempt, then the
                                        // spool keeps the rest for the next
                                        // start.
                                        let _ = self.drain().await;
                                        self.save().await;
                                        return;
                                    }
                                }
                            }
                        }
                        continue;
                    }
                }
            }
            // A batch left on disk with nothing queued after it shows no gap:
            // read it back now rather than when the next batch comes.
            if batches.is_empty() && self.stats.take_left_on_disk() {
                behind = Some(Behind::Lagged);
                continue;
            }
            // Wait for the next batch; or, when something committed is not
            // checkpointed yet, until the checkpoint is due; or until the
            // spooler leaves a batch on disk only.
            let due = self.last_checkpoint + CHECKPOINT_INTERVAL;
            let next = tokio::select! {
                next = batches.recv() => next,
                () = tokio::time::sleep_until(due), if self.unsaved.is_some() => {
                    self.save().await;
                    continue;
                }
                () = self.stats.left_on_disk_wake.notified() => continue,
            };
            let Some(first) = next else {
                // The spooler ended; what it could not queue is on disk.
                if self.stats.take_left_on_disk() {
                    let _ = self.drain().await;
                }
                self.save().await;
                return;
            };
            let taken = take_queued(first, &mut batches, &self.written, self.limit());
            let gathered = match gather(&self.spool, &self.written, taken, self.limit()).await {
                Ok(Some(gathered)) => gathered,
                Ok(None) => continue, // already written while draining the spool
                Err(_) => {
                    behind = Some(Behind::Failed);
                    continue;
                }
            };
            let (rows, end) = gathered;
            match self.write(&rows, end).await {
                Ok(()) => {
                    if self.last_checkpoint.elapsed() >= CHECKPOINT_INTERVAL {
                        self.save().await;
                    }
                }
                Err(_) => behind = Some(Behind::Failed),
            }
        }
    }

    /// Writes `rows`, everything in the spool from `written` to `end`.
    async fn write(&mut self, rows: &[UsageEvent], end: SpoolPosition) -> Result<(), StoreError> {
        let written = self.sink.write(rows, self.unsure).await;
        self.unsure = written.is_err();
        written?;
        self.written = end.clone();
        self.unsaved = Some(end);
        Ok(())
    }

    /// Writes everything in the spool after `written`, [`Writer::limit`]
    /// rows per transaction, checkpointing after each.
    async fn drain(&mut self) -> Result<(), StoreError> {
        loop {
            let after = self.written.clone();
            let limit = self.limit();
            let spool = self.spool.clone();
            let (events, position) =
                read_spool(move || lock(&spool)?.pending(Some(&after)).read(limit)).await?;
            if events.is_empty() {
                return Ok(());
            }
            self.write(&events, position).await?;
            self.save().await;
        }
    }

    /// Checkpoints what is written, if any of it is not yet.
    async fn save(&mut self) {
        if let Some(position) = self.unsaved.take() {
            checkpoint(&self.spool, &self.stats, position).await;
        }
        self.last_checkpoint = tokio::time::Instant::now();
    }
}

/// `first` and whatever else the spooler has already queued, leaving out
/// batches at or before `written` (written while draining the spool), until
/// they hold `limit` rows: `batch_size * WRITE_MERGE`, one transaction.
///
/// Under light load the channel is empty and batches go one by one, as
/// soon as they are spooled. When the database falls behind, batches queue
/// up and are written together: a transaction's fixed cost, and above all
/// its rollup upserts (one per day × customer × key × route × model group,
/// which a bigger batch repeats less), are then shared by more rows, so the
/// writer speeds up exactly when it has to (`benches/usage_write.rs`).
fn take_queued(
    first: Spooled,
    batches: &mut mpsc::Receiver<Spooled>,
    written: &SpoolPosition,
    limit: usize,
) -> Vec<Spooled> {
    let mut taken = Vec::new();
    let mut rows = 0;
    let mut next = Some(first);
    while let Some(batch) = next {
        if batch.end > *written {
            rows += batch.events.len();
            taken.push(batch);
        }
        if rows >= limit {
            break;
        }
        next = batches.try_recv().ok();
    }
    taken
}

/// The rows of `taken` in spool order from `written` on, with whatever the
/// spooler left on disk only before or between them read back from the
/// spool, and the position after the last; reading back stops at about
/// `limit` rows (the batches after that point are on disk, and are read
/// back next time). `None` when `taken` is empty.
async fn gather(
    spool: &Arc<Mutex<Spool>>,
    written: &SpoolPosition,
    taken: Vec<Spooled>,
    limit: usize,
) -> Result<Option<(Vec<UsageEvent>, SpoolPosition)>, StoreError> {
    let mut rows: Vec<UsageEvent> = Vec::new();
    let mut end = written.clone();
    for batch in taken {
        if batch.start != end {
            let room = limit.saturating_sub(rows.len());
            if room == 0 {
                break;
            }
            let (after, until) = (end.clone(), batch.start.clone());
            let spool = spool.clone();
            let (missing, reached, through) = read_spool(move || {
                let pending = lock(&spool)?.pending(Some(&after)).until(&until);
                let (events, position) = pending.read(room)?;
                let through = pending.is_read_through(&position);
                Ok((events, if through { until } else { position }, through))
            })
            .await?;
            rows.extend(missing);
            end = reached;
            if !through {
                break;
            }
        }
        // The usual case, one batch and no gap, keeps the batch's own rows.
        if rows.is_empty() {
            rows = batch.events;
        } else {
            rows.extend(batch.events);
        }
        end = batch.end;
    }
    Ok((!rows.is_empty()).then_some((rows, end)))
}

/// Runs `read` on a blocking thread: it reads the spool's files, holding
/// the spool only as long as it locks it itself, so that appends go on
/// meanwhile. A failure is not a database failure and is logged here.
async fn read_spool<T: Send + 'static>(
    read: impl FnOnce() -> Result<T, SpoolError> + Send + 'static,
) -> Result<T, StoreError> {
    match blocking(read).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(unreadable(format!("usage spool: {error}"))),
        Err(error) => Err(unreadable(error.to_string())),
    }
}

/// The spool could not be read back; logged here, since it is not a
/// database failure (those are logged where they happen).
fn unreadable(message: String) -> StoreError {
    tracing::warn!(message = "Cannot read the usage spool; retrying.", error = %message);
    StoreError::Corrupt(message)
}

async fn checkpoint(
    spool: &Arc<Mutex<Spool>>,
    stats: &Arc<RecorderStats>,
    position: SpoolPosition,
) {
    let spool_ref = spool.clone();
    // The fsyncs happen without holding the spool, so that appends go on.
    let result = blocking(move || {
        let Some(checkpoint) = lock(&spool_ref)?.prepare_checkpoint(position) else {
            return Ok(());
        };
        let persisted = checkpoint.persist();
        // The rows are in the database whether or not the file could be
        // written (a full disk refuses even that), so the segments before
        // the checkpoint are deleted anyway: on a full disk they are the
        // room the spool needs. An older checkpoint file only makes a
        // restart replay more, which the database ignores.
        lock(&spool_ref)?.checkpointed(checkpoint);
        persisted
    })
    .await;
    publish_spool(spool, stats);
    match result {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::warn!(message = "Usage spool checkpoint failed.", %error),
        Err(error) => tracing::warn!(message = "Usage spool checkpoint failed.", %error),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap (STYLE.md)
mod tests {
    use super::*;
    use crate::usage::spool::tests::{events, pos};

    /// A channel holding batches of `sizes` rows, numbered on from `start`,
    /// each ending at offset (its last row + 1) of segment 1.
    fn queued(start: u64, sizes: &[u64]) -> mpsc::Receiver<Spooled> {
        let (sender, receiver) = mpsc::channel(64);
        let mut n = start;
        for &size in sizes {
            sender
                .try_send(Spooled {
                    events: events(n..n + size),
                    start: pos(1, n),
                    end: pos(1, n + size),
                })
                .unwrap();
            n += size;
        }
        receiver
    }

    fn batch(from: u64, to: u64) -> Spooled {
        Spooled {
            events: events(from..to),
            start: pos(1, from),
            end: pos(1, to),
        }
    }

    fn ids(batch: &[UsageEvent]) -> Vec<u128> {
        batch
            .iter()
            .map(|event| event.id.as_u128() & 0xffff)
            .collect()
    }

    fn taken_ids(taken: &[Spooled]) -> Vec<u128> {
        taken.iter().flat_map(|batch| ids(&batch.events)).collect()
    }

    #[test]
    fn take_queued_takes_what_is_queued_up_to_the_limit() {
        // Batches are taken, only ever whole, until the rows reach the
        // limit; the batch that reaches it is the last.
        let limit = 3 * WRITE_MERGE as u64;
        let mut queue = queued(4, &[limit - 8, 8, 5, 2]);
        let taken = take_queued(batch(0, 4), &mut queue, &pos(1, 0), limit as usize);
        assert_eq!(
            taken_ids(&taken),
            (0..u128::from(limit + 4)).collect::<Vec<_>>()
        );
        // What is left goes in the next transaction, in order.
        let next = queue.try_recv().unwrap();
        let taken = take_queued(next, &mut queue, &pos(1, limit + 4), limit as usize);
        assert_eq!(
            taken_ids(&taken),
            (u128::from(limit + 4)..u128::from(limit + 11)).collect::<Vec<_>>()
        );
        assert!(queue.try_recv().is_err());
    }

    #[test]
    fn take_queued_with_nothing_queued_takes_the_batch_alone() {
        let mut queue = queued(0, &[]);
        let taken = take_queued(batch(0, 5), &mut queue, &pos(1, 0), 100);
        assert_eq!(taken_ids(&taken), (0..5).collect::<Vec<_>>());
    }

    #[test]
    fn take_queued_skips_batches_already_written_from_the_spool() {
        // Draining wrote everything up to offset 9; the batches ending at
        // 5 and 9 are dropped, the one ending at 12 is the first taken.
        let mut queue = queued(5, &[4, 3, 2]);
        let taken = take_queued(batch(0, 5), &mut queue, &pos(1, 9), 100);
        assert_eq!(taken_ids(&taken), (9..14).collect::<Vec<_>>());

        let mut queue = queued(5, &[4]);
        assert!(take_queued(batch(0, 5), &mut queue, &pos(1, 9), 100).is_empty());
    }

    /// A spool with small segments holding `count` batches of three events
    /// (0..3, 3..6, …), and each batch as the spooler hands it over.
    fn spooled(dir: &std::path::Path, count: u64) -> (Arc<Mutex<Spool>>, Vec<Spooled>) {
        let (mut spool, _) = Spool::open_with_segment_bytes(dir, u64::MAX, 1024).unwrap();
        let mut start = spool.end_position();
        let mut batches = Vec::new();
        for i in 0..count {
            let events = events(3 * i..3 * i + 3);
            let end = spool.append(&events).unwrap();
            batches.push(Spooled {
                events,
                start: std::mem::replace(&mut start, end.clone()),
                end,
            });
        }
        assert!(spool.end_position().segment() > 2, "batches span segments");
        (Arc::new(Mutex::new(spool)), batches)
    }

    #[tokio::test]
    async fn gather_reads_back_what_was_left_on_disk_before_and_between_batches() {
        let dir = tempfile::TempDir::new().unwrap();
        let (spool, mut all) = spooled(dir.path(), 12);
        let written = all[0].end.clone();
        let last = all[11].end.clone();
        // The writer got only batches 3, 4, 7 and 11 in memory.
        let taken: Vec<Spooled> = [11, 7, 4, 3]
            .map(|i| all.remove(i))
            .into_iter()
            .rev()
            .collect();
        let (rows, end) = gather(&spool, &written, taken, 1000)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(ids(&rows), (3..36).collect::<Vec<_>>());
        assert_eq!(end, last);
    }

    #[tokio::test]
    async fn gather_stops_reading_back_at_the_limit() {
        let dir = tempfile::TempDir::new().unwrap();
        let (spool, mut all) = spooled(dir.path(), 10);
        let written = pos(0, 0);
        // Batch 8 in memory, 0 to 7 on disk only: whole batches are read
        // back while they fit in 7 rows, and batch 8 waits for next time.
        let end_of_1 = all[1].end.clone();
        let taken = vec![all.remove(8)];
        let (rows, end) = gather(&spool, &written, taken, 7).await.unwrap().unwrap();
        assert_eq!(ids(&rows), (0..6).collect::<Vec<_>>());
        assert_eq!(end, end_of_1);
        // Nothing taken, nothing gathered.
        assert!(gather(&spool, &end, Vec::new(), 7).await.unwrap().is_none());
    }

    #[test]
    fn append_time_jumps_to_a_slow_append_and_forgets_it_slowly() {
        let ms = Duration::from_millis;
        let mut time = AppendTime::default();
        assert_eq!(time.estimate(), Duration::ZERO);
        time.observe(ms(8));
        assert_eq!(time.estimate(), ms(8));
        time.observe(ms(1));
        assert_eq!(time.estimate(), ms(7));
        time.observe(ms(40));
        assert_eq!(time.estimate(), ms(40));
        for _ in 0..40 {
            time.observe(ms(1));
        }
        assert!(time.estimate() < ms(2), "{:?}", time.estimate());
        assert!(time.estimate() >= ms(1));
    }
}
