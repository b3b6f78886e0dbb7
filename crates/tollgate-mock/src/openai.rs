//! OpenAI-compatible endpoints: Chat Completions, Responses and Embeddings.
//!
//! Shapes follow what api.openai.com sends, trimmed to the fields a client or
//! a usage parser looks at. Token counts follow the crate's rule; cached
//! prompt tokens (`x-mock-cache-read`) are included in `prompt_tokens` /
//! `input_tokens`, as OpenAI reports them.

use bytes::Bytes;
use serde_json::{json, Map, Value};

use crate::body::{Chunk, Plan};
use crate::handler::{Ctx, Reply};
use crate::tokens::{chunk_text, completion_text};

const DEFAULT_CHAT_MODEL: &str = "gpt-4o-mini";
const DEFAULT_EMBEDDING_MODEL: &str = "text-embedding-3-small";

/// Floats in each mock embedding.
pub(crate) const EMBEDDING_DIMENSIONS: usize = 8;

/// `data: <json>\n\n`, one server-sent event without a name.
fn data_event(value: &Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

/// `event: <name>\ndata: <json>\n\n`.
pub(crate) fn named_event(name: &str, value: &Value) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {value}\n\n"))
}

/// `POST /v1/chat/completions`.
pub(crate) fn chat(ctx: &Ctx<'_>) -> Reply {
    let id = format!("chatcmpl-mock{}", ctx.id);
    let model = ctx.model(DEFAULT_CHAT_MODEL);
    let created = ctx.now;
    let completion = ctx.completion(&["max_completion_tokens", "max_tokens"]);
    let cached = ctx.controls.cache_read;
    let prompt = ctx.prompt().saturating_add(cached);
    let usage = json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt.saturating_add(completion),
        "prompt_tokens_details": {"cached_tokens": cached},
        "completion_tokens_details": {"reasoning_tokens": 0},
    });

    if !ctx.stream() {
        return Reply::json(&json!({
            "id": id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": completion_text(completion)},
                "logprobs": null,
                "finish_reason": "stop",
            }],
            "usage": usage,
        }))
        .with_output_tokens(completion);
    }

    // With include_usage, OpenAI adds `"usage": null` to every chunk and ends
    // with one chunk that has no choices and the usage.
    let include_usage = ctx
        .request
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        == Some(true);
    let chunk = move |choices: Value, usage: Value| {
        let mut chunk = Map::new();
        chunk.insert("id".into(), id.clone().into());
        chunk.insert("object".into(), "chat.completion.chunk".into());
        chunk.insert("created".into(), created.into());
        chunk.insert("model".into(), model.clone().into());
        chunk.insert("choices".into(), choices);
        if include_usage {
            chunk.insert("usage".into(), usage);
        }
        data_event(&Value::Object(chunk))
    };
    let choice = |delta: Value, finish_reason: Value| json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason}]);

    // The role rides on the first chunk; with no content at all, on the last.
    let last_delta = if completion == 0 {
        json!({"role": "assistant"})
    } else {
        json!({})
    };
    let mut tail = vec![chunk(choice(last_delta, "stop".into()), Value::Null)];
    if include_usage {
        tail.push(chunk(json!([]), usage));
    }
    tail.push(Bytes::from_static(b"data: [DONE]\n\n"));

    let content = (0..completion).map(move |index| {
        let delta = if index == 0 {
            json!({"role": "assistant", "content": chunk_text(index)})
        } else {
            json!({"content": chunk_text(index)})
        };
        Chunk::new(chunk(choice(delta, Value::Null), Value::Null), index > 0)
    });
    let tail = tail.into_iter().map(|data| Chunk::new(data, false));
    Reply::event_stream(Plan::Stream(Box::new(content.chain(tail)))).with_output_tokens(completion)
}

/// `POST /v1/responses`.
pub(crate) fn responses(ctx: &Ctx<'_>) -> Reply {
    let response = ResponseIds {
        id: format!("resp_mock{}", ctx.id),
        message_id: format!("msg_mock{}", ctx.id),
        created_at: ctx.now,
        model: ctx.model(DEFAULT_CHAT_MODEL),
    };
    let completion = ctx.completion(&["max_output_tokens"]);
    let cached = ctx.controls.cache_read;
    let input = ctx.prompt().saturating_add(cached);
    let usage = json!({
        "input_tokens": input,
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input.saturating_add(completion),
    });
    let text = completion_text(completion);

    if !ctx.stream() {
        return Reply::json(&response.object("completed", Some(&text), usage))
            .with_output_tokens(completion);
    }
    response_stream(&response, &text, usage, completion)
}

/// The event sequence of a one-message text response, each event with its
/// sequence number; the content deltas sit between `head` and `tail`.
fn response_stream(response: &ResponseIds, text: &str, usage: Value, completion: u64) -> Reply {
    let in_progress = response.object("in_progress", None, Value::Null);
    let part = |text: &str| json!({"type": "output_text", "text": text, "annotations": []});
    let item_ref = |extra: Value| {
        let mut fields = Map::new();
        fields.insert("item_id".into(), response.message_id.clone().into());
        fields.insert("output_index".into(), 0.into());
        fields.insert("content_index".into(), 0.into());
        if let Value::Object(extra) = extra {
            fields.extend(extra);
        }
        Value::Object(fields)
    };
    let mut sequence: u64 = 0;
    let head = vec![
        sequenced(
            "response.created",
            json!({"response": in_progress}),
            &mut sequence,
        ),
        sequenced(
            "response.in_progress",
            json!({"response": in_progress}),
            &mut sequence,
        ),
        sequenced(
            "response.output_item.added",
            json!({"output_index": 0, "item": response.message("in_progress", None)}),
            &mut sequence,
        ),
        sequenced(
            "response.content_part.added",
            item_ref(json!({"part": part("")})),
            &mut sequence,
        ),
    ];
    let first_delta = sequence;
    sequence += completion;
    let tail = vec![
        sequenced(
            "response.output_text.done",
            item_ref(json!({"text": text, "logprobs": []})),
            &mut sequence,
        ),
        sequenced(
            "response.content_part.done",
            item_ref(json!({"part": part(text)})),
            &mut sequence,
        ),
        sequenced(
            "response.output_item.done",
            json!({"output_index": 0, "item": response.message("completed", Some(text))}),
            &mut sequence,
        ),
        sequenced(
            "response.completed",
            json!({"response": response.object("completed", Some(text), usage)}),
            &mut sequence,
        ),
    ];

    let message_id = response.message_id.clone();
    let content = (0..completion).map(move |index| {
        let delta = json!({
            "type": "response.output_text.delta",
            "sequence_number": first_delta + index,
            "item_id": message_id,
            "output_index": 0,
            "content_index": 0,
            "delta": chunk_text(index),
            "logprobs": [],
        });
        Chunk::new(named_event("response.output_text.delta", &delta), index > 0)
    });
    let head = head.into_iter().map(|data| Chunk::new(data, false));
    let tail = tail.into_iter().map(|data| Chunk::new(data, false));
    Reply::event_stream(Plan::Stream(Box::new(head.chain(content).chain(tail))))
        .with_output_tokens(completion)
}

/// A named event with its `type` and the next `sequence_number` filled in.
fn sequenced(name: &str, mut value: Value, sequence: &mut u64) -> Bytes {
    if let Some(fields) = value.as_object_mut() {
        fields.insert("type".into(), name.into());
        fields.insert("sequence_number".into(), (*sequence).into());
    }
    *sequence += 1;
    named_event(name, &value)
}

/// The identity of one Responses API response.
struct ResponseIds {
    id: String,
    message_id: String,
    created_at: u64,
    model: String,
}

impl ResponseIds {
    /// The response object; `text` is the output message's text, if any yet.
    fn object(&self, status: &str, text: Option<&str>, usage: Value) -> Value {
        let output: Vec<Value> = text
            .map(|text| self.message(status, Some(text)))
            .into_iter()
            .collect();
        json!({
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": null,
            "incomplete_details": null,
            "model": self.model,
            "output": output,
            "usage": usage,
            "metadata": {},
        })
    }

    /// The output message item.
    fn message(&self, status: &str, text: Option<&str>) -> Value {
        let content: Vec<Value> = text
            .map(|text| json!({"type": "output_text", "text": text, "annotations": []}))
            .into_iter()
            .collect();
        json!({
            "type": "message",
            "id": self.message_id,
            "status": status,
            "role": "assistant",
            "content": content,
        })
    }
}

/// `POST /v1/embeddings`: one embedding per input, derived from its text.
pub(crate) fn embeddings(ctx: &Ctx<'_>) -> Reply {
    let inputs: Vec<Value> = match ctx.request.get("input") {
        Some(Value::Array(inputs)) => inputs.clone(),
        Some(input) => vec![input.clone()],
        None => Vec::new(),
    };
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(index, input)| {
            let text = match input {
                Value::String(text) => text.clone(),
                other => other.to_string(),
            };
            json!({"object": "embedding", "index": index, "embedding": embedding(&text)})
        })
        .collect();
    let prompt = ctx.prompt();
    Reply::json(&json!({
        "object": "list",
        "data": data,
        "model": ctx.model(DEFAULT_EMBEDDING_MODEL),
        "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
    }))
}

/// A fixed function of the text (FNV-1a, one byte per dimension, in [-1, 1]),
/// so equal inputs get equal vectors.
fn embedding(text: &str) -> Vec<f64> {
    let hash = text.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    });
    (0..EMBEDDING_DIMENSIONS)
        .map(|dimension| {
            let byte = hash.to_le_bytes().get(dimension).copied().unwrap_or(0);
            f64::from(byte) / 127.5 - 1.0
        })
        .collect()
}
