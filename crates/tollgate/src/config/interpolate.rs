//! `${VAR}` substitution in config string values.
//!
//! Substitution runs on each string value after the TOML has been parsed,
//! never on the raw text: a variable's value can then contain quotes, `#` or
//! newlines without changing the file's structure, and an error can name the
//! key and line of the value it came from.
//!
//! Rules:
//! - `${NAME}` is replaced by the variable's value; `NAME` is an ASCII letter
//!   or `_` followed by letters, digits or `_`.
//! - `$${` is an escape for a literal `${` (so `"$${HOME}"` stays `${HOME}`).
//! - A `$` not followed by `{` is kept as is, so values like `"pa$$word"` or
//!   `"$5"` need no escaping.
//! - Substitution is a single pass: a variable whose value itself contains
//!   `${...}` is inserted verbatim, not expanded again.
//! - Only values are substituted, never keys (table names, `set_headers`
//!   names, pricing model names).

/// Why a value could not be interpolated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum InterpolateError {
    /// `${NAME}` where the environment has no `NAME`.
    Missing(String),
    /// `${` with no closing `}`.
    Unterminated,
    /// `${...}` whose contents are not a valid variable name.
    InvalidName(String),
}

impl std::fmt::Display for InterpolateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Missing(name) => write!(f, "environment variable {name} is not set"),
            Self::Unterminated => f.write_str("unterminated \"${\" (write \"$${\" for a literal \"${\")"),
            Self::InvalidName(name) => write!(
                f,
                "invalid variable name {name:?} in \"${{...}}\" (expected letters, digits and _, not starting with a digit)"
            ),
        }
    }
}

fn is_valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|first| first.is_ascii_alphabetic() || first == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Substitutes every `${NAME}` in `value` using `env`.
pub(super) fn interpolate(
    value: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<String, InterpolateError> {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(dollar) = rest.find('$') {
        out.push_str(&rest[..dollar]);
        let tail = &rest[dollar..];
        if let Some(after) = tail.strip_prefix("$${") {
            out.push_str("${");
            rest = after;
        } else if let Some(body) = tail.strip_prefix("${") {
            let end = body.find('}').ok_or(InterpolateError::Unterminated)?;
            let name = &body[..end];
            if !is_valid_name(name) {
                return Err(InterpolateError::InvalidName(name.to_owned()));
            }
            let replacement =
                env(name).ok_or_else(|| InterpolateError::Missing(name.to_owned()))?;
            out.push_str(&replacement);
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap (STYLE.md)
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "KEY" => Some("sk-123".to_owned()),
            "EMPTY" => Some(String::new()),
            "_A1" => Some("x".to_owned()),
            "NESTED" => Some("${KEY}".to_owned()),
            _ => None,
        }
    }

    fn run(value: &str) -> Result<String, InterpolateError> {
        interpolate(value, &env)
    }

    #[test]
    fn substitutes_variables() {
        assert_eq!(run("Bearer ${KEY}"), Ok("Bearer sk-123".to_owned()));
        assert_eq!(run("${KEY}${KEY}"), Ok("sk-123sk-123".to_owned()));
        assert_eq!(run("a${EMPTY}b"), Ok("ab".to_owned()));
        assert_eq!(run("${_A1}"), Ok("x".to_owned()));
        assert_eq!(run("no variables"), Ok("no variables".to_owned()));
        assert_eq!(run(""), Ok(String::new()));
    }

    #[test]
    fn lone_dollars_and_escapes() {
        assert_eq!(run("pa$$word $5 $"), Ok("pa$$word $5 $".to_owned()));
        assert_eq!(run("$${KEY}"), Ok("${KEY}".to_owned()));
        // Scanned left to right: a lone `$`, then the `$${` escape.
        assert_eq!(run("$$${KEY}"), Ok("$${KEY}".to_owned()));
        assert_eq!(run("ünï${KEY}cødé"), Ok("ünïsk-123cødé".to_owned()));
    }

    #[test]
    fn single_pass() {
        assert_eq!(run("${NESTED}"), Ok("${KEY}".to_owned()));
    }

    #[test]
    fn errors() {
        assert_eq!(
            run("${NOPE}"),
            Err(InterpolateError::Missing("NOPE".to_owned()))
        );
        assert_eq!(run("x ${KEY"), Err(InterpolateError::Unterminated));
        assert_eq!(
            run("${}"),
            Err(InterpolateError::InvalidName(String::new()))
        );
        assert_eq!(
            run("${KEY:-default}"),
            Err(InterpolateError::InvalidName("KEY:-default".to_owned()))
        );
        assert_eq!(
            run("${1X}"),
            Err(InterpolateError::InvalidName("1X".to_owned()))
        );
        assert_eq!(
            InterpolateError::Missing("NOPE".to_owned()).to_string(),
            "environment variable NOPE is not set"
        );
    }
}
