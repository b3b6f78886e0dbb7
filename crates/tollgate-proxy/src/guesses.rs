//! Failed admin sign-ins, per client address: after [`ALLOWED`] in a
//! [`WINDOW`], an address is refused (429) until its window ends, the
//! right token included, so that tokens cannot be guessed at line rate.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Failed attempts an address may make in a window.
pub(crate) const ALLOWED: u32 = 10;
/// How long failures count, from an address's first.
pub(crate) const WINDOW: Duration = Duration::from_secs(60);
/// Addresses remembered at most: past it, the ones whose window has ended
/// are forgotten, and if that is not enough, all.
const REMEMBERED: usize = 65_536;

#[derive(Default)]
pub(crate) struct Guesses {
    by_peer: Mutex<HashMap<IpAddr, Window>>,
}

struct Window {
    started: Instant,
    failures: u32,
}

impl Guesses {
    /// How long `peer` must wait before another attempt; `None` if it may
    /// make one now.
    pub(crate) fn wait(&self, peer: IpAddr) -> Option<Duration> {
        let now = Instant::now();
        let by_peer = self.by_peer.lock().unwrap_or_else(|e| e.into_inner());
        let window = by_peer.get(&peer)?;
        let left = WINDOW.checked_sub(now.duration_since(window.started))?;
        (window.failures >= ALLOWED).then_some(left)
    }

    /// `peer` presented a token that is not one of the admin tokens.
    pub(crate) fn failed(&self, peer: IpAddr) {
        let now = Instant::now();
        let mut by_peer = self.by_peer.lock().unwrap_or_else(|e| e.into_inner());
        if by_peer.len() >= REMEMBERED && !by_peer.contains_key(&peer) {
            by_peer.retain(|_, window| now.duration_since(window.started) < WINDOW);
            if by_peer.len() >= REMEMBERED {
                by_peer.clear();
            }
        }
        let window = by_peer.entry(peer).or_insert(Window {
            started: now,
            failures: 0,
        });
        if now.duration_since(window.started) >= WINDOW {
            *window = Window {
                started: now,
                failures: 0,
            };
        }
        window.failures = window.failures.saturating_add(1);
    }

    /// `peer` signed in: its failures are forgotten.
    pub(crate) fn succeeded(&self, peer: IpAddr) {
        let mut by_peer = self.by_peer.lock().unwrap_or_else(|e| e.into_inner());
        by_peer.remove(&peer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_is_refused_after_its_allowance_and_others_are_not() {
        let guesses = Guesses::default();
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        for _ in 0..ALLOWED - 1 {
            guesses.failed(a);
        }
        assert_eq!(guesses.wait(a), None);
        guesses.failed(a);
        let wait = guesses.wait(a).unwrap();
        assert!(
            wait > WINDOW - Duration::from_secs(5) && wait <= WINDOW,
            "{wait:?}"
        );
        assert_eq!(guesses.wait(b), None);
        guesses.succeeded(a);
        assert_eq!(guesses.wait(a), None);
    }
}
