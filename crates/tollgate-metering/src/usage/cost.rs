//! Money as integer nano-USD, parsed exactly from decimal text.
//!
//! Costs reach the gateway as text (an upstream's cost header, e.g.
//! `x-cost-usd: 0.00123`). Going through `f64` would turn `0.1` into
//! `0.1000000000000000055…` and make sums drift, so the text is read digit by
//! digit into an `i64` count of 1e-9 USD, rounded once, half up, at the ninth
//! fractional digit.

/// Why a cost text was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum CostError {
    #[error("the cost is empty")]
    Empty,
    #[error("the cost is negative")]
    Negative,
    #[error("the cost is not a finite number (NaN or infinity)")]
    NotFinite,
    #[error("the cost is not a decimal number: unexpected {found:?} at byte {at}")]
    Invalid { at: usize, found: char },
    #[error("the cost is not a decimal number: no digits")]
    NoDigits,
    #[error("the cost is too large: more than 9223372036.854775807 USD")]
    Overflow,
}

/// Nano-USD per USD.
const NANOS_PER_USD_DIGITS: i64 = 9;

/// Parses a decimal USD amount exactly into integer nano-USD.
///
/// Accepted: surrounding whitespace, an optional leading `+`, digits with an
/// optional `.` (`"12"`, `"0.00123"`, `".5"`, `"5."`), and an optional
/// exponent (`"1e-3"`, `"2.5E+2"`), since upstreams written in Python or
/// JavaScript print small floats that way (`1.2e-05`). Digits beyond the
/// ninth fractional place are rounded once, half up. Refused, with the
/// reason: empty text, a minus sign (even `"-0"`), NaN and infinities, any
/// other character, and amounts above `i64::MAX` nano-USD.
pub(crate) fn parse_usd_to_nanos(text: &str) -> Result<i64, CostError> {
    let text = text.trim();
    let bytes = text.as_bytes();
    if bytes.is_empty() {
        return Err(CostError::Empty);
    }
    let (offset, body) = match bytes[0] {
        b'-' => return Err(CostError::Negative),
        b'+' => (1, &bytes[1..]),
        _ => (0, bytes),
    };
    if [&b"nan"[..], b"inf", b"infinity"]
        .iter()
        .any(|word| body.eq_ignore_ascii_case(word))
    {
        return Err(CostError::NotFinite);
    }
    Decimal::scan(body)
        .map_err(|at| match at {
            Some(at) => invalid(text, offset + at),
            None => CostError::NoDigits,
        })?
        .to_nanos()
}

/// A decimal number as written: its integer and fraction digits and a
/// power of ten.
struct Decimal<'a> {
    int_digits: &'a [u8],
    frac_digits: &'a [u8],
    exponent: i64,
}

impl<'a> Decimal<'a> {
    /// Reads `digits[.digits][e[+-]digits]`, all of `body`. On error, the
    /// byte offset of the first unexpected character, or `None` where
    /// digits are missing.
    fn scan(body: &'a [u8]) -> Result<Decimal<'a>, Option<usize>> {
        let digits_from = |at: usize| {
            at + body[at..]
                .iter()
                .take_while(|byte| byte.is_ascii_digit())
                .count()
        };
        // Mantissa: integer digits, optional fraction.
        let mut at = digits_from(0);
        let int_digits = &body[..at];
        let mut frac_digits: &[u8] = &[];
        if body.get(at) == Some(&b'.') {
            let frac_end = digits_from(at + 1);
            frac_digits = &body[at + 1..frac_end];
            at = frac_end;
        }
        if int_digits.is_empty() && frac_digits.is_empty() {
            return match body.get(at) {
                Some(&byte) if byte != b'.' => Err(Some(at)),
                _ => Err(None),
            };
        }
        let mut exponent: i64 = 0;
        if matches!(body.get(at), Some(b'e' | b'E')) {
            at += 1;
            let negative = body.get(at) == Some(&b'-');
            if matches!(body.get(at), Some(b'-' | b'+')) {
                at += 1;
            }
            let exp_end = digits_from(at);
            if exp_end == at {
                return Err(body.get(at).map(|_| at));
            }
            // Saturated far beyond any meaningful value, so that a huge
            // exponent cannot overflow the arithmetic in `to_nanos`.
            for &digit in &body[at..exp_end] {
                exponent = (exponent * 10 + i64::from(digit - b'0')).min(1_000_000_000);
            }
            if negative {
                exponent = -exponent;
            }
            at = exp_end;
        }
        if at < body.len() {
            return Err(Some(at));
        }
        Ok(Decimal {
            int_digits,
            frac_digits,
            exponent,
        })
    }

    /// The value in nano-USD, rounded once, half up, at the ninth
    /// fractional digit.
    fn to_nanos(&self) -> Result<i64, CostError> {
        // The digits d₀d₁…dₙ₋₁ with the decimal point after `point` of them
        // (point may be negative or beyond n). The nano value keeps the
        // first point + 9 digits; the next digit decides the rounding.
        let digits = || {
            self.int_digits
                .iter()
                .chain(self.frac_digits)
                .map(|d| i64::from(d - b'0'))
        };
        let leading_zeros = digits().take_while(|&d| d == 0).count();
        let count = self.int_digits.len() + self.frac_digits.len();
        if leading_zeros == count {
            return Ok(0);
        }
        // Drop leading zeros: they shift nothing but would be counted as
        // kept digits below.
        let point = self.int_digits.len() as i64 - leading_zeros as i64 + self.exponent;
        let keep = point + NANOS_PER_USD_DIGITS;
        let significant = (count - leading_zeros) as i64;
        if keep > significant + 19 {
            // At least 20 integer digits of nano-USD: beyond i64.
            return Err(CostError::Overflow);
        }
        let mut nanos: i64 = 0;
        let mut round_up = false;
        for (index, digit) in digits().skip(leading_zeros).enumerate() {
            let index = index as i64;
            if index < keep {
                nanos = nanos
                    .checked_mul(10)
                    .and_then(|n| n.checked_add(digit))
                    .ok_or(CostError::Overflow)?;
            } else {
                round_up = index == keep && digit >= 5;
                break;
            }
        }
        for _ in significant..keep.max(significant) {
            nanos = nanos.checked_mul(10).ok_or(CostError::Overflow)?;
        }
        if keep < 0 {
            // The first significant digit lies more than one place below a
            // nano-USD: the amount rounds to zero.
            round_up = false;
        }
        if round_up {
            nanos = nanos.checked_add(1).ok_or(CostError::Overflow)?;
        }
        Ok(nanos)
    }
}

fn invalid(text: &str, at: usize) -> CostError {
    let found = text[at..].chars().next().unwrap_or('?');
    CostError::Invalid { at, found }
}

/// Formats nano-USD as a decimal USD string, exactly and without
/// trailing zeros: `2_100_000` → `"0.0021"`, `5_000_000_000` → `"5"`,
/// `-1` → `"-0.000000001"`. Money in JSON is always such a string.
pub fn format_usd(nanos: i64) -> String {
    let sign = if nanos < 0 { "-" } else { "" };
    let abs = nanos.unsigned_abs();
    let whole = abs / 1_000_000_000;
    let frac = abs % 1_000_000_000;
    if frac == 0 {
        return format!("{sign}{whole}");
    }
    let digits = format!("{frac:09}");
    format!("{sign}{whole}.{}", digits.trim_end_matches('0'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_exact_decimal_strings() {
        assert_eq!(format_usd(0), "0");
        assert_eq!(format_usd(2_100_000), "0.0021");
        assert_eq!(format_usd(5_000_000_000), "5");
        assert_eq!(format_usd(12_500_000_001), "12.500000001");
        assert_eq!(format_usd(-1), "-0.000000001");
        assert_eq!(format_usd(i64::MIN), "-9223372036.854775808");
        for nanos in [1, 999, 1_000_000_000, 123_456_789_012, i64::MAX] {
            assert_eq!(parse_usd_to_nanos(&format_usd(nanos)), Ok(nanos));
        }
    }

    #[test]
    fn parses_exact_amounts() {
        let cases = [
            ("0", 0),
            ("0.0", 0),
            ("1", 1_000_000_000),
            ("12.5", 12_500_000_000),
            (" 1.5 ", 1_500_000_000),
            ("+2", 2_000_000_000),
            ("0.00123", 1_230_000),
            ("0.000000001", 1),
            (".5", 500_000_000),
            ("5.", 5_000_000_000),
            ("0001.000", 1_000_000_000),
            ("1e-3", 1_000_000),
            ("1.2e-05", 12_000),
            ("2.5E+2", 250_000_000_000),
            ("1e-9", 1),
            ("1e-400", 0),
            ("0e999999999999", 0),
            ("9223372036.854775807", i64::MAX),
        ];
        for (text, nanos) in cases {
            assert_eq!(parse_usd_to_nanos(text), Ok(nanos), "{text}");
        }
    }

    #[test]
    fn rounds_once_half_up_at_the_ninth_digit() {
        let cases = [
            ("0.0000000015", 2),
            ("0.00000000149", 1),
            ("0.0000000014999999999", 1),
            ("0.0000000005", 1),
            ("0.0000000004999", 0),
            ("0.00000000049", 0),
            ("0.00000000005", 0),
            ("1.9999999995", 2_000_000_000),
            ("5e-10", 1),
            ("4.9e-10", 0),
            ("5e-11", 0),
        ];
        for (text, nanos) in cases {
            assert_eq!(parse_usd_to_nanos(text), Ok(nanos), "{text}");
        }
    }

    #[test]
    fn refuses_bad_input_saying_why() {
        let cases = [
            ("", CostError::Empty),
            ("   ", CostError::Empty),
            ("-1", CostError::Negative),
            ("-0", CostError::Negative),
            ("NaN", CostError::NotFinite),
            ("inf", CostError::NotFinite),
            ("+Infinity", CostError::NotFinite),
            (".", CostError::NoDigits),
            ("1e", CostError::NoDigits),
            ("abc", CostError::Invalid { at: 0, found: 'a' }),
            ("1.2.3", CostError::Invalid { at: 3, found: '.' }),
            ("1,5", CostError::Invalid { at: 1, found: ',' }),
            ("$1", CostError::Invalid { at: 0, found: '$' }),
            ("1 USD", CostError::Invalid { at: 1, found: ' ' }),
            ("0x10", CostError::Invalid { at: 1, found: 'x' }),
            ("1e400", CostError::Overflow),
            ("9223372036.854775808", CostError::Overflow),
            ("10000000000", CostError::Overflow),
            ("99999999999999999999999999", CostError::Overflow),
        ];
        for (text, error) in cases {
            assert_eq!(parse_usd_to_nanos(text), Err(error), "{text:?}");
        }
        assert_eq!(
            CostError::Invalid { at: 0, found: 'a' }.to_string(),
            "the cost is not a decimal number: unexpected 'a' at byte 0"
        );
    }

    #[test]
    fn rounding_up_at_the_top_overflows() {
        assert_eq!(
            parse_usd_to_nanos("9223372036.8547758075"),
            Err(CostError::Overflow)
        );
        assert_eq!(parse_usd_to_nanos("9223372036.8547758074"), Ok(i64::MAX));
    }
}
