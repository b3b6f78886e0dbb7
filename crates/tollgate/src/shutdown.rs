//! Process signals: SIGTERM and SIGINT both mean "stop accepting, drain,
//! exit 0"; SIGHUP means "re-read the config file".

/// SIGHUPs from now on (`None` where there are none, or they cannot be
/// listened for, which is logged). Must be called inside the runtime.
#[cfg(unix)]
pub fn hangups() -> Option<tokio::signal::unix::Signal> {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::hangup()) {
        Ok(hangups) => Some(hangups),
        Err(error) => {
            tracing::warn!(message = "Cannot listen for SIGHUP; reload with POST /v1/reload.", %error);
            None
        }
    }
}

#[cfg(not(unix))]
pub fn hangups() -> Option<()> {
    None
}

/// Calls `reload` on every SIGHUP; never returns.
#[cfg(unix)]
pub async fn reloads(hangups: Option<tokio::signal::unix::Signal>, reload: impl Fn()) {
    if let Some(mut hangups) = hangups {
        while hangups.recv().await.is_some() {
            tracing::info!(message = "SIGHUP received; reloading the config.");
            reload();
        }
    }
    std::future::pending::<()>().await;
}

#[cfg(not(unix))]
pub async fn reloads(_hangups: Option<()>, _reload: impl Fn()) {
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
