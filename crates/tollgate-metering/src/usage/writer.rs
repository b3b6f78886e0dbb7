//! The recorder's writer: follows the spool into the database.

use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::{JoinError, JoinHandle};
use tokio::time::Instant;

use crate::telemetry::emit;
use crate::usage::events;
use crate::usage::recorder::{
    blocking, RecorderConfig, RecorderError, Shared, Writes, CHECKPOINT_INTERVAL, RETRY_INTERVAL,
    WRITE_MERGE,
};
use crate::usage::spool::{SpoolError, SpoolPosition, Tail};
use crate::usage::UsageEvent;

/// Follows the spool from its position: reads what comes next, writes it
/// to the database, checkpoints when due; on error, waits
/// [`RETRY_INTERVAL`] and tries again. It ends once the spooler has ended
/// and it has written everything, or when a write fails after that (the
/// spool keeps the rest for the next start).
pub(super) struct Writer {
    shared: Arc<Shared>,
    pub(super) writes: Writes,
    /// Closed when the spooler ends.
    spooler_running: watch::Receiver<()>,
    /// Rows in one transaction at most (give or take a batch).
    limit: usize,
    /// Everything in the spool before this is in the database.
    written: SpoolPosition,
    /// `written` is past the checkpoint.
    past_checkpoint: bool,
    last_checkpoint: Instant,
    /// The rows after `written` may be in the database already (those
    /// committed after the last checkpoint before a crash, or by a write
    /// whose outcome went unseen): the next write says so to the store.
    unsure: bool,
    /// A write failed since the writer last had nothing left to write.
    behind: bool,
}

impl Writer {
    pub(super) fn new(
        shared: Arc<Shared>,
        writes: Writes,
        spooler_running: watch::Receiver<()>,
        config: &RecorderConfig,
    ) -> Writer {
        let written = shared
            .lock()
            .map(|spool| spool.checkpoint_position())
            .unwrap_or_default();
        Writer {
            shared,
            writes,
            spooler_running,
            limit: config.batch_size.saturating_mul(WRITE_MERGE),
            written,
            past_checkpoint: false,
            last_checkpoint: Instant::now(),
            unsure: false,
            behind: false,
        }
    }

    /// Writes the `pending` events the spool holds at start,
    /// checkpointing after each transaction; fails if the database does
    /// not take them.
    pub(super) async fn replay(&mut self, pending: u64) -> Result<(), RecorderError> {
        if pending > 0 {
            emit(events::SpoolReplaying { rows: pending });
            while let Some((rows, end)) = self.read().await? {
                self.writes.write(&rows, true).await?;
                self.written = end;
                self.past_checkpoint = true;
                self.checkpoint().await;
            }
            emit(events::SpoolReplayed {
                stats: &self.writes.stats,
            });
        }
        // Everything in the spool is in the database now.
        self.written = self.shared.lock()?.end_position();
        Ok(())
    }

    /// Follows the spool with up to two writes going at once: while one
    /// transaction is with the database, the next rows are read from the
    /// spool, encoded and sent in a second (on a second connection where
    /// the store has one), so that neither side waits for the other's round
    /// trips. They are settled in spool order: `written` passes a write's
    /// rows only once it and every write before it committed.
    pub(super) async fn run(mut self) {
        let mut in_flight: Option<InFlight> = None;
        loop {
            let spooler_ended = self.spooler_ended();
            // Reading on from what is in flight: it is in the spool
            // before what comes next.
            let after = in_flight.as_ref().map(|write| write.end.clone());
            match self.read_after(after).await {
                Ok(Some((rows, end))) => {
                    let next = self.start(rows, end);
                    if let Some(write) = in_flight.replace(next) {
                        if !self.settle(write).await {
                            break;
                        }
                    }
                }
                // Nothing after the write in flight yet: settle it, unless
                // the next rows come first.
                Ok(None) if in_flight.is_some() => {
                    if let Some(mut write) = in_flight.take() {
                        tokio::select! {
                            finished = &mut write.task => {
                                if !self.settled(finished, write.end).await {
                                    break;
                                }
                            }
                            () = self.shared.appended.notified(), if !spooler_ended => {
                                in_flight = Some(write);
                            }
                        }
                    }
                }
                Ok(None) if spooler_ended => break,
                Ok(None) => {
                    if std::mem::take(&mut self.behind) {
                        emit(events::WriterCaughtUp);
                    }
                    self.wait().await;
                }
                Err(error) => {
                    emit(events::SpoolUnreadable { error: &error });
                    if let Some(write) = in_flight.take() {
                        if !self.settle(write).await {
                            break;
                        }
                    }
                    if spooler_ended {
                        break;
                    }
                    self.back_off().await;
                }
            }
        }
        // Given up at shutdown: a write still in flight may yet commit (the
        // spool keeps its rows for the next start either way).
        if let Some(write) = in_flight {
            write.task.abort();
        }
        self.checkpoint().await;
    }

    /// Starts writing `rows`, the spool's up to `end`, on a task of its
    /// own.
    fn start(&self, rows: Vec<UsageEvent>, end: SpoolPosition) -> InFlight {
        let (writes, again) = (self.writes.clone(), self.unsure);
        let task = tokio::spawn(async move {
            let written = writes.write(&rows, again).await;
            (rows, written.is_ok())
        });
        InFlight { task, end }
    }

    /// Waits for a write started by [`Writer::start`]; if it failed, writes
    /// its rows again as [`Writer::write`] does, until the database takes
    /// them. False when it gave up (shutdown).
    async fn settle(&mut self, write: InFlight) -> bool {
        let finished = write.task.await;
        self.settled(finished, write.end).await
    }

    /// [`Writer::settle`], once the write's task has finished.
    async fn settled(
        &mut self,
        finished: Result<(Vec<UsageEvent>, bool), JoinError>,
        end: SpoolPosition,
    ) -> bool {
        match finished {
            Ok((_, true)) => {
                self.written_up_to(end).await;
                true
            }
            Ok((rows, false)) => {
                self.unsure = true;
                self.behind = true;
                if self.spooler_ended() {
                    return false;
                }
                self.back_off().await;
                self.write(&rows, end).await
            }
            // The write panicked: the writer ends, as it did when it wrote
            // on its own task. Its rows stay in the spool for the next
            // start.
            Err(_) => false,
        }
    }

    /// What follows `written`: batches the spool keeps in memory, or
    /// records read back from its files; `None` when there is nothing.
    async fn read(&self) -> Result<Option<(Vec<UsageEvent>, SpoolPosition)>, SpoolError> {
        self.read_after(None).await
    }

    /// What follows `after`, or `written` if `None`, as [`Writer::read`].
    async fn read_after(
        &self,
        after: Option<SpoolPosition>,
    ) -> Result<Option<(Vec<UsageEvent>, SpoolPosition)>, SpoolError> {
        let after = after.unwrap_or_else(|| self.written.clone());
        let (shared, limit) = (self.shared.clone(), self.limit);
        blocking(move || {
            let tail = shared.lock()?.tail(&after, limit);
            let (events, end) = match tail {
                Tail::Recent(events, end) => (events, end),
                Tail::OnDisk(records) => records.read(limit)?,
                Tail::End => return Ok(None),
            };
            Ok((!events.is_empty()).then_some((events, end)))
        })
        .await
    }

    /// Writes `rows`, the spool's up to `end`, retrying every
    /// [`RETRY_INTERVAL`] until the database takes them; false when it gave
    /// up, once the spooler has ended (shutdown).
    async fn write(&mut self, rows: &[UsageEvent], end: SpoolPosition) -> bool {
        loop {
            let spooler_ended = self.spooler_ended();
            if self.writes.write(rows, self.unsure).await.is_ok() {
                self.unsure = false;
                self.written_up_to(end).await;
                return true;
            }
            self.unsure = true;
            self.behind = true;
            if spooler_ended {
                return false;
            }
            self.back_off().await;
        }
    }

    /// Everything in the spool up to `end` is in the database now;
    /// checkpoints if that is due.
    async fn written_up_to(&mut self, end: SpoolPosition) {
        self.written = end;
        self.past_checkpoint = true;
        if self.last_checkpoint.elapsed() >= CHECKPOINT_INTERVAL {
            self.checkpoint().await;
        }
    }

    /// Waits for the next append, checkpointing what is written when that
    /// is due meanwhile.
    async fn wait(&mut self) {
        let due = self.last_checkpoint + CHECKPOINT_INTERVAL;
        tokio::select! {
            () = self.shared.appended.notified() => {}
            () = tokio::time::sleep_until(due), if self.past_checkpoint => self.checkpoint().await,
            _ = self.spooler_running.changed() => {}
        }
    }

    /// Waits [`RETRY_INTERVAL`], or until the spooler ends.
    async fn back_off(&mut self) {
        tokio::select! {
            () = tokio::time::sleep(RETRY_INTERVAL) => {}
            _ = self.spooler_running.changed() => {}
        }
    }

    fn spooler_ended(&self) -> bool {
        self.spooler_running.has_changed().is_err()
    }

    /// Checkpoints what is written, if any of it is not yet. The fsyncs
    /// happen without holding the spool, so that appends go on.
    async fn checkpoint(&mut self) {
        self.last_checkpoint = Instant::now();
        if !std::mem::take(&mut self.past_checkpoint) {
            return;
        }
        let (shared, upto) = (self.shared.clone(), self.written.clone());
        let result = blocking(move || {
            let Some(checkpoint) = shared.lock()?.prepare_checkpoint(upto) else {
                return Ok(());
            };
            let persisted = checkpoint.persist();
            // The rows are in the database whether or not the file could be
            // written (a full disk refuses even that), so the segments
            // before the checkpoint are deleted anyway: on a full disk they
            // are the room the spool needs. An older checkpoint file only
            // makes a restart replay more, which the database ignores.
            let mut spool = shared.lock()?;
            spool.checkpointed(checkpoint);
            shared.publish(&spool);
            persisted
        })
        .await;
        if let Err(error) = result {
            emit(events::CheckpointFailed { error: &error });
        }
    }
}

/// A write started by [`Writer::start`]: its task, which gives back its
/// rows and whether they committed, and the spool position after them.
struct InFlight {
    task: JoinHandle<(Vec<UsageEvent>, bool)>,
    end: SpoolPosition,
}
