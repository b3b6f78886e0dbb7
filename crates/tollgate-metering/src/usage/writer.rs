//! The recorder's writer: follows the spool into the database.

use std::sync::Arc;

use tokio::sync::watch;
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

    pub(super) async fn run(mut self) {
        loop {
            let spooler_ended = self.spooler_ended();
            match self.read().await {
                Ok(Some((rows, end))) => {
                    if !self.write(&rows, end).await {
                        break;
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
                    if spooler_ended {
                        break;
                    }
                    self.back_off().await;
                }
            }
        }
        self.checkpoint().await;
    }

    /// What follows `written`: batches the spool keeps in memory, or
    /// records read back from its files; `None` when there is nothing.
    async fn read(&self) -> Result<Option<(Vec<UsageEvent>, SpoolPosition)>, SpoolError> {
        let (shared, after, limit) = (self.shared.clone(), self.written.clone(), self.limit);
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
                self.written = end;
                self.past_checkpoint = true;
                if self.last_checkpoint.elapsed() >= CHECKPOINT_INTERVAL {
                    self.checkpoint().await;
                }
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
