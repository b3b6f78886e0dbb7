//! One response's usage, gathered as it passes: the route's usage headers
//! and the body, read by the route's parser, then judged once into the
//! usage event. The proxy hands over bytes and header text; every rule
//! about what counts and what is believed lives here.

use bytes::Bytes;

use super::cost::parse_usd_to_nanos;
use super::event::{InvalidValues, Reported, UsageEvent};
use super::extract::{Count, UsageChunkFilter, UsageFormat, UsageScanner};
use super::pricing::Pricing;

/// The text of a response's usage headers (the route's `cost_header`,
/// `input_tokens_header` and `output_tokens_header`), trimmed; `None` when
/// absent. A header that was sent but is not text should be passed as
/// something that does not parse (e.g. `"\u{FFFD}"`): it was sent, so it is
/// judged, and counted, as invalid.
#[derive(Clone, Copy, Debug, Default)]
pub struct UsageHeaders<'a> {
    pub cost: Option<&'a str>,
    pub input_tokens: Option<&'a str>,
    pub output_tokens: Option<&'a str>,
}

/// What a response body is, as far as usage goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResponseBody {
    /// Neither JSON nor an event stream: not read.
    Opaque,
    Json,
    /// `text/event-stream`. `hide_usage_chunk`: the gateway asked the
    /// upstream for the final usage chunk on the client's behalf, so that
    /// chunk (and the `"usage":null` of the others) is cut from what the
    /// client sees.
    EventStream {
        hide_usage_chunk: bool,
    },
}

/// A response's usage as it passes: never buffers the body, never fails.
#[derive(Debug)]
pub struct ResponseUsage {
    reported: Reported,
    scanner: Option<UsageScanner>,
    filter: Option<UsageChunkFilter>,
}

impl ResponseUsage {
    /// Reads the headers now; the body follows through [`ResponseUsage::pass`].
    pub fn new(
        format: UsageFormat,
        body: ResponseBody,
        headers: UsageHeaders<'_>,
    ) -> ResponseUsage {
        let scanner = match body {
            _ if format == UsageFormat::None => None,
            ResponseBody::Opaque => None,
            ResponseBody::Json => Some(UsageScanner::new(format, false)),
            ResponseBody::EventStream { .. } => Some(UsageScanner::new(format, true)),
        };
        let filter = (body
            == ResponseBody::EventStream {
                hide_usage_chunk: true,
            })
        .then(UsageChunkFilter::new);
        ResponseUsage {
            reported: Reported {
                body: Default::default(),
                input_tokens_header: headers.input_tokens.map(Count::parse),
                output_tokens_header: headers.output_tokens.map(Count::parse),
                cost_header: headers.cost.map(parse_usd_to_nanos),
            },
            scanner,
            filter,
        }
    }

    /// Whether the body is edited on its way (its length changes, so a
    /// `content-length` must go).
    pub fn edits_body(&self) -> bool {
        self.filter.is_some()
    }

    /// The next piece of the body, read; returns what the client gets of
    /// it. Pieces may split the body anywhere.
    pub fn pass(&mut self, chunk: Bytes) -> Bytes {
        if let Some(scanner) = &mut self.scanner {
            scanner.feed(&chunk);
        }
        match &mut self.filter {
            Some(filter) => Bytes::from(filter.feed(&chunk)),
            None => chunk,
        }
    }

    /// At the end of the body: what the filter still held back.
    pub fn held_back(&mut self) -> Bytes {
        match &mut self.filter {
            Some(filter) => Bytes::from(filter.finish()),
            None => Bytes::new(),
        }
    }

    /// Fills `event`'s tokens, model, cost and cost source from what was
    /// seen so far (at the end of the body, or early when the client went
    /// away), believing only valid values: those ignored are returned, to
    /// be counted.
    ///
    /// A token count that is not a whole number, or above 10¹², is ignored
    /// as if absent; a cost that is not a cost, or beyond $1M either way,
    /// is ignored and the next source applies: the cost header, else the
    /// pricing table × the (believed) tokens, else none. A token header
    /// replaces the body's count of its class.
    pub fn fill(&mut self, event: &mut UsageEvent, pricing: &Pricing) -> InvalidValues {
        if let Some(scanner) = &self.scanner {
            self.reported.body = scanner.finish();
        }
        self.reported.apply(event, pricing)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usage::CostSource;

    const OPENAI_STREAM: &str = concat!(
        "data: {\"model\":\"gpt-4o\",\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n",
        "data: {\"model\":\"gpt-4o\",\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":3}}\n\n",
        "data: [DONE]\n\n",
    );

    fn event() -> UsageEvent {
        let mut event = crate::usage::spool::tests::events(0..1).remove(0);
        event.model = None;
        event
    }

    fn pass_all(usage: &mut ResponseUsage, body: &str, piece: usize) -> String {
        let mut out = Vec::new();
        for chunk in body.as_bytes().chunks(piece) {
            out.extend_from_slice(&usage.pass(Bytes::copy_from_slice(chunk)));
        }
        out.extend_from_slice(&usage.held_back());
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn a_stream_is_read_in_any_pieces_and_passed_unchanged_unless_hidden() {
        for piece in [1, 7, 4096] {
            let stream = ResponseBody::EventStream {
                hide_usage_chunk: false,
            };
            let mut usage =
                ResponseUsage::new(UsageFormat::Openai, stream, UsageHeaders::default());
            assert!(!usage.edits_body());
            assert_eq!(pass_all(&mut usage, OPENAI_STREAM, piece), OPENAI_STREAM);
            let mut row = event();
            assert!(usage
                .fill(&mut row, &Pricing::default())
                .iter()
                .next()
                .is_none());
            assert_eq!((row.input_tokens, row.output_tokens), (7, 3));
            assert_eq!(row.model.as_deref(), Some("gpt-4o"));

            let hidden = ResponseBody::EventStream {
                hide_usage_chunk: true,
            };
            let mut usage =
                ResponseUsage::new(UsageFormat::Openai, hidden, UsageHeaders::default());
            assert!(usage.edits_body());
            let seen = pass_all(&mut usage, OPENAI_STREAM, piece);
            assert!(!seen.contains("\"usage\""), "{seen}");
            assert!(seen.ends_with("data: [DONE]\n\n"), "{seen}");
            let mut row = event();
            usage.fill(&mut row, &Pricing::default());
            assert_eq!((row.input_tokens, row.output_tokens), (7, 3));
        }
    }

    #[test]
    fn headers_replace_the_body_and_bad_ones_are_returned() {
        let headers = UsageHeaders {
            cost: Some("0.25"),
            input_tokens: Some("11"),
            output_tokens: Some("-4"),
        };
        let mut usage = ResponseUsage::new(UsageFormat::Openai, ResponseBody::Json, headers);
        usage.pass(Bytes::from_static(
            br#"{"model":"m","usage":{"prompt_tokens":1,"completion_tokens":2}}"#,
        ));
        let mut row = event();
        let invalid = usage.fill(&mut row, &Pricing::default());
        assert_eq!((row.input_tokens, row.output_tokens), (11, 0));
        assert_eq!(
            (row.cost_nanos, row.cost_source),
            (250_000_000, CostSource::Header)
        );
        let fields: Vec<_> = invalid
            .iter()
            .map(|(field, n)| (field.as_str(), n))
            .collect();
        assert_eq!(fields, [("output_tokens", 1)]);
    }

    #[test]
    fn an_opaque_body_or_a_route_without_a_parser_is_not_read() {
        let json = br#"{"usage":{"prompt_tokens":5}}"#;
        for (format, body) in [
            (UsageFormat::Openai, ResponseBody::Opaque),
            (UsageFormat::None, ResponseBody::Json),
        ] {
            let mut usage = ResponseUsage::new(format, body, UsageHeaders::default());
            assert_eq!(&usage.pass(Bytes::from_static(json))[..], json);
            let mut row = event();
            usage.fill(&mut row, &Pricing::default());
            assert_eq!(row.input_tokens, 0);
        }
    }
}
