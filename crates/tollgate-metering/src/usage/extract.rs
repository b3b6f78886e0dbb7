//! Token usage and model, read from LLM API bodies while they stream.
//!
//! Three jobs, all on the data plane's hot path:
//! - [`UsageScanner`] watches a response body (a JSON document or a
//!   server-sent-event stream, cut at arbitrary byte boundaries) for the
//!   usage object and the model name, in OpenAI's (Chat Completions,
//!   Responses, Embeddings) or Anthropic's (Messages) shapes.
//! - [`inject_include_usage`] asks OpenAI for a usage chunk in a streamed
//!   chat completion (README, Data plane behaviour), or refuses a request
//!   body it cannot be sure of ([`UnmeterableRequest`]), and
//!   [`UsageChunkFilter`] takes what that added back out of the stream the
//!   client receives, byte for byte.
//!
//! All three rest on one small incremental JSON structure walker
//! (`JsonWalker`): it tracks string, escape and nesting state and reports
//! the byte spans of chosen members of the root object (and of one object
//! nested in it), so only the *top-level* `usage` counts: a `"usage"` inside
//! message content, a tool call's arguments or a nested object never fools
//! it. What the walker picks out is small and is parsed with serde_json.
//!
//! # Failure behaviour
//! Nothing here fails or panics on any input. Malformed JSON, events cut
//! short, unknown shapes and oversized values simply yield no usage (the row
//! then has zero tokens) or, in the filter, pass through unchanged. Memory
//! is bounded per response whatever its size: an SSE event's data is
//! buffered up to [`EVENT_BUFFER_LIMIT`] (larger ones are walked as they
//! stream), a captured value up to [`CAPTURE_LIMIT`]; a captured value
//! larger than that is ignored. The filter holds back at most the one
//! incomplete trailing event.
//!
//! Token counts are read as written and not judged here: a count that is
//! not a whole number (negative, fractional, text) is marked [`Unusable`]
//! rather than thrown away with the rest of the usage object, and how large
//! a count may be is decided once, where the usage sources are combined
//! ([`crate::usage::event::Reported`]).
//!
//! Known blind spot: a key spelled with JSON escapes (`"\u0075sage"`) is not
//! recognised. No upstream writes keys that way.

use std::borrow::Cow;
use std::fmt;
use std::sync::LazyLock;

use memchr::{memchr2, memmem};
use serde::de::{self, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;

/// An SSE event's data is buffered up to this size and then examined in one
/// go (with a cheap pre-check first); a larger event (say, a Responses API
/// `response.completed` repeating a long output) is walked incrementally
/// instead, so it is never held whole.
pub(crate) const EVENT_BUFFER_LIMIT: usize = 64 * 1024;
/// The largest `usage` or `model` value captured from a streamed document.
pub(crate) const CAPTURE_LIMIT: usize = 16 * 1024;
/// The longest model name accepted; a longer one is ignored.
pub(crate) const MODEL_LIMIT: usize = 256;
/// Watched keys are short; a longer key is not one of them.
const KEY_LIMIT: usize = 32;

/// Which body shapes a route's usage parser understands (`routes.usage`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum UsageFormat {
    #[default]
    None,
    Openai,
    Anthropic,
}

/// Tokens by class. `input` excludes cached input (README, Usage metering).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct TokenCounts {
    pub input: u64,
    pub output: u64,
    pub cache_read: u64,
    pub cache_write: u64,
}

/// Token classes whose count an upstream wrote but not as a whole number
/// (see [`Count`]); such a class reads as 0 in [`TokenCounts`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Unusable {
    pub input: bool,
    pub output: bool,
    pub cache_read: bool,
    pub cache_write: bool,
}

/// What a body told about its usage.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Extracted {
    /// `None` when no usage was seen (not even partial counts).
    pub tokens: Option<TokenCounts>,
    pub model: Option<String>,
    /// Classes of `tokens` the body had an unusable count for.
    pub unusable: Unusable,
}

/// One token count as an upstream wrote it (in a body or a header).
///
/// Anything but a whole number from 0 to `u64::MAX` (a negative or
/// fractional number, `5.0`, text, a number beyond `u64`) is `Unusable`:
/// it reads as absent, but is kept apart so that it can be counted, and so
/// that one bad count does not take the other counts of its usage object
/// down with it. A whole number may still be absurd; that is judged where
/// usage sources are combined, not by the parsers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Count {
    Whole(u64),
    Unusable,
}

impl Count {
    /// A count from header text (already trimmed).
    pub(crate) fn parse(text: &str) -> Count {
        text.parse().map_or(Count::Unusable, Count::Whole)
    }

    /// The count, or 0 when unusable.
    fn or_zero(self) -> u64 {
        match self {
            Count::Whole(count) => count,
            Count::Unusable => 0,
        }
    }

    fn is_unusable(count: Option<Count>) -> bool {
        count == Some(Count::Unusable)
    }
}

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Count, D::Error> {
        // Any JSON value is accepted (an `Option<Count>` still reads `null`
        // as absent): refusing it would refuse the whole usage object.
        deserializer.deserialize_any(CountVisitor)
    }
}

/// Reads a count straight from the parser, without building a `Value`:
/// a whole number from 0 to `u64::MAX` is a count; anything else (skipped
/// whole, if it is an array or an object) is unusable.
struct CountVisitor;

impl<'de> serde::de::Visitor<'de> for CountVisitor {
    type Value = Count;

    fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
        formatter.write_str("a token count")
    }

    fn visit_u64<E>(self, count: u64) -> Result<Count, E> {
        Ok(Count::Whole(count))
    }

    fn visit_i64<E>(self, count: i64) -> Result<Count, E> {
        Ok(u64::try_from(count).map_or(Count::Unusable, Count::Whole))
    }

    fn visit_f64<E>(self, _: f64) -> Result<Count, E> {
        Ok(Count::Unusable)
    }

    fn visit_bool<E>(self, _: bool) -> Result<Count, E> {
        Ok(Count::Unusable)
    }

    fn visit_str<E>(self, _: &str) -> Result<Count, E> {
        Ok(Count::Unusable)
    }

    fn visit_unit<E>(self) -> Result<Count, E> {
        Ok(Count::Unusable)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Count, A::Error> {
        while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
        Ok(Count::Unusable)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Count, A::Error> {
        while map
            .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
            .is_some()
        {}
        Ok(Count::Unusable)
    }
}

// ---------------------------------------------------------------------------
// The scanner.

/// Scans a response body as it streams, for usage.
///
/// Never buffers the whole body and never fails: malformed input just
/// yields no usage. The result does not depend on how the body was cut
/// into chunks.
///
/// What counts:
/// - JSON bodies: the root object's `usage` and `model` only. OpenAI:
///   `prompt_tokens`/`completion_tokens` (Chat, Embeddings) or
///   `input_tokens`/`output_tokens` (Responses), with the cached tokens in
///   `*_tokens_details.cached_tokens` moved from input to `cache_read`.
///   Anthropic: `input_tokens`, `output_tokens`, `cache_read_input_tokens`,
///   `cache_creation_input_tokens`.
/// - OpenAI streams: the last event whose root `usage` (a Chat chunk) or
///   `response.usage` (a Responses event) is an object.
/// - Anthropic streams: input and cache counts from `message_start`'s
///   `message.usage`; output is the cumulative `usage.output_tokens` of the
///   last `message_delta` (not a sum), else `message_start`'s.
/// - Model: the first one named, at the same places.
#[derive(Clone, Debug)]
pub(crate) struct UsageScanner {
    tally: Tally,
    mode: Mode,
}

#[derive(Clone, Debug)]
enum Mode {
    Off,
    Json(Box<JsonWalker>),
    Sse(Box<SseReader>),
}

impl UsageScanner {
    /// `event_stream`: the response is `text/event-stream` (SSE), else a
    /// JSON body.
    pub(crate) fn new(format: UsageFormat, event_stream: bool) -> UsageScanner {
        let mode = match (format, event_stream) {
            (UsageFormat::None, _) => Mode::Off,
            (_, false) => Mode::Json(Box::new(JsonWalker::new(&JSON_BODY, true))),
            (UsageFormat::Openai, true) => Mode::Sse(Box::new(SseReader::new(&OPENAI_EVENT))),
            (UsageFormat::Anthropic, true) => Mode::Sse(Box::new(SseReader::new(&ANTHROPIC_EVENT))),
        };
        UsageScanner {
            tally: Tally {
                format,
                event_stream,
                ..Tally::default()
            },
            mode,
        }
    }

    /// The next piece of the body; pieces may split it anywhere.
    pub(crate) fn feed(&mut self, chunk: &[u8]) {
        let tally = &mut self.tally;
        match &mut self.mode {
            Mode::Off => {}
            Mode::Json(walker) => walker.feed(chunk, report(tally)),
            Mode::Sse(reader) => reader.feed(chunk, tally),
        }
    }

    /// What was found so far: called at the end of the body, or early when
    /// the client went away (then partial counts, e.g. Anthropic input and
    /// the output of the last `message_delta` seen). A final event without
    /// its closing blank line, or a JSON body missing its closing brace,
    /// still counts if what it holds is complete.
    pub(crate) fn finish(&self) -> Extracted {
        match &self.mode {
            Mode::Off => self.tally.extracted(),
            Mode::Json(walker) => {
                let mut tally = self.tally.clone();
                walker.unfinished(|member, value| tally.apply(member.level, member.key, value));
                tally.extracted()
            }
            Mode::Sse(reader) if reader.has_data => {
                let mut tally = self.tally.clone();
                let mut reader = reader.clone();
                reader.dispatch(&mut tally);
                tally.extracted()
            }
            Mode::Sse(_) => self.tally.extracted(),
        }
    }
}

/// Which members a walk reports: keys of the root object, and keys of the
/// object that is the value of the root's `nested_in` member.
#[derive(Debug)]
struct Watch {
    top: &'static [&'static [u8]],
    nested_in: Option<&'static [u8]>,
    nested: &'static [&'static [u8]],
}

/// Index of `usage` and `model` in the scanner's watches.
const USAGE: usize = 0;
const MODEL: usize = 1;

static JSON_BODY: Watch = Watch {
    top: &[b"usage", b"model"],
    nested_in: None,
    nested: &[],
};
/// Chat chunks carry `usage` at the root; Responses events inside `response`.
static OPENAI_EVENT: Watch = Watch {
    top: &[b"usage", b"model"],
    nested_in: Some(b"response"),
    nested: &[b"usage", b"model"],
};
/// `message_delta` carries `usage` at the root; `message_start` inside `message`.
static ANTHROPIC_EVENT: Watch = Watch {
    top: &[b"usage", b"model"],
    nested_in: Some(b"message"),
    nested: &[b"usage", b"model"],
};

/// What the scanner has found, and how to read what it finds.
#[derive(Clone, Debug, Default)]
struct Tally {
    format: UsageFormat,
    event_stream: bool,
    model: Option<String>,
    tokens: Option<(TokenCounts, Unusable)>,
    /// Anthropic streams: the cumulative counts of the last `message_delta`.
    delta: Option<Delta>,
}

/// The counts a `message_delta` gives: always the output, the input and
/// cache counts too where server tools (web search, code execution) added
/// to them during the turn. Each is cumulative, so the last one stands.
#[derive(Clone, Copy, Debug, Default)]
struct Delta {
    input: Option<Count>,
    output: Option<Count>,
    cache_read: Option<Count>,
    cache_write: Option<Count>,
}

/// The fields of a usage object, from either vendor.
#[derive(Debug, Default)]
struct UsageJson {
    prompt_tokens: Option<Count>,
    completion_tokens: Option<Count>,
    prompt_tokens_details: Option<Details>,
    input_tokens: Option<Count>,
    output_tokens: Option<Count>,
    input_tokens_details: Option<Details>,
    cache_read_input_tokens: Option<Count>,
    cache_creation_input_tokens: Option<Count>,
}

impl UsageJson {
    /// OpenAI's Chat Completions shape (`prompt_tokens`, `completion_tokens`).
    fn is_openai_chat(&self) -> bool {
        self.prompt_tokens.is_some() || self.completion_tokens.is_some()
    }

    /// Anthropic's shape, told apart from OpenAI's Responses one (which
    /// also says `input_tokens`) by its cache counts.
    fn is_anthropic(&self) -> bool {
        self.cache_read_input_tokens.is_some() || self.cache_creation_input_tokens.is_some()
    }

    /// The count `key` names at the top of a usage object.
    fn count(&mut self, key: UsageKey) -> Option<&mut Option<Count>> {
        match key {
            UsageKey::PromptTokens => Some(&mut self.prompt_tokens),
            UsageKey::CompletionTokens => Some(&mut self.completion_tokens),
            UsageKey::InputTokens => Some(&mut self.input_tokens),
            UsageKey::OutputTokens => Some(&mut self.output_tokens),
            UsageKey::CacheReadInputTokens => Some(&mut self.cache_read_input_tokens),
            UsageKey::CacheCreationInputTokens => Some(&mut self.cache_creation_input_tokens),
            _ => None,
        }
    }
}

#[derive(Debug, Default)]
struct Details {
    cached_tokens: Option<Count>,
}

/// A key of a usage object (or of its `*_details`), read as bytes.
///
/// Derived field names would be read as `str`, and serde_json checks that
/// each is UTF-8: a quarter of reading a usage object, on every metered
/// response. Bytes skip the check; a key that is not UTF-8 is simply none
/// of these.
#[derive(Clone, Copy, PartialEq, Eq)]
enum UsageKey {
    PromptTokens,
    CompletionTokens,
    PromptTokensDetails,
    InputTokens,
    OutputTokens,
    InputTokensDetails,
    CacheReadInputTokens,
    CacheCreationInputTokens,
    CachedTokens,
    Other,
}

impl UsageKey {
    fn of(key: &[u8]) -> UsageKey {
        match key {
            b"prompt_tokens" => UsageKey::PromptTokens,
            b"completion_tokens" => UsageKey::CompletionTokens,
            b"prompt_tokens_details" => UsageKey::PromptTokensDetails,
            b"input_tokens" => UsageKey::InputTokens,
            b"output_tokens" => UsageKey::OutputTokens,
            b"input_tokens_details" => UsageKey::InputTokensDetails,
            b"cache_read_input_tokens" => UsageKey::CacheReadInputTokens,
            b"cache_creation_input_tokens" => UsageKey::CacheCreationInputTokens,
            b"cached_tokens" => UsageKey::CachedTokens,
            _ => UsageKey::Other,
        }
    }
}

impl<'de> Deserialize<'de> for UsageKey {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<UsageKey, D::Error> {
        struct KeyVisitor;

        impl serde::de::Visitor<'_> for KeyVisitor {
            type Value = UsageKey;

            fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
                formatter.write_str("a key")
            }

            fn visit_bytes<E>(self, key: &[u8]) -> Result<UsageKey, E> {
                Ok(UsageKey::of(key))
            }

            fn visit_str<E>(self, key: &str) -> Result<UsageKey, E> {
                Ok(UsageKey::of(key.as_bytes()))
            }
        }

        deserializer.deserialize_bytes(KeyVisitor)
    }
}

/// The next value, into `slot`; a key given twice refuses the whole
/// object, as a derived `Deserialize` would.
fn value_once<'de, A: serde::de::MapAccess<'de>, T: Deserialize<'de>>(
    map: &mut A,
    seen: &mut u16,
    key: UsageKey,
    slot: &mut Option<T>,
) -> Result<(), A::Error> {
    let bit = 1 << key as u16;
    if *seen & bit != 0 {
        return Err(serde::de::Error::custom("a key given twice"));
    }
    *seen |= bit;
    *slot = map.next_value()?;
    Ok(())
}

impl<'de> Deserialize<'de> for UsageJson {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<UsageJson, D::Error> {
        struct UsageVisitor;

        impl<'de> serde::de::Visitor<'de> for UsageVisitor {
            type Value = UsageJson;

            fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
                formatter.write_str("a usage object")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<UsageJson, A::Error> {
                let mut usage = UsageJson::default();
                let mut seen = 0;
                while let Some(key) = map.next_key::<UsageKey>()? {
                    let seen = &mut seen;
                    match key {
                        UsageKey::PromptTokensDetails => {
                            value_once(&mut map, seen, key, &mut usage.prompt_tokens_details)?;
                        }
                        UsageKey::InputTokensDetails => {
                            value_once(&mut map, seen, key, &mut usage.input_tokens_details)?;
                        }
                        _ => match usage.count(key) {
                            Some(count) => value_once(&mut map, seen, key, count)?,
                            None => {
                                map.next_value::<serde::de::IgnoredAny>()?;
                            }
                        },
                    }
                }
                Ok(usage)
            }
        }

        deserializer.deserialize_map(UsageVisitor)
    }
}

impl<'de> Deserialize<'de> for Details {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Details, D::Error> {
        struct DetailsVisitor;

        impl<'de> serde::de::Visitor<'de> for DetailsVisitor {
            type Value = Details;

            fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
                formatter.write_str("a details object")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Details, A::Error> {
                let mut details = Details::default();
                let mut seen = 0;
                while let Some(key) = map.next_key::<UsageKey>()? {
                    if key == UsageKey::CachedTokens {
                        value_once(&mut map, &mut seen, key, &mut details.cached_tokens)?;
                    } else {
                        map.next_value::<serde::de::IgnoredAny>()?;
                    }
                }
                Ok(details)
            }
        }

        deserializer.deserialize_map(DetailsVisitor)
    }
}

impl Tally {
    /// One reported member: `value` is its JSON text.
    fn apply(&mut self, level: Level, key: usize, value: &[u8]) {
        match key {
            MODEL if self.model.is_none() => {
                if let Ok(model) = serde_json::from_slice::<String>(value) {
                    // Names with control characters are not names: they
                    // would reach terminals and spreadsheets as they are.
                    if !model.is_empty()
                        && model.len() <= MODEL_LIMIT
                        && !model.chars().any(char::is_control)
                    {
                        self.model = Some(model);
                    }
                }
            }
            USAGE => {
                // `null` (every chunk but the last of an include_usage
                // stream) and anything malformed read as no usage.
                let Ok(Some(usage)) = serde_json::from_slice::<Option<UsageJson>>(value) else {
                    return;
                };
                match self.format {
                    UsageFormat::None => {}
                    // Anthropic serves OpenAI's API too (`/v1/chat/completions`),
                    // in OpenAI's shape: read as such, or its tokens are lost.
                    UsageFormat::Openai | UsageFormat::Anthropic if usage.is_openai_chat() => {
                        if let Some(tokens) = openai_tokens(&usage) {
                            self.tokens = Some(tokens);
                        }
                    }
                    // And an upstream that serves Anthropic's API on an
                    // OpenAI route: its cache counts are its own fields.
                    UsageFormat::Openai if usage.is_anthropic() && !self.event_stream => {
                        if let Some(tokens) = anthropic_tokens(&usage) {
                            self.tokens = Some(tokens);
                        }
                    }
                    UsageFormat::Openai => {
                        if let Some(tokens) = openai_tokens(&usage) {
                            self.tokens = Some(tokens);
                        }
                    }
                    UsageFormat::Anthropic if self.event_stream && level == Level::Top => {
                        // message_delta.
                        let counts = [
                            usage.input_tokens,
                            usage.output_tokens,
                            usage.cache_read_input_tokens,
                            usage.cache_creation_input_tokens,
                        ];
                        if counts.iter().any(Option::is_some) {
                            let delta = self.delta.get_or_insert_with(Delta::default);
                            let seen = [
                                &mut delta.input,
                                &mut delta.output,
                                &mut delta.cache_read,
                                &mut delta.cache_write,
                            ];
                            for (seen, count) in seen.into_iter().zip(counts) {
                                if count.is_some() {
                                    *seen = count;
                                }
                            }
                        }
                    }
                    UsageFormat::Anthropic => {
                        if let Some(tokens) = anthropic_tokens(&usage) {
                            self.tokens = Some(tokens);
                        }
                    }
                }
            }
            _ => {}
        }
    }

    fn extracted(&self) -> Extracted {
        let mut found = self.tokens;
        if let Some(delta) = self.delta {
            // Over `message_start`'s counts, which it may leave out.
            let (tokens, unusable) = found.get_or_insert_with(Default::default);
            for (count, total, bad) in [
                (delta.input, &mut tokens.input, &mut unusable.input),
                (delta.output, &mut tokens.output, &mut unusable.output),
                (
                    delta.cache_read,
                    &mut tokens.cache_read,
                    &mut unusable.cache_read,
                ),
                (
                    delta.cache_write,
                    &mut tokens.cache_write,
                    &mut unusable.cache_write,
                ),
            ] {
                if let Some(count) = count {
                    *total = count.or_zero();
                    *bad = count == Count::Unusable;
                }
            }
        }
        let (tokens, unusable) = match found {
            Some((tokens, unusable)) => (Some(tokens), unusable),
            None => (None, Unusable::default()),
        };
        Extracted {
            tokens,
            model: self.model.clone(),
            unusable,
        }
    }
}

/// OpenAI reports cached prompt tokens inside the prompt count; the row's
/// `input_tokens` excludes them. An unusable cached count is taken as no
/// cached tokens (the whole prompt is input); an unusable prompt count
/// leaves the input unknown.
fn openai_tokens(usage: &UsageJson) -> Option<(TokenCounts, Unusable)> {
    let cached = |details: &Option<Details>| details.as_ref().and_then(|d| d.cached_tokens);
    let (prompt, output, cached) =
        if usage.prompt_tokens.is_some() || usage.completion_tokens.is_some() {
            (
                usage.prompt_tokens,
                usage.completion_tokens,
                cached(&usage.prompt_tokens_details),
            )
        } else if usage.input_tokens.is_some() || usage.output_tokens.is_some() {
            (
                usage.input_tokens,
                usage.output_tokens,
                cached(&usage.input_tokens_details),
            )
        } else {
            return None;
        };
    let read = |count: Option<Count>| count.map_or(0, Count::or_zero);
    let tokens = TokenCounts {
        input: read(prompt).saturating_sub(read(cached)),
        output: read(output),
        cache_read: read(cached),
        cache_write: 0,
    };
    let unusable = Unusable {
        input: Count::is_unusable(prompt),
        output: Count::is_unusable(output),
        cache_read: Count::is_unusable(cached),
        cache_write: false,
    };
    Some((tokens, unusable))
}

/// Anthropic's `input_tokens` already excludes the cache counts.
fn anthropic_tokens(usage: &UsageJson) -> Option<(TokenCounts, Unusable)> {
    let counts = [
        usage.input_tokens,
        usage.output_tokens,
        usage.cache_read_input_tokens,
        usage.cache_creation_input_tokens,
    ];
    if counts.iter().all(Option::is_none) {
        return None;
    }
    let [input, output, cache_read, cache_write] =
        counts.map(|count| count.map_or(0, Count::or_zero));
    let [input_unusable, output_unusable, cache_read_unusable, cache_write_unusable] =
        counts.map(Count::is_unusable);
    Some((
        TokenCounts {
            input,
            output,
            cache_read,
            cache_write,
        },
        Unusable {
            input: input_unusable,
            output: output_unusable,
            cache_read: cache_read_unusable,
            cache_write: cache_write_unusable,
        },
    ))
}

// ---------------------------------------------------------------------------
// Server-sent events.

/// Where the reader is within the current line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Line {
    /// `n` bytes into a line that so far spells the start of `data` (0: at
    /// the start of a line).
    Field(u8),
    /// Just after `data:`; one leading space is dropped.
    DataStart,
    /// In a `data` field's value.
    Data,
    /// In a line that is not a `data` field (`event:`, `id:`, comments…).
    Skip,
}

/// An SSE parser (WHATWG rules: `\n`, `\r\n` or `\r` line ends, `data`
/// lines joined with `\n`, `:` comments) that keeps only each event's data
/// and hands it to the walker. Event names are not needed: the data says
/// what it is.
#[derive(Clone, Debug)]
struct SseReader {
    watch: &'static Watch,
    line: Line,
    /// The previous byte was a `\r`: a `\n` right after it ends no new line.
    after_cr: bool,
    /// The current event's data, while it fits in [`EVENT_BUFFER_LIMIT`].
    data: Vec<u8>,
    /// The current event has a `data` field.
    has_data: bool,
    /// The current event's data outgrew the buffer: it is walked as it comes.
    large: Option<JsonWalker>,
}

/// `"usage"` and `"model"` as JSON strings: inside a JSON string their
/// quotes would be escaped, so these only match real tokens.
static USAGE_KEY: LazyLock<memmem::Finder<'static>> =
    LazyLock::new(|| memmem::Finder::new(b"\"usage\""));
static MODEL_KEY: LazyLock<memmem::Finder<'static>> =
    LazyLock::new(|| memmem::Finder::new(b"\"model\""));

impl SseReader {
    fn new(watch: &'static Watch) -> SseReader {
        SseReader {
            watch,
            line: Line::Field(0),
            after_cr: false,
            data: Vec::new(),
            has_data: false,
            large: None,
        }
    }

    fn feed(&mut self, chunk: &[u8], tally: &mut Tally) {
        let mut at = 0;
        if self.after_cr && !chunk.is_empty() {
            self.after_cr = false;
            if chunk[0] == b'\n' {
                at = 1;
            }
        }
        while at < chunk.len() {
            match self.line {
                Line::Data | Line::Skip => {
                    let rest = &chunk[at..];
                    let Some(end) = memchr2(b'\n', b'\r', rest) else {
                        if self.line == Line::Data {
                            self.push_data(rest, tally);
                        }
                        return;
                    };
                    if self.line == Line::Data {
                        self.push_data(&rest[..end], tally);
                        self.push_data(b"\n", tally);
                    }
                    at = self.end_line(chunk, at + end);
                }
                Line::DataStart => {
                    if chunk[at] == b' ' {
                        at += 1;
                    }
                    self.line = Line::Data;
                }
                Line::Field(n) => {
                    let byte = chunk[at];
                    if byte == b'\n' || byte == b'\r' {
                        match n {
                            0 => self.dispatch(tally),
                            // A bare `data` line: an empty value.
                            4 => {
                                self.has_data = true;
                                self.push_data(b"\n", tally);
                            }
                            _ => {}
                        }
                        at = self.end_line(chunk, at);
                    } else {
                        self.line = match (n, byte) {
                            (0..=3, _) if byte == b"data"[usize::from(n)] => Line::Field(n + 1),
                            (4, b':') => {
                                self.has_data = true;
                                Line::DataStart
                            }
                            _ => Line::Skip,
                        };
                        at += 1;
                    }
                }
            }
        }
    }

    /// Consumes the line end at `chunk[at]` (`\r` or `\n`); returns where the
    /// next line starts.
    fn end_line(&mut self, chunk: &[u8], at: usize) -> usize {
        self.line = Line::Field(0);
        if chunk[at] == b'\r' {
            match chunk.get(at + 1) {
                Some(b'\n') => return at + 2,
                Some(_) => {}
                None => self.after_cr = true,
            }
        }
        at + 1
    }

    fn push_data(&mut self, bytes: &[u8], tally: &mut Tally) {
        if let Some(walker) = &mut self.large {
            walker.feed(bytes, report(tally));
        } else if self.data.len() + bytes.len() > EVENT_BUFFER_LIMIT {
            let mut walker = JsonWalker::new(self.watch, true);
            walker.feed(&self.data, report(tally));
            walker.feed(bytes, report(tally));
            self.data.clear();
            self.large = Some(walker);
        } else {
            self.data.extend_from_slice(bytes);
        }
    }

    /// The end of an event: read its data, if it may say anything new.
    fn dispatch(&mut self, tally: &mut Tally) {
        if !self.has_data {
            return;
        }
        self.has_data = false;
        if self.large.take().is_some() {
            // Already walked (and reported) as it streamed.
            return;
        }
        let data = &self.data;
        // Most events carry neither a usage object nor a model still to
        // learn; a memchr-speed search says so without parsing them.
        if has_usage_object(data) || (tally.model.is_none() && MODEL_KEY.find(data).is_some()) {
            JsonWalker::new(self.watch, false).feed(data, |member, _| {
                tally.apply(
                    member.level,
                    member.key,
                    &data[member.value_start..member.value_end],
                );
            });
        }
        self.data.clear();
    }
}

/// Hands each captured member a walker reports to the tally.
fn report(tally: &mut Tally) -> impl FnMut(Member, Option<&[u8]>) + '_ {
    move |member, captured| {
        if let Some(value) = captured {
            tally.apply(member.level, member.key, value);
        }
    }
}

/// Whether `data` has `"usage"` followed by `:` and an object: the one
/// shape that may carry counts (`"usage":null` does not).
fn has_usage_object(data: &[u8]) -> bool {
    USAGE_KEY.find_iter(data).any(|at| {
        let rest = skip_space(&data[at + b"\"usage\"".len()..]);
        match rest.split_first() {
            Some((b':', rest)) => skip_space(rest).first() == Some(&b'{'),
            _ => false,
        }
    })
}

fn is_space(byte: u8) -> bool {
    matches!(byte, b' ' | b'\t' | b'\n' | b'\r')
}

fn skip_space(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|&b| !is_space(b))
        .unwrap_or(bytes.len());
    &bytes[start..]
}

fn trim_space(bytes: &[u8]) -> &[u8] {
    let bytes = skip_space(bytes);
    let end = bytes
        .iter()
        .rposition(|&b| !is_space(b))
        .map_or(0, |end| end + 1);
    &bytes[..end]
}

// ---------------------------------------------------------------------------
// The JSON structure walker.

/// Where a reported member sits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Level {
    /// In the root object.
    Top = 0,
    /// In the object that is the value of the root's `nested_in` member.
    Nested = 1,
}

impl Level {
    fn depth(self) -> u32 {
        self as u32 + 1
    }
}

/// A watched member, reported once its value has ended (at the `,` or `}`
/// after it). Offsets count from the start of the document.
#[derive(Clone, Copy, Debug)]
struct Member {
    level: Level,
    /// Index of the key in the watch's list for its level.
    key: usize,
    /// The key's opening quote.
    key_start: usize,
    /// Just after the `:`; the value may have whitespace around it.
    value_start: usize,
    /// The `,` or `}` that ends the member.
    value_end: usize,
}

#[derive(Clone, Copy, Debug)]
struct KeyRead {
    level: Level,
    start: usize,
    len: usize,
    buf: [u8; KEY_LIMIT],
    /// Too long or escaped: not a watched key.
    bad: bool,
}

impl KeyRead {
    fn push(&mut self, bytes: &[u8]) {
        if self.bad {
            return;
        }
        match self.buf.get_mut(self.len..self.len + bytes.len()) {
            Some(slot) => {
                slot.copy_from_slice(bytes);
                self.len += bytes.len();
            }
            None => self.bad = true,
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Active {
    key: usize,
    key_start: usize,
    value_start: usize,
}

/// An incremental JSON structure tracker.
///
/// It does not validate: it follows strings (with escapes), nesting and
/// the key/value rhythm of objects, which is all it takes to know which
/// bytes are the values of the watched members. Feed it a document in any
/// number of pieces; with `capture`, it copies the watched values (at most
/// [`CAPTURE_LIMIT`] each) so they can be read after the pieces are gone.
/// Invalid JSON yields spans that fail to parse, nothing worse.
#[derive(Clone, Debug)]
struct JsonWalker {
    watch: &'static Watch,
    capture: bool,
    /// Offset of the next byte.
    pos: usize,
    depth: u32,
    /// Bit `d - 1` is set when the container at depth `d` (≤ 64) is an
    /// array. Deeper containers are never watched.
    arrays: u64,
    in_string: bool,
    escape: bool,
    /// The next string at this depth is an object key.
    expect_key: bool,
    key: Option<KeyRead>,
    /// A watched key was just read; its value starts after the `:`.
    target: Option<(Level, usize, usize)>,
    /// The current root member is `watch.nested_in`.
    in_nested: bool,
    active: [Option<Active>; 2],
    captured: [Vec<u8>; 2],
    overflowed: [bool; 2],
}

impl JsonWalker {
    fn new(watch: &'static Watch, capture: bool) -> JsonWalker {
        JsonWalker {
            watch,
            capture,
            pos: 0,
            depth: 0,
            arrays: 0,
            in_string: false,
            escape: false,
            expect_key: false,
            key: None,
            target: None,
            in_nested: false,
            active: [None, None],
            captured: [Vec::new(), Vec::new()],
            overflowed: [false, false],
        }
    }

    fn is_array(&self, depth: u32) -> bool {
        (1..=64).contains(&depth) && self.arrays & (1 << (depth - 1)) != 0
    }

    /// Walks the next piece; `on_member` gets each watched member as it
    /// ends, with its captured value (`None` without `capture`, or when the
    /// value was too large).
    fn feed(&mut self, bytes: &[u8], mut on_member: impl FnMut(Member, Option<&[u8]>)) {
        // Where, in `bytes`, each active member's not yet captured bytes start.
        let mut capture_from = [0usize; 2];
        let mut at = 0;
        while at < bytes.len() {
            if self.in_string {
                if self.escape {
                    self.escape = false;
                    at += 1;
                    continue;
                }
                // Strings are most of an LLM body: skip them at memchr speed.
                let rest = &bytes[at..];
                let Some(stop) = memchr2(b'"', b'\\', rest) else {
                    if let Some(key) = &mut self.key {
                        key.push(rest);
                    }
                    break;
                };
                if let Some(key) = &mut self.key {
                    key.push(&rest[..stop]);
                }
                if rest[stop] == b'\\' {
                    self.escape = true;
                    if let Some(key) = &mut self.key {
                        key.bad = true;
                    }
                } else {
                    self.in_string = false;
                    if let Some(key) = self.key.take() {
                        self.end_key(key);
                    }
                }
                at += stop + 1;
                continue;
            }
            match bytes[at] {
                b'"' => {
                    self.target = None;
                    self.in_string = true;
                    if self.expect_key {
                        self.expect_key = false;
                        self.begin_key(self.pos + at);
                    }
                }
                open @ (b'{' | b'[') => {
                    self.target = None;
                    self.depth = self.depth.saturating_add(1);
                    if (1..=64).contains(&self.depth) {
                        let bit = 1u64 << (self.depth - 1);
                        if open == b'[' {
                            self.arrays |= bit;
                        } else {
                            self.arrays &= !bit;
                        }
                    }
                    self.expect_key = open == b'{';
                }
                b'}' | b']' => {
                    self.target = None;
                    self.end_member(bytes, at, &capture_from, &mut on_member);
                    self.depth = self.depth.saturating_sub(1);
                    self.expect_key = false;
                }
                b',' => {
                    self.target = None;
                    self.end_member(bytes, at, &capture_from, &mut on_member);
                    self.expect_key = self.depth > 0 && !self.is_array(self.depth);
                }
                b':' => {
                    if let Some((level, key, key_start)) = self.target.take() {
                        if self.depth == level.depth() {
                            let slot = level as usize;
                            self.active[slot] = Some(Active {
                                key,
                                key_start,
                                value_start: self.pos + at + 1,
                            });
                            capture_from[slot] = at + 1;
                            self.captured[slot].clear();
                            self.overflowed[slot] = false;
                        }
                    }
                }
                _ => {}
            }
            at += 1;
        }
        if self.capture {
            for slot in 0..2 {
                if self.active[slot].is_some() {
                    self.keep(slot, &bytes[capture_from[slot].min(bytes.len())..]);
                }
            }
        }
        self.pos += bytes.len();
    }

    fn begin_key(&mut self, start: usize) {
        let level = if self.depth == 1 && !self.is_array(1) {
            self.in_nested = false;
            Level::Top
        } else if self.depth == 2 && self.in_nested && !self.is_array(2) {
            Level::Nested
        } else {
            return;
        };
        self.key = Some(KeyRead {
            level,
            start,
            len: 0,
            buf: [0; KEY_LIMIT],
            bad: false,
        });
    }

    fn end_key(&mut self, key: KeyRead) {
        if key.bad {
            return;
        }
        let name = &key.buf[..key.len];
        let keys = match key.level {
            Level::Top => {
                self.in_nested = self.watch.nested_in == Some(name);
                self.watch.top
            }
            Level::Nested => self.watch.nested,
        };
        if let Some(index) = keys.iter().position(|&watched| watched == name) {
            self.target = Some((key.level, index, key.start));
        }
    }

    /// At a `,` or closing bracket: ends the active member of this depth.
    fn end_member(
        &mut self,
        bytes: &[u8],
        at: usize,
        capture_from: &[usize; 2],
        on_member: &mut impl FnMut(Member, Option<&[u8]>),
    ) {
        let level = match self.depth {
            1 => Level::Top,
            2 => Level::Nested,
            _ => return,
        };
        let slot = level as usize;
        let Some(active) = self.active[slot].take() else {
            return;
        };
        let member = Member {
            level,
            key: active.key,
            key_start: active.key_start,
            value_start: active.value_start,
            value_end: self.pos + at,
        };
        if self.capture {
            let piece = &bytes[capture_from[slot].min(at)..at];
            if active.value_start >= self.pos {
                // The whole value is in this piece (the usual case): it is
                // handed over where it lies, not copied.
                on_member(member, (piece.len() <= CAPTURE_LIMIT).then_some(piece));
                return;
            }
            self.keep(slot, piece);
            let captured = (!self.overflowed[slot]).then_some(self.captured[slot].as_slice());
            on_member(member, captured);
        } else {
            on_member(member, None);
        }
    }

    fn keep(&mut self, slot: usize, bytes: &[u8]) {
        if self.overflowed[slot] {
            return;
        }
        if self.captured[slot].len() + bytes.len() > CAPTURE_LIMIT {
            self.overflowed[slot] = true;
            self.captured[slot] = Vec::new();
        } else {
            self.captured[slot].extend_from_slice(bytes);
        }
    }

    /// Members still open at the end of what was fed (a body cut short),
    /// with what was captured of them.
    fn unfinished(&self, mut on_value: impl FnMut(Member, &[u8])) {
        for level in [Level::Top, Level::Nested] {
            let slot = level as usize;
            if let (Some(active), false) = (self.active[slot], self.overflowed[slot]) {
                let member = Member {
                    level,
                    key: active.key,
                    key_start: active.key_start,
                    value_start: active.value_start,
                    value_end: self.pos,
                };
                on_value(member, &self.captured[slot]);
            }
        }
    }
}

/// Walks a whole document and returns the last occurrence of each watched
/// member, top level first then nested.
fn members(watch: &'static Watch, json: &[u8]) -> (Vec<Option<Member>>, Vec<Option<Member>>) {
    let mut top = vec![None; watch.top.len()];
    let mut nested = vec![None; watch.nested.len()];
    JsonWalker::new(watch, false).feed(json, |member, _| {
        let found = match member.level {
            Level::Top => top.get_mut(member.key),
            Level::Nested => nested.get_mut(member.key),
        };
        if let Some(found) = found {
            *found = Some(member);
        }
    });
    (top, nested)
}

// ---------------------------------------------------------------------------
// The hidden usage chunk.

/// For an OpenAI chat-completions stream where the gateway added
/// `stream_options.include_usage`: removes what that option added from what
/// the client receives, so it gets byte for byte the stream it asked for.
///
/// The option adds a final chunk with `"choices":[]` and a usage object
/// (dropped whole, with its blank line) and a `"usage":null` member to
/// every other chunk (cut out with its comma). Every complete event is
/// passed on as soon as its blank line arrives; only an incomplete trailing
/// event is held back, and [`UsageChunkFilter::finish`] flushes it.
///
/// Only events with a single `data:` line are edited (OpenAI never splits
/// one); anything else passes unchanged.
#[derive(Clone, Debug)]
pub(crate) struct UsageChunkFilter {
    /// The start of an event not yet complete.
    held: Vec<u8>,
    /// Bytes of `held` already searched for the end of the event.
    scanned: usize,
    /// `scanned` is at the start of a line.
    at_line_start: bool,
}

impl Default for UsageChunkFilter {
    fn default() -> Self {
        Self::new()
    }
}

static CHUNK_EVENT: Watch = Watch {
    top: &[b"usage", b"choices"],
    nested_in: None,
    nested: &[],
};

impl UsageChunkFilter {
    pub(crate) fn new() -> Self {
        UsageChunkFilter {
            held: Vec::new(),
            scanned: 0,
            at_line_start: true,
        }
    }

    /// The next piece of the upstream's stream; returns what the client
    /// gets now (possibly nothing).
    pub(crate) fn feed(&mut self, chunk: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(chunk.len() + self.held.len());
        if self.held.is_empty() {
            // Nothing held: work on the chunk itself, keep only its tail.
            let consumed = self.pass_events(chunk, 0, &mut out);
            self.held.extend_from_slice(&chunk[consumed..]);
            self.scanned -= consumed;
        } else {
            self.held.extend_from_slice(chunk);
            let held = std::mem::take(&mut self.held);
            let consumed = self.pass_events(&held, self.scanned, &mut out);
            self.held = held;
            self.held.drain(..consumed);
            self.scanned -= consumed;
        }
        out
    }

    /// The end of the stream: whatever is held, as one last event.
    pub(crate) fn finish(&mut self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.held.len());
        pass_event(&self.held, &mut out);
        self.held.clear();
        self.scanned = 0;
        self.at_line_start = true;
        out
    }

    /// Passes every complete event of `data` (searched from `from`, which
    /// the previous call left off at) into `out`; returns where the first
    /// incomplete one starts.
    fn pass_events(&mut self, data: &[u8], from: usize, out: &mut Vec<u8>) -> usize {
        let mut pos = from;
        let mut line_start = self.at_line_start;
        let mut event_start = 0;
        loop {
            let Some(found) = memchr2(b'\n', b'\r', &data[pos..]) else {
                self.scanned = data.len();
                self.at_line_start = line_start && pos == data.len();
                return event_start;
            };
            let end_of_line = pos + found;
            let next = if data[end_of_line] == b'\n' {
                end_of_line + 1
            } else {
                match data.get(end_of_line + 1) {
                    Some(b'\n') => end_of_line + 2,
                    Some(_) => end_of_line + 1,
                    None => {
                        // A `\r` last: its `\n` may be in the next chunk.
                        self.scanned = end_of_line;
                        self.at_line_start = line_start && end_of_line == pos;
                        return event_start;
                    }
                }
            };
            if line_start && end_of_line == pos {
                // A blank line: the event is complete.
                pass_event(&data[event_start..next], out);
                event_start = next;
            }
            pos = next;
            line_start = true;
        }
    }
}

/// Appends `event` to `out` as the client would have received it without
/// `include_usage`.
fn pass_event(event: &[u8], out: &mut Vec<u8>) {
    if USAGE_KEY.find(event).is_none() {
        out.extend_from_slice(event);
        return;
    }
    let Some((json_start, json_end)) = single_data_line(event) else {
        out.extend_from_slice(event);
        return;
    };
    let json = &event[json_start..json_end];
    if json.ends_with(NULL_USAGE_LAST) {
        // OpenAI's own shape, on every chunk but the last. In valid JSON the
        // final `}` closes the root and the `"` after a `,` starts a key, so
        // this is the root's `usage` member: no walk needed.
        let cut = json_end - NULL_USAGE_LAST.len();
        out.extend_from_slice(&event[..cut]);
        out.extend_from_slice(&event[json_end - 1..]);
        return;
    }
    let (top, _) = members(&CHUNK_EVENT, json);
    let (Some(usage), choices) = (top[0], top[1]) else {
        out.extend_from_slice(event);
        return;
    };
    let value = trim_space(&json[usage.value_start..usage.value_end]);
    let no_choices = choices.is_some_and(|choices| {
        let choices = trim_space(&json[choices.value_start..choices.value_end]);
        choices.first() == Some(&b'[') && trim_space(&choices[1..]) == b"]"
    });
    if no_choices && value.first() == Some(&b'{') {
        // The usage chunk itself: the client never asked for it.
        return;
    }
    if value == b"null" {
        let (cut_start, cut_end) = member_cut(json, &usage);
        out.extend_from_slice(&event[..json_start + cut_start]);
        out.extend_from_slice(&event[json_start + cut_end..]);
        return;
    }
    out.extend_from_slice(event);
}

/// How OpenAI ends every chunk but the last when asked for usage.
const NULL_USAGE_LAST: &[u8] = b",\"usage\":null}";

/// The span of the event's only `data:` value (after the optional space,
/// before the line end), or `None` when it has no or several.
fn single_data_line(event: &[u8]) -> Option<(usize, usize)> {
    let mut found = None;
    let mut start = 0;
    while start < event.len() {
        let end = memchr2(b'\n', b'\r', &event[start..]).map_or(event.len(), |at| start + at);
        let line = &event[start..end];
        if let Some(value) = line.strip_prefix(b"data:") {
            if found.is_some() {
                return None;
            }
            let skip = usize::from(value.first() == Some(&b' '));
            found = Some((start + 5 + skip, end));
        }
        start = match event.get(end..end + 2) {
            Some(b"\r\n") => end + 2,
            _ => end + 1,
        };
    }
    found
}

/// The bytes to cut to remove `member` from its object, with one comma:
/// the one before it, else the one after it (and the space after that).
fn member_cut(json: &[u8], member: &Member) -> (usize, usize) {
    let value_end = member.value_start + trim_end(&json[member.value_start..member.value_end]);
    let before = json[..member.key_start].iter().rposition(|&b| !is_space(b));
    if let Some(comma) = before.filter(|&at| json[at] == b',') {
        return (comma, value_end);
    }
    if json.get(member.value_end) == Some(&b',') {
        let after = member.value_end + 1;
        let rest = json.len() - skip_space(&json[after..]).len();
        return (member.key_start, rest);
    }
    (member.key_start, value_end)
}

/// The length of `bytes` without trailing whitespace.
fn trim_end(bytes: &[u8]) -> usize {
    bytes
        .iter()
        .rposition(|&b| !is_space(b))
        .map_or(0, |end| end + 1)
}

// ---------------------------------------------------------------------------
// Asking for the usage chunk.

static STREAM_OPTIONS: Watch = Watch {
    top: &[b"stream_options"],
    nested_in: Some(b"stream_options"),
    nested: &[b"include_usage"],
};

/// Why a request body to an OpenAI completions endpoint is refused rather
/// than forwarded: the gateway cannot be sure whether it asks for a stream,
/// or cannot ask for that stream's usage. Each is a body that a lenient
/// upstream could read as a streaming request the gateway did not see, so
/// forwarding it could start a stream with no usage in it: unmetered.
/// The message says what to change.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum UnmeterableRequest {
    /// Empty, an array, a BOM or another encoding before the `{`, text.
    #[error("the request body is not a JSON object")]
    NotAnObject,
    /// Compressed (`Content-Encoding`): the gateway does not decompress.
    #[error("the request body is compressed; send it without a Content-Encoding")]
    Compressed,
    /// A `charset` other than UTF-8 in its `Content-Type`, which some
    /// readers decode by (Express's body-parser takes UTF-7).
    #[error("the request body's charset is not UTF-8")]
    NotUtf8,
    /// Not JSON, or a JSON reader could take it two ways: invalid UTF-8 in
    /// a key, invalid escapes, trailing text, a `stream`, `stream_options`
    /// or `include_usage` given twice or spelled in another case.
    /// serde_json's message, with its place.
    #[error("the request body cannot be read as JSON: {0}")]
    Unreadable(String),
    #[error("`stream` must be true, false or null")]
    StreamNotBoolean,
    #[error("`stream_options` must be an object or null")]
    OptionsNotObject,
    /// `stream_options` whose key is spelled with escapes, which the
    /// gateway reads but does not edit.
    #[error("`stream_options` cannot be edited to ask for usage; write its key without escapes")]
    Uneditable,
}

/// The members of a request body that decide whether to ask for usage.
/// A `stream` or `stream_options` given twice is an error, and so is a key
/// that differs from one of them only in case: readers that match keys
/// case-insensitively (Go's `encoding/json`, .NET's web defaults) would
/// take it for that member.
struct StreamRequest {
    stream: Option<Value>,
    /// `Some(StreamOptions::Null)` for an explicit `null`, `None` when absent.
    stream_options: Option<StreamOptions>,
}

impl<'de> Deserialize<'de> for StreamRequest {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(RequestVisitor)
    }
}

struct RequestVisitor;

impl<'de> Visitor<'de> for RequestVisitor {
    type Value = StreamRequest;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<StreamRequest, A::Error> {
        let mut request = StreamRequest {
            stream: None,
            stream_options: None,
        };
        while let Some(KeyText(key)) = map.next_key()? {
            match &*key {
                "stream" if request.stream.is_some() => {
                    return Err(de::Error::duplicate_field("stream"))
                }
                "stream" => request.stream = Some(map.next_value()?),
                "stream_options" if request.stream_options.is_some() => {
                    return Err(de::Error::duplicate_field("stream_options"))
                }
                "stream_options" => request.stream_options = Some(map.next_value()?),
                other => {
                    refuse_lookalike(other, &["stream", "stream_options"])?;
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(request)
    }
}

/// A key as written, borrowed from the body unless it has escapes.
struct KeyText<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for KeyText<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Text;
        impl<'de> Visitor<'de> for Text {
            type Value = KeyText<'de>;

            fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
                formatter.write_str("a key")
            }

            fn visit_borrowed_str<E>(self, key: &'de str) -> Result<KeyText<'de>, E> {
                Ok(KeyText(Cow::Borrowed(key)))
            }

            fn visit_str<E>(self, key: &str) -> Result<KeyText<'de>, E> {
                Ok(KeyText(Cow::Owned(key.to_owned())))
            }
        }
        deserializer.deserialize_str(Text)
    }
}

/// An error when `key` is not one of `names` but a case-insensitive reader
/// would take it for one.
fn refuse_lookalike<E: de::Error>(key: &str, names: &[&str]) -> Result<(), E> {
    match names.iter().find(|name| folds_to(key, name)) {
        Some(name) => Err(E::custom(format_args!(
            "the key `{key}` differs from `{name}` only in case, and some readers take it for \
             `{name}`"
        ))),
        None => Ok(()),
    }
}

/// Whether `key` equals the lowercase ASCII `name` ignoring case as the
/// case-insensitive readers do: ASCII case, and the non-ASCII letters that
/// Unicode case folding or .NET's upper-casing turn into one of `name`'s
/// (`ſ` to `s`, `ı` to `i`, the Kelvin sign to `k`).
fn folds_to(key: &str, name: &str) -> bool {
    let mut expected = name.bytes();
    for letter in key.chars() {
        let folded = match letter {
            '\u{17F}' => b's',
            '\u{131}' => b'i',
            '\u{212A}' => b'k',
            _ if letter.is_ascii() => letter as u8,
            _ => return false,
        };
        if expected.next() != Some(folded.to_ascii_lowercase()) {
            return false;
        }
    }
    expected.next().is_none()
}

/// A request's `stream_options`, as far as asking for usage goes.
enum StreamOptions {
    Null,
    /// Its `include_usage` (`None` when absent) and how many members it has.
    Object {
        include_usage: Option<Value>,
        members: usize,
    },
    /// Neither an object nor null.
    Other,
}

impl<'de> Deserialize<'de> for StreamOptions {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(OptionsVisitor)
    }
}

struct OptionsVisitor;

impl<'de> Visitor<'de> for OptionsVisitor {
    type Value = StreamOptions;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("stream_options")
    }

    fn visit_unit<E>(self) -> Result<StreamOptions, E> {
        Ok(StreamOptions::Null)
    }

    /// An object. `include_usage` given twice is an error: readers that
    /// keep the first and readers that keep the last would disagree. So is
    /// a key that differs from it only in case.
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<StreamOptions, A::Error> {
        let mut include_usage = None;
        let mut members = 0;
        while let Some(KeyText(key)) = map.next_key()? {
            if key == "include_usage" {
                if include_usage.is_some() {
                    return Err(de::Error::duplicate_field("include_usage"));
                }
                include_usage = Some(map.next_value::<Value>()?);
            } else {
                refuse_lookalike(&key, &["include_usage"])?;
                map.next_value::<IgnoredAny>()?;
            }
            members += 1;
        }
        Ok(StreamOptions::Object {
            include_usage,
            members,
        })
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<StreamOptions, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(StreamOptions::Other)
    }

    fn visit_bool<E>(self, _: bool) -> Result<StreamOptions, E> {
        Ok(StreamOptions::Other)
    }

    fn visit_i64<E>(self, _: i64) -> Result<StreamOptions, E> {
        Ok(StreamOptions::Other)
    }

    fn visit_u64<E>(self, _: u64) -> Result<StreamOptions, E> {
        Ok(StreamOptions::Other)
    }

    fn visit_f64<E>(self, _: f64) -> Result<StreamOptions, E> {
        Ok(StreamOptions::Other)
    }

    fn visit_str<E>(self, _: &str) -> Result<StreamOptions, E> {
        Ok(StreamOptions::Other)
    }
}

/// For a request body to an OpenAI completions endpoint: `Ok(Some)` with
/// `stream_options.include_usage = true` added when it asks for a stream
/// (`"stream": true`) without that option; `Ok(None)` to forward it as it
/// is (not streaming, or already asking for usage); `Err` when it cannot
/// be forwarded metered ([`UnmeterableRequest`]).
///
/// The client's bytes are kept as they are except for one textual edit:
/// `"stream_options":{"include_usage":true},` inserted after the opening
/// brace when there is no `stream_options`; `"include_usage":true`
/// inserted into an existing one; an existing `include_usage` value
/// replaced by `true`; a `null` `stream_options` replaced by the object.
pub fn inject_include_usage(body: &[u8]) -> Result<Option<Vec<u8>>, UnmeterableRequest> {
    let open = body.len() - skip_space(body).len();
    if body.get(open) != Some(&b'{') {
        return Err(UnmeterableRequest::NotAnObject);
    }
    if !may_name_stream(body) {
        return Ok(None);
    }
    // Validates the whole body (and refuses duplicate keys) without
    // building a tree of it.
    let request: StreamRequest = serde_json::from_slice(body).map_err(unreadable)?;
    match request.stream {
        Some(Value::Bool(true)) => {}
        None | Some(Value::Null | Value::Bool(false)) => return Ok(None),
        Some(_) => return Err(UnmeterableRequest::StreamNotBoolean),
    }
    let splice = |start: usize, end: usize, text: &[u8]| {
        let mut edited = Vec::with_capacity(body.len() + text.len());
        edited.extend_from_slice(&body[..start]);
        edited.extend_from_slice(text);
        edited.extend_from_slice(&body[end..]);
        edited
    };
    // The walker does not decode escaped keys; serde_json does. A
    // `stream_options` the one found and the other did not is refused.
    let found = |member: Option<Member>| member.ok_or(UnmeterableRequest::Uneditable);
    let edited = match request.stream_options {
        // The usual request (what the SDKs send): the option goes in as the
        // object's first member. The body was just read whole as one object
        // with a `stream` member and no `stream_options`, so the result is
        // one object with that member added and nothing else changed: it
        // needs no second reading, which would cost as much as the first.
        None => {
            return Ok(Some(splice(
                open + 1,
                open + 1,
                br#""stream_options":{"include_usage":true},"#,
            )))
        }
        Some(StreamOptions::Null) => {
            let (top, _) = members(&STREAM_OPTIONS, body);
            let (start, end) = trimmed(body, &found(top[0])?);
            splice(start, end, br#"{"include_usage":true}"#)
        }
        Some(StreamOptions::Object {
            include_usage: Some(Value::Bool(true)),
            ..
        }) => return Ok(None),
        Some(StreamOptions::Object {
            include_usage: Some(_),
            ..
        }) => {
            let (_, nested) = members(&STREAM_OPTIONS, body);
            let (start, end) = trimmed(body, &found(nested[0])?);
            splice(start, end, b"true")
        }
        Some(StreamOptions::Object {
            include_usage: None,
            members: count,
        }) => {
            let (top, _) = members(&STREAM_OPTIONS, body);
            let (start, _) = trimmed(body, &found(top[0])?);
            if body.get(start) != Some(&b'{') {
                return Err(UnmeterableRequest::Uneditable);
            }
            let text: &[u8] = if count == 0 {
                br#""include_usage":true"#
            } else {
                br#""include_usage":true,"#
            };
            splice(start + 1, start + 1, text)
        }
        Some(StreamOptions::Other) => return Err(UnmeterableRequest::OptionsNotObject),
    };
    // These edits land inside the body, where the walker put them: small
    // and structural, but a request must never be corrupted, so the
    // result is checked before it replaces what the client sent.
    let check: StreamRequest = serde_json::from_slice(&edited).map_err(unreadable)?;
    match check.stream_options {
        Some(StreamOptions::Object {
            include_usage: Some(Value::Bool(true)),
            ..
        }) => Ok(Some(edited)),
        _ => Err(UnmeterableRequest::Uneditable),
    }
}

fn unreadable(error: serde_json::Error) -> UnmeterableRequest {
    UnmeterableRequest::Unreadable(error.to_string())
}

static STREAM_WORD: LazyLock<memmem::Finder<'static>> =
    LazyLock::new(|| memmem::Finder::new(b"tream"));
static UNICODE_ESCAPE: LazyLock<memmem::Finder<'static>> =
    LazyLock::new(|| memmem::Finder::new(b"\\u"));

/// Whether any JSON reader could find a key `stream` in `body` (an object
/// of one line or many). A key spells it as it is, in any case (readers
/// that ignore case take `Stream` or `ſtream` for it: `tream` is in every
/// such spelling), or with a `\u` escape for one of its letters; text in
/// UTF-16 or UTF-32, which some readers detect and decode (Python's `json`
/// does), has zero bytes. A body with none of the three is not a streaming
/// request to any reader, and these vector searches spare a request that
/// omits `stream` (the SDKs' way of not streaming) the whole body's
/// reading.
fn may_name_stream(body: &[u8]) -> bool {
    UNICODE_ESCAPE.find(body).is_some()
        || memchr::memchr(0, body).is_some()
        || STREAM_WORD.find(&body.to_ascii_lowercase()).is_some()
}

/// The span of a member's value without the whitespace around it.
fn trimmed(json: &[u8], member: &Member) -> (usize, usize) {
    let raw = &json[member.value_start..member.value_end];
    let start = member.value_start + (raw.len() - skip_space(raw).len());
    let end = member.value_start + trim_end(raw);
    (start, end.max(start))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn walk(watch: &'static Watch, json: &str) -> Vec<(Level, usize, String)> {
        let mut found = Vec::new();
        JsonWalker::new(watch, false).feed(json.as_bytes(), |member, _| {
            found.push((
                member.level,
                member.key,
                json[member.value_start..member.value_end].trim().to_owned(),
            ));
        });
        found
    }

    #[test]
    fn walker_reports_only_top_level_and_nested_members() {
        let json = r#"{"a":{"usage":1},"usage" : {"x":[1,{"usage":2}]} ,"s":"\"usage\":3","response":{"model":"m","deep":{"usage":4}},"model":"top"}"#;
        assert_eq!(
            walk(&OPENAI_EVENT, json),
            vec![
                (Level::Top, USAGE, r#"{"x":[1,{"usage":2}]}"#.to_owned()),
                (Level::Nested, MODEL, r#""m""#.to_owned()),
                (Level::Top, MODEL, r#""top""#.to_owned()),
            ]
        );
        // A root array, or a nested array, hides everything.
        assert!(walk(&OPENAI_EVENT, r#"[{"usage":1}]"#).is_empty());
        assert!(walk(&OPENAI_EVENT, r#"{"response":[{"usage":1}]}"#).is_empty());
    }

    #[test]
    fn walker_captures_across_pieces() {
        let json = br#"{"id":"x\"y","usage":{"prompt_tokens":12,"t":"a,}b"},"model":"gpt"}"#;
        for cut in 0..=json.len() {
            let mut walker = JsonWalker::new(&JSON_BODY, true);
            let mut found = Vec::new();
            for piece in [&json[..cut], &json[cut..]] {
                walker.feed(piece, |member, captured| {
                    found.push((
                        member.key,
                        String::from_utf8(captured.unwrap().to_vec()).unwrap(),
                    ));
                });
            }
            assert_eq!(
                found,
                vec![
                    (USAGE, r#"{"prompt_tokens":12,"t":"a,}b"}"#.to_owned()),
                    (MODEL, r#""gpt""#.to_owned()),
                ],
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn oversized_captures_are_dropped() {
        let big = "x".repeat(CAPTURE_LIMIT);
        let json = format!(r#"{{"model":"{big}","usage":{{"prompt_tokens":1}}}}"#);
        let mut walker = JsonWalker::new(&JSON_BODY, true);
        let mut found = Vec::new();
        walker.feed(json.as_bytes(), |member, captured| {
            found.push((member.key, captured.is_some()))
        });
        assert_eq!(found, vec![(MODEL, false), (USAGE, true)]);
    }

    #[test]
    fn usage_object_precheck() {
        assert!(has_usage_object(br#"{"usage":{"a":1}}"#));
        assert!(has_usage_object(
            br#"{"usage" :
 {"a":1}}"#
        ));
        assert!(!has_usage_object(br#"{"usage":null}"#));
        assert!(!has_usage_object(br#"{"text":"\"usage\":{"}"#));
        assert!(!has_usage_object(br#"{"type":"usage","x":{}}"#));
    }

    #[test]
    fn member_cut_keeps_the_object_valid() {
        let cases = [
            (r#"{"a":1,"usage":null}"#, r#"{"a":1}"#),
            (r#"{"a":1, "usage" : null }"#, r#"{"a":1 }"#),
            (r#"{"usage":null,"a":1}"#, r#"{"a":1}"#),
            (r#"{"usage": null, "a": 1}"#, r#"{"a": 1}"#),
            (r#"{"a":1,"usage":null,"b":2}"#, r#"{"a":1,"b":2}"#),
            (r#"{"usage":null}"#, r#"{}"#),
        ];
        for (json, expected) in cases {
            let (top, _) = members(&CHUNK_EVENT, json.as_bytes());
            let (start, end) = member_cut(json.as_bytes(), &top[0].unwrap());
            let cut = format!("{}{}", &json[..start], &json[end..]);
            assert_eq!(cut, expected, "{json}");
            serde_json::from_str::<Value>(&cut).unwrap();
        }
    }

    #[test]
    fn sse_lines_in_every_framing() {
        // \r\n, bare \r, comments, a multi-line data field, no final blank line.
        let stream = "event: message_start\r\ndata: {\"type\":\"message_start\",\r\ndata: \"message\":{\"model\":\"claude\",\"usage\":{\"input_tokens\":3,\"output_tokens\":1}}}\r\n\r\n: comment\r\rdata:{\"type\":\"message_delta\",\"usage\":{\"output_tokens\":9}}";
        for cut in 0..=stream.len() {
            let mut scanner = UsageScanner::new(UsageFormat::Anthropic, true);
            scanner.feed(&stream.as_bytes()[..cut]);
            scanner.feed(&stream.as_bytes()[cut..]);
            assert_eq!(
                scanner.finish(),
                Extracted {
                    tokens: Some(TokenCounts {
                        input: 3,
                        output: 9,
                        ..TokenCounts::default()
                    }),
                    model: Some("claude".to_owned()),
                    unusable: Unusable::default(),
                },
                "cut at {cut}"
            );
        }
    }

    fn scan(format: UsageFormat, event_stream: bool, body: &str) -> Extracted {
        let mut scanner = UsageScanner::new(format, event_stream);
        scanner.feed(body.as_bytes());
        scanner.finish()
    }

    #[test]
    fn unusable_counts_are_marked_and_keep_the_others() {
        let tokens = |input, output| TokenCounts {
            input,
            output,
            ..TokenCounts::default()
        };
        let unusable = |input, cache_read, cache_write| Unusable {
            input,
            cache_read,
            cache_write,
            ..Unusable::default()
        };
        // (body, format, tokens read, classes marked unusable)
        let cases = [
            // Negative, fractional, text, beyond u64: each marks its class
            // and leaves the other counts of the object standing.
            (
                r#"{"model":"m","usage":{"prompt_tokens":-5,"completion_tokens":7,
                "prompt_tokens_details":{"cached_tokens":1.5}}}"#,
                UsageFormat::Openai,
                tokens(0, 7),
                unusable(true, true, false),
            ),
            (
                r#"{"usage":{"input_tokens":"12","output_tokens":2,
                "cache_read_input_tokens":1e30,"cache_creation_input_tokens":100000000000000000000}}"#,
                UsageFormat::Anthropic,
                tokens(0, 2),
                unusable(true, true, true),
            ),
            // Arrays, objects, booleans and null are skipped whole: the
            // counts after them still read.
            (
                r#"{"usage":{"input_tokens":[1,{"a":[2]}],"cache_read_input_tokens":{"n":3,"m":[4]},
                "cache_creation_input_tokens":true,"output_tokens":18446744073709551615}}"#,
                UsageFormat::Anthropic,
                tokens(0, u64::MAX),
                unusable(true, true, true),
            ),
            // `-0` parses as a float; `null` is an absent count.
            (
                r#"{"usage":{"prompt_tokens":-0,"completion_tokens":null}}"#,
                UsageFormat::Openai,
                tokens(0, 0),
                unusable(true, false, false),
            ),
            // Whole numbers pass as written, however large: bounds are
            // judged where the sources are combined.
            (
                r#"{"usage":{"prompt_tokens":5000000000000000000,"completion_tokens":5000000000000000000}}"#,
                UsageFormat::Openai,
                tokens(5_000_000_000_000_000_000, 5_000_000_000_000_000_000),
                unusable(false, false, false),
            ),
        ];
        for (json, format, tokens, unusable) in cases {
            let found = scan(format, false, json);
            assert_eq!(found.tokens, Some(tokens), "{json}");
            assert_eq!(found.unusable, unusable, "{json}");
        }
    }

    #[test]
    fn an_anthropic_route_reads_anthropics_openai_compatible_answers() {
        let counts = |input, output, cache_read| TokenCounts {
            input,
            output,
            cache_read,
            cache_write: 0,
        };
        let json = r#"{"id":"chatcmpl-1","object":"chat.completion","model":"claude-sonnet-4-5",
            "choices":[{"index":0,"message":{"role":"assistant","content":"Hi"}}],
            "usage":{"prompt_tokens":120,"completion_tokens":30,"total_tokens":150,
            "prompt_tokens_details":{"cached_tokens":20}}}"#;
        let found = scan(UsageFormat::Anthropic, false, json);
        assert_eq!(found.tokens, Some(counts(100, 30, 20)));
        assert_eq!(found.model.as_deref(), Some("claude-sonnet-4-5"));
        // Streamed, with the usage asked for: the last chunk carries it at
        // the root, where a `message_delta` would.
        let stream = "data: {\"object\":\"chat.completion.chunk\",\"model\":\"claude-sonnet-4-5\",\"choices\":[{\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n\
                      data: {\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":7}}\n\n\
                      data: [DONE]\n\n";
        let found = scan(UsageFormat::Anthropic, true, stream);
        assert_eq!(found.tokens, Some(counts(12, 7, 0)));
        assert_eq!(found.model.as_deref(), Some("claude-sonnet-4-5"));
    }

    #[test]
    fn an_openai_route_reads_anthropic_shaped_cache_counts() {
        let json = r#"{"type":"message","model":"m","usage":{"input_tokens":10,"output_tokens":4,
            "cache_read_input_tokens":50,"cache_creation_input_tokens":6}}"#;
        let expected = TokenCounts {
            input: 10,
            output: 4,
            cache_read: 50,
            cache_write: 6,
        };
        assert_eq!(
            scan(UsageFormat::Openai, false, json).tokens,
            Some(expected)
        );
        // OpenAI's Responses shape is still OpenAI's: cached inside input.
        let responses = r#"{"usage":{"input_tokens":10,"output_tokens":4,
            "input_tokens_details":{"cached_tokens":3}}}"#;
        let expected = TokenCounts {
            input: 7,
            output: 4,
            cache_read: 3,
            cache_write: 0,
        };
        assert_eq!(
            scan(UsageFormat::Openai, false, responses).tokens,
            Some(expected)
        );
    }

    #[test]
    fn a_message_delta_with_server_tool_counts_overrides_message_start() {
        // Web search adds its results to the input during the turn; the
        // last message_delta carries the cumulative counts.
        let stream = "event: message_start\n\
                      data: {\"type\":\"message_start\",\"message\":{\"model\":\"claude-sonnet-4-5\",\"usage\":{\"input_tokens\":2679,\"cache_read_input_tokens\":0,\"cache_creation_input_tokens\":0,\"output_tokens\":3}}}\n\n\
                      event: message_delta\n\
                      data: {\"type\":\"message_delta\",\"usage\":{\"input_tokens\":9000,\"cache_read_input_tokens\":1682,\"output_tokens\":410,\"server_tool_use\":{\"web_search_requests\":1}}}\n\n\
                      event: message_delta\n\
                      data: {\"type\":\"message_delta\",\"usage\":{\"input_tokens\":10682,\"cache_read_input_tokens\":1682,\"cache_creation_input_tokens\":null,\"output_tokens\":510}}\n\n";
        let found = scan(UsageFormat::Anthropic, true, stream);
        assert_eq!(
            found.tokens,
            Some(TokenCounts {
                input: 10682,
                output: 510,
                cache_read: 1682,
                cache_write: 0,
            })
        );
        // A delta with the output alone keeps message_start's input.
        let plain = "data: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":11,\"cache_creation_input_tokens\":4,\"output_tokens\":1}}}\n\n\
                     data: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":6}}\n\n";
        assert_eq!(
            scan(UsageFormat::Anthropic, true, plain).tokens,
            Some(TokenCounts {
                input: 11,
                output: 6,
                cache_read: 0,
                cache_write: 4,
            })
        );
        // A delta with no counts at all is no usage.
        let empty = "data: {\"type\":\"message_delta\",\"usage\":{}}\n\n";
        assert_eq!(scan(UsageFormat::Anthropic, true, empty).tokens, None);
    }

    #[test]
    fn an_unusable_delta_marks_the_output_of_an_anthropic_stream() {
        let stream = "data: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":3,\"output_tokens\":1}}}\n\n\
                      data: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":-9}}\n\n";
        let found = scan(UsageFormat::Anthropic, true, stream);
        assert_eq!(
            found.tokens,
            Some(TokenCounts {
                input: 3,
                ..TokenCounts::default()
            })
        );
        assert_eq!(
            found.unusable,
            Unusable {
                output: true,
                ..Unusable::default()
            }
        );
    }

    #[test]
    fn header_counts_are_whole_numbers_or_unusable() {
        assert_eq!(Count::parse("12"), Count::Whole(12));
        assert_eq!(Count::parse("18446744073709551615"), Count::Whole(u64::MAX));
        for text in ["-1", "1.5", "", "abc", "18446744073709551616", "1e3"] {
            assert_eq!(Count::parse(text), Count::Unusable, "{text:?}");
        }
    }
}
