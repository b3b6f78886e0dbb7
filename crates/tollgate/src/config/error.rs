//! The one error type of config loading.
//!
//! Every message is one line, shaped like a compiler diagnostic so that
//! editors and CI logs can jump to it:
//!
//! ```text
//! {file}:{line}:{column}: {key.path}: {message}
//! tollgate.toml:14:11: routes[1].timeout: invalid duration "5 parsecs" (expected e.g. "250ms", "10s", "5m", "24h", "30d")
//! ```
//!
//! `:{line}:{column}` is left out when no location is known and `{key.path}: `
//! when the error is not about one key (a TOML syntax error). Lines and
//! columns are 1-based; columns count characters, not bytes. Messages never
//! contain the value of an admin token, a header value or a database URL,
//! since those often come from secrets in the environment.

use std::fmt;
use std::path::PathBuf;

/// A 1-based position in the config text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub line: usize,
    pub column: usize,
}

impl Location {
    /// The line and column of byte `offset` in `text`. An offset past the end
    /// or inside a character is clamped to the nearest valid position before
    /// it, so a slightly off span from the parser still yields a location.
    pub(crate) fn of_offset(text: &str, offset: usize) -> Self {
        let mut offset = offset.min(text.len());
        while !text.is_char_boundary(offset) {
            offset -= 1;
        }
        let before = &text[..offset];
        let line_start = before.rfind('\n').map_or(0, |newline| newline + 1);
        Self {
            line: before.matches('\n').count() + 1,
            column: before[line_start..].chars().count() + 1,
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// Why a config file could not be loaded.
///
/// Not `Clone`: [`ConfigError::Read`] carries the `std::io::Error`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read. The I/O error is part of the message
    /// rather than a `source()`, so that printing the chain does not repeat it.
    #[error("cannot read config file {}: {error}", path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },

    /// The text is not valid TOML.
    #[error("{}", render(origin, location.as_ref(), "", message))]
    Syntax {
        origin: String,
        location: Option<Location>,
        message: String,
    },

    /// A key or value is wrong: an unknown key, a value of the wrong type, or
    /// a value that fails validation.
    #[error("{}", render(origin, location.as_ref(), key_path, message))]
    Invalid {
        origin: String,
        location: Option<Location>,
        /// Like `routes[1].timeout`; empty for the document root.
        key_path: String,
        message: String,
    },

    /// A `${VAR}` names a variable that is not set.
    #[error(
        "{}",
        render(origin, location.as_ref(), key_path, &format!("environment variable {var} is not set"))
    )]
    MissingEnvVar {
        origin: String,
        location: Option<Location>,
        key_path: String,
        var: String,
    },
}

fn render(origin: &str, location: Option<&Location>, key_path: &str, message: &str) -> String {
    let mut out = String::from(origin);
    if let Some(location) = location {
        out.push(':');
        out.push_str(&location.to_string());
    }
    out.push_str(": ");
    if !key_path.is_empty() {
        out.push_str(key_path);
        out.push_str(": ");
    }
    out.push_str(message);
    out
}

impl ConfigError {
    /// The position of the offending value, when known.
    pub fn location(&self) -> Option<Location> {
        match self {
            Self::Read { .. } => None,
            Self::Syntax { location, .. }
            | Self::Invalid { location, .. }
            | Self::MissingEnvVar { location, .. } => *location,
        }
    }

    /// The 1-based line of the offending value, when known.
    pub fn line(&self) -> Option<usize> {
        self.location().map(|location| location.line)
    }

    /// The 1-based column of the offending value, when known.
    pub fn column(&self) -> Option<usize> {
        self.location().map(|location| location.column)
    }

    /// The dotted key path of the offending value (`routes[1].timeout`), when
    /// the error is about one key.
    pub fn key_path(&self) -> Option<&str> {
        match self {
            Self::Read { .. } | Self::Syntax { .. } => None,
            Self::Invalid { key_path, .. } | Self::MissingEnvVar { key_path, .. } => {
                Some(key_path.as_str()).filter(|path| !path.is_empty())
            }
        }
    }

    /// True when the file does not exist. The binary uses this to fall back
    /// to the built-in defaults when no config file was asked for explicitly.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::Read { error, .. } if error.kind() == std::io::ErrorKind::NotFound)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap (STYLE.md)
mod tests {
    use super::*;

    #[test]
    fn locations_are_one_based_and_count_characters() {
        let text = "a = 1\nbé = \"x\"\n";
        assert_eq!(
            Location::of_offset(text, 0),
            Location { line: 1, column: 1 }
        );
        assert_eq!(
            Location::of_offset(text, 4),
            Location { line: 1, column: 5 }
        );
        assert_eq!(
            Location::of_offset(text, 6),
            Location { line: 2, column: 1 }
        );
        // `"x"` starts at byte 12 but character 6 of line 2 ("é" is two bytes).
        assert_eq!(
            Location::of_offset(text, 12),
            Location { line: 2, column: 6 }
        );
        // Inside "é" and past the end are clamped rather than panicking.
        assert_eq!(
            Location::of_offset(text, 8),
            Location { line: 2, column: 2 }
        );
        assert_eq!(
            Location::of_offset(text, 999),
            Location { line: 3, column: 1 }
        );
    }

    #[test]
    fn display_leaves_out_unknown_parts() {
        let invalid = ConfigError::Invalid {
            origin: "t.toml".to_owned(),
            location: Some(Location { line: 3, column: 7 }),
            key_path: "server.listen".to_owned(),
            message: "bad".to_owned(),
        };
        assert_eq!(invalid.to_string(), "t.toml:3:7: server.listen: bad");
        let rootless = ConfigError::Invalid {
            origin: "t.toml".to_owned(),
            location: None,
            key_path: String::new(),
            message: "bad".to_owned(),
        };
        assert_eq!(rootless.to_string(), "t.toml: bad");
        assert_eq!(rootless.key_path(), None);
        let syntax = ConfigError::Syntax {
            origin: "t.toml".to_owned(),
            location: Some(Location { line: 1, column: 2 }),
            message: "oops".to_owned(),
        };
        assert_eq!(syntax.to_string(), "t.toml:1:2: oops");
        assert_eq!(syntax.line(), Some(1));
        assert_eq!(syntax.column(), Some(2));
    }
}
