//! The usage parsers against real and mock-shaped bodies, cut every way.
//!
//! Bodies are fed whole, split in two at every byte boundary, and byte by
//! byte; the result must be the same each time. The Anthropic streams are
//! real ones (see `fixtures/README.md`); the OpenAI ones are built exactly
//! like the mock upstream (`crates/tollgate-mock/src/openai.rs`) builds them.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use crate::usage::extract::{
    inject_include_usage, Extracted, TokenCounts, UnmeterableRequest, UsageChunkFilter,
    UsageFormat, UsageScanner,
};
use proptest::prelude::*;
use serde_json::{json, Map, Value};

// ---------------------------------------------------------------------------
// Helpers.

fn scan(format: UsageFormat, event_stream: bool, pieces: &[&[u8]]) -> Extracted {
    let mut scanner = UsageScanner::new(format, event_stream);
    for piece in pieces {
        scanner.feed(piece);
    }
    scanner.finish()
}

/// Whole, in two pieces at every boundary, and byte by byte: all must give
/// `expected`.
fn assert_scan_every_split(
    format: UsageFormat,
    event_stream: bool,
    body: &[u8],
    expected: &Extracted,
) {
    assert_eq!(&scan(format, event_stream, &[body]), expected, "whole");
    for cut in 0..=body.len() {
        assert_eq!(
            &scan(format, event_stream, &[&body[..cut], &body[cut..]]),
            expected,
            "split at byte {cut}"
        );
    }
    let bytes: Vec<&[u8]> = body.chunks(1).collect();
    assert_eq!(
        &scan(format, event_stream, &bytes),
        expected,
        "byte by byte"
    );
}

fn tokens(input: u64, output: u64, cache_read: u64, cache_write: u64) -> Option<TokenCounts> {
    Some(TokenCounts {
        input,
        output,
        cache_read,
        cache_write,
    })
}

fn found(tokens: Option<TokenCounts>, model: &str) -> Extracted {
    Extracted {
        tokens,
        model: Some(model.to_owned()),
        ..Extracted::default()
    }
}

fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/anthropic-sse")
}

/// One Chat Completions stream, built as the mock builds it: `completion`
/// content chunks, a final chunk with `finish_reason`, with include_usage
/// `"usage":null` in each and a last chunk with no choices and the usage.
fn chat_stream(include_usage: bool, completion: u64, prompt: u64, cached: u64) -> Vec<u8> {
    let chunk = |choices: Value, usage: Value| {
        let mut chunk = Map::new();
        chunk.insert("id".into(), "chatcmpl-mock7".into());
        chunk.insert("object".into(), "chat.completion.chunk".into());
        chunk.insert("created".into(), 1_700_000_000u64.into());
        chunk.insert("model".into(), "gpt-4o-mini-2024-07-18".into());
        chunk.insert("choices".into(), choices);
        if include_usage {
            chunk.insert("usage".into(), usage);
        }
        format!("data: {}\n\n", Value::Object(chunk))
    };
    let choice = |delta: Value, finish: Value| json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]);
    let mut stream = String::new();
    for index in 0..completion {
        // Decoys: content that talks about usage.
        let text = format!(" word{index} \"usage\": {{\"prompt_tokens\": 999}}");
        let delta = if index == 0 {
            json!({"role": "assistant", "content": text})
        } else {
            json!({"content": text})
        };
        stream += &chunk(choice(delta, Value::Null), Value::Null);
    }
    stream += &chunk(choice(json!({}), "stop".into()), Value::Null);
    if include_usage {
        stream += &chunk(
            json!([]),
            json!({
                "prompt_tokens": prompt + cached,
                "completion_tokens": completion,
                "total_tokens": prompt + cached + completion,
                "prompt_tokens_details": {"cached_tokens": cached},
                "completion_tokens_details": {"reasoning_tokens": 0},
            }),
        );
    }
    stream += "data: [DONE]\n\n";
    stream.into_bytes()
}

fn named(name: &str, value: &Value) -> String {
    format!("event: {name}\ndata: {value}\n\n")
}

/// A Responses API stream as the mock sends it (`text_len` bytes of output).
fn responses_stream(text_len: usize, with_completed: bool) -> Vec<u8> {
    let text = "x".repeat(text_len);
    let object = |status: &str, usage: Value, text: Option<&str>| {
        let output: Vec<Value> = text
            .map(|text| json!({"type": "message", "id": "msg_1", "status": status, "role": "assistant",
                               "content": [{"type": "output_text", "text": text, "annotations": []}]}))
            .into_iter()
            .collect();
        json!({"id": "resp_1", "object": "response", "created_at": 1, "status": status, "error": null,
               "incomplete_details": null, "model": "gpt-4o-mini", "output": output, "usage": usage,
               "metadata": {"usage": {"input_tokens": 999}}})
    };
    let mut stream = named(
        "response.created",
        &json!({"type": "response.created", "sequence_number": 0, "response": object("in_progress", Value::Null, None)}),
    );
    stream += &named(
        "response.in_progress",
        &json!({"type": "response.in_progress", "sequence_number": 1, "response": object("in_progress", Value::Null, None)}),
    );
    stream += &named(
        "response.output_text.delta",
        &json!({"type": "response.output_text.delta", "sequence_number": 2, "item_id": "msg_1",
                "output_index": 0, "content_index": 0, "delta": "\"usage\":{\"input_tokens\":5}", "logprobs": []}),
    );
    if with_completed {
        let usage = json!({"input_tokens": 30, "input_tokens_details": {"cached_tokens": 10},
                           "output_tokens": 7, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 37});
        stream += &named(
            "response.completed",
            &json!({"type": "response.completed", "sequence_number": 3, "response": object("completed", usage, Some(&text))}),
        );
    }
    stream.into_bytes()
}

// ---------------------------------------------------------------------------
// Anthropic.

#[test]
fn anthropic_fixtures_match_expected_counts_under_every_split() {
    let dir = fixtures_dir();
    let expected: Value =
        serde_json::from_slice(&std::fs::read(dir.join("expected.json")).unwrap()).unwrap();
    let expected = expected.as_object().unwrap();
    assert_eq!(expected.len(), 4);
    for (file, want) in expected {
        let body = std::fs::read(dir.join(file)).unwrap();
        let count = |field: &str| want[field].as_u64().unwrap();
        let want = Extracted {
            tokens: tokens(
                count("input_tokens"),
                count("output_tokens"),
                count("cache_read_tokens"),
                count("cache_write_tokens"),
            ),
            model: Some(want["model"].as_str().unwrap().to_owned()),
            ..Extracted::default()
        };
        assert_scan_every_split(UsageFormat::Anthropic, true, &body, &want);
        // The same stream with \r\n line ends.
        let crlf = String::from_utf8(body.clone())
            .unwrap()
            .replace('\n', "\r\n");
        assert_eq!(
            scan(UsageFormat::Anthropic, true, &[crlf.as_bytes()]),
            want,
            "{file} with CRLF"
        );
    }
}

#[test]
fn fixture_copies_match_the_shared_originals_when_present() {
    // The copies make the crate self-contained; where the project's shared/
    // folder sits beside the repository, they must not have drifted.
    let shared =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures/anthropic-sse");
    let Ok(entries) = std::fs::read_dir(&shared) else {
        return;
    };
    for entry in entries {
        let path = entry.unwrap().path();
        let copy = fixtures_dir().join(path.file_name().unwrap());
        assert_eq!(
            std::fs::read(&path).unwrap(),
            std::fs::read(&copy).unwrap(),
            "{}",
            copy.display()
        );
    }
}

#[test]
fn anthropic_fixture_without_trailing_newline_is_counted() {
    let body = std::fs::read(fixtures_dir().join("basic_response.txt")).unwrap();
    assert!(
        !body.ends_with(b"\n"),
        "the fixture is meant to end without a newline"
    );
    // Here the last event is message_stop; cut the blank line before the
    // message_delta instead, so the usage event itself is unterminated.
    let text = String::from_utf8(body).unwrap();
    let delta_end = text.find("\"output_tokens\":6}}").unwrap() + "\"output_tokens\":6}}".len();
    let cut = &text.as_bytes()[..delta_end];
    assert_eq!(
        scan(UsageFormat::Anthropic, true, &[cut]),
        found(tokens(11, 6, 0, 0), "claude-3-opus-latest")
    );
}

#[test]
fn anthropic_partial_stream_reports_what_was_seen() {
    let body = std::fs::read(fixtures_dir().join("tool_use_response.txt")).unwrap();
    let text = String::from_utf8(body).unwrap();
    // Client gone after message_start: input from it, output its 1.
    let after_start = text.find("event: content_block_start").unwrap();
    assert_eq!(
        scan(
            UsageFormat::Anthropic,
            true,
            &[&text.as_bytes()[..after_start]]
        ),
        found(tokens(377, 1, 0, 0), "claude-sonnet-4-20250514")
    );
    // Gone in the middle of the message_delta line: that event is incomplete JSON.
    let mid_delta = text.find("\"output_tokens\":65").unwrap();
    assert_eq!(
        scan(
            UsageFormat::Anthropic,
            true,
            &[&text.as_bytes()[..mid_delta]]
        ),
        found(tokens(377, 1, 0, 0), "claude-sonnet-4-20250514")
    );
    // Nothing yet.
    assert_eq!(
        scan(
            UsageFormat::Anthropic,
            true,
            &[b"event: message_start\ndata: {\"ty"]
        ),
        Extracted::default()
    );
}

#[test]
fn anthropic_last_message_delta_wins_not_the_sum() {
    let stream = concat!(
        "event: message_start\n",
        "data: {\"type\":\"message_start\",\"message\":{\"model\":\"claude-x\",\"content\":[{\"type\":\"text\",\"text\":\"\\\"usage\\\":{}\"}],",
        "\"usage\":{\"input_tokens\":100,\"cache_read_input_tokens\":40,\"cache_creation_input_tokens\":7,\"output_tokens\":1}}}\n\n",
        "event: ping\ndata: {\"type\": \"ping\"}\n\n",
        ": keep-alive comment\n\n",
        "event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":20}}\n\n",
        "event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":35}}\n\n",
        "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":null}\n\n",
        "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
    );
    assert_scan_every_split(
        UsageFormat::Anthropic,
        true,
        stream.as_bytes(),
        &found(tokens(100, 35, 40, 7), "claude-x"),
    );
}

#[test]
fn anthropic_json_body() {
    // As the mock answers, with decoys in the content and in a nested object.
    let body = json!({
        "id": "msg_mock1", "type": "message", "role": "assistant", "model": "claude-3-5-haiku-latest",
        "content": [{"type": "text", "text": "{\"usage\": {\"input_tokens\": 999}, \"model\": \"fake\"}"},
                    {"type": "tool_use", "input": {"usage": {"input_tokens": 998}, "model": "fake2"}}],
        "stop_reason": "end_turn", "stop_sequence": null,
        "usage": {"input_tokens": 12, "cache_creation_input_tokens": 3, "cache_read_input_tokens": 4, "output_tokens": 5},
    });
    assert_scan_every_split(
        UsageFormat::Anthropic,
        false,
        body.to_string().as_bytes(),
        &found(tokens(12, 5, 4, 3), "claude-3-5-haiku-latest"),
    );
    // Pretty-printed, keys in the API's order (usage last).
    let pretty = serde_json::to_string_pretty(&body).unwrap();
    assert_eq!(
        scan(UsageFormat::Anthropic, false, &[pretty.as_bytes()]),
        found(tokens(12, 5, 4, 3), "claude-3-5-haiku-latest")
    );
}

// ---------------------------------------------------------------------------
// OpenAI.

#[test]
fn openai_chat_json_body() {
    let body = json!({
        "id": "chatcmpl-mock1", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini-2024-07-18",
        "choices": [{"index": 0, "message": {"role": "assistant",
            "content": "\"usage\":{\"prompt_tokens\":999,\"completion_tokens\":999}", "usage": {"prompt_tokens": 998}},
            "logprobs": null, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 50, "completion_tokens": 9, "total_tokens": 59,
                  "prompt_tokens_details": {"cached_tokens": 20}, "completion_tokens_details": {"reasoning_tokens": 0}},
    });
    assert_scan_every_split(
        UsageFormat::Openai,
        false,
        body.to_string().as_bytes(),
        &found(tokens(30, 9, 20, 0), "gpt-4o-mini-2024-07-18"),
    );
}

#[test]
fn usage_object_keys_are_read_as_a_derived_struct_would() {
    let read = |usage: &[u8]| {
        let body = [&br#"{"model":"m","usage":"#[..], usage, b"}"].concat();
        scan(UsageFormat::Openai, false, &[&body]).tokens
    };
    // Escaped keys are unescaped; unknown keys, even given twice, and
    // unknown members of the details object are skipped.
    assert_eq!(
        read(br#"{"prompt\u005ftokens":7,"total":1,"total":2,"completion_tokens":3,"prompt_tokens_details":{"audio_tokens":9,"cached_tokens":2}}"#),
        tokens(5, 3, 2, 0)
    );
    // A key that is not UTF-8 is an unknown key.
    assert_eq!(
        read(b"{\"prompt_tokens\":7,\"\xff\xfe\":1,\"completion_tokens\":3}"),
        tokens(7, 3, 0, 0)
    );
    // A count, or a details object, given twice refuses the whole object;
    // so does a usage object that is not an object.
    for refused in [
        &br#"{"prompt_tokens":7,"completion_tokens":3,"prompt_tokens":8}"#[..],
        br#"{"prompt_tokens":null,"prompt_tokens":8}"#,
        br#"{"prompt_tokens":7,"prompt_tokens_details":{},"prompt_tokens_details":{}}"#,
        br#"{"prompt_tokens":7,"prompt_tokens_details":{"cached_tokens":1,"cached_tokens":2}}"#,
        br#"[7,3]"#,
    ] {
        assert_eq!(read(refused), None, "{}", String::from_utf8_lossy(refused));
    }
}

#[test]
fn openai_chat_json_with_usage_first_and_a_huge_body() {
    // usage before a 1 MiB content string; fed in 4 KiB pieces.
    let content = "lorem \\\"usage\\\": ".repeat(64 * 1024);
    let body = format!(
        r#"{{"usage":{{"prompt_tokens":7,"completion_tokens":3}},"choices":[{{"message":{{"content":"{content}"}}}}],"model":"gpt-4o"}}"#
    );
    let pieces: Vec<&[u8]> = body.as_bytes().chunks(4096).collect();
    assert_eq!(
        scan(UsageFormat::Openai, false, &pieces),
        found(tokens(7, 3, 0, 0), "gpt-4o")
    );
}

#[test]
fn a_model_name_with_control_characters_is_no_name() {
    let body = br#"{"usage":{"prompt_tokens":7,"completion_tokens":3},"model":"m\u001b[2J\u0007"}"#;
    let got = scan(UsageFormat::Openai, false, &[body]);
    assert_eq!(got.model, None);
    assert_eq!(got.tokens, tokens(7, 3, 0, 0));
}

#[test]
fn openai_embeddings_json_body() {
    let body = json!({
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": [0.1, -0.5, 1.0e-3]}],
        "model": "text-embedding-3-small",
        "usage": {"prompt_tokens": 8, "total_tokens": 8},
    });
    assert_scan_every_split(
        UsageFormat::Openai,
        false,
        body.to_string().as_bytes(),
        &found(tokens(8, 0, 0, 0), "text-embedding-3-small"),
    );
}

#[test]
fn openai_responses_json_body() {
    let body = json!({
        "id": "resp_mock1", "object": "response", "created_at": 1, "status": "completed", "error": null,
        "incomplete_details": null, "model": "gpt-4o-mini",
        "output": [{"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
                    "content": [{"type": "output_text", "text": "hi", "annotations": []}]}],
        "usage": {"input_tokens": 30, "input_tokens_details": {"cached_tokens": 10}, "output_tokens": 7,
                  "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 37},
        "metadata": {"usage": "none"},
    });
    assert_scan_every_split(
        UsageFormat::Openai,
        false,
        body.to_string().as_bytes(),
        &found(tokens(20, 7, 10, 0), "gpt-4o-mini"),
    );
}

#[test]
fn openai_chat_stream_with_usage_chunk() {
    let stream = chat_stream(true, 4, 25, 5);
    assert_scan_every_split(
        UsageFormat::Openai,
        true,
        &stream,
        &found(tokens(25, 4, 5, 0), "gpt-4o-mini-2024-07-18"),
    );
}

#[test]
fn openai_chat_stream_without_usage_chunk_has_model_but_no_tokens() {
    let stream = chat_stream(false, 4, 25, 5);
    assert_scan_every_split(
        UsageFormat::Openai,
        true,
        &stream,
        &Extracted {
            tokens: None,
            model: Some("gpt-4o-mini-2024-07-18".to_owned()),
            ..Extracted::default()
        },
    );
    // Client gone before the usage chunk of an include_usage stream.
    let full = chat_stream(true, 4, 25, 5);
    let text = String::from_utf8(full).unwrap();
    let before_usage = text.find("data: {\"choices\":[]").unwrap();
    assert_eq!(
        scan(
            UsageFormat::Openai,
            true,
            &[&text.as_bytes()[..before_usage]]
        ),
        Extracted {
            tokens: None,
            model: Some("gpt-4o-mini-2024-07-18".to_owned()),
            ..Extracted::default()
        }
    );
}

#[test]
fn openai_responses_stream() {
    let stream = responses_stream(40, true);
    assert_scan_every_split(
        UsageFormat::Openai,
        true,
        &stream,
        &found(tokens(20, 7, 10, 0), "gpt-4o-mini"),
    );
    // Gone before response.completed: the model, no counts.
    assert_eq!(
        scan(UsageFormat::Openai, true, &[&responses_stream(40, false)]),
        Extracted {
            tokens: None,
            model: Some("gpt-4o-mini".to_owned()),
            ..Extracted::default()
        }
    );
}

#[test]
fn events_larger_than_the_buffer_are_walked_as_they_stream() {
    // response.completed repeats the whole output: 300 KiB here, beyond the
    // 64 KiB event buffer, with usage after it.
    let stream = responses_stream(300 * 1024, true);
    let want = found(tokens(20, 7, 10, 0), "gpt-4o-mini");
    for size in [1 << 20, 4096, 1000, 7] {
        let pieces: Vec<&[u8]> = stream.chunks(size).collect();
        assert_eq!(
            scan(UsageFormat::Openai, true, &pieces),
            want,
            "pieces of {size}"
        );
    }
    // Cut in the middle of the large event: nothing from it.
    let half = &stream[..stream.len() - 100];
    assert_eq!(
        scan(UsageFormat::Openai, true, &[half]),
        Extracted {
            tokens: None,
            model: Some("gpt-4o-mini".to_owned()),
            ..Extracted::default()
        }
    );
}

#[test]
fn garbage_and_errors_yield_no_usage() {
    let bodies: [&[u8]; 6] = [
        b"",
        b"not json at all",
        br#"{"error":{"type":"rate_limited","message":"usage exceeded"}}"#,
        br#"{"usage":"lots","model":42}"#,
        br#"[{"usage":{"prompt_tokens":1}}]"#,
        br#"{"usage":{"prompt_tokens":1,}}"#,
    ];
    for body in bodies {
        for event_stream in [false, true] {
            for format in [UsageFormat::Openai, UsageFormat::Anthropic] {
                assert_eq!(scan(format, event_stream, &[body]).tokens, None, "{body:?}");
            }
        }
    }
    // A count that is not a whole number is no count, but is reported as
    // unusable (to be counted), not taken for the absence of usage.
    let negative = scan(
        UsageFormat::Openai,
        false,
        &[br#"{"usage":{"prompt_tokens":-1}}"#],
    );
    assert_eq!(negative.tokens, Some(TokenCounts::default()));
    assert!(negative.unusable.input);
    // A route without a usage parser reads nothing, even a perfect body.
    let stream = chat_stream(true, 2, 3, 0);
    assert_eq!(
        scan(UsageFormat::None, true, &[&stream]),
        Extracted::default()
    );
}

// ---------------------------------------------------------------------------
// The hidden usage chunk.

fn filter(pieces: &[&[u8]]) -> Vec<u8> {
    let mut filter = UsageChunkFilter::new();
    let mut out = Vec::new();
    for piece in pieces {
        out.extend(filter.feed(piece));
    }
    out.extend(filter.finish());
    out
}

fn assert_filter_every_split(input: &[u8], expected: &[u8]) {
    let show = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    assert_eq!(show(&filter(&[input])), show(expected), "whole");
    for cut in 0..=input.len() {
        assert_eq!(
            show(&filter(&[&input[..cut], &input[cut..]])),
            show(expected),
            "split at byte {cut}"
        );
    }
    let bytes: Vec<&[u8]> = input.chunks(1).collect();
    assert_eq!(show(&filter(&bytes)), show(expected), "byte by byte");
}

#[test]
fn filter_restores_the_stream_the_client_asked_for() {
    for completion in [0, 1, 5] {
        let with = chat_stream(true, completion, 10, 2);
        let without = chat_stream(false, completion, 10, 2);
        assert_ne!(with, without);
        assert_filter_every_split(&with, &without);
    }
}

#[test]
fn filter_passes_streams_without_the_option_unchanged() {
    // No usage chunk: the final chunk (with finish_reason) and [DONE] pass.
    let plain = chat_stream(false, 3, 10, 0);
    assert_filter_every_split(&plain, &plain);
    // An upstream that sends usage in a chunk that still has choices (some
    // compatible servers do): not the hidden chunk, left alone.
    let odd = b"data: {\"choices\":[{\"index\":0,\"delta\":{}}],\"usage\":{\"prompt_tokens\":1}}\n\ndata: [DONE]\n\n";
    assert_filter_every_split(odd, odd);
    // A JSON error body is not an event stream: unchanged.
    let error = br#"{"error":{"message":"bad \"usage\": null"}}"#;
    assert_filter_every_split(error, error);
}

#[test]
fn filter_handles_crlf_and_other_member_orders() {
    let input = concat!(
        ": comment\r\n\r\n",
        "data: {\"usage\": null, \"id\": \"1\", \"choices\": [{\"delta\": {\"content\": \"\\\"usage\\\": null\"}}]}\r\n\r\n",
        "data: {\"id\":\"2\",\"usage\":null,\"choices\":[]}\r\n\r\n",
        "data: {\"id\": \"4\", \"choices\": [], \"usage\": null}\r\n\r\n",
        "data: {\"id\":\"3\",\"choices\":[ ],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}\r\n\r\n",
        "data: [DONE]\r\n\r\n",
    );
    let expected = concat!(
        ": comment\r\n\r\n",
        "data: {\"id\": \"1\", \"choices\": [{\"delta\": {\"content\": \"\\\"usage\\\": null\"}}]}\r\n\r\n",
        "data: {\"id\":\"2\",\"choices\":[]}\r\n\r\n",
        "data: {\"id\": \"4\", \"choices\": []}\r\n\r\n",
        "data: [DONE]\r\n\r\n",
    );
    assert_filter_every_split(input.as_bytes(), expected.as_bytes());
}

#[test]
fn filter_passes_each_event_as_soon_as_it_is_complete() {
    let stream = chat_stream(true, 3, 10, 0);
    let without = chat_stream(false, 3, 10, 0);
    let mut filter = UsageChunkFilter::new();
    let first_end = stream.windows(2).position(|w| w == b"\n\n").unwrap() + 2;
    // Everything but the blank line's last byte: held back.
    assert!(filter.feed(&stream[..first_end - 1]).is_empty());
    // The last byte completes the event: out it goes, edited.
    let out = filter.feed(&stream[first_end - 1..first_end]);
    let first_without = without.windows(2).position(|w| w == b"\n\n").unwrap() + 2;
    assert_eq!(out, &without[..first_without]);
    // An event cut short at the end of the stream is flushed by finish.
    assert!(filter.feed(b"data: {\"partial\"").is_empty());
    assert_eq!(filter.finish(), b"data: {\"partial\"");
}

// ---------------------------------------------------------------------------
// Asking for usage.

fn inject(body: &str) -> Option<String> {
    let edited = inject_include_usage(body.as_bytes()).unwrap_or_else(|e| panic!("{body}: {e}"));
    edited.map(|edited| String::from_utf8(edited).unwrap())
}

/// The edit must leave every other field as it was.
fn assert_same_apart_from_options(original: &str, edited: &str) {
    let mut before: Value = serde_json::from_str(original).unwrap();
    let mut after: Value = serde_json::from_str(edited).unwrap();
    assert_eq!(
        after.pointer("/stream_options/include_usage"),
        Some(&Value::Bool(true))
    );
    let before_options = before.as_object_mut().unwrap().remove("stream_options");
    let mut after_options = after
        .as_object_mut()
        .unwrap()
        .remove("stream_options")
        .unwrap();
    assert_eq!(before, after);
    after_options
        .as_object_mut()
        .unwrap()
        .remove("include_usage");
    if let Some(Value::Object(mut options)) = before_options {
        options.remove("include_usage");
        assert_eq!(Value::Object(options), after_options);
    } else {
        assert_eq!(after_options, json!({}));
    }
}

#[test]
fn inject_adds_stream_options_when_absent() {
    let body = r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"\"stream_options\": {}"}]}"#;
    let edited = inject(body).unwrap();
    assert_eq!(
        edited,
        r#"{"stream_options":{"include_usage":true},"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"\"stream_options\": {}"}]}"#
    );
    assert_same_apart_from_options(body, &edited);
    let pretty = "\n {\n  \"stream\": true\n}\n";
    let edited = inject(pretty).unwrap();
    assert_eq!(
        edited,
        "\n {\"stream_options\":{\"include_usage\":true},\n  \"stream\": true\n}\n"
    );
}

#[test]
fn inject_sets_include_usage_false_to_true() {
    let body = r#"{"stream":true,"stream_options":{"include_usage":false,"other":1},"model":"m"}"#;
    let edited = inject(body).unwrap();
    assert_eq!(
        edited,
        r#"{"stream":true,"stream_options":{"include_usage":true,"other":1},"model":"m"}"#
    );
    assert_same_apart_from_options(body, &edited);
    let null = r#"{"stream":true,"stream_options":{"other":1, "include_usage" : null }}"#;
    assert_eq!(
        inject(null).unwrap(),
        r#"{"stream":true,"stream_options":{"other":1, "include_usage" : true }}"#
    );
}

#[test]
fn inject_keeps_other_stream_options() {
    let body = r#"{"stream":true,"stream_options":{"continuous_usage_stats":false},"n":2}"#;
    let edited = inject(body).unwrap();
    assert_eq!(
        edited,
        r#"{"stream":true,"stream_options":{"include_usage":true,"continuous_usage_stats":false},"n":2}"#
    );
    assert_same_apart_from_options(body, &edited);
    let empty = r#"{"stream":true,"stream_options":{ }}"#;
    assert_eq!(
        inject(empty).unwrap(),
        r#"{"stream":true,"stream_options":{"include_usage":true }}"#
    );
    let null = r#"{"stream":true,"stream_options": null}"#;
    let edited = inject(null).unwrap();
    assert_eq!(
        edited,
        r#"{"stream":true,"stream_options": {"include_usage":true}}"#
    );
    assert_same_apart_from_options(null, &edited);
}

#[test]
fn inject_leaves_other_requests_alone() {
    let untouched = [
        r#"{"model":"m","messages":[]}"#,
        r#"{"stream":false}"#,
        r#"{"stream":null,"stream_options":"yes"}"#,
        r#"{"stream":true,"stream_options":{"include_usage":true}}"#,
        r#" {"stream":true,"stream_options":{"other":[],"include_usage":true}}"#,
        // Not JSON, but nothing in it could be read as `stream`.
        r#"{"model":"m","#,
    ];
    for body in untouched {
        assert_eq!(inject_include_usage(body.as_bytes()), Ok(None), "{body}");
    }
}

#[test]
fn inject_refuses_what_a_reader_could_take_for_an_unmetered_stream() {
    use UnmeterableRequest::*;
    let unreadable = |body: &[u8]| match inject_include_usage(body) {
        Err(Unreadable(message)) => message,
        other => panic!("{}: {other:?}", String::from_utf8_lossy(body)),
    };
    // Keys given twice: readers keep the first, the last, or refuse.
    let twice = unreadable(br#"{"stream":false,"model":"m","stream":true}"#);
    assert!(twice.contains("duplicate field `stream`"), "{twice}");
    let twice = unreadable(br#"{"stream":true,"stream_options":null,"stream_options":{}}"#);
    assert!(
        twice.contains("duplicate field `stream_options`"),
        "{twice}"
    );
    let twice = unreadable(
        br#"{"stream":true,"stream_options":{"include_usage":true,"include_usage":false}}"#,
    );
    assert!(twice.contains("duplicate field `include_usage`"), "{twice}");
    // Keys that readers which ignore case (Go, .NET) take for the real
    // ones, some letters folded from outside ASCII.
    for (body, key) in [
        (&br#"{"model":"m","Stream":true}"#[..], "Stream"),
        (br#"{"stream":false,"STREAM":true}"#, "STREAM"),
        ("{\"\u{17F}tream\":true}".as_bytes(), "\u{17F}tream"),
        (
            br#"{"stream":true,"stream_options":{"include_usage":true},"Stream_Options":{}}"#,
            "Stream_Options",
        ),
        (
            br#"{"stream":true,"stream_options":{"Include_Usage":false}}"#,
            "Include_Usage",
        ),
        (
            "{\"stream\":true,\"stream_options\":{\"\u{131}nclude_usage\":false}}".as_bytes(),
            "\u{131}nclude_usage",
        ),
        (br#"{"str\u0045am":true}"#, "strEam"),
    ] {
        let message = unreadable(body);
        assert!(
            message.contains(&format!("the key `{key}` differs")),
            "{message}"
        );
    }
    // Keys that only look alike stay what they are.
    for body in [
        r#"{"stream":true,"streams":1,"Stream2":2,"stream_option":{}}"#,
        r#"{"stream":true,"stream_options":{"include_usage":true,"include":1}}"#,
    ] {
        assert!(inject_include_usage(body.as_bytes()).is_ok(), "{body}");
    }
    // Not quite JSON, where a lenient reader may still see a stream.
    for body in [
        &br#"{"stream":true"#[..],
        br#"{"stream":true} trailing"#,
        br#"{"stream":true,}"#,
        br#"{"stream":true,"n":NaN}"#,
        // UTF-16 (little-endian), which Python's json detects and decodes.
        b"{\0\"\0s\0t\0r\0e\0a\0m\0\"\0:\0t\0r\0u\0e\0}\0",
    ] {
        unreadable(body);
    }
    for (body, why) in [
        (&br#"{"stream":"true"}"#[..], StreamNotBoolean),
        (br#"{"stream":1,"model":"m"}"#, StreamNotBoolean),
        (
            br#"{"stream":true,"stream_options":"yes"}"#,
            OptionsNotObject,
        ),
        (br#"{"stream":true,"stream_options":[]}"#, OptionsNotObject),
        (
            br#"{"stream":true,"stream_\u006fptions":{"include_usage":false}}"#,
            Uneditable,
        ),
        (br#"[{"stream":true}]"#, NotAnObject),
        (b"\xef\xbb\xbf{\"stream\":true}", NotAnObject),
        (b"\xff\xfe{\0\"\0}\0", NotAnObject),
        (b"", NotAnObject),
        (b"stream=true", NotAnObject),
    ] {
        assert_eq!(
            inject_include_usage(body),
            Err(why),
            "{}",
            String::from_utf8_lossy(body)
        );
    }
    // Text that is not valid but cannot hide a stream is the upstream's to
    // judge: the stream is still asked for its usage.
    for body in [
        &br#"{"stream":true,"messages":[{"content":"\ud800"}]}"#[..],
        b"{\"stream\":true,\"messages\":[{\"content\":\"\xff\"}]}",
    ] {
        let edited = inject_include_usage(body).unwrap().unwrap();
        assert!(edited.starts_with(br#"{"stream_options":{"include_usage":true},"#));
    }
}

#[test]
fn inject_reads_a_stream_key_however_it_is_spelled() {
    // Escaped, the key is `stream` to any JSON reader, the upstream's too.
    for body in [
        r#"{"\u0073tream":true,"model":"m"}"#,
        r#"{"model":"m","strea\u006d":true}"#,
    ] {
        let edited = inject(body).unwrap_or_else(|| panic!("{body}"));
        assert_same_apart_from_options(body, &edited);
    }
    // "stream" inside a value and not as a key: read, and left alone; a
    // body without the word or an escape is left alone unread.
    assert_eq!(
        inject(r#"{"messages":[{"content":"\"stream\":true"}]}"#),
        None
    );
    assert_eq!(inject(r#"{"model":"m","max_tokens":5}"#), None);
}

// ---------------------------------------------------------------------------
// Properties.

/// The bodies the properties cut up.
fn corpus() -> Vec<(UsageFormat, bool, Vec<u8>)> {
    let mut bodies = vec![
        (UsageFormat::Openai, true, chat_stream(true, 6, 40, 8)),
        (UsageFormat::Openai, true, responses_stream(200, true)),
        (
            UsageFormat::Openai,
            false,
            br#"{"model":"gpt-4o","choices":[{"message":{"content":"a\\\"b\"usage\":{}"}}],"usage":{"prompt_tokens":5,"completion_tokens":2}}"#.to_vec(),
        ),
    ];
    for file in [
        "basic_response.txt",
        "tool_use_response.txt",
        "message_delta_omitted_usage_response.txt",
    ] {
        let body = std::fs::read(fixtures_dir().join(file)).unwrap();
        let crlf = String::from_utf8(body.clone())
            .unwrap()
            .replace('\n', "\r\n")
            .into_bytes();
        let cr = String::from_utf8(body.clone())
            .unwrap()
            .replace('\n', "\r")
            .into_bytes();
        bodies.push((UsageFormat::Anthropic, true, body));
        bodies.push((UsageFormat::Anthropic, true, crlf));
        bodies.push((UsageFormat::Anthropic, true, cr));
    }
    bodies
}

/// Cuts `body` at the given fractions of its length.
fn cut(body: &[u8], cuts: &[f64]) -> Vec<Vec<u8>> {
    let mut points: Vec<usize> = cuts
        .iter()
        .map(|c| (c * body.len() as f64) as usize)
        .collect();
    points.push(0);
    points.push(body.len());
    points.sort_unstable();
    points
        .windows(2)
        .map(|w| body[w[0]..w[1]].to_vec())
        .collect()
}

/// A chat request's members other than `stream` and `stream_options`:
/// keys and string values of any characters (quotes, backslashes, control
/// characters, non-ASCII), numbers, nested objects and arrays.
fn request_members() -> impl Strategy<Value = Vec<(String, Value)>> {
    let leaf = prop_oneof![
        any::<String>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<bool>().prop_map(Value::from),
        Just(Value::Null),
    ];
    let value = leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec((any::<String>(), inner), 0..4)
                .prop_map(|members| Value::Object(members.into_iter().collect())),
        ]
    });
    let key = any::<String>().prop_filter("not the stream members", |key| {
        key != "stream" && key != "stream_options"
    });
    prop::collection::vec((key, value), 0..6)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// A streaming request without `stream_options` (the one edit made
    /// without reading the result again) comes out as the same request
    /// asking for usage, whatever its members (`stream` lands among them
    /// where its name sorts), compact or pretty-printed.
    #[test]
    fn inject_into_any_streaming_request_keeps_it_valid(
        members in request_members(),
        pretty in any::<bool>(),
    ) {
        let mut object: Map<String, Value> = members.into_iter().collect();
        object.insert("stream".to_owned(), Value::Bool(true));
        let request = Value::Object(object);
        let body = if pretty {
            serde_json::to_string_pretty(&request).unwrap()
        } else {
            request.to_string()
        };
        let edited = inject(&body);
        prop_assert!(edited.is_some(), "{}", body);
        assert_same_apart_from_options(&body, &edited.unwrap());
    }

    #[test]
    fn scanner_result_does_not_depend_on_the_split(
        which in 0usize..12,
        cuts in proptest::collection::vec(0.0f64..1.0, 0..40),
    ) {
        let corpus = corpus();
        let (format, event_stream, body) = &corpus[which % corpus.len()];
        let whole = scan(*format, *event_stream, &[body]);
        prop_assert!(whole.tokens.is_some());
        let pieces = cut(body, &cuts);
        let refs: Vec<&[u8]> = pieces.iter().map(Vec::as_slice).collect();
        prop_assert_eq!(scan(*format, *event_stream, &refs), whole);
    }

    #[test]
    fn filter_result_does_not_depend_on_the_split(
        completion in 0u64..8,
        cuts in proptest::collection::vec(0.0f64..1.0, 0..40),
    ) {
        let with = chat_stream(true, completion, 3, 1);
        let pieces = cut(&with, &cuts);
        let refs: Vec<&[u8]> = pieces.iter().map(Vec::as_slice).collect();
        prop_assert_eq!(filter(&refs), chat_stream(false, completion, 3, 1));
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_split_the_same(
        body in proptest::collection::vec(
            prop_oneof![
                Just(b'{'), Just(b'}'), Just(b'['), Just(b']'), Just(b'"'), Just(b'\\'),
                Just(b':'), Just(b','), Just(b'\n'), Just(b'\r'), Just(b' '), any::<u8>(),
            ],
            0..300,
        ),
        cuts in proptest::collection::vec(0.0f64..1.0, 0..10),
    ) {
        let pieces = cut(&body, &cuts);
        let refs: Vec<&[u8]> = pieces.iter().map(Vec::as_slice).collect();
        for format in [UsageFormat::Openai, UsageFormat::Anthropic] {
            for event_stream in [false, true] {
                prop_assert_eq!(scan(format, event_stream, &refs), scan(format, event_stream, &[&body]));
            }
        }
        prop_assert_eq!(filter(&refs), filter(&[&body]));
        let _ = inject_include_usage(&body);
    }

    #[test]
    fn usage_fields_round_trip(
        prompt in 0u64..u64::MAX / 2,
        cached in 0u64..1_000_000,
        completion in any::<u64>(),
    ) {
        let body = json!({"model": "m", "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                          "prompt_tokens_details": {"cached_tokens": cached}}});
        prop_assert_eq!(
            scan(UsageFormat::Openai, false, &[body.to_string().as_bytes()]),
            found(tokens(prompt.saturating_sub(cached), completion, cached, 0), "m")
        );
    }
}
