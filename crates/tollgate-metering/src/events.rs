//! What the key feed and the customer policies report about themselves
//! (see [`crate::telemetry`]). The recorder's events live beside it in
//! `usage`.

use std::time::Duration;

use crate::keys::ids::CustomerId;
use crate::store::{StoreError, StoreEvent};
use crate::telemetry::Event;

/// A change from the feed could not be applied; it is retried after
/// `retry_in`.
pub(crate) struct KeyFeedUpdateFailed<'a> {
    pub error: &'a StoreError,
    pub event: StoreEvent,
    pub retry_in: Duration,
}

impl Event for KeyFeedUpdateFailed<'_> {
    fn emit(self) {
        tracing::warn!(
            message = "Key cache update failed; retrying.",
            error = %self.error,
            event = ?self.event,
            retry_in_ms = self.retry_in.as_millis() as u64,
        );
    }
}

/// The feed lost track of changes and every key and customer was loaded
/// again.
pub(crate) struct KeyFeedResynced {
    pub keys: usize,
    pub customers: usize,
}

impl Event for KeyFeedResynced {
    fn emit(self) {
        tracing::info!(
            message = "Key cache and customer limits resynchronised.",
            keys = self.keys,
            customers = self.customers,
        );
    }
}

/// Why a customer is blocked until the operator fixes its record or the
/// config.
pub(crate) enum BlockedReason<'a> {
    /// Its overrides do not combine with its tier.
    InvalidOverrides(&'a dyn std::fmt::Display),
    /// Its tier is not in the config.
    UnknownTier(&'a str),
}

/// A customer whose limits cannot be computed is blocked (every monthly
/// limit zero), never left unlimited.
pub(crate) struct CustomerBlocked<'a> {
    pub customer: CustomerId,
    pub reason: BlockedReason<'a>,
}

impl Event for CustomerBlocked<'_> {
    fn emit(self) {
        match self.reason {
            BlockedReason::InvalidOverrides(error) => tracing::error!(
                message = "Customer overrides are invalid; the customer is blocked until they are fixed.",
                customer_id = %self.customer,
                %error,
            ),
            BlockedReason::UnknownTier(tier) => tracing::error!(
                message = "Customer has a tier the config does not define; the customer is blocked until it is.",
                customer_id = %self.customer,
                %tier,
            ),
        }
    }
}
