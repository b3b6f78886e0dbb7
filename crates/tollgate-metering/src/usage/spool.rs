//! The usage spool: a durable local outbox for usage rows that are not in
//! the database yet.
//!
//! The recorder appends every batch here (one write, one fsync) before it
//! writes the batch to the database, and checkpoints once the database has
//! committed it; on start it replays whatever lies after the checkpoint. The
//! database ignores ids it already has, so replaying a row twice is
//! harmless and losing one is not: wherever the spool has to choose, it
//! replays too much rather than too little.
//!
//! It knows nothing of the database or the recorder's tasks; it is plain
//! blocking file I/O, to be called from a blocking thread. Besides the
//! files it keeps its last [`RECENT_BATCHES`] batches in memory
//! ([`Spool::append_and_keep`]), so that a reader following close behind
//! the appends ([`Spool::tail`]) gets them without reading them back.
//!
//! # On disk
//! ```text
//! <dir>/spool.lock                    locked (flock) while a Spool is open
//! <dir>/checkpoint                    "TGCP" | segment u64 LE | offset u64 LE | crc32 u32 LE
//! <dir>/seg-00000000000000000001.log  records, appended
//! <dir>/seg-00000000000000000002.log  …
//! ```
//! A record is one appended batch: `length u32 LE | crc32 u32 LE | payload`,
//! the CRC covering the length bytes and the payload, the payload being
//! `format u8 | event count u32 LE | the events`. Format 2, which this
//! version writes, stores each event as [postcard] of [`WireEvent`]
//! (varints and length-prefixed strings, some 150 bytes an event); format
//! 1, written by earlier versions and still read, stores each as JSON
//! followed by '\n' (four times the bytes, and the costliest part of an
//! append). One record per batch, because a batch is one write: a
//! crash can then only damage the last record, and recovery never has to
//! guess where inside a half-written batch the damage stops. Before a batch
//! that would take a segment past 64 MiB the spool starts a new one, so a
//! record never spans segments, and a checkpoint deletes whole segments.
//!
//! # Failure behaviour
//! - Crash mid-append: the last record of the last segment is cut short,
//!   fails its checksum, or (on some file systems) reads as zeros. `open`
//!   truncates it away and logs a warning. That batch's `append` never
//!   returned, so nothing that was acknowledged is lost.
//! - Damage anywhere else (a bad record with data after it, or in a segment
//!   that is not the last): `open` and `read_pending` fail with
//!   [`SpoolError::Corrupt`], naming the file and byte offset. Data is never
//!   skipped silently; the operator decides what to do with the file.
//! - An unreadable checkpoint file: logged, and everything in the spool is
//!   replayed (the database ignores the rows it already has).
//! - A failed append (disk full, I/O error) is cut back off the segment
//!   before the next append, so a later record never follows garbage. The
//!   batch is not in the spool: the caller keeps it (and the recorder
//!   writes it to the database directly).
//! - A full disk: once everything in the active segment is checkpointed,
//!   the append after a failed one deletes it and starts a new segment, so
//!   a spool that filled the disk gives its space back by itself when the
//!   database has taken its rows (other segments go at each checkpoint).
//! - `open` returns everything pending at once, so a spool near `spool_max`
//!   (after a long database outage) costs about that much memory again, and
//!   more, while it is replayed.
//! - A spool written by an older version stays readable: every format ever
//!   written keeps its decoder, and a change to [`WireEvent`] is a new
//!   format number. A record that does not decode, or has a format this
//!   version does not know, is reported as `Corrupt`, never dropped.
//!
//! [postcard]: https://postcard.jamesmunns.com/wire-format

use std::borrow::Cow;
use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::keys::ids::{CustomerId, KeyId};
use crate::usage::{CostSource, Outcome, UsageEvent};

/// A segment is rolled before a batch that would take it past this size.
const SEGMENT_BYTES: u64 = 64 << 20;
/// `length u32 | crc32 u32`.
const HEADER_BYTES: u64 = 8;
/// Payload format 1: events as JSON lines (read, no longer written).
const FORMAT_JSON_LINES: u8 = 1;
/// Payload format 2: events as postcard [`WireEvent`]s, back to back.
const FORMAT_POSTCARD: u8 = 2;
/// `format u8 | count u32`, before the events.
const PAYLOAD_PREFIX: usize = 5;
const LOCK_FILE: &str = "spool.lock";
const CHECKPOINT_FILE: &str = "checkpoint";
const CHECKPOINT_TMP: &str = "checkpoint.tmp";
const CHECKPOINT_MAGIC: [u8; 4] = *b"TGCP";
const CHECKPOINT_BYTES: usize = 24;
/// Read buffer for scanning segments.
const READ_BUFFER: usize = 256 << 10;
/// Batches the spool keeps in memory after appending them; older ones are
/// read back from disk when asked for.
pub(crate) const RECENT_BATCHES: usize = 16;

/// A point in the spool: everything before it was appended earlier.
/// Ordered by segment, then byte offset in the segment.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct SpoolPosition {
    segment: u64,
    offset: u64,
}

impl SpoolPosition {
    #[cfg(test)]
    /// The segment's number (its file is `seg-<number>.log`).
    pub(crate) fn segment(&self) -> u64 {
        self.segment
    }

    #[cfg(test)]
    /// The byte offset in the segment.
    pub(crate) fn offset(&self) -> u64 {
        self.offset
    }
}

impl fmt::Display for SpoolPosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "segment {} byte {}", self.segment, self.offset)
    }
}

/// Why the spool could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("usage spool file {} is corrupt at byte {offset}: {reason}", path.display())]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    #[error(
        "usage spool directory {} is in use by another process (it holds the lock on {LOCK_FILE}); \
         each gateway needs its own spool_dir",
        dir.display()
    )]
    Locked { dir: PathBuf },
    #[error("usage spool unusable: a thread panicked while holding it")]
    Poisoned,
    #[error("usage spool task failed: {0}")]
    Task(String),
    #[error("usage batch of {events} events is too large for one spool record ({bytes} bytes)")]
    BatchTooLarge { events: usize, bytes: usize },
    #[error("cannot encode usage event {id}: {reason}")]
    Encode { id: Uuid, reason: String },
}

fn io_error<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> SpoolError + 'a {
    move |source| SpoolError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

/// The spool. Not shared: the recorder keeps it behind a mutex.
#[derive(Debug)]
pub(crate) struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    segment_bytes: u64,
    /// Held for the spool's life: the OS releases the lock when it closes.
    _lock: File,
    /// Every segment file, by number, with the length of its valid records.
    segments: BTreeMap<u64, u64>,
    /// The segment appends go to (the last one), once there is one.
    active: Option<Active>,
    end: SpoolPosition,
    checkpoint: SpoolPosition,
    pending_bytes: u64,
    /// The record being appended, kept to reuse its allocation.
    buf: Vec<u8>,
    /// The last append failed: the disk may be full, so the next one first
    /// gives back the active segment if it holds nothing pending.
    refused: bool,
    /// The last batches appended with [`Spool::append_and_keep`], oldest
    /// first, until [`Spool::tail`] hands them out.
    recent: VecDeque<Kept>,
}

/// A batch kept in memory: its events and where its record lies, `start`
/// being where the record before it ended.
#[derive(Debug)]
struct Kept {
    start: SpoolPosition,
    end: SpoolPosition,
    events: Vec<UsageEvent>,
}

/// What follows a position in the spool ([`Spool::tail`]).
#[derive(Debug)]
pub(crate) enum Tail {
    /// Batches kept in memory, taken out of the spool's keeping: their
    /// events and the position after the last one.
    Recent(Vec<UsageEvent>, SpoolPosition),
    /// Records to read back from disk (up to the first batch still kept).
    OnDisk(Pending),
    /// Nothing: the position is the end of the spool.
    End,
}

#[derive(Debug)]
struct Active {
    id: u64,
    file: File,
    path: PathBuf,
    /// Valid bytes; the file's cursor is here unless `dirty`.
    len: u64,
    /// A failed append may have left bytes after `len`.
    dirty: bool,
}

impl Active {
    /// Cuts off what a failed append may have left, so that neither the next
    /// record nor the next segment follows garbage.
    fn cut_failed_append(&mut self) -> Result<(), SpoolError> {
        if self.dirty {
            self.file
                .set_len(self.len)
                .and_then(|()| self.file.sync_data())
                .map_err(io_error("truncate", &self.path))?;
            self.file
                .seek(SeekFrom::Start(self.len))
                .map_err(io_error("seek in", &self.path))?;
            self.dirty = false;
        }
        Ok(())
    }

    fn write_record(&mut self, record: &[u8]) -> Result<(), SpoolError> {
        self.cut_failed_append()?;
        let written = self
            .file
            .write_all(record)
            .and_then(|()| self.file.sync_data());
        match written {
            Ok(()) => {
                self.len += record.len() as u64;
                Ok(())
            }
            Err(source) => {
                self.dirty = true;
                Err(io_error("append to", &self.path)(source))
            }
        }
    }
}

impl Spool {
    #[cfg(test)]
    /// Creates `dir` if needed, takes an exclusive lock on it, recovers a
    /// torn tail (truncating it away, with a warning), and returns every
    /// event after the checkpoint, in append order.
    pub(crate) fn open(dir: &Path, max_bytes: u64) -> Result<(Spool, Vec<UsageEvent>), SpoolError> {
        Self::open_with_segment_bytes(dir, max_bytes, SEGMENT_BYTES)
    }

    /// As [`Spool::open`], but returns only how many events are pending:
    /// every record is still read and checked, but none is kept, so opening
    /// a full spool costs no more memory than one record. Replay then pages
    /// through them with [`Spool::read_pending`].
    pub(crate) fn open_counting(dir: &Path, max_bytes: u64) -> Result<(Spool, u64), SpoolError> {
        let (spool, _, pending) = Self::open_inner(dir, max_bytes, SEGMENT_BYTES, false)?;
        Ok((spool, pending))
    }

    #[cfg(test)]
    pub(crate) fn open_with_segment_bytes(
        dir: &Path,
        max_bytes: u64,
        segment_bytes: u64,
    ) -> Result<(Spool, Vec<UsageEvent>), SpoolError> {
        let (spool, events, _) = Self::open_inner(dir, max_bytes, segment_bytes, true)?;
        Ok((spool, events))
    }

    fn open_inner(
        dir: &Path,
        max_bytes: u64,
        segment_bytes: u64,
        keep: bool,
    ) -> Result<(Spool, Vec<UsageEvent>, u64), SpoolError> {
        fs::create_dir_all(dir).map_err(io_error("create", dir))?;
        let lock = lock_dir(dir)?;
        let tmp = dir.join(CHECKPOINT_TMP);
        match fs::remove_file(&tmp) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => return Err(io_error("remove", &tmp)(error)),
        }
        let checkpoint = read_checkpoint(dir)?;
        let ids = list_segments(dir)?;
        let last = ids.last().copied();

        let mut segments = BTreeMap::new();
        let mut events = Vec::new();
        let mut pending = 0;
        for id in ids {
            let path = segment_path(dir, id);
            if id < checkpoint.segment {
                // Wholly checkpointed; a crash came between the checkpoint
                // and the deletion.
                remove_segment(&path);
                continue;
            }
            let from = if id == checkpoint.segment {
                checkpoint.offset
            } else {
                0
            };
            let len = scan_segment(
                &path,
                from,
                Some(id) == last,
                &mut events,
                keep,
                &mut pending,
            )?;
            segments.insert(id, len);
        }

        // Append to the last segment, unless the checkpoint lies past its
        // end (its tail was lost after being checkpointed): new records
        // must sort after the checkpoint, so they go to a new segment.
        let mut active = None;
        if let Some((&id, &len)) = segments.last_key_value() {
            if (SpoolPosition {
                segment: id,
                offset: len,
            }) >= checkpoint
            {
                let path = segment_path(dir, id);
                let mut file = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(io_error("open", &path))?;
                file.seek(SeekFrom::Start(len))
                    .map_err(io_error("seek in", &path))?;
                active = Some(Active {
                    id,
                    file,
                    path,
                    len,
                    dirty: false,
                });
            }
        }
        let end = active.as_ref().map_or_else(
            || checkpoint.clone(),
            |active| SpoolPosition {
                segment: active.id,
                offset: active.len,
            },
        );
        let mut spool = Spool {
            dir: dir.to_owned(),
            max_bytes,
            segment_bytes,
            _lock: lock,
            segments,
            active,
            end,
            checkpoint,
            pending_bytes: 0,
            buf: Vec::new(),
            refused: false,
            recent: VecDeque::new(),
        };
        spool.remove_checkpointed_segments();
        spool.pending_bytes = spool.count_pending_bytes();
        Ok((spool, events, pending))
    }

    /// Appends the batch as one record, fsyncs, and returns the position
    /// just after it. Succeeds whenever the disk does, even past
    /// `max_bytes`: admission control is the caller's, through
    /// `Spool::is_full`. An empty batch writes nothing.
    ///
    /// After a failed append, the next one starts a new segment when the
    /// active one holds nothing pending, and deletes that one first: on a
    /// full disk it is the room the spool can give back (other segments are
    /// deleted by checkpoints, but the active one only once appends have
    /// moved past it).
    pub(crate) fn append(&mut self, batch: &[UsageEvent]) -> Result<SpoolPosition, SpoolError> {
        if batch.is_empty() {
            return Ok(self.end.clone());
        }
        encode_record(&mut self.buf, batch)?;
        if self.refused {
            self.release_checkpointed_active();
        }
        let appended = self.append_record();
        self.refused = appended.is_err();
        appended
    }

    /// [`Spool::append`], keeping the batch in memory among the last
    /// [`RECENT_BATCHES`] for [`Spool::tail`]: on success `batch` is left
    /// empty, on failure it is left as it was.
    pub(crate) fn append_and_keep(
        &mut self,
        batch: &mut Vec<UsageEvent>,
    ) -> Result<SpoolPosition, SpoolError> {
        let start = self.end.clone();
        let end = self.append(batch)?;
        if !batch.is_empty() {
            if self.recent.len() == RECENT_BATCHES {
                self.recent.pop_front();
            }
            self.recent.push_back(Kept {
                start,
                end: end.clone(),
                events: std::mem::take(batch),
            });
        }
        Ok(end)
    }

    /// What follows `after` (a position an append or an earlier `tail`
    /// returned): the batches kept in memory from there, whole ones while
    /// they fit in `max_events` and at least one; or, when the first of
    /// them is not the next, the records before it, to be read from disk
    /// without holding the spool. Kept batches that end at or before
    /// `after` are dropped.
    pub(crate) fn tail(&mut self, after: &SpoolPosition, max_events: usize) -> Tail {
        while self.recent.front().is_some_and(|kept| kept.end <= *after) {
            self.recent.pop_front();
        }
        match self.recent.front() {
            Some(first) if first.start == *after => {}
            Some(first) => return Tail::OnDisk(self.pending(Some(after)).until(&first.start)),
            None if *after < self.end => return Tail::OnDisk(self.pending(Some(after))),
            None => return Tail::End,
        }
        let mut events: Vec<UsageEvent> = Vec::new();
        let mut end = after.clone();
        while let Some(next) = self.recent.front() {
            let full = !events.is_empty() && events.len() + next.events.len() > max_events;
            if next.start != end || full {
                break;
            }
            let Some(kept) = self.recent.pop_front() else {
                break;
            };
            end = kept.end;
            if events.is_empty() {
                events = kept.events;
            } else {
                events.extend(kept.events);
            }
            if events.len() >= max_events {
                break;
            }
        }
        Tail::Recent(events, end)
    }

    /// Appends the record in `buf`.
    fn append_record(&mut self) -> Result<SpoolPosition, SpoolError> {
        let record_len = self.buf.len() as u64;
        let mut active = match self.active.take() {
            Some(active) if active.len == 0 || active.len + record_len <= self.segment_bytes => {
                active
            }
            Some(mut old) => {
                let new = old.cut_failed_append().and_then(|()| self.create_segment());
                match new {
                    Ok(new) => new,
                    Err(error) => {
                        self.active = Some(old);
                        return Err(error);
                    }
                }
            }
            None => self.create_segment()?,
        };
        let written = active.write_record(&self.buf);
        let id = active.id;
        let len = active.len;
        self.active = Some(active);
        written?;
        self.segments.insert(id, len);
        self.end = SpoolPosition {
            segment: id,
            offset: len,
        };
        self.pending_bytes += record_len;
        Ok(self.end.clone())
    }

    #[cfg(test)]
    /// Records that everything before `upto` is in the database: persists
    /// it atomically (temporary file, fsync, rename, fsync of the
    /// directory) and deletes the segments wholly before it. A position at
    /// or before the current checkpoint is ignored; one past the end is
    /// taken as the end.
    pub(crate) fn checkpoint(&mut self, upto: SpoolPosition) -> Result<(), SpoolError> {
        if let Some(checkpoint) = self.prepare_checkpoint(upto) {
            checkpoint.persist()?;
            self.checkpointed(checkpoint);
        }
        Ok(())
    }

    /// [`Spool::checkpoint`] in three steps, for a spool shared behind a
    /// lock: this one and [`Spool::checkpointed`] under the lock,
    /// [`Checkpoint::persist`] (the fsyncs) without it, so that appends
    /// need not wait. One checkpoint at a time: two persisted out of order
    /// would move the checkpoint back. `None` when `upto` is not past the
    /// current checkpoint.
    pub(crate) fn prepare_checkpoint(&self, upto: SpoolPosition) -> Option<Checkpoint> {
        let upto = upto.min(self.end.clone());
        (upto > self.checkpoint).then(|| Checkpoint {
            dir: self.dir.clone(),
            upto,
        })
    }

    /// The last step of a checkpoint, once persisted: deletes the segments
    /// wholly before it.
    pub(crate) fn checkpointed(&mut self, checkpoint: Checkpoint) {
        if checkpoint.upto <= self.checkpoint {
            return;
        }
        self.checkpoint = checkpoint.upto;
        self.remove_checkpointed_segments();
        self.pending_bytes = self.count_pending_bytes();
    }

    #[cfg(test)]
    /// Reads from disk the events after `max(after, checkpoint)`: whole
    /// records (batches) while they fit in `max_events`, and always at least
    /// one record when anything is pending. Returns them with the position
    /// just after the last one, or an empty vec (and the start position)
    /// when nothing is pending.
    pub(crate) fn read_pending(
        &self,
        after: Option<&SpoolPosition>,
        max_events: usize,
    ) -> Result<(Vec<UsageEvent>, SpoolPosition), SpoolError> {
        self.pending(after).read(max_events)
    }

    /// The records after `max(after, checkpoint)` as they are now, to be
    /// read without holding the spool ([`Pending::read`]) while appends go
    /// on.
    pub(crate) fn pending(&self, after: Option<&SpoolPosition>) -> Pending {
        let start = match after {
            Some(after) if *after > self.checkpoint => after.clone(),
            _ => self.checkpoint.clone(),
        };
        let segments = self
            .segments
            .range(start.segment..)
            .map(|(&id, &len)| (id, len))
            .collect();
        Pending {
            dir: self.dir.clone(),
            start,
            segments,
        }
    }

    /// The position after the last append.
    pub(crate) fn end_position(&self) -> SpoolPosition {
        self.end.clone()
    }

    /// The checkpoint: everything before it is in the database.
    pub(crate) fn checkpoint_position(&self) -> SpoolPosition {
        self.checkpoint.clone()
    }

    /// Bytes appended after the checkpoint (records with their framing).
    pub(crate) fn pending_bytes(&self) -> u64 {
        self.pending_bytes
    }

    /// `pending_bytes() >= max_bytes`.
    pub(crate) fn is_full(&self) -> bool {
        self.pending_bytes >= self.max_bytes
    }

    /// Starts the next segment (numbered after every segment and the
    /// checkpoint, so its records sort after both). A name already taken
    /// (a file the spool does not know of) is passed over, never written.
    fn create_segment(&mut self) -> Result<Active, SpoolError> {
        let last = self.segments.keys().next_back().copied().unwrap_or(0);
        let first = last.max(self.end.segment) + 1;
        let mut id = first;
        let (path, file) = loop {
            let path = segment_path(&self.dir, id);
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(file) => break (path, file),
                Err(error)
                    if error.kind() == std::io::ErrorKind::AlreadyExists && id - first < 16 =>
                {
                    id += 1;
                }
                Err(error) => return Err(io_error("create", &path)(error)),
            }
        };
        // The new name must be durable before a record in it is reported
        // so. If it cannot be made so, the file goes again, and the next
        // attempt makes it anew.
        if let Err(error) = sync_dir(&self.dir) {
            let _ = std::fs::remove_file(&path);
            return Err(error);
        }
        self.segments.insert(id, 0);
        Ok(Active {
            id,
            file,
            path,
            len: 0,
            dirty: false,
        })
    }

    /// Closes and deletes the active segment if everything in it is
    /// checkpointed; the next append then creates a new one (numbered after
    /// it, so positions keep growing). One that cannot be deleted is left
    /// to the next checkpoint, as any other.
    fn release_checkpointed_active(&mut self) {
        let Some(active) = &self.active else {
            return;
        };
        let end = SpoolPosition {
            segment: active.id,
            offset: active.len,
        };
        if end > self.checkpoint {
            return;
        }
        let (id, path) = (active.id, active.path.clone());
        // Closed before it is deleted, so that its space is freed now.
        self.active = None;
        if remove_segment(&path) {
            self.segments.remove(&id);
        }
    }

    /// Deletes every segment that lies wholly before the checkpoint, except
    /// the one appends go to. A segment that cannot be deleted is logged and
    /// tried again at the next checkpoint (or open); it is never replayed.
    fn remove_checkpointed_segments(&mut self) {
        let active = self.active.as_ref().map(|active| active.id);
        let done: Vec<u64> = self
            .segments
            .iter()
            .filter(|&(&id, &len)| {
                Some(id) != active
                    && SpoolPosition {
                        segment: id,
                        offset: len,
                    } <= self.checkpoint
            })
            .map(|(&id, _)| id)
            .collect();
        for id in done {
            if remove_segment(&segment_path(&self.dir, id)) {
                self.segments.remove(&id);
            }
        }
    }

    fn count_pending_bytes(&self) -> u64 {
        self.segments
            .iter()
            .map(|(&id, &len)| match id.cmp(&self.checkpoint.segment) {
                std::cmp::Ordering::Less => 0,
                std::cmp::Ordering::Equal => len.saturating_sub(self.checkpoint.offset),
                std::cmp::Ordering::Greater => len,
            })
            .sum()
    }
}

/// A checkpoint to persist: see [`Spool::prepare_checkpoint`].
#[derive(Debug)]
pub(crate) struct Checkpoint {
    dir: PathBuf,
    upto: SpoolPosition,
}

impl Checkpoint {
    /// Writes the checkpoint file (temporary file, fsync, rename, fsync of
    /// the directory).
    pub(crate) fn persist(&self) -> Result<(), SpoolError> {
        write_checkpoint(&self.dir, &self.upto)
    }
}

/// The spool's records after a position, as they were when taken
/// ([`Spool::pending`]). Segments only grow and only a checkpoint deletes
/// one, so these can be read while appends go on; not while a checkpoint
/// past them is made.
#[derive(Debug)]
pub(crate) struct Pending {
    dir: PathBuf,
    start: SpoolPosition,
    /// The segments from the start's on, with their lengths then.
    segments: Vec<(u64, u64)>,
}

impl Pending {
    /// Only the records that end at or before `end`.
    pub(crate) fn until(mut self, end: &SpoolPosition) -> Pending {
        self.segments.retain(|&(id, _)| id <= end.segment);
        for (id, len) in &mut self.segments {
            if *id == end.segment {
                *len = (*len).min(end.offset);
            }
        }
        self
    }

    /// The events, whole records (batches) while they fit in `max_events`
    /// and always at least one record when there is any, with the position
    /// just after the last one; or an empty vec and the start position.
    pub(crate) fn read(
        &self,
        max_events: usize,
    ) -> Result<(Vec<UsageEvent>, SpoolPosition), SpoolError> {
        let start = &self.start;
        let mut events = Vec::new();
        let mut position = start.clone();
        for &(id, len) in &self.segments {
            let from = if id == start.segment { start.offset } else { 0 };
            if from >= len {
                continue;
            }
            let path = segment_path(&self.dir, id);
            let file = File::open(&path).map_err(io_error("open", &path))?;
            let mut records = RecordReader::new(file, &path, from, len)?;
            loop {
                let (record_start, record_end) = match records.next()? {
                    Next::End => break,
                    Next::Invalid { offset, reason, .. } => {
                        return Err(corrupt(&path, offset, reason));
                    }
                    Next::Record { start, end } => (start, end),
                };
                let count = record_count(&records.payload);
                if !events.is_empty() && events.len() + count > max_events {
                    return Ok((events, position));
                }
                decode_payload(&records.payload, &mut events)
                    .map_err(|reason| corrupt(&path, record_start, reason))?;
                position = SpoolPosition {
                    segment: id,
                    offset: record_end,
                };
                if events.len() >= max_events {
                    return Ok((events, position));
                }
            }
        }
        Ok((events, position))
    }
}

fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("seg-{id:020}.log"))
}

fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("seg-")?.strip_suffix(".log")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The segment numbers in `dir`, in order.
fn list_segments(dir: &Path) -> Result<Vec<u64>, SpoolError> {
    let mut ids = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_error("list", dir))? {
        let entry = entry.map_err(io_error("list", dir))?;
        if let Some(id) = entry.file_name().to_str().and_then(parse_segment_name) {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    Ok(ids)
}

/// Whether the segment is gone.
fn remove_segment(path: &Path) -> bool {
    match fs::remove_file(path) {
        Ok(()) => true,
        Err(error) if error.kind() == io::ErrorKind::NotFound => true,
        Err(error) => {
            tracing::warn!(
                message = "Cannot delete a checkpointed usage spool segment; will retry.",
                path = %path.display(),
                %error,
            );
            false
        }
    }
}

fn lock_dir(dir: &Path) -> Result<File, SpoolError> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io_error("open", &path))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => Err(SpoolError::Locked {
            dir: dir.to_owned(),
        }),
        Err(TryLockError::Error(source)) => Err(io_error("lock", &path)(source)),
    }
}

fn sync_dir(dir: &Path) -> Result<(), SpoolError> {
    // Directories can be fsynced (and need to be, for new names and
    // renames to survive a crash) on Unix; elsewhere this is best effort.
    #[cfg(unix)]
    File::open(dir)
        .and_then(|dir| dir.sync_all())
        .map_err(io_error("sync", dir))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

fn encode_checkpoint(position: &SpoolPosition) -> [u8; CHECKPOINT_BYTES] {
    let mut bytes = [0; CHECKPOINT_BYTES];
    bytes[..4].copy_from_slice(&CHECKPOINT_MAGIC);
    bytes[4..12].copy_from_slice(&position.segment.to_le_bytes());
    bytes[12..20].copy_from_slice(&position.offset.to_le_bytes());
    let crc = crc32fast::hash(&bytes[..20]);
    bytes[20..].copy_from_slice(&crc.to_le_bytes());
    bytes
}

fn decode_checkpoint(bytes: &[u8]) -> Option<SpoolPosition> {
    let bytes: &[u8; CHECKPOINT_BYTES] = bytes.try_into().ok()?;
    let (body, crc) = bytes.split_at(20);
    if body[..4] != CHECKPOINT_MAGIC || crc32fast::hash(body).to_le_bytes() != crc {
        return None;
    }
    Some(SpoolPosition {
        segment: u64::from_le_bytes(body[4..12].try_into().ok()?),
        offset: u64::from_le_bytes(body[12..20].try_into().ok()?),
    })
}

fn read_checkpoint(dir: &Path) -> Result<SpoolPosition, SpoolError> {
    let path = dir.join(CHECKPOINT_FILE);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            return Ok(SpoolPosition::default())
        }
        Err(error) => return Err(io_error("read", &path)(error)),
    };
    Ok(decode_checkpoint(&bytes).unwrap_or_else(|| {
        // It is only ever replaced by rename, so this is damage, not a
        // crash. Replaying everything is safe: the database skips the
        // rows it has.
        tracing::warn!(
            message = "Usage spool checkpoint is unreadable; replaying the whole spool.",
            path = %path.display(),
            bytes = bytes.len(),
        );
        SpoolPosition::default()
    }))
}

fn write_checkpoint(dir: &Path, position: &SpoolPosition) -> Result<(), SpoolError> {
    let tmp = dir.join(CHECKPOINT_TMP);
    let path = dir.join(CHECKPOINT_FILE);
    let mut file = File::create(&tmp).map_err(io_error("create", &tmp))?;
    file.write_all(&encode_checkpoint(position))
        .and_then(|()| file.sync_all())
        .map_err(io_error("write", &tmp))?;
    drop(file);
    fs::rename(&tmp, &path).map_err(io_error("replace", &path))?;
    sync_dir(dir)
}

/// Encodes `batch` as one framed record into `buf`.
fn encode_record(buf: &mut Vec<u8>, batch: &[UsageEvent]) -> Result<(), SpoolError> {
    buf.clear();
    buf.extend_from_slice(&[0; HEADER_BYTES as usize]);
    buf.push(FORMAT_POSTCARD);
    let too_large = |bytes| SpoolError::BatchTooLarge {
        events: batch.len(),
        bytes,
    };
    let count = u32::try_from(batch.len()).map_err(|_| too_large(0))?;
    buf.extend_from_slice(&count.to_le_bytes());
    for event in batch {
        let encoded = WireEvent::new(event)
            .and_then(|wire| postcard::to_io(&wire, &mut *buf).map_err(|e| e.to_string()));
        encoded.map_err(|reason| SpoolError::Encode {
            id: event.id,
            reason,
        })?;
    }
    let payload_len = buf.len() - HEADER_BYTES as usize;
    let length = u32::try_from(payload_len).map_err(|_| too_large(buf.len()))?;
    let length = length.to_le_bytes();
    buf[..4].copy_from_slice(&length);
    let crc = record_crc(length, &buf[HEADER_BYTES as usize..]);
    buf[4..8].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// An event as payload format 2 stores it: the postcard encoding of these
/// fields, in this order, with `Outcome` and `CostSource` as the position of
/// their variant. Any change here (a field added, moved or retyped, an enum
/// variant inserted anywhere but last) is a new format number, with this
/// one kept for reading; the test `format_2_bytes_still_decode` holds it.
#[derive(Serialize, Deserialize)]
struct WireEvent<'a> {
    id: Uuid,
    client_request_id: Option<Cow<'a, str>>,
    /// Nanoseconds since the Unix epoch.
    ts: i64,
    customer_id: Uuid,
    key_id: Uuid,
    #[serde(borrow)]
    instance: Cow<'a, str>,
    #[serde(borrow)]
    route: Cow<'a, str>,
    #[serde(borrow)]
    method: Cow<'a, str>,
    #[serde(borrow)]
    path: Cow<'a, str>,
    status: u16,
    outcome: Outcome,
    latency_us: u64,
    upstream_latency_us: u64,
    request_bytes: u64,
    response_bytes: u64,
    model: Option<Cow<'a, str>>,
    input_tokens: u64,
    output_tokens: u64,
    cache_read_tokens: u64,
    cache_write_tokens: u64,
    cost_nanos: i64,
    cost_source: CostSource,
}

impl<'a> WireEvent<'a> {
    fn new(event: &'a UsageEvent) -> Result<WireEvent<'a>, String> {
        let ts = i64::try_from(event.ts.unix_timestamp_nanos())
            .map_err(|_| format!("timestamp {} is out of range", event.ts))?;
        Ok(WireEvent {
            id: event.id,
            client_request_id: event.client_request_id.as_deref().map(Cow::Borrowed),
            ts,
            customer_id: event.customer_id.0,
            key_id: event.key_id.0,
            instance: Cow::Borrowed(&event.instance),
            route: Cow::Borrowed(&event.route),
            method: Cow::Borrowed(&event.method),
            path: Cow::Borrowed(&event.path),
            status: event.status,
            outcome: event.outcome,
            latency_us: event.latency_us,
            upstream_latency_us: event.upstream_latency_us,
            request_bytes: event.request_bytes,
            response_bytes: event.response_bytes,
            model: event.model.as_deref().map(Cow::Borrowed),
            input_tokens: event.input_tokens,
            output_tokens: event.output_tokens,
            cache_read_tokens: event.cache_read_tokens,
            cache_write_tokens: event.cache_write_tokens,
            cost_nanos: event.cost_nanos,
            cost_source: event.cost_source,
        })
    }

    fn into_event(self) -> Result<UsageEvent, String> {
        let ts = OffsetDateTime::from_unix_timestamp_nanos(i128::from(self.ts))
            .map_err(|error| format!("timestamp {}: {error}", self.ts))?;
        Ok(UsageEvent {
            id: self.id,
            client_request_id: self.client_request_id.map(Cow::into_owned),
            ts,
            customer_id: CustomerId(self.customer_id),
            key_id: KeyId(self.key_id),
            instance: self.instance.into_owned(),
            route: self.route.into_owned(),
            method: self.method.into_owned(),
            path: self.path.into_owned(),
            status: self.status,
            outcome: self.outcome,
            latency_us: self.latency_us,
            upstream_latency_us: self.upstream_latency_us,
            request_bytes: self.request_bytes,
            response_bytes: self.response_bytes,
            model: self.model.map(Cow::into_owned),
            input_tokens: self.input_tokens,
            output_tokens: self.output_tokens,
            cache_read_tokens: self.cache_read_tokens,
            cache_write_tokens: self.cache_write_tokens,
            cost_nanos: self.cost_nanos,
            cost_source: self.cost_source,
        })
    }
}

fn record_crc(length: [u8; 4], payload: &[u8]) -> u32 {
    let mut crc = crc32fast::Hasher::new();
    crc.update(&length);
    crc.update(payload);
    crc.finalize()
}

/// The event count of a payload the reader has validated.
fn record_count(payload: &[u8]) -> usize {
    match payload.get(1..PAYLOAD_PREFIX) {
        Some(&[a, b, c, d]) => u32::from_le_bytes([a, b, c, d]) as usize,
        _ => 0,
    }
}

/// Decodes a validated payload's events onto `out`; on error `out` is left
/// as it was.
fn decode_payload(payload: &[u8], out: &mut Vec<UsageEvent>) -> Result<(), String> {
    let count = record_count(payload);
    let before = out.len();
    out.reserve(count.min(payload.len() / 64));
    let body = payload.get(PAYLOAD_PREFIX..).unwrap_or_default();
    let decoded = match payload.first() {
        Some(&FORMAT_POSTCARD) => decode_postcard(body, count, out),
        _ => decode_json_lines(body, out),
    };
    let error = match decoded {
        Err((number, error)) => {
            format!("event {number} of {count} in the record does not decode: {error}")
        }
        Ok(()) if out.len() - before != count => {
            format!(
                "record says {count} events but holds {}",
                out.len() - before
            )
        }
        Ok(()) => return Ok(()),
    };
    out.truncate(before);
    Err(error)
}

/// Format 2: `count` postcard events and nothing after them. Errors carry
/// the number of the event (from 1) that failed.
fn decode_postcard(
    mut body: &[u8],
    count: usize,
    out: &mut Vec<UsageEvent>,
) -> Result<(), (usize, String)> {
    for number in 1..=count {
        if body.is_empty() {
            return Ok(()); // fewer events than counted: the caller says so
        }
        let (wire, rest) = postcard::take_from_bytes::<WireEvent<'_>>(body)
            .map_err(|error| (number, error.to_string()))?;
        out.push(wire.into_event().map_err(|error| (number, error))?);
        body = rest;
    }
    if body.is_empty() {
        Ok(())
    } else {
        Err((
            count + 1,
            format!("{} bytes after the last event", body.len()),
        ))
    }
}

/// Format 1: events as JSON, each followed by '\n'.
fn decode_json_lines(body: &[u8], out: &mut Vec<UsageEvent>) -> Result<(), (usize, String)> {
    for (index, event) in serde_json::Deserializer::from_slice(body)
        .into_iter::<UsageEvent>()
        .enumerate()
    {
        out.push(event.map_err(|error| (index + 1, error.to_string()))?);
    }
    Ok(())
}

fn corrupt(path: &Path, offset: u64, reason: String) -> SpoolError {
    SpoolError::Corrupt {
        path: path.to_owned(),
        offset,
        reason,
    }
}

/// Reads and checks a segment's records from `from`, adding their events to
/// `events` (only when `keep`) and their count to `counted`.
fn scan_segment(
    path: &Path,
    from: u64,
    is_last: bool,
    events: &mut Vec<UsageEvent>,
    keep: bool,
    counted: &mut u64,
) -> Result<u64, SpoolError> {
    let file = File::open(path).map_err(io_error("open", path))?;
    let file_len = file.metadata().map_err(io_error("stat", path))?.len();
    if from > file_len {
        // Checkpointed bytes are missing: nothing pending is lost, but say so.
        tracing::warn!(
            message = "Usage spool checkpoint lies past the end of its segment.",
            path = %path.display(),
            checkpoint = from,
            len = file_len,
        );
        return Ok(file_len);
    }
    let mut records = RecordReader::new(file, path, from, file_len)?;
    loop {
        match records.next()? {
            Next::End => return Ok(file_len),
            Next::Record { start, .. } => {
                let before = events.len();
                decode_payload(&records.payload, events)
                    .map_err(|reason| corrupt(path, start, reason))?;
                *counted += (events.len() - before) as u64;
                if !keep {
                    events.clear();
                }
            }
            Next::Invalid {
                offset,
                reason,
                torn,
            } => {
                // A crash mid-append tears the last record only: a whole
                // record after this one means damage (a length field
                // with a bit flipped, say), never a torn tail.
                if !is_last
                    || !(torn || records.zeros_to_end(offset)?)
                    || records.record_after(offset)?
                {
                    return Err(corrupt(path, offset, reason));
                }
                tracing::warn!(
                    message = "Usage spool ends in a torn record (a crash mid-append); truncating it away.",
                    path = %path.display(),
                    offset,
                    bytes = file_len - offset,
                    %reason,
                );
                let file = OpenOptions::new()
                    .write(true)
                    .open(path)
                    .map_err(io_error("open", path))?;
                file.set_len(offset)
                    .and_then(|()| file.sync_all())
                    .map_err(io_error("truncate", path))?;
                return Ok(offset);
            }
        }
    }
}

enum Next {
    /// A valid record from `start` to `end`; its payload is in `payload`.
    Record {
        start: u64,
        end: u64,
    },
    End,
    /// What starts at `offset` is not a valid record. `torn`: it looks
    /// like what a crash mid-append leaves when it is the end of the last
    /// segment (a record cut short, or whose frame reaches the end of the
    /// file but fails its checksum); anything with data after it is damage.
    Invalid {
        offset: u64,
        reason: String,
        torn: bool,
    },
}

struct RecordReader<'a> {
    reader: BufReader<File>,
    path: &'a Path,
    offset: u64,
    len: u64,
    payload: Vec<u8>,
}

impl<'a> RecordReader<'a> {
    fn new(file: File, path: &'a Path, from: u64, len: u64) -> Result<Self, SpoolError> {
        let mut reader = BufReader::with_capacity(READ_BUFFER, file);
        reader
            .seek(SeekFrom::Start(from))
            .map_err(io_error("seek in", path))?;
        Ok(RecordReader {
            reader,
            path,
            offset: from,
            len,
            payload: Vec::new(),
        })
    }

    fn next(&mut self) -> Result<Next, SpoolError> {
        let start = self.offset;
        let remaining = self.len.saturating_sub(start);
        if remaining == 0 {
            return Ok(Next::End);
        }
        let invalid = |reason: String, torn: bool| {
            Ok(Next::Invalid {
                offset: start,
                reason,
                torn,
            })
        };
        if remaining < HEADER_BYTES {
            return invalid(
                format!("{remaining} bytes left, too few for a record header"),
                true,
            );
        }
        let mut header = [0; HEADER_BYTES as usize];
        self.reader
            .read_exact(&mut header)
            .map_err(io_error("read", self.path))?;
        let length = [header[0], header[1], header[2], header[3]];
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        let payload_len = u32::from_le_bytes(length) as usize;
        let available = remaining - HEADER_BYTES;
        if payload_len as u64 > available {
            return invalid(
                format!(
                    "the record's length ({payload_len} bytes) runs past the end of the file \
                     ({available} bytes left)"
                ),
                true,
            );
        }
        if payload_len < PAYLOAD_PREFIX {
            return invalid(
                format!("the record's length ({payload_len} bytes) is too small"),
                false,
            );
        }
        self.payload.resize(payload_len, 0);
        self.reader
            .read_exact(&mut self.payload)
            .map_err(io_error("read", self.path))?;
        let actual = record_crc(length, &self.payload);
        if actual != crc {
            return invalid(
                format!("checksum mismatch (stored {crc:08x}, computed {actual:08x})"),
                payload_len as u64 == available,
            );
        }
        if !matches!(self.payload[0], FORMAT_JSON_LINES | FORMAT_POSTCARD) {
            return invalid(
                format!(
                    "unknown record format {} (written by a newer version?)",
                    self.payload[0]
                ),
                false,
            );
        }
        self.offset = start + HEADER_BYTES + payload_len as u64;
        Ok(Next::Record {
            start,
            end: self.offset,
        })
    }

    /// Whether a whole, valid record starts anywhere after `offset` (its
    /// length within the file, a known format and its checksum right).
    fn record_after(&mut self, offset: u64) -> Result<bool, SpoolError> {
        self.reader
            .seek(SeekFrom::Start(offset))
            .map_err(io_error("seek in", self.path))?;
        let mut tail = Vec::new();
        self.reader
            .read_to_end(&mut tail)
            .map_err(io_error("read", self.path))?;
        let header = HEADER_BYTES as usize;
        for start in 1..tail.len().saturating_sub(header) {
            let length = [
                tail[start],
                tail[start + 1],
                tail[start + 2],
                tail[start + 3],
            ];
            let payload_len = u32::from_le_bytes(length) as usize;
            let payload_at = start + header;
            if payload_len < PAYLOAD_PREFIX || payload_len > tail.len() - payload_at {
                continue;
            }
            let payload = &tail[payload_at..payload_at + payload_len];
            if !matches!(payload[0], FORMAT_JSON_LINES | FORMAT_POSTCARD) {
                continue;
            }
            let crc = u32::from_le_bytes([
                tail[start + 4],
                tail[start + 5],
                tail[start + 6],
                tail[start + 7],
            ]);
            if record_crc(length, payload) == crc {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Whether everything from `offset` to the end is zeros: space the file
    /// system allocated for an append but never wrote.
    fn zeros_to_end(&mut self, offset: u64) -> Result<bool, SpoolError> {
        self.reader
            .seek(SeekFrom::Start(offset))
            .map_err(io_error("seek in", self.path))?;
        let mut chunk = [0; 4096];
        let mut left = self.len.saturating_sub(offset);
        while left > 0 {
            let want = chunk.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            let read = self
                .reader
                .read(&mut chunk[..want])
                .map_err(io_error("read", self.path))?;
            if read == 0 {
                break;
            }
            if chunk[..read].iter().any(|&b| b != 0) {
                return Ok(false);
            }
            left -= read as u64;
        }
        Ok(true)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap (STYLE.md)
pub(crate) mod tests {
    use std::ops::Range;

    use proptest::prelude::*;
    use tempfile::TempDir;
    use time::macros::datetime;

    use super::*;
    use crate::keys::ids::{CustomerId, KeyId};
    use crate::usage::{CostSource, Outcome};

    fn event(n: u64) -> UsageEvent {
        let i = n as usize;
        UsageEvent {
            id: Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0000 | u128::from(n)),
            client_request_id: n.is_multiple_of(3).then(|| format!("client \"{n}\"\n✓")),
            ts: datetime!(2028-02-29 23:59:59.999 UTC) + time::Duration::microseconds(7 * n as i64),
            customer_id: CustomerId(Uuid::from_u128(1000 + u128::from(n % 5))),
            key_id: KeyId(Uuid::from_u128(2000 + u128::from(n % 7))),
            instance: "gw-test".to_owned(),
            route: format!("route-{}", n % 4),
            method: "POST".to_owned(),
            path: format!("/v1/chat/completions/{n}"),
            status: [200, 429, 502, 0][i % 4],
            outcome: Outcome::ALL[i % Outcome::ALL.len()],
            latency_us: 13 * n,
            upstream_latency_us: 11 * n,
            request_bytes: 100 * n,
            response_bytes: 1000 * n,
            model: n.is_multiple_of(2).then(|| "gpt-4o-mini".to_owned()),
            input_tokens: n,
            output_tokens: 2 * n,
            cache_read_tokens: n % 10,
            cache_write_tokens: n % 3,
            cost_nanos: 1234 * n as i64 - 5,
            cost_source: [CostSource::Header, CostSource::Pricing, CostSource::None][i % 3],
        }
    }

    pub(crate) fn events(range: Range<u64>) -> Vec<UsageEvent> {
        range.map(event).collect()
    }

    fn open(dir: &Path) -> (Spool, Vec<UsageEvent>) {
        Spool::open(dir, u64::MAX).unwrap()
    }

    fn open_small(dir: &Path, segment_bytes: u64) -> (Spool, Vec<UsageEvent>) {
        Spool::open_with_segment_bytes(dir, u64::MAX, segment_bytes).unwrap()
    }

    #[test]
    fn a_segment_name_taken_behind_the_spools_back_is_passed_over() {
        let dir = tempfile::tempdir().unwrap();
        let (mut spool, _) = open(dir.path());
        // The name the next segment would take exists, unknown to the
        // spool (left by a failed attempt to make it durable, say).
        let taken = segment_path(dir.path(), 1);
        std::fs::write(&taken, b"not ours").unwrap();
        spool.append(&events(0..3)).unwrap();
        spool.append(&events(3..5)).unwrap();
        assert_eq!(std::fs::read(&taken).unwrap(), b"not ours", "left alone");
        assert!(segment_path(dir.path(), 2).exists());
        drop(spool);
        std::fs::remove_file(&taken).unwrap();
        let (_, replayed) = open(dir.path());
        assert_eq!(replayed, events(0..5));
    }

    pub(crate) fn pos(segment: u64, offset: u64) -> SpoolPosition {
        SpoolPosition { segment, offset }
    }

    fn file_len(path: &Path) -> u64 {
        fs::metadata(path).unwrap().len()
    }

    /// Every pending event through `read_pending`, `max_events` at a time.
    fn read_all(spool: &Spool, max_events: usize) -> Vec<UsageEvent> {
        let mut all = Vec::new();
        let mut after: Option<SpoolPosition> = None;
        loop {
            let (page, next) = spool.read_pending(after.as_ref(), max_events).unwrap();
            if page.is_empty() {
                return all;
            }
            assert!(after.as_ref().is_none_or(|after| next > *after));
            all.extend(page);
            after = Some(next);
        }
    }

    #[test]
    fn append_then_open_returns_every_event_in_order() {
        let dir = TempDir::new().unwrap();
        let (mut spool, replay) = open(dir.path());
        assert!(replay.is_empty());
        assert_eq!(spool.end_position(), SpoolPosition::default());
        let p1 = spool.append(&events(0..1)).unwrap();
        let p2 = spool.append(&events(1..101)).unwrap();
        let p3 = spool.append(&events(101..104)).unwrap();
        assert!(SpoolPosition::default() < p1 && p1 < p2 && p2 < p3);
        assert_eq!(spool.end_position(), p3);
        drop(spool);

        // Restart after restart: nothing was checkpointed, everything comes back.
        for _ in 0..2 {
            let (spool, replay) = open(dir.path());
            assert_eq!(replay, events(0..104));
            assert_eq!(spool.end_position(), p3);
        }
    }

    #[test]
    fn open_creates_the_directory_and_appending_starts_segment_one() {
        let dir = TempDir::new().unwrap();
        let spool_dir = dir.path().join("a/b");
        let (mut spool, replay) = open(&spool_dir);
        assert!(replay.is_empty());
        assert_eq!(spool.pending_bytes(), 0);
        assert!(list_segments(&spool_dir).unwrap().is_empty());
        assert_eq!(spool.append(&[]).unwrap(), SpoolPosition::default());
        assert!(list_segments(&spool_dir).unwrap().is_empty());
        let p = spool.append(&events(0..2)).unwrap();
        assert_eq!(p.segment(), 1);
        assert_eq!(p.offset(), file_len(&segment_path(&spool_dir, 1)));
    }

    #[test]
    fn checkpoint_then_open_returns_only_later_events() {
        let dir = TempDir::new().unwrap();
        let (mut spool, _) = open(dir.path());
        let p1 = spool.append(&events(0..3)).unwrap();
        let p2 = spool.append(&events(3..5)).unwrap();
        let p3 = spool.append(&events(5..9)).unwrap();
        spool.checkpoint(p2.clone()).unwrap();
        // An older position is ignored, in memory and on disk.
        spool.checkpoint(p1).unwrap();
        assert_eq!(spool.checkpoint_position(), p2);
        drop(spool);

        let (mut spool, replay) = open(dir.path());
        assert_eq!(replay, events(5..9));
        assert_eq!(spool.checkpoint_position(), p2);
        spool.checkpoint(p3).unwrap();
        drop(spool);
        let (spool, replay) = open(dir.path());
        assert!(replay.is_empty());
        assert_eq!(spool.pending_bytes(), 0);
    }

    #[test]
    fn a_checkpoint_past_the_end_is_taken_as_the_end() {
        let dir = TempDir::new().unwrap();
        let (mut spool, _) = open(dir.path());
        let p1 = spool.append(&events(0..1)).unwrap();
        spool.checkpoint(pos(9, 0)).unwrap();
        assert_eq!(spool.checkpoint_position(), p1);
        spool.append(&events(1..2)).unwrap();
        drop(spool);
        assert_eq!(open(dir.path()).1, events(1..2));
    }

    #[test]
    fn read_pending_pages_through_every_event_exactly_once() {
        let dir = TempDir::new().unwrap();
        let (mut spool, _) = open_small(dir.path(), 4096);
        let mut n = 0;
        let mut batches = Vec::new();
        for size in (1..=7).cycle().take(40) {
            let batch = events(n..n + size);
            n += size;
            let end = spool.append(&batch).unwrap();
            batches.push((batch, end));
        }
        assert!(list_segments(dir.path()).unwrap().len() > 5);
        let all = events(0..n);
        for max in [0, 1, 3, 7, 10, 1000] {
            // Whole batches, as many as fit in `max`, at least one.
            let mut expected_pages: Vec<usize> = Vec::new();
            let mut page = 0;
            for (batch, _) in &batches {
                if page > 0 && page + batch.len() > max {
                    expected_pages.push(page);
                    page = 0;
                }
                page += batch.len();
                if page >= max {
                    expected_pages.push(page);
                    page = 0;
                }
            }
            if page > 0 {
                expected_pages.push(page);
            }

            let mut seen = Vec::new();
            let mut pages = Vec::new();
            let mut after: Option<SpoolPosition> = None;
            loop {
                let (page, next) = spool.read_pending(after.as_ref(), max).unwrap();
                if page.is_empty() {
                    assert_eq!(next, after.unwrap_or_default(), "max {max}");
                    break;
                }
                // Each page ends at a batch's end, with that batch's last event.
                let (batch, _) = batches.iter().find(|(_, end)| *end == next).unwrap();
                assert_eq!(page.last(), batch.last(), "max {max}");
                pages.push(page.len());
                seen.extend(page);
                after = Some(next);
            }
            assert_eq!(pages, expected_pages, "max {max}");
            assert_eq!(seen, all, "max {max}");
        }

        // After a checkpoint, reading starts there whatever `after` says.
        let (_, mid) = &batches[19];
        spool.checkpoint(mid.clone()).unwrap();
        let first_pending = batches[20].0.clone();
        let (page, _) = spool.read_pending(None, 1).unwrap();
        assert_eq!(page, first_pending);
        let (page, _) = spool.read_pending(Some(&batches[3].1), 1).unwrap();
        assert_eq!(page, first_pending);
        let (page, _) = spool.read_pending(Some(&batches[20].1), 1).unwrap();
        assert_eq!(page, batches[21].0);
        let (page, end) = spool.read_pending(Some(&spool.end_position()), 10).unwrap();
        assert!(page.is_empty());
        assert_eq!(end, spool.end_position());
    }

    #[test]
    fn a_torn_tail_cut_at_any_byte_loses_only_the_torn_record() {
        let fixture = TempDir::new().unwrap();
        let (mut spool, _) = open(fixture.path());
        let p1 = spool.append(&events(0..3)).unwrap();
        let p2 = spool.append(&events(3..4)).unwrap();
        drop(spool);
        let segment = segment_path(fixture.path(), 1);
        let bytes = fs::read(&segment).unwrap();
        assert_eq!(bytes.len() as u64, p2.offset());
        let last_record = p2.offset() - p1.offset();

        for cut in 1..=last_record {
            let dir = TempDir::new().unwrap();
            let path = segment_path(dir.path(), 1);
            fs::write(&path, &bytes[..(p2.offset() - cut) as usize]).unwrap();
            let (mut spool, replay) = open(dir.path());
            assert_eq!(replay, events(0..3), "cut {cut}");
            assert_eq!(file_len(&path), p1.offset(), "cut {cut}");
            assert_eq!(spool.end_position(), p1, "cut {cut}");
            // Appending after recovery works, and lands right after the
            // last complete record (checked on a sample: fsyncs are slow).
            if cut % 17 == 1 || cut == last_record {
                assert_eq!(spool.append(&events(10..12)).unwrap().segment(), 1);
                drop(spool);
                let replay = open(dir.path()).1;
                assert_eq!(replay, [events(0..3), events(10..12)].concat(), "cut {cut}");
            }
        }
    }

    #[test]
    fn a_damaged_length_with_whole_records_after_it_is_corrupt_not_torn() {
        let dir = TempDir::new().unwrap();
        let (mut spool, _) = open(dir.path());
        let p1 = spool.append(&events(0..2)).unwrap();
        spool.append(&events(2..4)).unwrap();
        spool.append(&events(4..6)).unwrap();
        drop(spool);
        let path = segment_path(dir.path(), 1);
        let mut bytes = fs::read(&path).unwrap();
        let before = bytes.len();
        // The second record's length now runs past the end of the file.
        bytes[p1.offset() as usize + 3] ^= 0x40;
        fs::write(&path, &bytes).unwrap();
        match Spool::open(dir.path(), u64::MAX) {
            Err(SpoolError::Corrupt { offset, .. }) => assert_eq!(offset, p1.offset()),
            Err(other) => panic!("expected Corrupt, got {other}"),
            Ok(_) => panic!("a damaged spool opened"),
        }
        assert_eq!(file_len(&path), before as u64, "nothing cut away");
    }

    #[test]
    fn a_bad_checksum_in_the_last_record_is_a_torn_tail() {
        let dir = TempDir::new().unwrap();
        let (mut spool, _) = open(dir.path());
        let p1 = spool.append(&events(0..2)).unwrap();
        let p2 = spool.append(&events(2..4)).unwrap();
        drop(spool);
        let path = segment_path(dir.path(), 1);
        let mut bytes = fs::read(&path).unwrap();
        bytes[(p2.offset() - 3) as usize] ^= 0x20;
        fs::write(&path, &bytes).unwrap();
        let (_, replay) = open(dir.path());
        assert_eq!(replay, events(0..2));
        assert_eq!(file_len(&path), p1.offset());
    }

    #[test]
    fn garbage_and_zeros_after_the_last_record_are_truncated() {
        let garbage: Vec<u8> = (0u32..3000)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 | 0x80)
            .collect();
        for tail in [garbage, vec![0; 5000], vec![0xAB; 3]] {
            let dir = TempDir::new().unwrap();
            let (mut spool, _) = open(dir.path());
            spool.append(&events(0..2)).unwrap();
            let p = spool.append(&events(2..3)).unwrap();
            drop(spool);
            let path = segment_path(dir.path(), 1);
            let mut file = OpenOptions::new().append(true).open(&path).unwrap();
            file.write_all(&tail).unwrap();
            drop(file);

            let (mut spool, replay) = open(dir.path());
            assert_eq!(replay, events(0..3));
            assert_eq!(file_len(&path), p.offset());
            spool.append(&events(3..5)).unwrap();
            drop(spool);
            assert_eq!(open(dir.path()).1, events(0..5));
        }
    }

    #[test]
    fn corruption_before_the_tail_is_a_corrupt_error_naming_file_and_offset() {
        let dir = TempDir::new().unwrap();
        let (mut spool, _) = open(dir.path());
        let p1 = spool.append(&events(0..2)).unwrap();
        spool.append(&events(2..4)).unwrap();
        spool.append(&events(4..6)).unwrap();
        // Damage the middle record while the spool is open: reading it fails.
        let path = segment_path(dir.path(), 1);
        let mut bytes = fs::read(&path).unwrap();
        bytes[p1.offset() as usize + 40] ^= 0x01;
        fs::write(&path, &bytes).unwrap();
        match spool.read_pending(None, 100) {
            Err(SpoolError::Corrupt {
                path: p, offset, ..
            }) => {
                assert_eq!((p, offset), (path.clone(), p1.offset()));
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
        drop(spool);

        let error = Spool::open(dir.path(), u64::MAX).unwrap_err();
        let message = error.to_string();
        match error {
            SpoolError::Corrupt {
                path: p,
                offset,
                reason,
            } => {
                assert_eq!((p, offset), (path.clone(), p1.offset()));
                assert!(reason.contains("checksum"), "{reason}");
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
        assert!(
            message.contains("seg-00000000000000000001.log"),
            "{message}"
        );
        assert!(
            message.contains(&format!("byte {}", p1.offset())),
            "{message}"
        );
        // Nothing was truncated.
        assert_eq!(fs::read(&path).unwrap(), bytes);
    }

    #[test]
    fn a_torn_record_in_a_segment_that_is_not_the_last_is_corrupt() {
        let dir = TempDir::new().unwrap();
        let (mut spool, _) = open_small(dir.path(), 1);
        let p1 = spool.append(&events(0..2)).unwrap();
        let p2 = spool.append(&events(2..4)).unwrap();
        assert_eq!((p1.segment(), p2.segment()), (1, 2));
        drop(spool);
        let path = segment_path(dir.path(), 1);
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(p1.offset() - 10).unwrap();
        drop(file);
        match Spool::open(dir.path(), u64::MAX) {
            Err(SpoolError::Corrupt {
                path: p, offset, ..
            }) => assert_eq!((p, offset), (path, 0)),
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    /// Appends `payload` to segment 1 of `dir` as one framed record, as a
    /// version writing that payload would; returns the record's length.
    fn append_raw_record(dir: &Path, payload: &[u8]) -> u64 {
        let length = (payload.len() as u32).to_le_bytes();
        let mut record = length.to_vec();
        record.extend_from_slice(&record_crc(length, payload).to_le_bytes());
        record.extend_from_slice(payload);
        let path = segment_path(dir, 1);
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        file.write_all(&record).unwrap();
        record.len() as u64
    }

    #[test]
    fn a_record_that_does_not_decode_is_corrupt_not_torn() {
        // Valid checksums, so not a crash: a newer format, or an event this
        // version cannot read. Reported, never truncated.
        let two_events = {
            let mut buf = Vec::new();
            encode_record(&mut buf, &events(0..2)).unwrap();
            buf.split_off(HEADER_BYTES as usize)
        };
        let mut trailing = two_events.clone();
        trailing.push(0);
        let mut cut = two_events.clone();
        cut.pop();
        let mut overcounted = two_events.clone();
        overcounted[1] = 3;
        for (payload, reason) in [
            (&b"\x03\x01\x00\x00\x00{}\n"[..], "unknown record format 3"),
            (
                &b"\x01\x01\x00\x00\x00{}\n"[..],
                "event 1 of 1 in the record does not decode",
            ),
            (
                &b"\x01\x02\x00\x00\x00"[..],
                "record says 2 events but holds 0",
            ),
            (
                &b"\x02\x01\x00\x00\x00\xff"[..],
                "event 1 of 1 in the record does not decode",
            ),
            (
                &trailing[..],
                "event 3 of 2 in the record does not decode: 1 bytes after",
            ),
            (&cut[..], "event 2 of 2 in the record does not decode"),
            (&overcounted[..], "record says 3 events but holds 2"),
        ] {
            let dir = TempDir::new().unwrap();
            let (mut spool, _) = open(dir.path());
            let p1 = spool.append(&events(0..1)).unwrap();
            drop(spool);
            let length = append_raw_record(dir.path(), payload);
            let error = Spool::open(dir.path(), u64::MAX).unwrap_err();
            assert!(
                matches!(&error, SpoolError::Corrupt { offset, reason: r, .. }
                    if *offset == p1.offset() && r.contains(reason)),
                "{reason}: {error:?}"
            );
            assert_eq!(file_len(&segment_path(dir.path(), 1)), p1.offset() + length);
        }
    }

    #[test]
    fn records_of_format_1_written_by_earlier_versions_are_still_read() {
        // Format 1 as earlier versions wrote it: each event as JSON and '\n'.
        let dir = TempDir::new().unwrap();
        let old = events(0..4);
        let mut payload = vec![FORMAT_JSON_LINES];
        payload.extend_from_slice(&(old.len() as u32).to_le_bytes());
        for event in &old {
            serde_json::to_writer(&mut payload, event).unwrap();
            payload.push(b'\n');
        }
        append_raw_record(dir.path(), &payload);
        // The next append, in format 2, goes after it in the same segment.
        let (mut spool, replayed) = open(dir.path());
        assert_eq!(replayed, old);
        spool.append(&events(4..6)).unwrap();
        drop(spool);
        assert_eq!(open(dir.path()).1, events(0..6));
    }

    #[test]
    fn format_2_stores_every_outcome_and_cost_source_by_a_fixed_code() {
        // Variants are stored by position: a variant inserted or moved
        // would silently turn old spooled rows into other outcomes. New
        // variants go last, with a new line here.
        use CostSource::*;
        use Outcome::*;
        let outcomes = [
            (Ok, 0u8),
            (UpstreamError, 1),
            (UpstreamTimeout, 2),
            (ClientClosed, 3),
            (RateLimited, 4),
            (QuotaExceeded, 5),
            (BudgetExceeded, 6),
            (RouteForbidden, 7),
            (PayloadTooLarge, 8),
            (ClientTimeout, 9),
        ];
        assert_eq!(outcomes.len(), Outcome::ALL.len());
        for (outcome, code) in outcomes {
            assert_eq!(postcard::to_allocvec(&outcome).unwrap(), [code]);
            assert_eq!(postcard::from_bytes::<Outcome>(&[code]).unwrap(), outcome);
        }
        for (source, code) in [(Header, 0u8), (Pricing, 1), (None, 2)] {
            assert_eq!(postcard::to_allocvec(&source).unwrap(), [code]);
            assert_eq!(postcard::from_bytes::<CostSource>(&[code]).unwrap(), source);
        }
        assert!(postcard::from_bytes::<Outcome>(&[10]).is_err());
    }

    #[test]
    fn format_2_bytes_still_decode() {
        // The payload this version writes for event 6 (a client request id
        // with quotes, a newline and a non-ASCII character; a model;
        // outcome budget_exceeded, cost source header). Spools written with it
        // must stay readable: if this test fails, the encoding changed, and
        // the change needs a new format number, not a new expected value.
        let bytes = concat!(
            "0201000000",                         // format 2, 1 event
            "1001900000000070008000000000000006", // id
            "010e636c69656e74202236220ae29c93",   // client_request_id
            "a087abfbcab2f8f832",                 // ts
            "10000000000000000000000000000003e9", // customer_id
            "10000000000000000000000000000007d6", // key_id
            "0767772d74657374",
            "07726f7574652d32",                               // instance, route
            "04504f5354",                                     // method
            "162f76312f636861742f636f6d706c6574696f6e732f36", // path
            "f603",
            "06",                         // status, outcome
            "4e42d804f02e",               // latencies, bytes
            "010b6770742d346f2d6d696e69", // model
            "060c0600",
            "ce73",
            "00", // tokens, cost, source
        );
        let payload: Vec<u8> = (0..bytes.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&bytes[i..i + 2], 16).unwrap())
            .collect();
        let mut decoded = Vec::new();
        decode_payload(&payload, &mut decoded).unwrap();
        assert_eq!(decoded, vec![event(6)]);
        let mut written = Vec::new();
        encode_record(&mut written, &[event(6)]).unwrap();
        assert_eq!(&written[HEADER_BYTES as usize..], &payload[..]);
    }

    #[test]
    fn a_failed_append_is_cut_off_before_the_next_one() {
        // The next append goes to the same segment, or to a new one.
        for roll in [false, true] {
            let dir = TempDir::new().unwrap();
            let (mut spool, _) = open(dir.path());
            let p1 = spool.append(&events(0..2)).unwrap();
            let path = segment_path(dir.path(), 1);
            // A handle that cannot write makes the append fail, as a full
            // disk would.
            let writable = std::mem::replace(
                &mut spool.active.as_mut().unwrap().file,
                File::open(&path).unwrap(),
            );
            let error = spool.append(&events(2..4)).unwrap_err();
            assert!(
                matches!(&error, SpoolError::Io { path: p, .. } if *p == path),
                "{error:?}"
            );
            assert!(
                error.to_string().contains("seg-00000000000000000001.log"),
                "{error}"
            );
            assert_eq!(
                (spool.end_position(), spool.pending_bytes()),
                (p1.clone(), p1.offset())
            );
            // Suppose it got some of its bytes out before failing (the
            // cursor of the handle that wrote them would be past them).
            let mut partial = OpenOptions::new().append(true).open(&path).unwrap();
            partial.write_all(&[0x5A; 300]).unwrap();
            drop(partial);
            let mut writable = writable;
            writable.seek(SeekFrom::End(0)).unwrap();
            spool.active.as_mut().unwrap().file = writable;
            if roll {
                spool.segment_bytes = 1;
            }

            let p2 = spool.append(&events(4..6)).unwrap();
            assert_eq!(p2.segment(), if roll { 2 } else { 1 });
            assert_eq!(
                file_len(&path),
                if roll { p1.offset() } else { p2.offset() }
            );
            drop(spool);
            let replay = open(dir.path()).1;
            assert_eq!(replay, [events(0..2), events(4..6)].concat(), "roll {roll}");
        }
    }

    #[test]
    fn after_a_failed_append_a_checkpointed_active_segment_is_given_back() {
        let dir = TempDir::new().unwrap();
        let (mut spool, _) = open(dir.path());
        let p1 = spool.append(&events(0..2)).unwrap();
        let path = segment_path(dir.path(), 1);
        // A handle that cannot write makes the append fail, as a full disk
        // would.
        spool.active.as_mut().unwrap().file = File::open(&path).unwrap();
        spool.append(&events(2..4)).unwrap_err();
        // Not yet in the database: the segment is kept, and the append
        // still goes to it (and fails).
        spool.append(&events(2..4)).unwrap_err();
        assert!(path.exists());

        // Once its rows are in the database, the next append deletes it and
        // starts a new segment after it.
        spool.checkpoint(p1.clone()).unwrap();
        assert!(path.exists(), "a checkpoint keeps the active segment");
        let p2 = spool.append(&events(4..6)).unwrap();
        assert_eq!(p2.segment(), 2);
        assert!(!path.exists(), "the checkpointed segment is given back");
        assert_eq!(spool.pending_bytes(), p2.offset());
        let p3 = spool.append(&events(6..8)).unwrap();
        assert_eq!(p3.segment(), 2, "appends go on in the new segment");
        drop(spool);
        let (spool, replay) = open(dir.path());
        assert_eq!(replay, events(4..8));
        assert_eq!(list_segments(dir.path()).unwrap(), [2]);
        assert_eq!(spool.end_position(), p3);
    }

    #[test]
    fn pending_reads_what_was_there_while_appends_go_on() {
        // Small segments, so the appends after the snapshot roll over to
        // new ones and the last one read grows meanwhile.
        let dir = TempDir::new().unwrap();
        let (mut spool, _) = open_small(dir.path(), 1024);
        let first = spool.append(&events(0..2)).unwrap();
        for i in 1..6 {
            spool.append(&events(2 * i..2 * i + 2)).unwrap();
        }
        let end = spool.end_position();
        let pending = spool.pending(Some(&first));
        for i in 6..20 {
            spool.append(&events(2 * i..2 * i + 2)).unwrap();
        }
        assert!(spool.end_position().segment() > end.segment());
        let (read, position) = pending.read(usize::MAX).unwrap();
        assert_eq!(read, events(2..12));
        assert_eq!(position, end);
        // Paged: whole records only, resumable from the position.
        let (page, after) = pending.read(3).unwrap();
        assert_eq!(page, events(2..4));
        let (rest, _) = spool.pending(Some(&after)).read(usize::MAX).unwrap();
        assert_eq!(rest, events(4..40));
    }

    /// Everything `tail` hands out from `after` on, `max_events` at a
    /// time, and how many of those reads came from memory.
    fn tail_all(
        spool: &mut Spool,
        mut after: SpoolPosition,
        max: usize,
    ) -> (Vec<UsageEvent>, usize) {
        let (mut all, mut recent) = (Vec::new(), 0);
        loop {
            let (page, end) = match spool.tail(&after, max) {
                Tail::Recent(page, end) => {
                    recent += 1;
                    (page, end)
                }
                Tail::OnDisk(records) => records.read(max).unwrap(),
                Tail::End => return (all, recent),
            };
            assert!(!page.is_empty() && page.len() <= max.max(3));
            assert!(end > after);
            all.extend(page);
            after = end;
        }
    }

    #[test]
    fn tail_hands_out_kept_batches_and_reads_back_the_older_ones() {
        let dir = TempDir::new().unwrap();
        let (mut spool, _) = open_small(dir.path(), 1024);
        let batches = RECENT_BATCHES as u64 + 4;
        for i in 0..batches {
            let mut batch = events(3 * i..3 * i + 3);
            spool.append_and_keep(&mut batch).unwrap();
            assert!(batch.is_empty(), "kept, not copied");
        }
        assert!(spool.end_position().segment() > 2, "batches span segments");
        // The first four are on disk only; the rest come from memory, two
        // batches (six events) at a time.
        let (all, recent) = tail_all(&mut spool, SpoolPosition::default(), 7);
        assert_eq!(all, events(0..3 * batches));
        assert_eq!(recent, RECENT_BATCHES / 2);
        // Handed out once: a second reader from the start reads it all
        // back from disk.
        let (again, recent) = tail_all(&mut spool, SpoolPosition::default(), 1000);
        assert_eq!((again, recent), (events(0..3 * batches), 0));

        // A reader that got ahead of what is kept skips it; one behind the
        // checkpoint starts there.
        let end = spool.end_position();
        let mut batch = events(100..103);
        spool.append_and_keep(&mut batch).unwrap();
        spool.checkpoint(end.clone()).unwrap();
        let (tail, recent) = tail_all(&mut spool, end, 1000);
        assert_eq!((tail, recent), (events(100..103), 1));
        let (tail, _) = tail_all(&mut spool, SpoolPosition::default(), 1000);
        assert_eq!(tail, events(100..103));
        assert!(matches!(spool.tail(&spool.end_position(), 10), Tail::End));
    }

    #[test]
    fn a_checkpoint_made_in_steps_keeps_what_was_appended_meanwhile() {
        let dir = TempDir::new().unwrap();
        let (mut spool, _) = open_small(dir.path(), 1024);
        for i in 0..8 {
            spool.append(&events(2 * i..2 * i + 2)).unwrap();
        }
        let upto = spool.end_position();
        let checkpoint = spool.prepare_checkpoint(upto.clone()).unwrap();
        assert!(spool.prepare_checkpoint(SpoolPosition::default()).is_none());
        // Appends go on while the checkpoint is persisted.
        spool.append(&events(16..18)).unwrap();
        checkpoint.persist().unwrap();
        spool.append(&events(18..20)).unwrap();
        spool.checkpointed(checkpoint);
        assert_eq!(spool.checkpoint_position(), upto);
        assert_eq!(list_segments(dir.path()).unwrap()[0], upto.segment());
        assert_eq!(read_all(&spool, usize::MAX), events(16..20));
        drop(spool);
        assert_eq!(open(dir.path()).1, events(16..20));
    }

    #[test]
    fn segments_roll_and_checkpointed_ones_are_deleted() {
        let dir = TempDir::new().unwrap();
        let (mut spool, _) = open_small(dir.path(), 1024);
        let ends: Vec<SpoolPosition> = (0..12)
            .map(|i| spool.append(&events(2 * i..2 * i + 2)).unwrap())
            .collect();
        let ids = list_segments(dir.path()).unwrap();
        assert!(ids.len() >= 4, "{ids:?}");
        assert_eq!(ids, (1..=ids.len() as u64).collect::<Vec<_>>());
        for (i, end) in ends.iter().enumerate() {
            // No segment grows past the limit with a second record, and a
            // record never straddles two segments.
            assert!(end.offset() <= 1024 || i == 0 || ends[i - 1].segment() != end.segment());
            if i > 0 && ends[i - 1].segment() != end.segment() {
                assert_eq!(
                    file_len(&segment_path(dir.path(), ends[i - 1].segment())),
                    ends[i - 1].offset()
                );
            }
        }

        // Checkpoint into the middle of segment 3: 1 and 2 go, 3 stays.
        let inside_3 = ends.iter().find(|end| end.segment() == 3).unwrap().clone();
        assert!(ends.iter().filter(|end| end.segment() == 3).count() >= 2);
        spool.checkpoint(inside_3).unwrap();
        assert_eq!(list_segments(dir.path()).unwrap()[0], 3);
        assert!(!segment_path(dir.path(), 1).exists());
        assert!(!segment_path(dir.path(), 2).exists());

        // Checkpoint at the very end of segment 3: it goes too.
        let end_of_3 = ends.iter().rfind(|end| end.segment() == 3).unwrap().clone();
        spool.checkpoint(end_of_3).unwrap();
        assert_eq!(list_segments(dir.path()).unwrap()[0], 4);

        // Everything: only the segment appends go to is left.
        let last = spool.end_position();
        spool.checkpoint(last.clone()).unwrap();
        assert_eq!(list_segments(dir.path()).unwrap(), vec![last.segment()]);
        assert_eq!(spool.pending_bytes(), 0);
        drop(spool);
        let (mut spool, replay) = open_small(dir.path(), 4096);
        assert!(replay.is_empty());
        let next = spool.append(&events(100..101)).unwrap();
        assert!(next > last);
        drop(spool);
        assert_eq!(open(dir.path()).1, events(100..101));
    }

    #[test]
    fn pending_bytes_and_is_full_follow_appends_and_checkpoints() {
        let dir = TempDir::new().unwrap();
        let (mut spool, _) = open_small(dir.path(), 512);
        assert_eq!(spool.pending_bytes(), 0);
        let p1 = spool.append(&events(0..3)).unwrap();
        let record = p1.offset();
        assert_eq!(spool.pending_bytes(), record);
        drop(spool);

        // Full at exactly max_bytes, and appends still succeed past it.
        let (mut spool, _) = Spool::open_with_segment_bytes(dir.path(), 2 * record, 512).unwrap();
        assert_eq!(spool.pending_bytes(), record);
        assert!(!spool.is_full());
        let p2 = spool.append(&events(0..3)).unwrap();
        assert_eq!(p2.segment(), 2);
        assert_eq!(spool.pending_bytes(), 2 * record);
        assert!(spool.is_full());
        let p3 = spool.append(&events(0..3)).unwrap();
        assert_eq!(spool.pending_bytes(), 3 * record);
        assert!(spool.is_full());

        spool.checkpoint(p2).unwrap();
        assert_eq!(spool.pending_bytes(), record);
        assert!(!spool.is_full());
        drop(spool);
        let (mut spool, _) = Spool::open_with_segment_bytes(dir.path(), 2 * record, 512).unwrap();
        assert_eq!(spool.pending_bytes(), record);
        spool.checkpoint(p3).unwrap();
        assert_eq!(spool.pending_bytes(), 0);
        drop(spool);

        let (spool, _) = Spool::open(dir.path(), 0).unwrap();
        assert!(spool.is_full(), "max_bytes 0 is always full");
    }

    #[test]
    fn a_second_open_of_the_same_directory_is_locked() {
        let dir = TempDir::new().unwrap();
        let (spool, _) = open(dir.path());
        let error = Spool::open(dir.path(), u64::MAX).unwrap_err();
        assert!(
            matches!(&error, SpoolError::Locked { dir: d } if d == dir.path()),
            "{error:?}"
        );
        let message = error.to_string();
        assert!(
            message.contains(&dir.path().display().to_string()),
            "{message}"
        );
        assert!(message.contains("another process"), "{message}");
        drop(spool);
        open(dir.path());
    }

    #[test]
    fn a_checkpoint_into_a_deleted_segment_or_past_the_data_is_handled() {
        // Into a deleted segment: the natural case after a checkpoint at
        // the end of a segment that was not the last.
        let dir = TempDir::new().unwrap();
        let (mut spool, _) = open_small(dir.path(), 1);
        let p1 = spool.append(&events(0..1)).unwrap();
        spool.append(&events(1..2)).unwrap();
        spool.append(&events(2..3)).unwrap();
        spool.checkpoint(p1.clone()).unwrap();
        assert!(!segment_path(dir.path(), 1).exists());
        drop(spool);
        let (spool, replay) = open_small(dir.path(), 1);
        assert_eq!(replay, events(1..3));
        assert_eq!(spool.checkpoint_position(), p1);
        drop(spool);

        // A checkpoint with no segment left at all (written by hand).
        let dir = TempDir::new().unwrap();
        write_checkpoint(dir.path(), &pos(5, 100)).unwrap();
        let (mut spool, replay) = open(dir.path());
        assert!(replay.is_empty());
        assert_eq!(spool.end_position(), pos(5, 100));
        let p = spool.append(&events(0..2)).unwrap();
        assert_eq!(p.segment(), 6);
        drop(spool);
        assert_eq!(open(dir.path()).1, events(0..2));

        // A checkpoint past the data of the last segment (bytes lost after
        // they were checkpointed): new records must still sort after it.
        let dir = TempDir::new().unwrap();
        let (mut spool, _) = open(dir.path());
        let p1 = spool.append(&events(0..1)).unwrap();
        let p2 = spool.append(&events(1..2)).unwrap();
        spool.checkpoint(p2.clone()).unwrap();
        drop(spool);
        let file = OpenOptions::new()
            .write(true)
            .open(segment_path(dir.path(), 1))
            .unwrap();
        file.set_len(p1.offset()).unwrap();
        drop(file);
        let (mut spool, replay) = open(dir.path());
        assert!(replay.is_empty());
        assert_eq!(spool.pending_bytes(), 0);
        let p3 = spool.append(&events(2..3)).unwrap();
        assert!(p3 > p2);
        drop(spool);
        assert_eq!(open(dir.path()).1, events(2..3));
    }

    #[test]
    fn zero_length_segments_are_harmless() {
        let dir = TempDir::new().unwrap();
        fs::write(segment_path(dir.path(), 1), b"").unwrap();
        let (mut spool, replay) = open(dir.path());
        assert!(replay.is_empty());
        assert_eq!(spool.append(&events(0..1)).unwrap().segment(), 1);
        drop(spool);
        // An empty segment in the middle and one at the end.
        fs::write(segment_path(dir.path(), 2), b"").unwrap();
        let (mut spool, _) = open_small(dir.path(), 1);
        assert_eq!(spool.append(&events(1..2)).unwrap().segment(), 2);
        drop(spool);
        fs::write(segment_path(dir.path(), 3), b"").unwrap();
        fs::write(segment_path(dir.path(), 4), b"").unwrap();
        let (mut spool, replay) = open(dir.path());
        assert_eq!(replay, events(0..2));
        assert_eq!(spool.append(&events(2..3)).unwrap().segment(), 4);
        drop(spool);
        assert_eq!(open(dir.path()).1, events(0..3));
    }

    #[test]
    fn an_unreadable_checkpoint_replays_everything() {
        let dir = TempDir::new().unwrap();
        let (mut spool, _) = open(dir.path());
        let p1 = spool.append(&events(0..2)).unwrap();
        spool.append(&events(2..4)).unwrap();
        spool.checkpoint(p1).unwrap();
        drop(spool);
        let path = dir.path().join(CHECKPOINT_FILE);
        let mut bytes = fs::read(&path).unwrap();
        bytes[14] ^= 0xFF;
        fs::write(&path, &bytes).unwrap();
        let (spool, replay) = open(dir.path());
        assert_eq!(replay, events(0..4));
        assert_eq!(spool.checkpoint_position(), SpoolPosition::default());
    }

    #[test]
    fn checkpoint_file_round_trips_and_rejects_damage() {
        let p = pos(0x0102_0304_0506_0708, 42);
        let bytes = encode_checkpoint(&p);
        assert_eq!(decode_checkpoint(&bytes), Some(p));
        for i in 0..CHECKPOINT_BYTES {
            let mut damaged = bytes;
            damaged[i] ^= 0x10;
            assert_eq!(decode_checkpoint(&damaged), None, "byte {i}");
        }
        assert_eq!(decode_checkpoint(&bytes[..20]), None);
    }

    #[derive(Clone, Debug)]
    enum Op {
        Append(u64),
        Checkpoint(usize),
        Reopen,
        Read(usize),
        /// Cut the last record short (spool closed), then reopen.
        Tear(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            5 => (0u64..5).prop_map(Op::Append),
            2 => any::<usize>().prop_map(Op::Checkpoint),
            1 => Just(Op::Reopen),
            1 => (0usize..6).prop_map(Op::Read),
            1 => any::<u64>().prop_map(Op::Tear),
        ]
    }

    struct Batch {
        start: SpoolPosition,
        end: SpoolPosition,
        events: Vec<UsageEvent>,
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 48,
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        #[test]
        fn random_appends_checkpoints_and_reopens_match_a_model(ops in proptest::collection::vec(op(), 1..30)) {
            const SEGMENT: u64 = 3000;
            let dir = TempDir::new().unwrap();
            let (mut spool, _) = open_small(dir.path(), SEGMENT);
            let mut batches: Vec<Batch> = Vec::new();
            let mut checkpoint = SpoolPosition::default();
            let mut known: Vec<SpoolPosition> = Vec::new();
            let mut next = 0;
            let pending = |batches: &[Batch], checkpoint: &SpoolPosition| -> Vec<UsageEvent> {
                batches
                    .iter()
                    .filter(|batch| batch.end > *checkpoint)
                    .flat_map(|batch| batch.events.clone())
                    .collect()
            };
            for op in ops {
                match op {
                    Op::Append(n) => {
                        let batch = events(next..next + n);
                        next += n;
                        let before = spool.end_position();
                        let end = spool.append(&batch).unwrap();
                        if n == 0 {
                            prop_assert_eq!(end, before);
                            continue;
                        }
                        prop_assert!(end > before);
                        let start = if end.segment == before.segment { before } else { pos(end.segment, 0) };
                        known.push(end.clone());
                        batches.push(Batch { start, end, events: batch });
                    }
                    Op::Checkpoint(i) => {
                        if known.is_empty() {
                            continue;
                        }
                        let upto = known[i % known.len()].clone();
                        spool.checkpoint(upto.clone()).unwrap();
                        checkpoint = checkpoint.max(upto);
                        prop_assert_eq!(spool.checkpoint_position(), checkpoint.clone());
                    }
                    Op::Reopen => {
                        drop(spool);
                        let replay;
                        (spool, replay) = open_small(dir.path(), SEGMENT);
                        prop_assert_eq!(replay, pending(&batches, &checkpoint));
                    }
                    Op::Read(max) => {
                        prop_assert_eq!(read_all(&spool, max), pending(&batches, &checkpoint));
                    }
                    Op::Tear(cut) => {
                        let Some(last) = batches.last() else { continue };
                        if last.end != spool.end_position() || last.end <= checkpoint {
                            continue;
                        }
                        drop(spool);
                        let cut = 1 + cut % (last.end.offset - last.start.offset);
                        let file = OpenOptions::new()
                            .write(true)
                            .open(segment_path(dir.path(), last.end.segment))
                            .unwrap();
                        file.set_len(last.end.offset - cut).unwrap();
                        drop(file);
                        let torn = last.end.clone();
                        batches.pop();
                        known.retain(|known| *known != torn);
                        let replay;
                        (spool, replay) = open_small(dir.path(), SEGMENT);
                        prop_assert_eq!(replay, pending(&batches, &checkpoint));
                    }
                }
                let pending_bytes: u64 = batches
                    .iter()
                    .filter(|batch| batch.end > checkpoint)
                    .map(|batch| batch.end.offset - batch.start.offset)
                    .sum();
                prop_assert_eq!(spool.pending_bytes(), pending_bytes);
                let on_disk = list_segments(dir.path()).unwrap();
                prop_assert!(on_disk.iter().all(|&id| id >= checkpoint.segment), "{:?} {}", on_disk, checkpoint);
            }
            drop(spool);
            let (_, replay) = open_small(dir.path(), SEGMENT);
            prop_assert_eq!(replay, pending(&batches, &checkpoint));
        }
    }
}
