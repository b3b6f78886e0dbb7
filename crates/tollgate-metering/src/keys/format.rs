//! The key format (README, Keys and storage) and the digest keys are stored and looked up by.
//!
//! A key is `{prefix}_{30 base62 random}{6 base62 checksum}`. The checksum is
//! CRC-32 (IEEE) over the 30 random characters, in base62 (`0-9A-Za-z`), most
//! significant digit first, left-padded with `0`: anyone can check a key
//! offline, and a mistyped or truncated key is refused without a lookup.
//! Only the BLAKE3 digest of the whole key string is ever stored.

use std::fmt;

/// The base62 alphabet, in digit order.
pub(crate) const ALPHABET: &[u8; 62] =
    b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
/// Random characters per key (30 × log2(62) ≈ 178 bits of entropy).
pub(crate) const RANDOM_LEN: usize = 30;
/// Checksum characters per key.
pub(crate) const CHECKSUM_LEN: usize = 6;
/// Random characters shown in the display prefix.
pub(crate) const DISPLAY_LEN: usize = 8;

/// Why a presented string is not a well-formed key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyFormatError {
    #[error("the key does not start with the expected prefix")]
    Prefix,
    #[error("the key has the wrong length")]
    Length,
    #[error("the key contains characters outside base62")]
    Alphabet,
    #[error("the key's checksum does not match")]
    Checksum,
}

/// The BLAKE3 digest of a key: what is stored and what the cache is keyed by.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyDigest(pub [u8; 32]);

impl KeyDigest {
    pub fn of(key: &str) -> KeyDigest {
        KeyDigest(*blake3::hash(key.as_bytes()).as_bytes())
    }
}

impl fmt::Debug for KeyDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyDigest(")?;
        for byte in &self.0[..6] {
            write!(f, "{byte:02x}")?;
        }
        write!(f, "…)")
    }
}

/// A plaintext key, held only long enough to show it once. Its `Debug` and
/// `Display` never print it; [`PlainKey::expose`] is the one way out.
#[derive(Clone, PartialEq, Eq)]
pub struct PlainKey(String);

impl PlainKey {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for PlainKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PlainKey(<redacted>)")
    }
}

/// Keys with a given prefix (`keys.prefix` in config).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyFormat {
    /// `{prefix}_`.
    head: String,
}

impl KeyFormat {
    pub fn new(prefix: &str) -> KeyFormat {
        KeyFormat {
            head: format!("{prefix}_"),
        }
    }

    /// The total length of a key in this format.
    pub(crate) fn key_len(&self) -> usize {
        self.head.len() + RANDOM_LEN + CHECKSUM_LEN
    }

    /// A fresh key from the OS CSPRNG.
    pub fn generate(&self) -> Result<PlainKey, getrandom::Error> {
        let mut random = [0u8; RANDOM_LEN];
        fill_base62(&mut random)?;
        let mut key = String::with_capacity(self.key_len());
        key.push_str(&self.head);
        // Base62 bytes are ASCII.
        key.extend(random.iter().map(|&b| b as char));
        key.extend(checksum(&random).iter().map(|&b| b as char));
        Ok(PlainKey(key))
    }

    /// Checks shape and checksum without any lookup.
    pub fn check(&self, presented: &str) -> Result<(), KeyFormatError> {
        let rest = presented
            .strip_prefix(self.head.as_str())
            .ok_or(KeyFormatError::Prefix)?
            .as_bytes();
        if rest.len() != RANDOM_LEN + CHECKSUM_LEN {
            return Err(KeyFormatError::Length);
        }
        if !rest.iter().all(u8::is_ascii_alphanumeric) {
            return Err(KeyFormatError::Alphabet);
        }
        let (random, sum) = rest.split_at(RANDOM_LEN);
        if checksum(random) != sum {
            return Err(KeyFormatError::Checksum);
        }
        Ok(())
    }

    /// `{prefix}_` plus the first 8 random characters, for humans. Only
    /// meaningful for a key that passed [`KeyFormat::check`].
    pub fn display_prefix(&self, key: &str) -> String {
        key.chars().take(self.head.len() + DISPLAY_LEN).collect()
    }
}

/// The 6-character base62 CRC-32 of `random`.
pub(crate) fn checksum(random: &[u8]) -> [u8; CHECKSUM_LEN] {
    let mut value = crc32fast::hash(random);
    let mut out = [b'0'; CHECKSUM_LEN];
    for slot in out.iter_mut().rev() {
        *slot = ALPHABET[(value % 62) as usize];
        value /= 62;
    }
    out
}

/// Fills `out` with uniformly random base62 characters. Bytes at or above
/// 248 (= 4 × 62) are rejected so that `% 62` has no bias.
fn fill_base62(out: &mut [u8]) -> Result<(), getrandom::Error> {
    let mut filled = 0;
    let mut pool = [0u8; 64];
    while filled < out.len() {
        getrandom::fill(&mut pool)?;
        for &byte in &pool {
            if filled == out.len() {
                break;
            }
            if byte < 248 {
                out[filled] = ALPHABET[(byte % 62) as usize];
                filled += 1;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn generated_keys_check_and_have_the_documented_format() {
        let format = KeyFormat::new("tg");
        let key = format.generate().unwrap();
        let text = key.expose();
        assert_eq!(text.len(), 3 + 36);
        assert!(text.starts_with("tg_"));
        assert_eq!(format.check(text), Ok(()));
        assert_eq!(format.display_prefix(text), &text[..11]);
        assert_eq!(format!("{key:?}"), "PlainKey(<redacted>)");
        assert_ne!(format.generate().unwrap(), key, "keys are random");
    }

    #[test]
    fn checksum_matches_an_independent_computation() {
        // CRC-32/IEEE of "123456789" is the standard check value
        // 0xCBF43926 = 3421780262, which in base62 (computed separately) is
        // "3jZRME".
        assert_eq!(crc32fast::hash(b"123456789"), 0xCBF4_3926);
        assert_eq!(&checksum(b"123456789"), b"3jZRME");
        // A zero-ish CRC is left-padded.
        let format = KeyFormat::new("tg");
        let random = "A".repeat(RANDOM_LEN);
        let key = format!(
            "tg_{random}{}",
            std::str::from_utf8(&checksum(random.as_bytes())).unwrap()
        );
        assert_eq!(format.check(&key), Ok(()));
    }

    #[test]
    fn malformed_keys_say_why() {
        let format = KeyFormat::new("tg");
        let key = format.generate().unwrap().expose().to_owned();
        assert_eq!(
            format.check(&key.replacen("tg_", "sk_", 1)),
            Err(KeyFormatError::Prefix)
        );
        assert_eq!(
            format.check(&key[..key.len() - 1]),
            Err(KeyFormatError::Length)
        );
        let mut bad = key.clone().into_bytes();
        bad[5] = b'-';
        assert_eq!(
            format.check(std::str::from_utf8(&bad).unwrap()),
            Err(KeyFormatError::Alphabet)
        );
        assert_eq!(format.check(""), Err(KeyFormatError::Prefix));
    }

    proptest! {
        #[test]
        fn any_single_character_change_is_caught(pos in 3usize..39, replacement in 0usize..62) {
            let format = KeyFormat::new("tg");
            let key = format.generate().unwrap().expose().to_owned();
            let mut bytes = key.clone().into_bytes();
            let new = ALPHABET[replacement];
            prop_assume!(bytes[pos] != new);
            bytes[pos] = new;
            let changed = String::from_utf8(bytes).unwrap();
            // CRC-32 detects every single-symbol error.
            prop_assert_eq!(format.check(&changed), Err(KeyFormatError::Checksum));
        }

        #[test]
        fn any_random_part_with_its_checksum_checks(random in "[0-9A-Za-z]{30}") {
            let format = KeyFormat::new("tg");
            let sum = checksum(random.as_bytes());
            let key = format!("tg_{random}{}", std::str::from_utf8(&sum).unwrap());
            prop_assert_eq!(format.check(&key), Ok(()));
            prop_assert_eq!(KeyDigest::of(&key), KeyDigest::of(&key.clone()));
        }

        #[test]
        fn checksums_are_six_base62_digits(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let sum = checksum(&bytes);
            prop_assert!(sum.iter().all(u8::is_ascii_alphanumeric));
            // Decoding the digits gives back the CRC.
            let decoded = sum.iter().fold(0u64, |acc, &d| {
                acc * 62 + ALPHABET.iter().position(|&a| a == d).unwrap() as u64
            });
            prop_assert_eq!(decoded, u64::from(crc32fast::hash(&bytes)));
        }
    }

    /// The documented key format, checked independently of [`KeyFormat::check`]:
    /// `tg_`, 30 base62 characters, then the base62 CRC-32 of those 30.
    fn valid_by_the_documented_format(presented: &str) -> bool {
        let Some(rest) = presented.strip_prefix("tg_") else {
            return false;
        };
        let rest = rest.as_bytes();
        rest.len() == RANDOM_LEN + CHECKSUM_LEN && rest.iter().all(|b| ALPHABET.contains(b)) && {
            let crc = u64::from(crc32fast::hash(&rest[..RANDOM_LEN]));
            let mut digits = [b'0'; CHECKSUM_LEN];
            let mut n = crc;
            for digit in digits.iter_mut().rev() {
                *digit = ALPHABET[(n % 62) as usize];
                n /= 62;
            }
            rest[RANDOM_LEN..] == digits
        }
    }

    /// Any text a client might present: near-keys (a generated key with
    /// some characters replaced, removed or added) and arbitrary strings.
    fn presented() -> impl Strategy<Value = String> {
        let near_key = (
            proptest::collection::vec((0usize..48, any::<char>(), 0u8..3), 0..3),
            any::<bool>(),
        )
            .prop_map(|(edits, keep)| {
                let key = KeyFormat::new("tg").generate().unwrap().expose().to_owned();
                let mut chars: Vec<char> = key.chars().collect();
                if keep {
                    return chars.into_iter().collect();
                }
                for (at, c, kind) in edits {
                    let at = at % (chars.len() + 1);
                    match kind {
                        0 if at < chars.len() => chars[at] = c,
                        1 if at < chars.len() => {
                            chars.remove(at);
                        }
                        _ => chars.insert(at, c),
                    }
                }
                chars.into_iter().collect()
            });
        prop_oneof![near_key, any::<String>(), "tg_[0-9A-Za-z]{30,37}"]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// `check` accepts exactly the keys the documented format describes, whatever
        /// it is given.
        #[test]
        fn arbitrary_input_key_check_accepts_exactly_the_valid_ones(text in presented()) {
            prop_assert_eq!(KeyFormat::new("tg").check(&text).is_ok(), valid_by_the_documented_format(&text), "{:?}", text);
            // The display prefix never panics, even for text that is not a key.
            let shown = KeyFormat::new("tg").display_prefix(&text);
            prop_assert!(shown.chars().count() <= 11);
        }

        /// Every generated key checks; any one character replaced by any
        /// other character, at any position (prefix included), is refused.
        #[test]
        fn arbitrary_input_key_any_single_character_change_is_refused(
            at in 0usize..39,
            replacement in any::<char>(),
        ) {
            let format = KeyFormat::new("tg");
            let key = format.generate().unwrap().expose().to_owned();
            prop_assert_eq!(format.check(&key), Ok(()));
            let mut chars: Vec<char> = key.chars().collect();
            prop_assume!(chars[at] != replacement);
            chars[at] = replacement;
            let changed: String = chars.into_iter().collect();
            prop_assert!(format.check(&changed).is_err(), "{:?}", changed);
        }
    }
}
