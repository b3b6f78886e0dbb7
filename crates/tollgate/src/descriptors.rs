//! File descriptors: how many connections each listener may really hold.
//!
//! Every client connection, upstream connection, database connection and
//! spool file takes a descriptor. A data plane allowed more connections than
//! the process has descriptors would, when flooded, leave none for the admin
//! listener (so `/healthz` fails with the data plane), for upstream
//! connections or for the spool. So at start the soft limit is raised to the
//! hard one (as nginx's `worker_rlimit_nofile` or Go's runtime do), and each
//! listener's budget is capped to a share of what is left: the data plane
//! at most half (each client connection may need an upstream one too), the
//! admin listener at most an eighth.
//!
//! # Failure behaviour
//! When the limit cannot be read (not Linux, or a sandbox) the configured
//! `max_connections` is used as it is; running out of descriptors then makes
//! the accept loops back off and retry instead of failing.

/// The data plane's share of the descriptor limit.
const DATA_SHARE: u64 = 2;
/// The admin listener's share of the descriptor limit.
const ADMIN_SHARE: u64 = 8;
/// Never less than this many connections per listener, however low the limit.
const FLOOR: u64 = 4;

/// Connection budgets per listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budgets {
    pub data: usize,
    pub admin: usize,
}

/// Raises the soft descriptor limit as far as allowed and splits it.
pub fn budgets(max_connections: usize) -> Budgets {
    let limit = raise_limit();
    let budgets = split(max_connections, limit);
    if let Some(limit) = limit {
        if budgets.data < max_connections {
            tracing::warn!(
                message = "The file-descriptor limit caps the connections per listener below server.max_connections.",
                descriptors = limit,
                max_connections,
                data = budgets.data,
                admin = budgets.admin,
            );
        }
    }
    budgets
}

fn split(max_connections: usize, limit: Option<u64>) -> Budgets {
    let share = |divisor: u64| match limit {
        Some(limit) => {
            let cap = usize::try_from((limit / divisor).max(FLOOR)).unwrap_or(usize::MAX);
            max_connections.min(cap)
        }
        None => max_connections,
    };
    Budgets {
        data: share(DATA_SHARE),
        admin: share(ADMIN_SHARE),
    }
}

/// The soft `RLIMIT_NOFILE` after raising it to the hard limit; `None` when
/// it cannot be read or is unlimited.
fn raise_limit() -> Option<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let Rlimit { current, maximum } = getrlimit(Resource::Nofile);
    if current < maximum {
        let raised = Rlimit {
            current: maximum,
            maximum,
        };
        if setrlimit(Resource::Nofile, raised).is_ok() {
            return maximum;
        }
    }
    current
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_are_shares_of_the_descriptor_limit() {
        assert_eq!(
            split(10_000, Some(256)),
            Budgets {
                data: 128,
                admin: 32
            }
        );
        assert_eq!(
            split(10_000, Some(1 << 20)),
            Budgets {
                data: 10_000,
                admin: 10_000
            }
        );
        assert_eq!(
            split(100, None),
            Budgets {
                data: 100,
                admin: 100
            }
        );
        assert_eq!(split(10_000, Some(8)), Budgets { data: 4, admin: 4 });
        assert_eq!(split(2, Some(8)), Budgets { data: 2, admin: 2 });
    }
}
