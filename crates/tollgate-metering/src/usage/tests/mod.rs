//! The usage parsers against real bodies and arbitrary input.

mod arbitrary_input;
mod extract;
