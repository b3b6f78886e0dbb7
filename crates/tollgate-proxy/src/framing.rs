//! Detection of requests that carry both `Content-Length` and
//! `Transfer-Encoding`.
//!
//! hyper resolves such a request itself (Transfer-Encoding wins, the
//! Content-Length header is dropped before the request reaches us, and the
//! connection is closed afterwards), so the handler cannot see the conflict.
//! The gateway refuses it with 400, the stricter answer that also tells a
//! misbehaving client what is wrong, so the HTTP/1 byte stream is watched on
//! its way into hyper: [`FramingWatch`] wraps a connection's I/O and marks the
//! connection when a header block holds both fields. Only a request that
//! still shows `Transfer-Encoding`, the necessary symptom, takes the mark:
//! several pipelined requests may arrive in one read, and the mark set by
//! the last of them must not be spent by an earlier, innocent one. hyper
//! closes the connection after a request with both fields, so the
//! conflicting request is always the last one a connection serves.
//!
//! # Failure behaviour
//! The scanner does not know where bodies end, so a request *body* containing
//! an HTTP-looking block with both fields marks the connection too; a later
//! request on that connection is then refused only if it also uses
//! Transfer-Encoding. So is a chunked request pipelined just before a
//! conflicting one (the connection closes, and the conflicting one is never
//! served either). The opposite error cannot happen: every head passes
//! through the scanner before hyper parses it. HTTP/2 connections are
//! recognised by their preface and not scanned (h2 has no such framing).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The per-connection mark shared between the I/O wrapper, the handler
/// and the connection's timer.
#[derive(Clone, Debug, Default)]
pub(crate) struct FramingMark(Arc<Marks>);

#[derive(Debug, Default)]
struct Marks {
    conflict: AtomicBool,
    /// HTTP/1 bytes received so far: the connection's timer tells a head
    /// that is arriving (slowly) from a connection that is merely idle.
    received: AtomicU64,
}

impl FramingMark {
    /// Takes the mark: whether a CL+TE header block has been read since the
    /// last call.
    pub(crate) fn take(&self) -> bool {
        self.0.conflict.swap(false, Ordering::Relaxed)
    }

    /// HTTP/1 bytes received on the connection so far (0 on HTTP/2).
    pub(crate) fn received(&self) -> u64 {
        self.0.received.load(Ordering::Relaxed)
    }

    fn set(&self) {
        self.0.conflict.store(true, Ordering::Relaxed);
    }
}

const CONTENT_LENGTH: &[u8] = b"content-length:";
const TRANSFER_ENCODING: &[u8] = b"transfer-encoding:";
const H2_PREFACE: &[u8] = b"pri * http/2.0";
/// Enough of a line to recognise either header name.
const LINE_PREFIX: usize = 18;

/// A line scanner that survives reads split anywhere.
#[derive(Debug)]
struct Scanner {
    line: [u8; LINE_PREFIX],
    line_len: usize,
    first_line: bool,
    saw_cl: bool,
    saw_te: bool,
    /// The current line cannot be either field nor the blank line that
    /// ends a head: its bytes are skipped, not copied.
    skip: bool,
    disabled: bool,
}

impl Scanner {
    fn new() -> Self {
        Scanner {
            line: [0; LINE_PREFIX],
            line_len: 0,
            first_line: true,
            saw_cl: false,
            saw_te: false,
            skip: false,
            disabled: false,
        }
    }

    /// Feeds bytes; returns true when a block with both fields just ended.
    fn feed(&mut self, bytes: &[u8]) -> bool {
        let mut conflict = false;
        let mut rest = bytes;
        while !self.disabled && !rest.is_empty() {
            let newline = memchr::memchr(b'\n', rest);
            let take = newline.unwrap_or(rest.len());
            // Most lines (and bodies, which hold few newlines) are known to
            // be irrelevant from their first byte.
            if self.line_len == 0 && !self.first_line && !self.skip {
                if let Some(&first) = rest[..take].first() {
                    self.skip = !matches!(first, b'c' | b'C' | b't' | b'T' | b'\r');
                }
            }
            if !self.skip {
                // Fill the line prefix until it is full or the line ends.
                let room = LINE_PREFIX - self.line_len;
                for &b in &rest[..take.min(room)] {
                    self.line[self.line_len] = b.to_ascii_lowercase();
                    self.line_len += 1;
                }
            }
            match newline {
                None => break,
                Some(at) => {
                    conflict |= self.end_line();
                    rest = &rest[at + 1..];
                }
            }
        }
        conflict
    }

    fn end_line(&mut self) -> bool {
        if self.skip {
            self.skip = false;
            self.first_line = false;
            return false;
        }
        let mut line = &self.line[..self.line_len];
        if line.last() == Some(&b'\r') {
            line = &line[..line.len() - 1];
        }
        let mut conflict = false;
        if self.first_line && line.starts_with(H2_PREFACE) {
            self.disabled = true;
        } else if line.is_empty() {
            conflict = self.saw_cl && self.saw_te;
            self.saw_cl = false;
            self.saw_te = false;
        } else if line.starts_with(CONTENT_LENGTH) {
            self.saw_cl = true;
        } else if line.starts_with(TRANSFER_ENCODING) {
            self.saw_te = true;
        }
        self.first_line = false;
        self.line_len = 0;
        conflict
    }
}

/// Connection I/O that watches incoming bytes for conflicting framing.
#[derive(Debug)]
pub(crate) struct FramingWatch<IO> {
    inner: IO,
    scanner: Scanner,
    mark: FramingMark,
}

impl<IO> FramingWatch<IO> {
    pub(crate) fn new(inner: IO, mark: FramingMark) -> Self {
        FramingWatch {
            inner,
            scanner: Scanner::new(),
            mark,
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for FramingWatch<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = result {
            let read = &buf.filled()[before..];
            if this.scanner.feed(read) {
                this.mark.set();
            }
            if !this.scanner.disabled {
                this.mark
                    .0
                    .received
                    .fetch_add(read.len() as u64, Ordering::Relaxed);
            }
        }
        result
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for FramingWatch<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_in_pieces(input: &[u8], piece: usize) -> bool {
        let mut scanner = Scanner::new();
        let mut conflict = false;
        for chunk in input.chunks(piece) {
            conflict |= scanner.feed(chunk);
        }
        conflict
    }

    #[test]
    fn finds_the_conflict_however_the_bytes_are_split() {
        let bad = b"POST /v1/x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTRANSFER-ENCODING: chunked\r\n\r\n0\r\n\r\n";
        let good = b"POST /v1/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\nGET / HTTP/1.1\r\ncontent-length: 0\r\n\r\n";
        for piece in 1..=bad.len() {
            assert!(scan_in_pieces(bad, piece), "split every {piece} bytes");
        }
        for piece in 1..=good.len() {
            assert!(!scan_in_pieces(good, piece), "split every {piece} bytes");
        }
    }

    #[test]
    fn h2_connections_are_not_scanned() {
        let h2 =
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\ncontent-length: 1\r\ntransfer-encoding: x\r\n\r\n";
        assert!(!scan_in_pieces(h2, 7));
    }
}
