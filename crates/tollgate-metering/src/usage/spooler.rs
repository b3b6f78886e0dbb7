//! The recorder's spooler: batches the events the data plane records and
//! appends each batch to the spool.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::telemetry::emit;
use crate::usage::events;
use crate::usage::recorder::{Recorded, RecorderConfig, Shared, Writes, RETRY_INTERVAL};
use crate::usage::spool::SpoolError;
use crate::usage::UsageEvent;

/// Collects events into batches and appends each to the spool (fsync),
/// which wakes the writer; a batch the spool refuses goes straight to the
/// database instead ([`Spooler::save`]). On `close` it stops taking new
/// events, saves what is buffered, and ends.
///
/// A batch is appended early enough that its oldest event is on disk
/// within `flush_interval` of being recorded: the wait for more events
/// ends an eighth of `flush_interval` early (room for a late timer on a
/// busy machine), and earlier still by what appends have been taking
/// lately ([`AppendTime`]). It never waits for the writer: the writer's
/// reads and checkpoint fsyncs are made without holding the spool.
pub(super) struct Spooler {
    events: mpsc::UnboundedReceiver<Recorded>,
    /// Taken once it fired: then the channel is closed and drained.
    close: Option<oneshot::Receiver<()>>,
    shared: Arc<Shared>,
    writes: Writes,
    batch_size: usize,
    flush_interval: Duration,
    append_time: AppendTime,
    /// An append took longer than `flush_interval` (and it was logged).
    slow_disk: bool,
    /// The spool's last append failed (and it was logged).
    refusing: bool,
    /// Dropped when the spooler ends, which tells the writer.
    _running: watch::Sender<()>,
}

/// How often an open batch takes in the events queued since: often enough
/// that a batch fills without delay under load (a few hundred events at a
/// hundred thousand a second), seldom enough that a quiet gateway wakes
/// only a few dozen times per batch.
fn gather_every(flush_interval: Duration) -> Duration {
    (flush_interval / 32).clamp(Duration::from_millis(1), Duration::from_millis(10))
}

/// What became of an append.
enum Appended {
    Yes,
    /// Refused by the spool: the batch, back, and why.
    Refused(Vec<UsageEvent>, SpoolError),
    /// Lost with a blocking task that died (a bug); counted and logged.
    Lost,
}

impl Spooler {
    pub(super) fn new(
        events: mpsc::UnboundedReceiver<Recorded>,
        close: oneshot::Receiver<()>,
        shared: Arc<Shared>,
        writes: Writes,
        config: &RecorderConfig,
        running: watch::Sender<()>,
    ) -> Spooler {
        Spooler {
            events,
            close: Some(close),
            shared,
            writes,
            batch_size: config.batch_size,
            flush_interval: config.flush_interval,
            append_time: AppendTime::default(),
            slow_disk: false,
            refusing: false,
            _running: running,
        }
    }

    pub(super) async fn run(mut self) {
        while let Some(batch) = self.next_batch().await {
            let rows = batch.len() as u64;
            self.save(batch).await;
            self.shared.stats.pending.fetch_sub(rows, Ordering::Relaxed);
        }
    }

    /// The first event of a batch, however long it takes; `None` once
    /// closed and drained.
    async fn first_event(&mut self) -> Option<Recorded> {
        loop {
            let Some(close) = &mut self.close else {
                return self.events.recv().await;
            };
            tokio::select! {
                biased;
                event = self.events.recv() => return event,
                _ = close => {
                    self.close = None;
                    self.events.close();
                }
            }
        }
    }

    /// The next batch: the first event, and those that come before its
    /// deadline (all that are buffered, when closing), up to `batch_size`.
    ///
    /// Once a batch is open the spooler does not wake for each event: it
    /// takes what has queued every [`gather_every`] and at the deadline, so
    /// under load handing a row over is a push onto the channel, with no
    /// task woken for it.
    async fn next_batch(&mut self) -> Option<Vec<UsageEvent>> {
        let (recorded_at, first) = self.first_event().await?;
        let flush = self.flush_interval;
        let deadline = recorded_at
            + flush
                .saturating_sub(flush / 8)
                .saturating_sub(self.append_time.estimate());
        let gather = gather_every(flush);
        let mut batch = Vec::with_capacity(self.batch_size.min(8192));
        batch.push(first);
        loop {
            // An event already queued goes in the batch even when the
            // deadline has passed: a late batch is not cut short.
            while batch.len() < self.batch_size {
                match self.events.try_recv() {
                    Ok((_, event)) => batch.push(event),
                    Err(_) => break,
                }
            }
            let now = Instant::now();
            // Closing: everything buffered is in (or waits for the next
            // batch, when this one is full).
            if batch.len() >= self.batch_size || now >= deadline || self.close.is_none() {
                return Some(batch);
            }
            let wake = tokio::time::sleep_until((now + gather).min(deadline));
            if let Some(close) = &mut self.close {
                tokio::select! {
                    biased;
                    _ = close => {
                        self.close = None;
                        self.events.close();
                    }
                    () = wake => {}
                }
            }
        }
    }

    /// Saves a batch: appends it to the spool or, when the disk refuses it
    /// (full, I/O errors), writes it straight to the database; retried until
    /// one of them takes it, and meanwhile no new request is admitted. An
    /// event that was recorded must be saved: its request may have had its
    /// 200.
    ///
    /// A batch is never in both places: a failed append is cut back off the
    /// spool before the next one, so the writer never reads back, nor a
    /// restart replays, rows written here. (A crash between a failed append
    /// and that cut may leave it whole in the file, to be replayed: the
    /// database ignores the ids it has.)
    async fn save(&mut self, mut batch: Vec<UsageEvent>) {
        let rows = batch.len();
        // After a failed write the batch may have committed unseen.
        let mut again = false;
        let mut delay = Duration::from_millis(100);
        loop {
            let error = match self.append(batch).await {
                Appended::Yes | Appended::Lost => break,
                Appended::Refused(returned, error) => {
                    batch = returned;
                    error
                }
            };
            if !std::mem::replace(&mut self.refusing, true) {
                emit(events::SpoolAppendFailed {
                    error: &error,
                    rows,
                });
            }
            if self.writes.write(&batch, again).await.is_ok() {
                break;
            }
            again = true;
            if !self.shared.unsaved.swap(true, Ordering::Relaxed) {
                emit(events::RowsUnsaved { rows });
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(RETRY_INTERVAL);
        }
        self.shared.unsaved.store(false, Ordering::Relaxed);
    }

    /// Appends `batch` to the spool, which keeps it in memory for the
    /// writer, and wakes the writer.
    async fn append(&mut self, batch: Vec<UsageEvent>) -> Appended {
        let rows = batch.len();
        let shared = self.shared.clone();
        let started = Instant::now();
        let attempt = tokio::task::spawn_blocking(move || {
            let mut batch = batch;
            let appended = shared.lock().and_then(|mut spool| {
                let appended = spool.append_and_keep(&mut batch);
                shared.publish(&spool);
                appended
            });
            (batch, appended)
        })
        .await;
        let stats = &*self.shared.stats;
        match attempt {
            Ok((_, Ok(_))) => {}
            Ok((batch, Err(error))) => return Appended::Refused(batch, error),
            Err(error) => {
                emit(events::SpoolTaskDied {
                    stats,
                    rows,
                    error: &error,
                });
                return Appended::Lost;
            }
        }
        self.shared.appended.notify_one();
        let took = started.elapsed();
        self.append_time.observe(took);
        if took > self.flush_interval && !self.slow_disk {
            self.slow_disk = true;
            emit(events::SlowSpoolAppend { took });
        } else if took <= self.flush_interval / 2 {
            self.slow_disk = false;
        }
        emit(events::RowsSpooled { stats, rows });
        if std::mem::take(&mut self.refusing) {
            emit(events::SpoolAppendsResumed);
        }
        Appended::Yes
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

#[cfg(test)]
mod tests {
    use super::*;

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
