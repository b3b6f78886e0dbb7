//! Console sign-in sessions: kept on the server, named by a random id in an
//! `HttpOnly`, `SameSite=Strict` cookie, each with its own CSRF token.
//! Signing out, or the end of `admin.session_ttl`, ends one here; nothing of
//! it is kept in the browser but the id.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The cookie that names a session.
pub(crate) const COOKIE: &str = "tollgate_session";

/// The most sessions held at once; signing in past it ends the oldest.
const MAX_SESSIONS: usize = 10_000;

/// One signed-in browser.
#[derive(Clone, Debug)]
pub(crate) struct Session {
    /// Must come with every state-changing request.
    pub(crate) csrf: String,
    expires: Instant,
}

/// The sessions of this gateway instance.
#[derive(Debug, Default)]
pub(crate) struct Sessions {
    by_id: Mutex<HashMap<String, Session>>,
}

impl Sessions {
    /// Starts a session for `ttl`; returns its id and CSRF token, or `None`
    /// when the OS random source fails.
    pub(crate) fn start(&self, ttl: Duration) -> Option<(String, String)> {
        let id = random_hex()?;
        let csrf = random_hex()?;
        let now = Instant::now();
        let mut sessions = self.by_id.lock().unwrap_or_else(|e| e.into_inner());
        sessions.retain(|_, session| session.expires > now);
        if sessions.len() >= MAX_SESSIONS {
            let oldest = sessions
                .iter()
                .min_by_key(|(_, session)| session.expires)
                .map(|(id, _)| id.clone());
            if let Some(oldest) = oldest {
                sessions.remove(&oldest);
            }
        }
        let session = Session {
            csrf: csrf.clone(),
            expires: now + ttl,
        };
        sessions.insert(id.clone(), session);
        Some((id, csrf))
    }

    /// The live session `id` names, if any.
    pub(crate) fn get(&self, id: &str) -> Option<Session> {
        let mut sessions = self.by_id.lock().unwrap_or_else(|e| e.into_inner());
        match sessions.get(id) {
            Some(session) if session.expires > Instant::now() => Some(session.clone()),
            Some(_) => {
                sessions.remove(id);
                None
            }
            None => None,
        }
    }

    pub(crate) fn end(&self, id: &str) {
        self.by_id
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }
}

/// 32 random bytes as hex.
fn random_hex() -> Option<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).ok()?;
    Some(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Whether two secrets are equal, in time that does not depend on where
/// they differ.
pub(crate) fn same_secret(a: &str, b: &str) -> bool {
    blake3::hash(a.as_bytes()) == blake3::hash(b.as_bytes())
}

/// The session id in a `Cookie` header, if there is one.
pub(crate) fn session_cookie(header: &str) -> Option<&str> {
    header
        .split(';')
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_lives_for_its_ttl_until_it_is_ended() {
        let sessions = Sessions::default();
        let (id, csrf) = sessions.start(Duration::from_secs(60)).unwrap();
        assert_eq!(id.len(), 64);
        assert_ne!(id, csrf);
        assert_eq!(sessions.get(&id).unwrap().csrf, csrf);
        assert!(sessions.get("nope").is_none());
        sessions.end(&id);
        assert!(sessions.get(&id).is_none());
        let (short, _) = sessions.start(Duration::ZERO).unwrap();
        assert!(sessions.get(&short).is_none(), "expired at once");
    }

    #[test]
    fn the_cookie_is_found_among_others() {
        assert_eq!(
            session_cookie("a=1; tollgate_session=abc; b=2"),
            Some("abc")
        );
        assert_eq!(session_cookie("tollgate_sessionx=1"), None);
        assert!(same_secret("x", "x") && !same_secret("x", "y"));
    }
}
