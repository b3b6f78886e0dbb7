//! Telemetry as named events.
//!
//! Each thing the gateway reports about itself (a request refused, an
//! upstream that failed, a usage flush that failed, a spool append that
//! failed, a key feed that resynchronised, ...) is one type implementing
//! [`Event`]. Its [`Event::emit`] writes the log line and moves the metrics
//! in one call, so a log line and its counter cannot drift apart, and the
//! labels come from enums rather than strings assembled at the call site.
//!
//! Each crate keeps its own events next to the code that raises them (an
//! `events` module); this trait is the one shape they share.

/// One thing worth logging and counting.
pub trait Event {
    /// Logs this event and records its metrics.
    fn emit(self);
}

/// Emits `event`: `emit(SpoolAppendFailed { .. })` reads as what happened.
pub fn emit(event: impl Event) {
    event.emit();
}
