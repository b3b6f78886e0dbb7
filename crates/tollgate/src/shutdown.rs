//! Process signals: SIGTERM and SIGINT both mean "stop accepting, drain,
//! exit 0"; SIGHUP means "re-read the config file".

/// Calls `reload` on every SIGHUP; never returns (unless SIGHUP cannot be
/// listened for, which is logged).
pub async fn reloads(reload: impl Fn()) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::hangup()) {
            Ok(mut hangups) => {
                while hangups.recv().await.is_some() {
                    tracing::info!(message = "SIGHUP received; reloading the config.");
                    reload();
                }
            }
            Err(error) => {
                tracing::warn!(message = "Cannot listen for SIGHUP; reload with POST /v1/reload.", %error);
            }
        }
    }
    #[cfg(not(unix))]
    let _ = reload;
    std::future::pending::<()>().await;
}

/// Resolves when the process is asked to stop.
pub async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = terminate.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(error) => {
                tracing::warn!(message = "Cannot listen for SIGTERM; only SIGINT stops the gateway.", %error);
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
