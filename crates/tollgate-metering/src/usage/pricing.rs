//! The pricing table: what a request costs when the upstream did not say.
//!
//! Prices are held as integer nano-USD per million tokens and a cost is
//! computed exactly (in `i128`) as the sum over token classes of tokens ×
//! price, then rounded once, half up, to a whole nano-USD (README, Usage metering). No
//! floating point is involved, so the same tokens always cost the same
//! nanos on every instance and every replay.

use std::collections::HashMap;

use crate::usage::extract::TokenCounts;

/// Tokens the prices are quoted per.
const TOKENS_PER_PRICE: i128 = 1_000_000;

/// Per-model prices in nano-USD per million tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ModelPrice {
    pub input: i64,
    pub output: i64,
    pub cache_read: i64,
    pub cache_write: i64,
}

/// Prices by model name (the keys of `[pricing]` in the config).
///
/// Looked up once or more for each name a response reports, through a
/// fast hash: the keys are the operator's, so there is no flood of
/// colliding keys to defend against.
#[derive(Clone, Debug, Default)]
pub struct Pricing {
    models: HashMap<String, ModelPrice, foldhash::fast::RandomState>,
}

impl Pricing {
    pub fn new(prices: impl IntoIterator<Item = (String, ModelPrice)>) -> Pricing {
        Pricing {
            models: prices.into_iter().collect(),
        }
    }

    /// The priced model names.
    pub fn models(&self) -> impl Iterator<Item = &str> {
        self.models.keys().map(String::as_str)
    }

    /// The priced name and price that apply to `model`: the exact name,
    /// else the priced name `p` such that `model` is `p`, `-` and a
    /// snapshot (OpenAI answers `gpt-4o-mini` requests with
    /// `gpt-4o-mini-2024-07-18`; see [`is_snapshot`]). Any other suffix
    /// names another model, often a dearer one (`o3-pro` is not `o3`), so
    /// it has no price rather than a wrong one. The name is also the
    /// bounded value for a `model` metric label (docs/METRICS.md).
    pub fn resolve(&self, model: &str) -> Option<(&str, &ModelPrice)> {
        if let Some((name, price)) = self.models.get_key_value(model) {
            return Some((name.as_str(), price));
        }
        // A snapshot is the last segment, or the last three as a date: the
        // last and the third-last `-` are the cuts to try (a byte scan from
        // the end, as this runs twice for every row).
        let bytes = model.as_bytes();
        let mut dashes = bytes
            .iter()
            .enumerate()
            .rev()
            .filter(|&(_, &byte)| byte == b'-')
            .map(|(at, _)| at);
        let last = dashes.next()?;
        let date = dashes.nth(1);
        [Some(last), date]
            .into_iter()
            .flatten()
            .filter(|&at| is_snapshot(&bytes[at + 1..]))
            .find_map(|at| self.models.get_key_value(&model[..at]))
            .map(|(name, price)| (name.as_str(), price))
    }

    /// Cost of `tokens` for `model` in nano-USD: the sum over token classes
    /// of tokens × price / 1e6, computed exactly and rounded once, half up
    /// (half away from zero, should a price be negative). `None` when the
    /// model has no price. Saturates at the `i64` bounds.
    pub(crate) fn cost_nanos(&self, model: &str, tokens: &TokenCounts) -> Option<i64> {
        let (_, price) = self.resolve(model)?;
        Some(cost_nanos(price, tokens))
    }
}

/// A suffix that names a snapshot of a model rather than another model: a
/// date (`2024-07-18`, `20241022`), OpenAI's older month and day (`0613`),
/// a three-digit version (`001`), or `latest`.
fn is_snapshot(suffix: &[u8]) -> bool {
    let digits = |bytes: &[u8]| bytes.iter().all(u8::is_ascii_digit);
    match suffix.len() {
        3 | 4 | 8 => digits(suffix),
        6 => suffix == b"latest",
        // YYYY-MM-DD
        10 => {
            suffix[4] == b'-'
                && suffix[7] == b'-'
                && digits(&suffix[..4])
                && digits(&suffix[5..7])
                && digits(&suffix[8..])
        }
        _ => false,
    }
}

/// The exact cost of `tokens` at `price`.
pub(crate) fn cost_nanos(price: &ModelPrice, tokens: &TokenCounts) -> i64 {
    let terms = [
        (tokens.input, price.input),
        (tokens.output, price.output),
        (tokens.cache_read, price.cache_read),
        (tokens.cache_write, price.cache_write),
    ];
    // Each product fits in i128 (< 2^127); only the sum of four can
    // overflow, and only with absurd inputs: saturate then.
    let mut total: i128 = 0;
    for (count, nanos_per_million) in terms {
        let product = i128::from(count) * i128::from(nanos_per_million);
        total = match total.checked_add(product) {
            Some(total) => total,
            None if product > 0 => return i64::MAX,
            None => return i64::MIN,
        };
    }
    let half = TOKENS_PER_PRICE / 2;
    let rounded = if total >= 0 {
        (total + half) / TOKENS_PER_PRICE
    } else {
        -((-total + half) / TOKENS_PER_PRICE)
    };
    i64::try_from(rounded).unwrap_or(if rounded > 0 { i64::MAX } else { i64::MIN })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// USD per million tokens → nano-USD per million tokens.
    fn usd(text: &str) -> i64 {
        crate::usage::cost::parse_usd_to_nanos(text).unwrap()
    }

    fn table() -> Pricing {
        Pricing::new([
            (
                "gpt-4o-mini".to_owned(),
                ModelPrice {
                    input: usd("0.15"),
                    output: usd("0.60"),
                    cache_read: usd("0.075"),
                    cache_write: usd("0.15"),
                },
            ),
            (
                "gpt-4o".to_owned(),
                ModelPrice {
                    input: usd("2.50"),
                    output: usd("10"),
                    cache_read: usd("1.25"),
                    cache_write: usd("2.50"),
                },
            ),
            (
                "odd".to_owned(),
                ModelPrice {
                    input: 1,
                    output: 499_999,
                    cache_read: 500_000,
                    cache_write: 1_500_000,
                },
            ),
        ])
    }

    fn tokens(input: u64, output: u64, cache_read: u64, cache_write: u64) -> TokenCounts {
        TokenCounts {
            input,
            output,
            cache_read,
            cache_write,
        }
    }

    #[test]
    fn costs_are_exact_sums_rounded_once() {
        let pricing = table();
        // 1 input token at 0.15 USD/M = 150 nano-USD.
        assert_eq!(
            pricing.cost_nanos("gpt-4o-mini", &tokens(1, 0, 0, 0)),
            Some(150)
        );
        // 1 cached token at 0.075 USD/M = 75 nano-USD.
        assert_eq!(
            pricing.cost_nanos("gpt-4o-mini", &tokens(0, 0, 1, 0)),
            Some(75)
        );
        // 1000 in, 500 out, 200 cached: 150_000 + 300_000 + 15_000 nano.
        assert_eq!(
            pricing.cost_nanos("gpt-4o-mini", &tokens(1000, 500, 200, 0)),
            Some(465_000)
        );
        // 1M input + 1M output of gpt-4o = 12.50 USD.
        assert_eq!(
            pricing.cost_nanos("gpt-4o", &tokens(1_000_000, 1_000_000, 0, 0)),
            Some(12_500_000_000)
        );
    }

    #[test]
    fn rounding_is_half_up_on_the_sum_not_per_class() {
        let pricing = table();
        // 1 token × 1 nano/M = 0.000001 nano → 0.
        assert_eq!(pricing.cost_nanos("odd", &tokens(1, 0, 0, 0)), Some(0));
        // 0.499999 → 0.
        assert_eq!(pricing.cost_nanos("odd", &tokens(0, 1, 0, 0)), Some(0));
        // Exactly 0.5 → 1 (half up).
        assert_eq!(pricing.cost_nanos("odd", &tokens(0, 0, 1, 0)), Some(1));
        // 1.5 → 2.
        assert_eq!(pricing.cost_nanos("odd", &tokens(0, 0, 0, 1)), Some(2));
        // 0.000001 + 0.499999 = 0.5 → 1, where rounding each class first
        // would give 0 + 0.
        assert_eq!(pricing.cost_nanos("odd", &tokens(1, 1, 0, 0)), Some(1));
        // 3 × 0.499999 = 1.499997 → 1, where per-class rounding gives 0.
        assert_eq!(pricing.cost_nanos("odd", &tokens(0, 3, 0, 0)), Some(1));
        assert_eq!(
            pricing.cost_nanos("gpt-4o-mini", &tokens(0, 0, 0, 0)),
            Some(0)
        );
        // 0.01875 USD/M (a cache-read price) = 18.75 nano per token.
        let cache_only = ModelPrice {
            cache_read: usd("0.01875"),
            ..ModelPrice::default()
        };
        assert_eq!(cost_nanos(&cache_only, &tokens(0, 0, 1, 0)), 19);
        // 37.5 → 38 (half up).
        assert_eq!(cost_nanos(&cache_only, &tokens(0, 0, 2, 0)), 38);
        assert_eq!(cost_nanos(&cache_only, &tokens(0, 0, 4, 0)), 75);
        // 1 input at 0.15 + 1 cached at 0.01875 = 168.75 → 169.
        let mixed = ModelPrice {
            input: usd("0.15"),
            ..cache_only
        };
        assert_eq!(cost_nanos(&mixed, &tokens(1, 0, 1, 0)), 169);
    }

    #[test]
    fn dated_models_fall_back_to_the_longest_priced_prefix() {
        let pricing = table();
        let usage = tokens(1000, 0, 0, 0);
        // "gpt-4o-mini-2024-07-18" → "gpt-4o-mini", not "gpt-4o".
        assert_eq!(
            pricing.cost_nanos("gpt-4o-mini-2024-07-18", &usage),
            Some(150_000)
        );
        assert_eq!(
            pricing
                .resolve("gpt-4o-mini-2024-07-18")
                .map(|(name, _)| name),
            Some("gpt-4o-mini")
        );
        assert_eq!(
            pricing.cost_nanos("gpt-4o-2024-08-06", &usage),
            Some(2_500_000)
        );
        // Only at a '-': "gpt-4omega" is not "gpt-4o".
        assert_eq!(pricing.cost_nanos("gpt-4omega", &usage), None);
        let resolved = |model| pricing.resolve(model).map(|(name, _)| name);
        for (model, priced) in [
            ("gpt-4o-mini-20240718", "gpt-4o-mini"),
            ("gpt-4o-0613", "gpt-4o"),
            ("gpt-4o-001", "gpt-4o"),
            ("gpt-4o-latest", "gpt-4o"),
        ] {
            assert_eq!(resolved(model), Some(priced), "{model}");
        }
    }

    #[test]
    fn a_suffix_that_names_another_model_has_no_price() {
        let pricing = table();
        let resolved = |model| pricing.resolve(model).map(|(name, _)| name);
        // Another model, or another version of one, is not a snapshot of
        // the priced one: "gpt-4o-audio-preview" is billed otherwise.
        for model in [
            "gpt-4o-",
            "gpt-4o-audio-preview",
            "gpt-4o-mini-tts",
            "gpt-4o-pro-2025-06-10",
            "gpt-4o-5-20250929",
            "gpt-4o-mini-2024-07",
            "gpt-4o-2024-07-18-x",
            "gpt-4o-2024-0a-18",
            "gpt-4o-99",
            "gpt-4o-12345",
            "gpt-4o-Latest",
            "gpt-4o--2024-07-18",
        ] {
            assert_eq!(resolved(model), None, "{model}");
        }
        // The longest priced name still wins where both would do.
        assert_eq!(resolved("gpt-4o-mini-latest"), Some("gpt-4o-mini"));
    }

    #[test]
    fn unknown_models_have_no_price() {
        let pricing = table();
        assert_eq!(
            pricing.cost_nanos("claude-3-opus", &tokens(1, 1, 1, 1)),
            None
        );
        assert_eq!(pricing.cost_nanos("", &tokens(1, 1, 1, 1)), None);
        assert_eq!(pricing.cost_nanos("gpt", &tokens(1, 1, 1, 1)), None);
        assert_eq!(
            Pricing::default().cost_nanos("gpt-4o", &tokens(1, 1, 1, 1)),
            None
        );
    }

    #[test]
    fn huge_counts_saturate() {
        let price = ModelPrice {
            input: i64::MAX,
            output: i64::MAX,
            cache_read: i64::MAX,
            cache_write: i64::MAX,
        };
        let max = tokens(u64::MAX, u64::MAX, u64::MAX, u64::MAX);
        assert_eq!(cost_nanos(&price, &max), i64::MAX);
        assert_eq!(cost_nanos(&price, &tokens(u64::MAX, 0, 0, 0)), i64::MAX);
        let negative = ModelPrice {
            input: i64::MIN,
            ..ModelPrice::default()
        };
        assert_eq!(cost_nanos(&negative, &max), i64::MIN);
        // Negative prices round half away from zero.
        let credit = ModelPrice {
            input: -500_000,
            ..ModelPrice::default()
        };
        assert_eq!(cost_nanos(&credit, &tokens(1, 0, 0, 0)), -1);
    }
}
