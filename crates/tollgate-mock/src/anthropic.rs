//! Anthropic Messages API: `POST /v1/messages`.
//!
//! The stream has the event sequence and framing of the real API (compare
//! `fixtures/anthropic-sse/basic_response.txt`): `message_start` carries
//! `input_tokens` and `output_tokens: 1`, and the final `message_delta`
//! carries the cumulative `output_tokens`. Cached prompt tokens
//! (`x-mock-cache-read`) are reported in `cache_read_input_tokens` and are not
//! part of `input_tokens`, as Anthropic reports them.

use bytes::Bytes;
use serde_json::json;

use crate::body::{Chunk, Plan};
use crate::handler::{Ctx, Reply};
use crate::openai::named_event;
use crate::tokens::{chunk_text, completion_text};

const DEFAULT_MODEL: &str = "claude-3-5-haiku-latest";

/// `POST /v1/messages`.
pub(crate) fn messages(ctx: &Ctx<'_>) -> Reply {
    let id = format!("msg_mock{}", ctx.id);
    let model = ctx.model(DEFAULT_MODEL);
    let input = ctx.prompt();
    let cached = ctx.controls.cache_read;
    let completion = ctx.completion(&["max_tokens"]);
    let usage = |output: u64| {
        json!({
            "input_tokens": input,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": cached,
            "output_tokens": output,
        })
    };

    if !ctx.stream() {
        return Reply::json(&json!({
            "id": id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": completion_text(completion)}],
            "stop_reason": "end_turn",
            "stop_sequence": null,
            "usage": usage(completion),
        }))
        .with_output_tokens(completion);
    }

    let head = [
        named_event(
            "message_start",
            &json!({"type": "message_start", "message": {
                "id": id,
                "type": "message",
                "role": "assistant",
                "content": [],
                "model": model,
                "stop_reason": null,
                "stop_sequence": null,
                "usage": usage(1),
            }}),
        ),
        named_event(
            "content_block_start",
            &json!({"type": "content_block_start", "index": 0,
                    "content_block": {"type": "text", "text": ""}}),
        ),
        // Byte for byte what Anthropic sends, space included.
        Bytes::from_static(b"event: ping\ndata: {\"type\": \"ping\"}\n\n"),
    ];
    let content = (0..completion).map(|index| {
        let delta = json!({"type": "content_block_delta", "index": 0,
                           "delta": {"type": "text_delta", "text": chunk_text(index)}});
        Chunk::new(named_event("content_block_delta", &delta), index > 0)
    });
    let tail = [
        named_event(
            "content_block_stop",
            &json!({"type": "content_block_stop", "index": 0}),
        ),
        named_event(
            "message_delta",
            &json!({"type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": null},
                    "usage": {"output_tokens": completion}}),
        ),
        named_event("message_stop", &json!({"type": "message_stop"})),
    ];
    let chunks = head
        .into_iter()
        .map(|data| Chunk::new(data, false))
        .chain(content)
        .chain(tail.into_iter().map(|data| Chunk::new(data, false)));
    Reply::event_stream(Plan::Stream(Box::new(chunks))).with_output_tokens(completion)
}
