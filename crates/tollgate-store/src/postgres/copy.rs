//! Rows in Postgres's binary COPY format, handed to the connection in large
//! chunks.
//!
//! tokio-postgres's `BinaryCopyInWriter` encodes the same format, but hands
//! its buffer to the connection every 4 KiB (about 15 usage rows), through a
//! channel of capacity one: each hand-off waits for the connection task to
//! take the last one, which, on the recorder's thread with the connection
//! task on another, is a cross-thread wake-up every few rows. Here chunks
//! are [`CHUNK`] bytes. Rows are encoded either by the same `ToSql` impls,
//! with only the framing (a field count per row, a length per value) ours,
//! or, for the usage rows written by the thousand, field by field through
//! [`Fields`], which tests hold to the `ToSql` bytes.

use std::future::poll_fn;
use std::pin::Pin;

use bytes::{BufMut, Bytes, BytesMut};
use futures_sink::Sink;
use time::OffsetDateTime;
use tokio_postgres::types::{IsNull, ToSql, Type};
use tokio_postgres::CopyInSink;
use tollgate_metering::StoreError;
use uuid::Uuid;

use super::Failure;

/// The binary COPY header: signature, flags, header-extension length.
const HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";

/// Bytes encoded before a chunk goes to the connection: about 800 usage
/// rows, so a 5,000-row batch is a handful of hand-offs, not hundreds.
const CHUNK: usize = 256 << 10;

/// Writes rows of `types` into a `COPY … FROM STDIN (FORMAT binary)`. The
/// copy must be completed with [`CopyWriter::finish`]; dropped before, it
/// is aborted (the transaction then fails).
pub(super) struct CopyWriter<'t> {
    sink: Pin<Box<CopyInSink<Bytes>>>,
    types: &'t [Type],
    buf: BytesMut,
}

/// A usage row's bytes in the COPY, a little over: what the buffer of a
/// COPY of a few rows is sized by.
const ROW_BYTES: usize = 384;

impl<'t> CopyWriter<'t> {
    /// A writer for about `rows` rows: its buffer is sized for them, up
    /// to a chunk and a quarter (the last row of a chunk goes over).
    pub(super) fn new(sink: CopyInSink<Bytes>, types: &'t [Type], rows: usize) -> CopyWriter<'t> {
        let capacity = rows
            .saturating_mul(ROW_BYTES)
            .saturating_add(HEADER.len())
            .min(CHUNK + (CHUNK >> 2));
        let mut buf = BytesMut::with_capacity(capacity);
        buf.put_slice(HEADER);
        CopyWriter {
            sink: Box::pin(sink),
            types,
            buf,
        }
    }

    /// Appends one row: `values` in the order of the writer's types.
    pub(super) async fn write(&mut self, values: &[&(dyn ToSql + Sync)]) -> Result<(), Failure> {
        encode(&mut self.buf, self.types, values)?;
        self.sent_if_full().await
    }

    /// Appends one row that `row` encodes itself, field by field, through
    /// a [`Fields`]: the way for rows written by the thousand, without a
    /// dynamic call and a type check per value.
    pub(super) async fn write_fields(
        &mut self,
        row: impl FnOnce(Fields<'_>),
    ) -> Result<(), Failure> {
        encode_fields(&mut self.buf, self.types, row)?;
        self.sent_if_full().await
    }

    async fn sent_if_full(&mut self) -> Result<(), Failure> {
        if self.buf.len() >= CHUNK {
            let chunk = self.buf.split().freeze();
            self.send(chunk).await?;
        }
        Ok(())
    }

    /// Ends the copy; the number of rows the server took.
    pub(super) async fn finish(mut self) -> Result<u64, Failure> {
        self.buf.put_i16(-1);
        let rest = self.buf.split().freeze();
        self.send(rest).await?;
        Ok(self.sink.as_mut().finish().await?)
    }

    /// Hands `chunk` to the connection once it has room for it.
    async fn send(&mut self, chunk: Bytes) -> Result<(), Failure> {
        poll_fn(|cx| self.sink.as_mut().poll_ready(cx)).await?;
        self.sink.as_mut().start_send(chunk)?;
        Ok(())
    }
}

/// One row's values, in the binary COPY format, by `ToSql`: its field
/// count, then each value's length (-1 for NULL) and bytes.
fn encode(
    buf: &mut BytesMut,
    types: &[Type],
    values: &[&(dyn ToSql + Sync)],
) -> Result<(), Failure> {
    let fields = i16::try_from(values.len())
        .ok()
        .filter(|_| values.len() == types.len())
        .ok_or_else(|| {
            encoding(format!(
                "{} values for {} columns",
                values.len(),
                types.len()
            ))
        })?;
    buf.put_i16(fields);
    for (index, (value, ty)) in values.iter().zip(types).enumerate() {
        let at = buf.len();
        buf.put_i32(0);
        let len = match value.to_sql_checked(ty, buf) {
            Ok(IsNull::Yes) => -1,
            Ok(IsNull::No) => i32::try_from(buf.len() - at - 4)
                .map_err(|_| encoding(format!("column {index} is over 2 GiB")))?,
            Err(error) => return Err(encoding(format!("column {index}: {error}"))),
        };
        buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
    }
    Ok(())
}

/// One row's values, in the binary COPY format, written by `row` through
/// [`Fields`]: its field count, then the values.
fn encode_fields(
    buf: &mut BytesMut,
    types: &[Type],
    row: impl FnOnce(Fields<'_>),
) -> Result<(), Failure> {
    let fields =
        i16::try_from(types.len()).map_err(|_| encoding(format!("{} columns", types.len())))?;
    buf.put_i16(fields);
    row(Fields(buf));
    Ok(())
}

/// Microseconds from the Unix epoch to Postgres's, 2000-01-01 00:00 UTC.
const POSTGRES_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// Writes a row's values one after another, each as its column's type
/// takes it in binary: what `ToSql` writes for the same Rust value (the
/// tests compare the two byte for byte), without the dynamic call and the
/// type check. The caller writes exactly the columns of the writer's
/// types, in order.
pub(super) struct Fields<'b>(&'b mut BytesMut);

impl Fields<'_> {
    pub(super) fn uuid(&mut self, value: &Uuid) -> &mut Self {
        self.0.put_i32(16);
        self.0.put_slice(value.as_bytes());
        self
    }

    /// Texts longer than 2 GiB cannot be in a usage row: the request's
    /// own limits are far below it. Clamped, the server refuses the row.
    pub(super) fn text(&mut self, value: &str) -> &mut Self {
        self.0
            .put_i32(i32::try_from(value.len()).unwrap_or(i32::MAX));
        self.0.put_slice(value.as_bytes());
        self
    }

    pub(super) fn optional_text(&mut self, value: Option<&str>) -> &mut Self {
        match value {
            Some(value) => self.text(value),
            None => {
                self.0.put_i32(-1);
                self
            }
        }
    }

    pub(super) fn int4(&mut self, value: i32) -> &mut Self {
        self.0.put_i32(4);
        self.0.put_i32(value);
        self
    }

    pub(super) fn int8(&mut self, value: i64) -> &mut Self {
        self.0.put_i32(8);
        self.0.put_i64(value);
        self
    }

    /// A `timestamptz`: microseconds since 2000-01-01 UTC, sub-microsecond
    /// digits cut toward that instant, as `ToSql` cuts them. Every time
    /// the `time` crate holds (years ±9999) fits an `i64` of microseconds.
    pub(super) fn timestamptz(&mut self, value: OffsetDateTime) -> &mut Self {
        let since = value.unix_timestamp_nanos() - i128::from(POSTGRES_EPOCH_MICROS) * 1_000;
        self.int8(i64::try_from(since / 1_000).unwrap_or(i64::MAX))
    }
}

/// A value that cannot be encoded as its column's type. Retrying cannot
/// help, so the batch is reported as corrupt rather than the database as
/// down.
fn encoding(message: String) -> Failure {
    Failure::Store(StoreError::Corrupt(format!(
        "encoding a usage row for COPY: {message}"
    )))
}

/// One row as [`CopyWriter::write_fields`] appends it.
#[cfg(test)]
pub(super) fn fields_row(
    types: &[Type],
    row: impl FnOnce(Fields<'_>),
) -> Result<BytesMut, Failure> {
    let mut buf = BytesMut::new();
    encode_fields(&mut buf, types, row)?;
    Ok(buf)
}

/// One row as [`CopyWriter::write`] appends it.
#[cfg(test)]
pub(super) fn values_row(
    types: &[Type],
    values: &[&(dyn ToSql + Sync)],
) -> Result<BytesMut, Failure> {
    let mut buf = BytesMut::new();
    encode(&mut buf, types, values)?;
    Ok(buf)
}
