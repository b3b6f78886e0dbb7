//! Rows in Postgres's binary COPY format, handed to the connection in large
//! chunks.
//!
//! tokio-postgres's `BinaryCopyInWriter` encodes the same format, but hands
//! its buffer to the connection every 4 KiB (about 15 usage rows), through a
//! channel of capacity one: each hand-off waits for the connection task to
//! take the last one, which, on the recorder's thread with the connection
//! task on another, is a cross-thread wake-up every few rows. Here the
//! values are encoded by the same `ToSql` impls, and only the framing (a
//! field count per row, a length per value) is ours; chunks are
//! [`CHUNK`] bytes.

use std::future::poll_fn;
use std::pin::Pin;

use bytes::{BufMut, Bytes, BytesMut};
use futures_sink::Sink;
use tokio_postgres::types::{IsNull, ToSql, Type};
use tokio_postgres::CopyInSink;
use tollgate_metering::StoreError;

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

impl<'t> CopyWriter<'t> {
    pub(super) fn new(sink: CopyInSink<Bytes>, types: &'t [Type]) -> CopyWriter<'t> {
        let mut buf = BytesMut::with_capacity(CHUNK + (CHUNK >> 2));
        buf.put_slice(HEADER);
        CopyWriter {
            sink: Box::pin(sink),
            types,
            buf,
        }
    }

    /// Appends one row: `values` in the order of the writer's types.
    pub(super) async fn write(&mut self, values: &[&(dyn ToSql + Sync)]) -> Result<(), Failure> {
        self.encode(values)?;
        if self.buf.len() >= CHUNK {
            let chunk = self.buf.split().freeze();
            self.send(chunk).await?;
        }
        Ok(())
    }

    fn encode(&mut self, values: &[&(dyn ToSql + Sync)]) -> Result<(), Failure> {
        let fields = i16::try_from(values.len())
            .ok()
            .filter(|_| values.len() == self.types.len())
            .ok_or_else(|| {
                encoding(format!(
                    "{} values for {} columns",
                    values.len(),
                    self.types.len()
                ))
            })?;
        self.buf.put_i16(fields);
        for (index, (value, ty)) in values.iter().zip(self.types).enumerate() {
            let at = self.buf.len();
            self.buf.put_i32(0);
            let len = match value.to_sql_checked(ty, &mut self.buf) {
                Ok(IsNull::Yes) => -1,
                Ok(IsNull::No) => i32::try_from(self.buf.len() - at - 4)
                    .map_err(|_| encoding(format!("column {index} is over 2 GiB")))?,
                Err(error) => return Err(encoding(format!("column {index}: {error}"))),
            };
            self.buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
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

/// A value that cannot be encoded as its column's type. Retrying cannot
/// help, so the batch is reported as corrupt rather than the database as
/// down.
fn encoding(message: String) -> Failure {
    Failure::Store(StoreError::Corrupt(format!(
        "encoding a usage row for COPY: {message}"
    )))
}
