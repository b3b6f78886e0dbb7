//! Usage scanning on the streaming hot path, in MB/s of response body.
//!
//! - a response's usage (`ResponseUsage`) read from a ~1 MB OpenAI chat
//!   stream (include_usage shape: `"usage":null` in every chunk, a usage
//!   chunk last) fed in 4 KiB pieces and in one piece, and from a ~1 MB
//!   Anthropic stream;
//! - the same with the hidden usage chunk filtered out of the OpenAI stream
//!   (every event is edited);
//! - the naive baseline beside them: a plain memchr (SIMD `memmem`) scan for
//!   `\n\n` over the same bytes, the cost floor of finding event boundaries
//!   at all.
//!
//! Run: `cargo bench --bench sse_scan`. Compare each line with its baseline.

#![allow(clippy::unwrap_used)]

use std::hint::black_box;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use memchr::memmem;
use tollgate_metering::usage::{
    CostSource, Outcome, Pricing, ResponseBody, ResponseUsage, UsageEvent, UsageFormat,
    UsageHeaders,
};
use tollgate_metering::{CustomerId, KeyId};

const TARGET: usize = 1 << 20;
const PIECE: usize = 4096;
const WORDS: [&str; 8] = [
    " lorem",
    " ipsum",
    " dolor",
    " sit",
    " amet",
    " consectetur",
    " adipiscing",
    " elit",
];

/// A chat completion stream as api.openai.com sends it with include_usage.
fn openai_stream() -> Vec<u8> {
    let head = r#"{"id":"chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT","object":"chat.completion.chunk","created":1741570283,"model":"gpt-4o-2024-08-06","service_tier":"default","system_fingerprint":"fp_eb9dce56a8","choices":[{"index":0,"delta":{"#;
    let mut stream = String::with_capacity(TARGET + 1024);
    stream += &format!("data: {head}\"role\":\"assistant\",\"content\":\"\",\"refusal\":null}},\"logprobs\":null,\"finish_reason\":null}}],\"usage\":null}}\n\n");
    let mut words = 0;
    while stream.len() < TARGET {
        let word = WORDS[words % WORDS.len()];
        stream += &format!("data: {head}\"content\":\"{word}\"}},\"logprobs\":null,\"finish_reason\":null}}],\"usage\":null}}\n\n");
        words += 1;
    }
    stream += &format!(
        "data: {head}}},\"logprobs\":null,\"finish_reason\":\"stop\"}}],\"usage\":null}}\n\n"
    );
    stream += &format!(
        "data: {{\"id\":\"chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT\",\"object\":\"chat.completion.chunk\",\"created\":1741570283,\"model\":\"gpt-4o-2024-08-06\",\"service_tier\":\"default\",\"system_fingerprint\":\"fp_eb9dce56a8\",\"choices\":[],\"usage\":{{\"prompt_tokens\":1117,\"completion_tokens\":{words},\"total_tokens\":{},\"prompt_tokens_details\":{{\"cached_tokens\":1024,\"audio_tokens\":0}},\"completion_tokens_details\":{{\"reasoning_tokens\":0,\"audio_tokens\":0,\"accepted_prediction_tokens\":0,\"rejected_prediction_tokens\":0}}}}}}\n\n",
        1117 + words
    );
    stream += "data: [DONE]\n\n";
    stream.into_bytes()
}

/// A Messages stream as api.anthropic.com sends it.
fn anthropic_stream() -> Vec<u8> {
    let mut stream = String::with_capacity(TARGET + 1024);
    stream += "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_019Q1hrJbZG26Fb9BQhrkHEr\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude-sonnet-4-20250514\",\"content\":[],\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":377,\"cache_creation_input_tokens\":0,\"cache_read_input_tokens\":0,\"output_tokens\":1,\"service_tier\":\"standard\"}}}\n\n";
    stream += "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n";
    stream += "event: ping\ndata: {\"type\": \"ping\"}\n\n";
    let mut words = 0;
    while stream.len() < TARGET {
        let text: String = (0..3).map(|i| WORDS[(words + i) % WORDS.len()]).collect();
        stream += &format!("event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{{\"type\":\"text_delta\",\"text\":\"{text}\"}}}}\n\n");
        words += 3;
    }
    stream += "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n";
    stream += &format!("event: message_delta\ndata: {{\"type\":\"message_delta\",\"delta\":{{\"stop_reason\":\"end_turn\",\"stop_sequence\":null}},\"usage\":{{\"output_tokens\":{words}}}}}\n\n");
    stream += "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
    stream.into_bytes()
}

/// The naive baseline: the number of `\n\n` in `bytes`, found with
/// memchr's SIMD substring search. No parser can find event boundaries
/// faster than this.
fn baseline_count_blank_lines(bytes: &[u8]) -> usize {
    memmem::find_iter(bytes, b"\n\n").count()
}

fn event() -> UsageEvent {
    UsageEvent {
        id: uuid::Uuid::now_v7(),
        client_request_id: None,
        ts: time::OffsetDateTime::UNIX_EPOCH,
        customer_id: CustomerId::new(),
        key_id: KeyId::new(),
        instance: "gw-1".to_owned(),
        route: "chat".to_owned(),
        method: "POST".to_owned(),
        path: "/v1/chat/completions".to_owned(),
        status: 200,
        outcome: Outcome::Ok,
        latency_us: 0,
        upstream_latency_us: 0,
        request_bytes: 0,
        response_bytes: 0,
        model: None,
        input_tokens: 0,
        output_tokens: 0,
        cache_read_tokens: 0,
        cache_write_tokens: 0,
        cost_nanos: 0,
        cost_source: CostSource::None,
    }
}

/// Passes the pieces through a response's usage; returns the bytes the
/// client gets and the output tokens found.
fn read(format: UsageFormat, hide_usage_chunk: bool, pieces: &[Bytes]) -> (usize, u64) {
    let body = ResponseBody::EventStream { hide_usage_chunk };
    let mut usage = ResponseUsage::new(format, body, UsageHeaders::default());
    let mut passed = 0;
    for piece in pieces {
        passed += usage.pass(piece.clone()).len();
    }
    passed += usage.held_back().len();
    let mut event = event();
    usage.fill(&mut event, &Pricing::default());
    (passed, event.output_tokens)
}

fn bench_stream(c: &mut Criterion, name: &str, format: UsageFormat, stream: &[u8], filter: bool) {
    let pieces: Vec<Bytes> = stream.chunks(PIECE).map(Bytes::copy_from_slice).collect();
    let whole = [Bytes::copy_from_slice(stream)];
    // The usage must have been found, or the numbers mean nothing.
    let (passed, output) = read(format, false, &pieces);
    assert!(output > 1000 && passed == stream.len());
    assert_eq!(read(format, false, &whole), (passed, output));

    let mut group = c.benchmark_group(name);
    group.throughput(Throughput::Bytes(stream.len() as u64));
    group.bench_function("baseline_memchr_blank_lines", |b| {
        b.iter(|| {
            pieces
                .iter()
                .map(|piece| baseline_count_blank_lines(black_box(piece)))
                .sum::<usize>()
        })
    });
    group.bench_function("scanner_4k_pieces", |b| {
        b.iter(|| read(format, false, black_box(&pieces)))
    });
    group.bench_function("scanner_one_piece", |b| {
        b.iter(|| read(format, false, black_box(&whole)))
    });
    if filter {
        let (filtered, output) = read(format, true, &pieces);
        assert!(output > 1000);
        assert!(
            filtered < stream.len() - 40_000,
            "the filter must cut usage:null"
        );
        group.bench_function("scanner_and_filter_4k_pieces", |b| {
            b.iter(|| read(format, true, black_box(&pieces)))
        });
    }
    group.finish();
}

fn benches(c: &mut Criterion) {
    bench_stream(
        c,
        "openai_chat_sse",
        UsageFormat::Openai,
        &openai_stream(),
        true,
    );
    bench_stream(
        c,
        "anthropic_sse",
        UsageFormat::Anthropic,
        &anthropic_stream(),
        false,
    );
}

criterion_group!(sse_scan, benches);
criterion_main!(sse_scan);
