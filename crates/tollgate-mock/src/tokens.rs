//! The deterministic token rule and the generated completion text.
//!
//! Nothing here tokenizes for real: a "token" is a whitespace-separated word,
//! so a test can compute every usage number the mock reports from its own
//! request (see the crate docs for the full rule).

use serde_json::Value;

/// Completion chunks (words) per response when `x-mock-chunks` is absent.
pub(crate) const DEFAULT_CHUNKS: u64 = 3;

/// The words a completion is made of, used in order and then from the start again.
const WORDS: [&str; 8] = [
    "lorem",
    "ipsum",
    "dolor",
    "sit",
    "amet",
    "consectetur",
    "adipiscing",
    "elit",
];

/// Deterministic prompt token count of a request body: the number of
/// whitespace-separated words in all of its prompt text, at least 1.
///
/// Counted, wherever present (so one rule serves every endpoint):
///
/// - `messages[*].content` (Chat Completions, Anthropic Messages): a string, or
///   an array of content parts whose `text` strings are counted;
/// - `system` (Anthropic): a string, or an array of blocks with `text`;
/// - `instructions` (Responses): a string;
/// - `input` (Responses, Embeddings): a string, or an array whose elements are
///   strings, or items with a `content` (string or parts with `text`) or a
///   `text` of their own.
///
/// Anything else (tool definitions, images, token-id arrays, non-JSON bodies
/// passed as `Value::Null`) counts nothing, and the result is never below 1.
///
/// ```
/// let request = serde_json::json!({
///     "model": "gpt-4o-mini",
///     "messages": [
///         {"role": "system", "content": "Be brief."},
///         {"role": "user", "content": [{"type": "text", "text": "Hello there, mock"}]}
///     ]
/// });
/// assert_eq!(tollgate_mock::prompt_tokens(&request), 5);
/// assert_eq!(tollgate_mock::prompt_tokens(&serde_json::Value::Null), 1);
/// ```
pub fn prompt_tokens(request_json: &Value) -> u64 {
    let mut words = 0;
    if let Some(Value::Array(messages)) = request_json.get("messages") {
        words += messages
            .iter()
            .map(|message| content_words(message.get("content")))
            .sum::<u64>();
    }
    words += content_words(request_json.get("system"));
    words += content_words(request_json.get("instructions"));
    match request_json.get("input") {
        Some(Value::String(text)) => words += count_words(text),
        Some(Value::Array(items)) => {
            words += items
                .iter()
                .map(|item| match item {
                    Value::String(text) => count_words(text),
                    Value::Object(_) => {
                        content_words(item.get("content")) + content_words(item.get("text"))
                    }
                    _ => 0,
                })
                .sum::<u64>();
        }
        _ => {}
    }
    words.max(1)
}

/// Words in a `content`-like value: a string, or an array of strings and parts
/// with a `text` string.
fn content_words(content: Option<&Value>) -> u64 {
    match content {
        Some(Value::String(text)) => count_words(text),
        Some(Value::Array(parts)) => parts
            .iter()
            .map(|part| match part {
                Value::String(text) => count_words(text),
                Value::Object(_) => part
                    .get("text")
                    .and_then(Value::as_str)
                    .map_or(0, count_words),
                _ => 0,
            })
            .sum(),
        _ => 0,
    }
}

fn count_words(text: &str) -> u64 {
    // usize always fits in u64 on supported targets.
    u64::try_from(text.split_whitespace().count()).unwrap_or(u64::MAX)
}

/// Completion tokens (= streamed content chunks) for a request: the
/// `x-mock-chunks` value or [`DEFAULT_CHUNKS`], capped by the request's own
/// output limit when that is smaller.
pub(crate) fn completion_tokens(chunks: Option<u64>, request_cap: Option<u64>) -> u64 {
    let chunks = chunks.unwrap_or(DEFAULT_CHUNKS);
    request_cap.map_or(chunks, |cap| chunks.min(cap))
}

/// The first of `fields` in `request` that holds a whole number: the request's
/// own cap on output tokens (`max_tokens`, `max_output_tokens`, ...).
pub(crate) fn request_cap(request: &Value, fields: &[&str]) -> Option<u64> {
    fields
        .iter()
        .find_map(|field| request.get(*field).and_then(Value::as_u64))
}

/// Text of content chunk `index`: one word, preceded by a space after the first,
/// so that the chunks of a stream concatenate to exactly [`completion_text`].
pub(crate) fn chunk_text(index: u64) -> String {
    let word = word(index);
    if index == 0 {
        word.to_owned()
    } else {
        format!(" {word}")
    }
}

/// The whole completion of `chunks` words, as a non-streamed response carries it.
pub(crate) fn completion_text(chunks: u64) -> String {
    (0..chunks).map(chunk_text).collect()
}

fn word(index: u64) -> &'static str {
    // The modulo keeps the index below WORDS.len(), so both conversions are exact.
    let len = u64::try_from(WORDS.len()).unwrap_or(1);
    let at = usize::try_from(index % len).unwrap_or(0);
    WORDS.get(at).copied().unwrap_or("lorem")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn chat_messages_count_strings_and_parts() {
        let request = json!({"messages": [
            {"role": "system", "content": "You are  terse.\n"},
            {"role": "user", "content": [
                {"type": "text", "text": "one two"},
                {"type": "image_url", "image_url": {"url": "http://x/y z"}}
            ]},
            {"role": "assistant", "content": null}
        ]});
        assert_eq!(prompt_tokens(&request), 5);
    }

    #[test]
    fn anthropic_system_and_messages() {
        let request = json!({
            "system": [{"type": "text", "text": "be kind"}],
            "messages": [{"role": "user", "content": "hi there"}]
        });
        assert_eq!(prompt_tokens(&request), 4);
        let request = json!({"system": "a b c", "messages": []});
        assert_eq!(prompt_tokens(&request), 3);
    }

    #[test]
    fn responses_input_and_instructions() {
        assert_eq!(prompt_tokens(&json!({"input": "tell me a story"})), 4);
        let request = json!({
            "instructions": "be brief",
            "input": [
                {"role": "user", "content": "first message"},
                {"type": "message", "role": "user",
                 "content": [{"type": "input_text", "text": "second one here"}]},
                {"type": "input_text", "text": "loose"}
            ]
        });
        assert_eq!(prompt_tokens(&request), 8);
    }

    #[test]
    fn embeddings_input_strings() {
        assert_eq!(prompt_tokens(&json!({"input": ["a b", "c"]})), 3);
        // Token-id arrays count nothing, so the minimum applies.
        assert_eq!(prompt_tokens(&json!({"input": [[1, 2, 3]]})), 1);
    }

    #[test]
    fn minimum_is_one() {
        assert_eq!(prompt_tokens(&Value::Null), 1);
        assert_eq!(prompt_tokens(&json!({"messages": [{"content": "  "}]})), 1);
    }

    #[test]
    fn completion_tokens_default_override_and_cap() {
        assert_eq!(completion_tokens(None, None), DEFAULT_CHUNKS);
        assert_eq!(completion_tokens(Some(10), None), 10);
        assert_eq!(completion_tokens(Some(10), Some(4)), 4);
        assert_eq!(completion_tokens(Some(2), Some(4)), 2);
        assert_eq!(completion_tokens(None, Some(0)), 0);
    }

    #[test]
    fn request_cap_takes_first_present_field() {
        let request = json!({"max_tokens": 7, "max_completion_tokens": 5});
        assert_eq!(
            request_cap(&request, &["max_completion_tokens", "max_tokens"]),
            Some(5)
        );
        assert_eq!(request_cap(&request, &["max_output_tokens"]), None);
    }

    #[test]
    fn chunks_concatenate_to_the_completion_and_count_as_words() {
        for n in 0..20 {
            let joined: String = (0..n).map(chunk_text).collect();
            assert_eq!(joined, completion_text(n));
            assert_eq!(count_words(&joined), n);
        }
        assert_eq!(completion_text(3), "lorem ipsum dolor");
    }
}
