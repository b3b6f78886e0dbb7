//! What the binary's own machinery reports: the usage totals sync and
//! config reloads (see `tollgate_metering::telemetry`).

use std::time::Duration;

use tollgate_metering::telemetry::Event;
use tollgate_metering::StoreError;

use tollgate_accounts::ReloadReport;

use crate::reload::ReloadError;

/// The periodic totals sync failed; limits use the last totals plus this
/// instance's own counts until it recovers. Logged once per outage.
pub(crate) struct TotalsSyncFailed<'a>(pub &'a StoreError);

impl Event for TotalsSyncFailed<'_> {
    fn emit(self) {
        tracing::warn!(
            message = "Usage totals sync failed; limits use the last totals plus this instance's own counts.",
            error = %self.0,
        );
    }
}

/// The totals sync works again after failing.
pub(crate) struct TotalsSyncRecovered;

impl Event for TotalsSyncRecovered {
    fn emit(self) {
        tracing::info!(message = "Usage totals sync recovered.");
    }
}

/// A totals sync took more than a fifth of `usage.sync_interval` (and over
/// 100 ms): the syncs are spaced out so that they take at most a fifth of
/// the time (at most a minute apart), and quotas see other instances'
/// traffic that much later. Logged the first time and whenever the spacing
/// doubles, until the syncs are fast again.
pub(crate) struct TotalsSyncSlow {
    pub took: Duration,
    pub every: Duration,
    pub interval: Duration,
}

impl Event for TotalsSyncSlow {
    fn emit(self) {
        tracing::warn!(
            message = "Usage totals sync is slow; syncing less often than usage.sync_interval.",
            took_ms = millis(self.took),
            every_ms = millis(self.every),
            sync_interval_ms = millis(self.interval),
        );
    }
}

/// The totals syncs are fast again (under a tenth of `usage.sync_interval`):
/// every `usage.sync_interval`.
pub(crate) struct TotalsSyncFast {
    pub interval: Duration,
}

impl Event for TotalsSyncFast {
    fn emit(self) {
        tracing::info!(
            message = "Usage totals sync is back to every usage.sync_interval.",
            sync_interval_ms = millis(self.interval),
        );
    }
}

/// Whole milliseconds, as a number in every log format.
fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Who asked for a reload: the outcome of a SIGHUP is only in the log, so
/// its failure is an error; an API caller gets the reason in the reply.
#[derive(Clone, Copy)]
pub(crate) enum ReloadTrigger {
    Signal,
    Api,
}

/// A config reload was applied.
pub(crate) struct ConfigReloaded<'a> {
    pub report: &'a ReloadReport,
    pub trigger: ReloadTrigger,
}

impl Event for ConfigReloaded<'_> {
    fn emit(self) {
        tracing::info!(message = "Config reloaded.", changes = %json_text(&self.report.changed));
        let pending = &self.report.restart_required;
        if matches!(self.trigger, ReloadTrigger::Signal) && !pending.is_empty() {
            tracing::warn!(
                message = "Some changed settings take effect only after a restart.",
                keys = %json_text(pending),
            );
        }
    }
}

/// A config reload changed nothing.
pub(crate) struct ConfigReloadFailed<'a> {
    pub error: &'a ReloadError,
    pub trigger: ReloadTrigger,
}

impl Event for ConfigReloadFailed<'_> {
    fn emit(self) {
        let error = self.error;
        match self.trigger {
            ReloadTrigger::Signal => tracing::error!(
                message = "Config reload failed; the running config is unchanged.",
                %error,
            ),
            ReloadTrigger::Api => tracing::warn!(
                message = "Config reload refused; the running config is unchanged.",
                %error,
            ),
        }
    }
}

fn json_text(value: &impl serde::Serialize) -> String {
    serde_json::to_string(value).unwrap_or_default()
}
