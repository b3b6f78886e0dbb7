//! Arbitrary input to every parser this crate owns that reads what a client
//! or an upstream sent: none may panic, and each keeps a property that
//! shows it parsed rather than merely survived. One `proptest!` block per
//! parser:
//!
//! - `arbitrary_input_usage_scanner`: the SSE reader and the JSON usage
//!   walker (`usage::extract::UsageScanner`): any split gives the unsplit
//!   result;
//! - `arbitrary_input_usage_chunk_filter`: the stream filter that removes
//!   the injected usage chunk: any split gives the same bytes out;
//! - `arbitrary_input_include_usage`: the request rewrite: whatever it
//!   returns is JSON asking for usage, with the client's fields kept, and
//!   nothing it lets through unchanged reads as a stream without usage;
//! - `arbitrary_input_cost_header`: `x-cost-usd` (`usage::cost`): accepts
//!   exactly the decimal amounts in range, exactly, and round-trips.

#![allow(clippy::unwrap_used)] // tests may unwrap (STYLE.md)

use crate::usage::cost::{format_usd, parse_usd_to_nanos, CostError};
use crate::usage::extract::{
    inject_include_usage, Extracted, UsageChunkFilter, UsageFormat, UsageScanner,
};
use proptest::prelude::*;
use serde_json::Value;

/// Pieces that make the scanners take their interesting paths (events,
/// usage objects, escapes, numbers at their limits) mixed with raw bytes.
fn fragment() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(b"data: ".to_vec()),
        Just(b"data:".to_vec()),
        Just(b"event: message_delta\n".to_vec()),
        Just(b"\n\n".to_vec()),
        Just(b"\r\n".to_vec()),
        Just(b"\r".to_vec()),
        Just(b": comment\n".to_vec()),
        Just(b"[DONE]".to_vec()),
        Just(br#"{"usage":{"prompt_tokens":"#.to_vec()),
        Just(
            br#"{"type":"message_start","message":{"model":"m","usage":{"input_tokens":"#.to_vec()
        ),
        Just(br#"{"type":"message_delta","usage":{"output_tokens":"#.to_vec()),
        Just(br#"{"type":"response.completed","response":{"usage":{"input_tokens":"#.to_vec()),
        Just(br#","completion_tokens":"#.to_vec()),
        Just(br#","prompt_tokens_details":{"cached_tokens":"#.to_vec()),
        Just(br#","model":"gpt-4o""#.to_vec()),
        Just(b"18446744073709551615".to_vec()),
        Just(b"18446744073709551616".to_vec()),
        Just(b"1e400".to_vec()),
        Just(b"-1".to_vec()),
        Just(b"12".to_vec()),
        Just(b"}}".to_vec()),
        Just(b"}".to_vec()),
        Just(b"]".to_vec()),
        Just(br#""\"\\u00e9""#.to_vec()),
        proptest::collection::vec(any::<u8>(), 0..8),
    ]
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(fragment(), 0..24).prop_map(|pieces| pieces.concat())
}

/// Cut points as indexes into the body (taken modulo its length + 1).
fn cuts() -> impl Strategy<Value = Vec<usize>> {
    proptest::collection::vec(any::<usize>(), 0..12)
}

fn pieces<'a>(body: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (body.len() + 1)).collect();
    points.push(0);
    points.push(body.len());
    points.sort_unstable();
    points.windows(2).map(|w| &body[w[0]..w[1]]).collect()
}

fn scan(format: UsageFormat, event_stream: bool, pieces: &[&[u8]]) -> Extracted {
    let mut scanner = UsageScanner::new(format, event_stream);
    for piece in pieces {
        scanner.feed(piece);
    }
    scanner.finish()
}

fn filter(pieces: &[&[u8]]) -> Vec<u8> {
    let mut filter = UsageChunkFilter::new();
    let mut out = Vec::new();
    for piece in pieces {
        out.extend(filter.feed(piece));
    }
    out.extend(filter.finish());
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_input_usage_scanner_is_independent_of_the_split(body in body(), cuts in cuts()) {
        let split = pieces(&body, &cuts);
        let bytes: Vec<&[u8]> = body.chunks(1).collect();
        for format in [UsageFormat::Openai, UsageFormat::Anthropic, UsageFormat::None] {
            for event_stream in [false, true] {
                let whole = scan(format, event_stream, &[&body]);
                prop_assert_eq!(&scan(format, event_stream, &split), &whole);
                prop_assert_eq!(&scan(format, event_stream, &bytes), &whole);
                if format == UsageFormat::None {
                    prop_assert_eq!(&whole, &Extracted::default());
                }
            }
        }
    }

    #[test]
    fn arbitrary_input_usage_scanner_raw_bytes(
        body in proptest::collection::vec(any::<u8>(), 0..512),
        cuts in cuts(),
    ) {
        let split = pieces(&body, &cuts);
        for format in [UsageFormat::Openai, UsageFormat::Anthropic] {
            for event_stream in [false, true] {
                prop_assert_eq!(
                    scan(format, event_stream, &split),
                    scan(format, event_stream, &[&body])
                );
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_input_usage_chunk_filter_is_independent_of_the_split(body in body(), cuts in cuts()) {
        let whole = filter(&[&body]);
        prop_assert_eq!(filter(&pieces(&body, &cuts)), whole.clone());
        let bytes: Vec<&[u8]> = body.chunks(1).collect();
        prop_assert_eq!(filter(&bytes), whole.clone());
        // The filter only ever removes: it never adds a byte.
        prop_assert!(whole.len() <= body.len());
    }
}

/// Request bodies around the shapes the rewrite cares about.
fn request_body() -> impl Strategy<Value = Vec<u8>> {
    let field = prop_oneof![
        Just(r#""stream":true"#.to_owned()),
        Just(r#""stream":false"#.to_owned()),
        Just(r#""stream_options":null"#.to_owned()),
        Just(r#""stream_options":{}"#.to_owned()),
        Just(r#""stream_options":{"include_usage":false}"#.to_owned()),
        Just(r#""stream_options":{"include_usage":true}"#.to_owned()),
        Just(r#""stream_options":[]"#.to_owned()),
        Just(r#""stream":"true""#.to_owned()),
        Just(r#""stream":1"#.to_owned()),
        Just(r#""str\u0065am":true"#.to_owned()),
        Just(r#""stream_\u006fptions":{"include_usage":false}"#.to_owned()),
        Just(r#""stream_options":{"include_usage":false,"include_usage":false}"#.to_owned()),
        Just(r#""model":"gpt-4o""#.to_owned()),
        Just(r#""messages":[{"role":"user","content":"hi \"there\""}]"#.to_owned()),
        "[ -~]{0,12}",
    ];
    (
        proptest::collection::vec(field, 0..6),
        "[ \t\r\n]{0,2}",
        proptest::collection::vec(any::<u8>(), 0..3),
    )
        .prop_map(|(fields, space, tail)| {
            let mut body = format!("{space}{{{}}}", fields.join(",")).into_bytes();
            if tail.first().is_some_and(|b| b % 4 == 0) {
                body.extend(tail);
            }
            body
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_input_include_usage_rewrite_asks_for_usage_and_keeps_the_rest(
        body in prop_oneof![request_body(), proptest::collection::vec(any::<u8>(), 0..64)],
    ) {
        let rewritten = match inject_include_usage(&body) {
            // Refused: nothing is forwarded.
            Err(_) => return Ok(()),
            // Forwarded as it is: no JSON reader may take it for a stream
            // that does not ask for usage. serde_json's `Value` keeps the
            // last of duplicate keys, as Python's and JavaScript's readers do.
            Ok(None) => {
                if let Ok(Value::Object(read)) = serde_json::from_slice::<Value>(&body) {
                    let stream = read.get("stream");
                    prop_assert!(
                        matches!(stream, None | Some(Value::Null | Value::Bool(_))),
                        "a stream that is not a boolean is refused: {}",
                        String::from_utf8_lossy(&body)
                    );
                    let asks = read
                        .get("stream_options")
                        .and_then(|options| options.get("include_usage"))
                        == Some(&Value::Bool(true));
                    prop_assert!(
                        stream != Some(&Value::Bool(true)) || asks,
                        "an unmetered stream was let through: {}",
                        String::from_utf8_lossy(&body)
                    );
                }
                return Ok(());
            }
            Ok(Some(rewritten)) => rewritten,
        };
        let before: Value = serde_json::from_slice(&body).unwrap();
        let after: Value = serde_json::from_slice(&rewritten)
            .unwrap_or_else(|e| panic!("rewrite is not JSON ({e}): {}", String::from_utf8_lossy(&rewritten)));
        prop_assert_eq!(&before["stream"], &Value::Bool(true));
        prop_assert_eq!(&after["stream_options"]["include_usage"], &Value::Bool(true));
        let (Value::Object(mut before), Value::Object(mut after)) = (before, after) else {
            panic!("only objects are rewritten");
        };
        let options_before = before.remove("stream_options");
        let mut options_after = after.remove("stream_options");
        prop_assert_eq!(before, after, "fields other than stream_options are kept");
        if let (Some(Value::Object(before)), Some(Value::Object(after))) =
            (options_before, options_after.as_mut())
        {
            after.remove("include_usage");
            let mut before = before;
            before.remove("include_usage");
            prop_assert_eq!(&before, after, "other stream_options are kept");
        }
    }
}

/// The exponent-free amounts, read independently with wide integers:
/// `Some(nanos)` for `[+]digits[.digits]` (or `.digits`), rounded half up at
/// the ninth decimal; `None` for anything else. `nanos` may exceed `i64`.
fn reference_nanos(text: &str) -> Option<u128> {
    let text = text.trim();
    let text = text.strip_prefix('+').unwrap_or(text);
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if !digits(whole) || !digits(fraction) || (whole.is_empty() && fraction.is_empty()) {
        return None;
    }
    let whole: u128 = if whole.is_empty() {
        0
    } else {
        whole.parse().ok()?
    };
    let mut nanos = whole.checked_mul(1_000_000_000)?;
    for (place, digit) in fraction.bytes().take(9).enumerate() {
        nanos += u128::from(digit - b'0') * 10u128.pow(8 - place as u32);
    }
    if fraction.as_bytes().get(9).is_some_and(|d| *d >= b'5') {
        nanos += 1;
    }
    Some(nanos)
}

/// Cost texts: mostly decimal-looking, with signs, exponents, spaces and
/// stray characters mixed in.
fn cost_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[+]?[0-9]{0,22}([.][0-9]{0,14})?",
        "[ ]?[+-]?[0-9]{0,12}[.]?[0-9]{0,12}([eE][+-]?[0-9]{0,4})?[ ]?",
        "[0-9.eE+\\- a-zA-Z_]{0,16}",
        any::<String>(),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_input_cost_header_accepts_exactly_the_amounts_in_range(text in cost_text()) {
        let parsed = parse_usd_to_nanos(&text);
        match reference_nanos(&text) {
            Some(nanos) => match i64::try_from(nanos) {
                Ok(nanos) => prop_assert_eq!(parsed, Ok(nanos), "{:?}", text),
                Err(_) => prop_assert_eq!(parsed, Err(CostError::Overflow), "{:?}", text),
            },
            None => {
                let has_exponent = text.contains(['e', 'E']);
                if !has_exponent {
                    prop_assert!(parsed.is_err(), "{:?} accepted as {:?}", text, parsed);
                }
            }
        }
        if let Ok(nanos) = parsed {
            prop_assert!(nanos >= 0);
            // What was accepted reads back the same once formatted.
            prop_assert_eq!(parse_usd_to_nanos(&format_usd(nanos)), Ok(nanos));
        }
    }

    #[test]
    fn arbitrary_input_cost_header_exponents_scale(
        mantissa in "[0-9]{1,8}([.][0-9]{1,8})?",
        exponent in -12i32..12,
    ) {
        // `m e k` is `m` with the point moved k places: compare with the
        // same amount written out.
        let with_exponent = parse_usd_to_nanos(&format!("{mantissa}e{exponent}"));
        let (whole, fraction) = mantissa.split_once('.').unwrap_or((&mantissa, ""));
        let digits = format!("{whole}{fraction}");
        let point = whole.len() as i32 + exponent;
        let written = if point <= 0 {
            format!("0.{}{digits}", "0".repeat((-point) as usize))
        } else if point as usize >= digits.len() {
            format!("{digits}{}", "0".repeat(point as usize - digits.len()))
        } else {
            format!("{}.{}", &digits[..point as usize], &digits[point as usize..])
        };
        prop_assert_eq!(with_exponent, parse_usd_to_nanos(&written), "{} vs {}", mantissa, written);
    }

    #[test]
    fn arbitrary_input_cost_header_round_trips(nanos in 0i64..=i64::MAX) {
        let text = format_usd(nanos);
        prop_assert_eq!(parse_usd_to_nanos(&text), Ok(nanos));
        prop_assert_eq!(parse_usd_to_nanos(&format!(" +{text} ")), Ok(nanos));
        prop_assert_eq!(parse_usd_to_nanos(&format!("-{text}")), Err(CostError::Negative));
    }
}
