//! The recorder: every usage event, durably into the database, exactly once.
//!
//! ```text
//! data plane ──record()──► channel ──► spooler: batch (batch_size | flush_interval),
//!                                       append to the spool, fsync
//!                                           │ (batch, position)
//!                                           ▼
//!                                       writer: Store::write_usage, then checkpoint
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
//! - Spool write failure (disk full, I/O error): logged and counted; the
//!   batch is retried, and the recorder reports itself not accepting so new
//!   requests are refused rather than unmetered.

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
    async fn write(
        &self,
        store: &dyn Store,
        rows: &[UsageEvent],
        stats: &RecorderStats,
    ) -> Result<u64, StoreError> {
        let started = std::time::Instant::now();
        let result = store.write_usage(rows).await;
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

/// Called with every batch the writer committed to the database (not with
/// the rows replayed at start, which happen before anything is counted):
/// the limiter's multi-instance sync needs to know what this instance has
/// committed.
pub type CommitHook = Arc<dyn Fn(&[UsageEvent]) + Send + Sync>;

/// Batches the writer may hold in memory before it relies on the spool.
const MAX_BATCHES_IN_MEMORY: usize = 16;

/// How many batches' worth of rows the writer puts in one transaction when
/// it is behind (see [`coalesce`]), and reads at once when draining the
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
/// How often a writer that is behind retries the database.
const RETRY_INTERVAL: Duration = Duration::from_millis(500);

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
    /// in the spool and are written later).
    pub write_failures: AtomicU64,
    pub rows_failed: AtomicU64,
    pub database_up: AtomicBool,
    spool_full: AtomicBool,
    spool_failing: AtomicBool,
    /// Set by the spooler when it left a batch on disk only (the writer's
    /// queue was full), before it queues any later batch; the writer checks
    /// it after taking batches from the queue and, when set, writes from
    /// the spool (from where it got to) instead of from the queue.
    left_on_disk: AtomicBool,
    /// Wakes a writer waiting for batches when one was left on disk.
    left_on_disk_wake: tokio::sync::Notify,
}

impl RecorderStats {
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
    /// stalled disk gets it there).
    pub fn accepting(&self) -> bool {
        if self.stats.spool_failing.load(Ordering::Relaxed)
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
    let spool = Arc::new(Mutex::new(spool));
    if pending > 0 {
        tracing::info!(message = "Replaying the usage spool.", rows = pending);
        let mut written = None;
        drain(
            &*store,
            &spool,
            &stats,
            &mut written,
            config.batch_size,
            None,
            &config.flush_metrics,
        )
        .await?;
        let replayed = stats.rows_written.swap(0, Ordering::Relaxed);
        stats.rows_replayed.fetch_add(replayed, Ordering::Relaxed);
        tracing::info!(message = "Usage spool replayed.", rows = replayed);
    }
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
        stats.clone(),
        config.batch_size,
        config.flush_interval,
    ));
    let writer = tokio::spawn(writer(
        batch_receiver,
        spool,
        store,
        stats,
        config.batch_size,
        on_commit,
        config.flush_metrics,
    ));
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

    /// Flushes everything recorded so far and stops: every event is in the
    /// spool, and in the database unless it is down (then the spool keeps
    /// it for the next start). Call after the data plane stopped serving;
    /// events recorded after this call are lost (and logged).
    pub async fn shutdown(self) {
        let RecorderHandle {
            recorder,
            close,
            spooler,
            writer,
        } = self;
        drop(recorder);
        // The spooler closes its channel, spools what is buffered and ends;
        // the writer ends when the spooler's batches stop.
        let _ = close.send(());
        if let Err(error) = spooler.await {
            tracing::error!(message = "Usage spooler failed.", %error);
        }
        if let Err(error) = writer.await {
            tracing::error!(message = "Usage writer failed.", %error);
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
/// hands it to the writer. On `close` it stops taking new events, spools
/// what is buffered, and ends.
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
    batches: mpsc::Sender<(Vec<UsageEvent>, SpoolPosition)>,
    spool: Arc<Mutex<Spool>>,
    stats: Arc<RecorderStats>,
    batch_size: usize,
    flush_interval: Duration,
) {
    let mut closing = false;
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
        let (batch, position) = append_until_done(&spool, &stats, batch).await;
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
        stats.pending.fetch_sub(count, Ordering::Relaxed);
        stats.rows_spooled.fetch_add(count, Ordering::Relaxed);
        match batches.try_send((batch, position)) {
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

/// Appends with retries: an event that was recorded must reach the spool.
async fn append_until_done(
    spool: &Arc<Mutex<Spool>>,
    stats: &Arc<RecorderStats>,
    batch: Vec<UsageEvent>,
) -> (Vec<UsageEvent>, SpoolPosition) {
    let mut batch = batch;
    let mut delay = Duration::from_millis(100);
    loop {
        let spool_ref = spool.clone();
        let attempt = blocking(move || {
            let result = lock(&spool_ref).and_then(|mut spool| spool.append(&batch));
            (batch, result)
        })
        .await;
        match attempt {
            Ok((returned, Ok(position))) => {
                stats.spool_failing.store(false, Ordering::Relaxed);
                publish_spool(spool, stats);
                return (returned, position);
            }
            Ok((returned, Err(error))) => {
                batch = returned;
                stats.spool_failing.store(true, Ordering::Relaxed);
                tracing::error!(
                    message = "Usage spool append failed; retrying. New requests are refused until it succeeds.",
                    %error,
                    rows = batch.len(),
                );
            }
            Err(error) => {
                // The blocking task itself died (a panic): the batch is gone
                // with it. This is a bug; say so loudly.
                tracing::error!(message = "Usage spool task died; a batch is lost.", %error);
                let position = spool.lock().map(|s| s.end_position()).unwrap_or_default();
                return (Vec::new(), position);
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

/// Writes spooled batches to the database and checkpoints them; falls back
/// to draining the spool from disk when it fell behind.
async fn writer(
    mut batches: mpsc::Receiver<(Vec<UsageEvent>, SpoolPosition)>,
    spool: Arc<Mutex<Spool>>,
    store: Arc<dyn Store>,
    stats: Arc<RecorderStats>,
    batch_size: usize,
    on_commit: Option<CommitHook>,
    flush: FlushMetrics,
) {
    let hook = on_commit.as_ref();
    // Everything up to `written` is in the database; `unsaved` is the part
    // of it not yet checkpointed.
    let mut written: Option<SpoolPosition> = None;
    let mut unsaved: Option<SpoolPosition> = None;
    let mut last_checkpoint = tokio::time::Instant::now();
    let mut behind = None;
    loop {
        if let Some(why) = behind {
            match drain(
                &*store,
                &spool,
                &stats,
                &mut written,
                batch_size,
                hook,
                &flush,
            )
            .await
            {
                Ok(()) => {
                    behind = None;
                    if why == Behind::Failed {
                        tracing::info!(message = "Usage writer caught up from the spool.");
                    }
                }
                Err(_) => {
                    behind = Some(Behind::Failed);
                    // Keep taking batches off the channel (they are on disk;
                    // the next drain writes them), until it is time to retry.
                    let retry = tokio::time::sleep(RETRY_INTERVAL);
                    tokio::pin!(retry);
                    loop {
                        tokio::select! {
                            () = &mut retry => break,
                            received = batches.recv() => {
                                if received.is_none() {
                                    // Shutting down with the database away:
                                    // one last attempt, then the spool keeps
                                    // the rest for the next start.
                                    let _ = drain(&*store, &spool, &stats, &mut written, batch_size, hook, &flush).await;
                                    save(&spool, &stats, &mut unsaved, &mut last_checkpoint).await;
                                    return;
                                }
                            }
                        }
                    }
                    continue;
                }
            }
        }
        // Wait for the next batch; or, when something committed is not
        // checkpointed yet, until the checkpoint is due; or until the
        // spooler leaves a batch on disk only.
        let due = last_checkpoint + CHECKPOINT_INTERVAL;
        let next = tokio::select! {
            next = batches.recv() => next,
            () = tokio::time::sleep_until(due), if unsaved.is_some() => {
                save(&spool, &stats, &mut unsaved, &mut last_checkpoint).await;
                continue;
            }
            () = stats.left_on_disk_wake.notified() => {
                if stats.take_left_on_disk() {
                    behind = Some(Behind::Lagged);
                }
                continue;
            }
        };
        let Some(first) = next else {
            // The spooler ended; what it could not queue is on disk.
            if stats.take_left_on_disk() {
                let _ = drain(
                    &*store,
                    &spool,
                    &stats,
                    &mut written,
                    batch_size,
                    hook,
                    &flush,
                )
                .await;
            }
            save(&spool, &stats, &mut unsaved, &mut last_checkpoint).await;
            return;
        };
        let merged = coalesce(first, &mut batches, written.as_ref(), batch_size);
        // A batch the spooler left on disk only was left before any batch
        // queued after it, so a gap among the batches just taken (or
        // before them) shows here: write them, and the gap, from the spool.
        if stats.take_left_on_disk() {
            behind = Some(Behind::Lagged);
            continue;
        }
        let Some((batch, position)) = merged else {
            continue; // already written while draining the spool
        };
        match flush.write(&*store, &batch, &stats).await {
            Ok(_) => {
                if let Some(hook) = hook {
                    hook(&batch);
                }
                stats
                    .rows_written
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                stats.database_up.store(true, Ordering::Relaxed);
                written = Some(position.clone());
                unsaved = Some(position);
                if last_checkpoint.elapsed() >= CHECKPOINT_INTERVAL {
                    save(&spool, &stats, &mut unsaved, &mut last_checkpoint).await;
                }
            }
            Err(_) => behind = Some(Behind::Failed),
        }
    }
}

/// Why the writer reads the spool instead of the spooler's batches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Behind {
    /// A database write failed; retried every [`RETRY_INTERVAL`].
    Failed,
    /// The spooler left batches on disk only (`left_on_disk`).
    Lagged,
}

/// The batches to write in one transaction: `first` and whatever else the
/// spooler has already handed over, up to `batch_size * WRITE_MERGE` rows,
/// leaving out anything at or before `written` (written while draining the
/// spool). `None` when nothing is left.
///
/// Under light load the channel is empty and batches go one by one, as
/// soon as they are spooled. When the database falls behind, batches queue
/// up and are written together: a transaction's fixed cost, and above all
/// its rollup upserts (one per day × customer × key × route × model group,
/// which a bigger batch repeats less), are then shared by more rows, so the
/// writer speeds up exactly when it has to (`benches/usage_write.rs`).
fn coalesce(
    first: (Vec<UsageEvent>, SpoolPosition),
    batches: &mut mpsc::Receiver<(Vec<UsageEvent>, SpoolPosition)>,
    written: Option<&SpoolPosition>,
    batch_size: usize,
) -> Option<(Vec<UsageEvent>, SpoolPosition)> {
    let limit = batch_size.saturating_mul(WRITE_MERGE);
    let is_new = |position: &SpoolPosition| written.is_none_or(|done| position > done);
    let mut merged: Option<(Vec<UsageEvent>, SpoolPosition)> = is_new(&first.1).then_some(first);
    while merged.as_ref().is_none_or(|(rows, _)| rows.len() < limit) {
        let Ok((batch, position)) = batches.try_recv() else {
            break;
        };
        if !is_new(&position) {
            continue;
        }
        match &mut merged {
            Some((rows, last)) => {
                rows.extend(batch);
                *last = position;
            }
            None => merged = Some((batch, position)),
        }
    }
    merged
}

/// Checkpoints the last committed position, if any is unsaved.
async fn save(
    spool: &Arc<Mutex<Spool>>,
    stats: &Arc<RecorderStats>,
    unsaved: &mut Option<SpoolPosition>,
    last_checkpoint: &mut tokio::time::Instant,
) {
    if let Some(position) = unsaved.take() {
        checkpoint(spool, stats, position).await;
    }
    *last_checkpoint = tokio::time::Instant::now();
}

/// Writes everything in the spool after `written`, batch by batch.
async fn drain(
    store: &dyn Store,
    spool: &Arc<Mutex<Spool>>,
    stats: &Arc<RecorderStats>,
    written: &mut Option<SpoolPosition>,
    batch_size: usize,
    hook: Option<&CommitHook>,
    flush: &FlushMetrics,
) -> Result<(), StoreError> {
    loop {
        let after = written.clone();
        let spool_ref = spool.clone();
        // Read without holding the spool, so that appends go on meanwhile.
        let read = blocking(move || {
            let pending = lock(&spool_ref)?.pending(after.as_ref());
            pending.read(batch_size.saturating_mul(WRITE_MERGE))
        })
        .await;
        let (events, position) = match read {
            Ok(Ok(read)) => read,
            Ok(Err(error)) => return Err(unreadable(format!("usage spool: {error}"))),
            Err(error) => return Err(unreadable(error.to_string())),
        };
        if events.is_empty() {
            return Ok(());
        }
        flush.write(store, &events, stats).await?;
        if let Some(hook) = hook {
            hook(&events);
        }
        stats
            .rows_written
            .fetch_add(events.len() as u64, Ordering::Relaxed);
        checkpoint(spool, stats, position.clone()).await;
        *written = Some(position);
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
        checkpoint.persist()?;
        lock(&spool_ref)?.checkpointed(checkpoint);
        Ok::<(), SpoolError>(())
    })
    .await;
    match result {
        Ok(Ok(())) => publish_spool(spool, stats),
        // A failed checkpoint only means those rows may be written again
        // after a restart, which the database ignores.
        Ok(Err(error)) => tracing::warn!(message = "Usage spool checkpoint failed.", %error),
        Err(error) => tracing::warn!(message = "Usage spool checkpoint failed.", %error),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap (STYLE.md)
mod tests {
    use super::*;
    use crate::usage::spool::tests::{events, pos};

    type Batch = (Vec<UsageEvent>, SpoolPosition);

    /// A channel holding batches of `sizes` rows, numbered on from `start`,
    /// each ending at offset (its last row + 1) of segment 1.
    fn queued(start: u64, sizes: &[u64]) -> mpsc::Receiver<Batch> {
        let (sender, receiver) = mpsc::channel(64);
        let mut n = start;
        for &size in sizes {
            sender
                .try_send((events(n..n + size), pos(1, n + size)))
                .unwrap();
            n += size;
        }
        receiver
    }

    fn ids(batch: &[UsageEvent]) -> Vec<u128> {
        batch
            .iter()
            .map(|event| event.id.as_u128() & 0xffff)
            .collect()
    }

    #[test]
    fn coalesce_takes_what_is_queued_up_to_the_limit() {
        // batch_size 3: batches are taken, only ever whole, until the rows
        // reach 3 × WRITE_MERGE; the batch that reaches it is the last.
        let limit = 3 * WRITE_MERGE as u64;
        let mut queue = queued(4, &[limit - 8, 8, 5, 2]);
        let (rows, end) = coalesce((events(0..4), pos(1, 4)), &mut queue, None, 3).unwrap();
        assert_eq!(ids(&rows), (0..u128::from(limit + 4)).collect::<Vec<_>>());
        assert_eq!(end, pos(1, limit + 4));
        // What is left goes in the next transaction, in order.
        let next = queue.try_recv().unwrap();
        let (rows, end) = coalesce(next, &mut queue, None, 3).unwrap();
        assert_eq!(
            ids(&rows),
            (u128::from(limit + 4)..u128::from(limit + 11)).collect::<Vec<_>>()
        );
        assert_eq!(end, pos(1, limit + 11));
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

    #[test]
    fn coalesce_with_nothing_queued_writes_the_batch_alone() {
        let mut queue = queued(0, &[]);
        let (rows, end) = coalesce((events(0..5), pos(1, 5)), &mut queue, None, 100).unwrap();
        assert_eq!(ids(&rows), (0..5).collect::<Vec<_>>());
        assert_eq!(end, pos(1, 5));
    }

    #[test]
    fn coalesce_skips_batches_already_written_from_the_spool() {
        // Draining wrote everything up to offset 9; the batches ending at
        // 5 and 9 are dropped, the one ending at 12 is the first written.
        let mut queue = queued(5, &[4, 3, 2]);
        let (rows, end) =
            coalesce((events(0..5), pos(1, 5)), &mut queue, Some(&pos(1, 9)), 100).unwrap();
        assert_eq!(ids(&rows), (9..14).collect::<Vec<_>>());
        assert_eq!(end, pos(1, 14));

        let mut queue = queued(5, &[4]);
        let written = pos(1, 9);
        assert!(coalesce((events(0..5), pos(1, 5)), &mut queue, Some(&written), 100).is_none());
    }
}
