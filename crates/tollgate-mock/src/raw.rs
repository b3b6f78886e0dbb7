//! Endpoints that are about HTTP rather than an API: the echo, `/bytes/{n}`
//! and `/sink`.

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::request::Parts;
use serde_json::{json, Map, Value};

use crate::body::{Chunk, Plan};
use crate::handler::Reply;

/// Size of the chunks `/bytes/{n}` streams.
pub(crate) const BYTES_CHUNK: usize = 64 * 1024;

/// The `/bytes/{n}` pattern repeats every this many bytes: byte `i` of a
/// download is `(i % 251) as u8`. A prime, so that it never lines up with
/// chunk or buffer sizes and a misplaced chunk shows.
pub(crate) const PATTERN_PERIOD: usize = 251;

const PATTERN_LEN: usize = BYTES_CHUNK + PATTERN_PERIOD;

/// One chunk of the pattern at every phase: the chunk that starts at offset
/// `o` is `PATTERN[o % 251..][..len]`, a slice of this static buffer, so a
/// download of any size allocates nothing.
static PATTERN: [u8; PATTERN_LEN] = pattern();

const fn pattern() -> [u8; PATTERN_LEN] {
    let mut bytes = [0; PATTERN_LEN];
    let mut i = 0;
    while i < PATTERN_LEN {
        // i % 251 < 256: the cast is exact.
        bytes[i] = (i % PATTERN_PERIOD) as u8;
        i += 1;
    }
    bytes
}

/// Any request the mock has no endpoint for: what it received, as JSON.
pub(crate) fn echo(parts: &Parts, body_bytes: u64) -> Reply {
    let mut headers = Map::new();
    for name in parts.headers.keys() {
        let values = parts
            .headers
            .get_all(name)
            .iter()
            .map(|value| Value::from(String::from_utf8_lossy(value.as_bytes())))
            .collect();
        headers.insert(name.as_str().to_owned(), Value::Array(values));
    }
    Reply::json(&json!({
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "headers": headers,
        "body_bytes": body_bytes,
    }))
}

/// `POST /sink`: the body has been counted (not kept); say how long it was.
pub(crate) fn sink(body_bytes: u64) -> Reply {
    Reply::json(&json!({"bytes": body_bytes}))
}

/// `GET /bytes/{n}`: exactly `len` pattern bytes in 64 KiB chunks, with a
/// `content-length` only if asked for.
pub(crate) fn bytes(len: u64, content_length: bool) -> Reply {
    let reply = Reply::raw(
        "application/octet-stream",
        Plan::Stream(Box::new(PatternChunks {
            offset: 0,
            len,
            pattern: Bytes::from_static(&PATTERN),
        })),
    );
    if content_length {
        reply.with_header(header::CONTENT_LENGTH, HeaderValue::from(len))
    } else {
        reply
    }
}

/// The chunks of one `/bytes/{n}` download, made lazily.
struct PatternChunks {
    offset: u64,
    len: u64,
    pattern: Bytes,
}

impl Iterator for PatternChunks {
    type Item = Chunk;

    fn next(&mut self) -> Option<Chunk> {
        let remaining = self.len.checked_sub(self.offset).filter(|&left| left > 0)?;
        let size = usize::try_from(remaining).map_or(BYTES_CHUNK, |left| left.min(BYTES_CHUNK));
        // Both conversions are exact: the phase is below 251 and the size at
        // most 64 KiB, so the slice stays within PATTERN.
        let phase = usize::try_from(self.offset % PATTERN_PERIOD as u64).unwrap_or(0);
        let chunk = Chunk::new(self.pattern.slice(phase..phase + size), self.offset > 0);
        self.offset += u64::try_from(size).unwrap_or(0);
        Some(chunk)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_chunks_concatenate_to_the_pattern() {
        let len = 3 * BYTES_CHUNK as u64 + 1000;
        let chunks: Vec<Chunk> = PatternChunks {
            offset: 0,
            len,
            pattern: Bytes::from_static(&PATTERN),
        }
        .collect();
        assert_eq!(chunks.len(), 4);
        assert!(!chunks[0].delayed && chunks[1].delayed);
        let all: Vec<u8> = chunks
            .iter()
            .flat_map(|chunk| chunk.data.to_vec())
            .collect();
        assert_eq!(all.len() as u64, len);
        for (i, byte) in all.iter().enumerate() {
            assert_eq!(*byte, (i % 251) as u8, "byte {i}");
        }
    }

    #[test]
    fn zero_bytes_is_no_chunks() {
        let mut chunks = PatternChunks {
            offset: 0,
            len: 0,
            pattern: Bytes::from_static(&PATTERN),
        };
        assert!(chunks.next().is_none());
    }
}
