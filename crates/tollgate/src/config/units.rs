//! Parsers for the small value languages used in the config file: durations
//! (`"250ms"`), sizes (`"10MiB"`), rates (`"60/min"`) and USD amounts.
//!
//! They are public because the CLI and the admin API accept the same forms
//! (`keys create --expires-in 30d`, `keys rotate --grace 24h`, per-customer tier
//! overrides), and one grammar everywhere is easier to document than two.
//!
//! The grammars are deliberately strict: an unsigned integer immediately
//! followed by a unit, no whitespace, no fractions, no unit-less numbers. A
//! config value is read far more often than it is written, and `"10"` meaning
//! ten seconds in one place and ten milliseconds in another is how outages start.

use std::time::Duration;

/// A value that does not follow one of the grammars in this module.
///
/// The messages quote the offending input so that the config error pointing at
/// it reads on its own: `invalid duration "5 parsecs" (expected e.g. ...)`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    #[error("invalid duration {0:?} (expected e.g. \"250ms\", \"10s\", \"5m\", \"24h\", \"30d\")")]
    Duration(String),
    #[error("invalid size {0:?} (expected e.g. \"512KiB\", \"10MiB\", \"1GiB\")")]
    Size(String),
    #[error("invalid rate {0:?} (expected e.g. \"10/s\", \"60/min\", \"1000/h\")")]
    Rate(String),
    #[error("invalid rate {0:?} (the count must be at least 1)")]
    ZeroRate(String),
    #[error("{kind} {input:?} is too large")]
    TooLarge { kind: &'static str, input: String },
    #[error("amount {0} USD must not be negative")]
    NegativeAmount(String),
    #[error("amount must be a finite number of USD, not {0}")]
    NonFiniteAmount(String),
    #[error("amount {0} USD is too large (the maximum is 9223372036.854775807)")]
    AmountTooLarge(String),
}

/// Splits `"250ms"` into `(250, "ms")`. `None` when there are no leading
/// digits; `Some((None, unit))` when the digits overflow a `u64`.
fn split_number(input: &str) -> Option<(Option<u64>, &str)> {
    let digits_end = input
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(input.len());
    if digits_end == 0 {
        return None;
    }
    let (digits, unit) = input.split_at(digits_end);
    // Only overflow can fail here: `digits` is a non-empty run of ASCII digits.
    Some((digits.parse::<u64>().ok(), unit))
}

/// Parses `<integer><unit>` with unit `ms`, `s`, `m` (minutes), `h` or `d`.
///
/// Zero is accepted here; whether a zero duration makes sense is for the
/// caller to decide (a timeout of zero does not, a grace period of zero does).
pub fn parse_duration(input: &str) -> Result<Duration, UnitError> {
    let invalid = || UnitError::Duration(input.to_owned());
    let too_large = || UnitError::TooLarge {
        kind: "duration",
        input: input.to_owned(),
    };
    let (count, unit) = split_number(input).ok_or_else(invalid)?;
    let millis_per_unit: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60 * 1_000,
        "h" => 60 * 60 * 1_000,
        "d" => 24 * 60 * 60 * 1_000,
        _ => return Err(invalid()),
    };
    let millis = count
        .and_then(|count| count.checked_mul(millis_per_unit))
        .ok_or_else(too_large)?;
    Ok(Duration::from_millis(millis))
}

/// Bytes in a kibibyte, mebibyte, gibibyte and tebibyte.
pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;
pub const TIB: u64 = 1 << 40;

/// Parses `<integer><unit>` into bytes, with unit `B`, `KiB`, `MiB`, `GiB`,
/// `TiB` (powers of 1024) or `KB`, `MB`, `GB`, `TB` (powers of 1000).
/// Units are case-sensitive: `"10mb"` is rejected rather than guessed at.
pub fn parse_size(input: &str) -> Result<u64, UnitError> {
    let invalid = || UnitError::Size(input.to_owned());
    let (count, unit) = split_number(input).ok_or_else(invalid)?;
    let bytes_per_unit: u64 = match unit {
        "B" => 1,
        "KiB" => KIB,
        "MiB" => MIB,
        "GiB" => GIB,
        "TiB" => TIB,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        _ => return Err(invalid()),
    };
    count
        .and_then(|count| count.checked_mul(bytes_per_unit))
        .ok_or_else(|| UnitError::TooLarge {
            kind: "size",
            input: input.to_owned(),
        })
}

/// Parses `<count>/<unit>` with unit `s`, `min` or `h` into `(count, window)`.
/// The count must be at least 1: a rate of zero would block every request,
/// which is better said by not routing them.
pub fn parse_rate(input: &str) -> Result<(u64, Duration), UnitError> {
    let invalid = || UnitError::Rate(input.to_owned());
    let (count, unit) = split_number(input).ok_or_else(invalid)?;
    let per = match unit {
        "/s" => Duration::from_secs(1),
        "/min" => Duration::from_secs(60),
        "/h" => Duration::from_secs(60 * 60),
        _ => return Err(invalid()),
    };
    let count = count.ok_or_else(|| UnitError::TooLarge {
        kind: "rate",
        input: input.to_owned(),
    })?;
    if count == 0 {
        return Err(UnitError::ZeroRate(input.to_owned()));
    }
    Ok((count, per))
}

/// Nano-USD in one USD.
pub const NANOS_PER_USD: i64 = 1_000_000_000;

/// Converts a whole number of USD to nano-USD.
pub fn usd_int_to_nanos(usd: i64) -> Result<i64, UnitError> {
    if usd < 0 {
        return Err(UnitError::NegativeAmount(usd.to_string()));
    }
    usd.checked_mul(NANOS_PER_USD)
        .ok_or_else(|| UnitError::AmountTooLarge(usd.to_string()))
}

/// Converts a USD amount written as a TOML float to integer nano-USD.
///
/// The float is not multiplied by 1e9 (that would turn `0.075` into
/// `74_999_999.99…` before rounding and make exactness depend on luck).
/// Instead it is printed in Rust's shortest round-trip decimal form, which
/// for any literal of up to 15 significant digits is exactly what the operator
/// wrote, and that decimal string is converted with integer arithmetic. Digits
/// beyond the ninth decimal place are rounded half up: sub-nano precision has
/// no meaning for a price and rejecting it would only be pedantic.
pub fn usd_to_nanos(usd: f64) -> Result<i64, UnitError> {
    if !usd.is_finite() {
        return Err(UnitError::NonFiniteAmount(usd.to_string()));
    }
    if usd < 0.0 {
        return Err(UnitError::NegativeAmount(usd.to_string()));
    }
    // `abs` folds -0.0 (which passes the check above) into 0.0 so that the
    // decimal form below never carries a sign. Display for f64 never uses
    // exponent notation, so the text is always `digits[.digits]`.
    let text = usd.abs().to_string();
    let too_large = || UnitError::AmountTooLarge(text.clone());
    let (whole, fraction) = text.split_once('.').unwrap_or((&text, ""));
    // i64::MAX nanos is about 9.2e9 USD, so more than 10 whole digits always overflows.
    if whole.len() > 10 {
        return Err(too_large());
    }
    let whole: i64 = whole.parse().map_err(|_| too_large())?;
    let mut fraction_nanos: i64 = 0;
    for (position, digit) in fraction.bytes().take(9).enumerate() {
        let digit = i64::from(digit - b'0');
        fraction_nanos += digit * 10_i64.pow(8 - position as u32);
    }
    let round_up = fraction
        .as_bytes()
        .get(9)
        .is_some_and(|digit| *digit >= b'5');
    whole
        .checked_mul(NANOS_PER_USD)
        .and_then(|nanos| nanos.checked_add(fraction_nanos))
        .and_then(|nanos| nanos.checked_add(i64::from(round_up)))
        .ok_or_else(too_large)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap (STYLE.md)
mod tests {
    use super::*;

    #[test]
    fn durations_in_every_unit() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("30d"), Ok(Duration::from_secs(2_592_000)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
    }

    #[test]
    fn malformed_durations_are_rejected_with_a_hint() {
        for bad in [
            "",
            "10",
            "s",
            "5 parsecs",
            "10 s",
            " 10s",
            "1.5s",
            "-1s",
            "10S",
            "10sec",
            "5mins",
        ] {
            assert_eq!(
                parse_duration(bad),
                Err(UnitError::Duration(bad.to_owned())),
                "{bad:?}"
            );
        }
        assert_eq!(
            parse_duration("5 parsecs")
                .map_err(|e| e.to_string())
                .unwrap_err(),
            r#"invalid duration "5 parsecs" (expected e.g. "250ms", "10s", "5m", "24h", "30d")"#
        );
    }

    #[test]
    fn huge_durations_overflow_cleanly() {
        let err = parse_duration("99999999999999999999s").unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"duration "99999999999999999999s" is too large"#
        );
        assert!(matches!(
            parse_duration("18446744073709551615d"),
            Err(UnitError::TooLarge { .. })
        ));
    }

    #[test]
    fn sizes_binary_and_decimal() {
        assert_eq!(parse_size("0B"), Ok(0));
        assert_eq!(parse_size("512B"), Ok(512));
        assert_eq!(parse_size("512KiB"), Ok(512 * 1024));
        assert_eq!(parse_size("10MiB"), Ok(10 * 1024 * 1024));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("2TiB"), Ok(2 << 40));
        assert_eq!(parse_size("3KB"), Ok(3_000));
        assert_eq!(parse_size("3MB"), Ok(3_000_000));
        assert_eq!(parse_size("3GB"), Ok(3_000_000_000));
        assert_eq!(parse_size("3TB"), Ok(3_000_000_000_000));
    }

    #[test]
    fn malformed_sizes_are_rejected_with_a_hint() {
        for bad in [
            "", "10", "MiB", "10mib", "10 MiB", "1.5GiB", "10M", "-1B", "10KIB",
        ] {
            assert_eq!(
                parse_size(bad),
                Err(UnitError::Size(bad.to_owned())),
                "{bad:?}"
            );
        }
        assert_eq!(
            parse_size("10 megs").unwrap_err().to_string(),
            r#"invalid size "10 megs" (expected e.g. "512KiB", "10MiB", "1GiB")"#
        );
        assert_eq!(
            parse_size("20000000TiB").unwrap_err().to_string(),
            r#"size "20000000TiB" is too large"#
        );
    }

    #[test]
    fn rates() {
        assert_eq!(parse_rate("10/s"), Ok((10, Duration::from_secs(1))));
        assert_eq!(parse_rate("60/min"), Ok((60, Duration::from_secs(60))));
        assert_eq!(parse_rate("1000/h"), Ok((1000, Duration::from_secs(3600))));
        for bad in [
            "", "60", "/min", "60/m", "60 / min", "60/day", "1.5/s", "60/MIN",
        ] {
            assert_eq!(
                parse_rate(bad),
                Err(UnitError::Rate(bad.to_owned())),
                "{bad:?}"
            );
        }
        assert_eq!(
            parse_rate("0/s").unwrap_err().to_string(),
            r#"invalid rate "0/s" (the count must be at least 1)"#
        );
        assert_eq!(
            parse_rate("fast").unwrap_err().to_string(),
            r#"invalid rate "fast" (expected e.g. "10/s", "60/min", "1000/h")"#
        );
    }

    #[test]
    fn usd_floats_convert_exactly() {
        assert_eq!(usd_to_nanos(0.15), Ok(150_000_000));
        assert_eq!(usd_to_nanos(0.60), Ok(600_000_000));
        assert_eq!(usd_to_nanos(0.075), Ok(75_000_000));
        assert_eq!(usd_to_nanos(500.0), Ok(500_000_000_000));
        assert_eq!(usd_to_nanos(0.001), Ok(1_000_000));
        assert_eq!(usd_to_nanos(0.000000001), Ok(1));
        assert_eq!(usd_to_nanos(0.0), Ok(0));
        assert_eq!(usd_to_nanos(-0.0), Ok(0));
        assert_eq!(usd_to_nanos(2.5e-6), Ok(2_500));
        assert_eq!(usd_to_nanos(1234.567891234), Ok(1_234_567_891_234));
        // Sub-nano digits round half up.
        assert_eq!(usd_to_nanos(0.0000000015), Ok(2));
        assert_eq!(usd_to_nanos(0.0000000014), Ok(1));
        assert_eq!(usd_to_nanos(9_223_372_036.0), Ok(9_223_372_036_000_000_000));
    }

    #[test]
    fn bad_usd_amounts_are_rejected() {
        assert_eq!(
            usd_to_nanos(-0.5).unwrap_err().to_string(),
            "amount -0.5 USD must not be negative"
        );
        assert_eq!(
            usd_to_nanos(f64::NAN).unwrap_err().to_string(),
            "amount must be a finite number of USD, not NaN"
        );
        assert_eq!(
            usd_to_nanos(f64::INFINITY).unwrap_err().to_string(),
            "amount must be a finite number of USD, not inf"
        );
        assert!(matches!(
            usd_to_nanos(9_223_372_037.0),
            Err(UnitError::AmountTooLarge(_))
        ));
        assert!(matches!(
            usd_to_nanos(1e300),
            Err(UnitError::AmountTooLarge(_))
        ));
    }

    #[test]
    fn usd_integers() {
        assert_eq!(usd_int_to_nanos(500), Ok(500_000_000_000));
        assert_eq!(usd_int_to_nanos(0), Ok(0));
        assert_eq!(
            usd_int_to_nanos(-1).unwrap_err().to_string(),
            "amount -1 USD must not be negative"
        );
        assert!(matches!(
            usd_int_to_nanos(i64::MAX),
            Err(UnitError::AmountTooLarge(_))
        ));
    }

    use proptest::prelude::*;

    /// Milliseconds per duration unit, bytes per size unit, the rate windows.
    const DURATION_UNITS: [(&str, u64); 5] = [
        ("ms", 1),
        ("s", 1_000),
        ("m", 60_000),
        ("h", 3_600_000),
        ("d", 86_400_000),
    ];
    const SIZE_UNITS: [(&str, u64); 9] = [
        ("B", 1),
        ("KiB", KIB),
        ("MiB", MIB),
        ("GiB", GIB),
        ("TiB", TIB),
        ("KB", 1_000),
        ("MB", 1_000_000),
        ("GB", 1_000_000_000),
        ("TB", 1_000_000_000_000),
    ];
    const RATE_UNITS: [(&str, u64); 3] = [("/s", 1), ("/min", 60), ("/h", 3_600)];

    /// Digits (often more than fit a u64), then a unit or near-unit.
    fn unit_text() -> impl Strategy<Value = String> {
        prop_oneof![
            "[0-9]{1,25}(ms|s|m|h|d|B|KiB|MiB|GiB|TiB|KB|MB|GB|TB|/s|/min|/h|sec|MIB|/m|)",
            "[0-9 .+-]{0,6}[a-zA-Z/]{0,4}",
            any::<String>(),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// A count and a unit read back as count × unit, or `TooLarge` when
        /// that does not fit: never a wrapped value.
        #[test]
        fn arbitrary_input_units_round_trip(count in any::<u64>(), unit in 0usize..9) {
            let (name, millis) = DURATION_UNITS[unit % DURATION_UNITS.len()];
            let text = format!("{count}{name}");
            match count.checked_mul(millis) {
                Some(total) => prop_assert_eq!(parse_duration(&text), Ok(Duration::from_millis(total))),
                None => {
                    let too_large = matches!(parse_duration(&text), Err(UnitError::TooLarge { .. }));
                    prop_assert!(too_large, "{}", text);
                }
            }
            let (name, bytes) = SIZE_UNITS[unit];
            let text = format!("{count}{name}");
            match count.checked_mul(bytes) {
                Some(total) => prop_assert_eq!(parse_size(&text), Ok(total)),
                None => {
                    let too_large = matches!(parse_size(&text), Err(UnitError::TooLarge { .. }));
                    prop_assert!(too_large, "{}", text);
                }
            }
            let (name, seconds) = RATE_UNITS[unit % RATE_UNITS.len()];
            let text = format!("{count}{name}");
            let expected = if count == 0 {
                Err(UnitError::ZeroRate(text.clone()))
            } else {
                Ok((count, Duration::from_secs(seconds)))
            };
            prop_assert_eq!(parse_rate(&text), expected);
        }

        /// Any text is parsed or refused, never a panic; what is accepted
        /// is exactly `<digits><unit>` with a known unit.
        #[test]
        fn arbitrary_input_units_accept_exactly_the_grammar(text in unit_text()) {
            let grammar = |units: &[&str]| {
                let digits = text.bytes().take_while(u8::is_ascii_digit).count();
                digits > 0 && units.contains(&&text[digits..])
            };
            let durations: Vec<&str> = DURATION_UNITS.iter().map(|(u, _)| *u).collect();
            let sizes: Vec<&str> = SIZE_UNITS.iter().map(|(u, _)| *u).collect();
            let rates: Vec<&str> = RATE_UNITS.iter().map(|(u, _)| *u).collect();
            let duration = parse_duration(&text);
            if !grammar(&durations) {
                prop_assert_eq!(duration, Err(UnitError::Duration(text.clone())));
            } else {
                prop_assert!(!matches!(duration, Err(UnitError::Duration(_))));
            }
            let size = parse_size(&text);
            if !grammar(&sizes) {
                prop_assert_eq!(size, Err(UnitError::Size(text.clone())));
            } else {
                prop_assert!(!matches!(size, Err(UnitError::Size(_))));
            }
            let rate = parse_rate(&text);
            if !grammar(&rates) {
                prop_assert_eq!(rate, Err(UnitError::Rate(text.clone())));
            } else {
                prop_assert!(!matches!(rate, Err(UnitError::Rate(_))));
            }
        }

        /// Any USD float converts exactly or is refused; never a panic.
        #[test]
        fn arbitrary_input_units_usd(usd in any::<f64>(), whole in any::<i64>()) {
            match usd_to_nanos(usd) {
                Ok(nanos) => {
                    prop_assert!(usd >= 0.0 && nanos >= 0);
                    // Exact to the nano-USD, within float precision.
                    let back = nanos as f64 / 1e9;
                    prop_assert!((back - usd).abs() <= usd.abs() * 1e-12 + 1e-9, "{} -> {}", usd, nanos);
                }
                Err(_) => prop_assert!(!(0.0..9_223_372_036.854_775).contains(&usd)),
            }
            match usd_int_to_nanos(whole) {
                Ok(nanos) => prop_assert_eq!(i128::from(nanos), i128::from(whole) * 1_000_000_000),
                Err(_) => prop_assert!(!(0..=9_223_372_036).contains(&whole)),
            }
        }
    }

    #[test]
    fn the_largest_durations_are_errors_not_wraps() {
        assert!(matches!(
            parse_duration("999999999999999d"),
            Err(UnitError::TooLarge { .. })
        ));
        // Fits a u64 of milliseconds: representable here; whether it is a
        // sensible lifetime is for the caller (it is past year 9999).
        assert_eq!(
            parse_duration("999999999d"),
            Ok(Duration::from_millis(999_999_999 * 86_400_000))
        );
    }
}
