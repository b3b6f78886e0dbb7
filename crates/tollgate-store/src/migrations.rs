//! Versioned schema migrations, embedded per backend.
//!
//! Each backend has an ordered list of SQL scripts numbered 1, 2, 3, … with
//! no gaps. A database records what it has applied in
//! `schema_migrations(version, name, applied_at)`. `migrate` applies the
//! pending scripts one transaction each (a failed script leaves the database
//! at the previous version), does nothing when the database is current, and
//! refuses a database whose recorded version is higher than any this binary
//! knows ([`StoreError::SchemaTooNew`]): an older binary must not write to a
//! schema it does not understand.
//!
//! To add a migration: write `migrations/{sqlite,postgres}/NNNN_name.sql`
//! and append it to both lists below. Never edit one that has shipped.

use tollgate_metering::StoreError;

/// One schema change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Migration {
    pub(crate) version: u32,
    pub(crate) name: &'static str,
    pub(crate) sql: &'static str,
}

pub(crate) const SQLITE: &[Migration] = &[
    Migration {
        version: 1,
        name: "keys",
        sql: include_str!("../migrations/sqlite/0001_keys.sql"),
    },
    Migration {
        version: 2,
        name: "usage",
        sql: include_str!("../migrations/sqlite/0002_usage.sql"),
    },
    Migration {
        version: 3,
        name: "reports",
        sql: include_str!("../migrations/sqlite/0003_reports.sql"),
    },
    Migration {
        version: 4,
        name: "customer_daily",
        sql: include_str!("../migrations/sqlite/0004_customer_daily.sql"),
    },
    Migration {
        version: 5,
        name: "key_limits",
        sql: include_str!("../migrations/sqlite/0005_key_limits.sql"),
    },
    Migration {
        version: 6,
        name: "webhooks",
        sql: include_str!("../migrations/sqlite/0006_webhooks.sql"),
    },
    Migration {
        version: 7,
        name: "usage_key",
        sql: include_str!("../migrations/sqlite/0007_usage_key.sql"),
    },
];

pub(crate) const POSTGRES: &[Migration] = &[
    Migration {
        version: 1,
        name: "keys",
        sql: include_str!("../migrations/postgres/0001_keys.sql"),
    },
    Migration {
        version: 2,
        name: "usage",
        sql: include_str!("../migrations/postgres/0002_usage.sql"),
    },
    Migration {
        version: 3,
        name: "reports",
        sql: include_str!("../migrations/postgres/0003_reports.sql"),
    },
    Migration {
        version: 4,
        name: "customer_daily",
        sql: include_str!("../migrations/postgres/0004_customer_daily.sql"),
    },
    Migration {
        version: 5,
        name: "key_limits",
        sql: include_str!("../migrations/postgres/0005_key_limits.sql"),
    },
    Migration {
        version: 6,
        name: "webhooks",
        sql: include_str!("../migrations/postgres/0006_webhooks.sql"),
    },
    Migration {
        version: 7,
        name: "usage_key",
        sql: include_str!("../migrations/postgres/0007_usage_key.sql"),
    },
];

/// The highest version in `migrations`.
pub(crate) fn latest(migrations: &[Migration]) -> u32 {
    migrations.last().map_or(0, |m| m.version)
}

/// The migration that follows `current`, `None` when the database is
/// current, `SchemaTooNew` when it is ahead of `migrations`.
pub(crate) fn next(
    migrations: &'static [Migration],
    current: u32,
) -> Result<Option<&'static Migration>, StoreError> {
    let binary = latest(migrations);
    if current > binary {
        return Err(StoreError::SchemaTooNew {
            database: current,
            binary,
        });
    }
    Ok(migrations.iter().find(|m| m.version > current))
}

/// `current` against `migrations`: `SchemaTooNew` when the database is
/// ahead, a `Config` error naming the fix when it is behind.
pub(crate) fn check_current(migrations: &[Migration], current: u32) -> Result<u32, StoreError> {
    let binary = latest(migrations);
    match current.cmp(&binary) {
        std::cmp::Ordering::Greater => Err(StoreError::SchemaTooNew {
            database: current,
            binary,
        }),
        std::cmp::Ordering::Less => Err(StoreError::Config(format!(
            "the database schema is at version {current}, older than this binary's {binary}; \
             run `tollgate migrate` (or set database.migrate = true)"
        ))),
        std::cmp::Ordering::Equal => Ok(current),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_contiguous_from_one_and_match_across_backends() {
        for list in [SQLITE, POSTGRES] {
            for (index, migration) in list.iter().enumerate() {
                assert_eq!(migration.version as usize, index + 1, "{}", migration.name);
                assert!(!migration.sql.trim().is_empty());
            }
        }
        let names =
            |list: &[Migration]| list.iter().map(|m| (m.version, m.name)).collect::<Vec<_>>();
        assert_eq!(names(SQLITE), names(POSTGRES));
    }

    #[test]
    fn next_walks_the_list_and_refuses_newer_databases() {
        assert_eq!(next(SQLITE, 0).ok().flatten().map(|m| m.version), Some(1));
        assert_eq!(next(SQLITE, latest(SQLITE)).ok().flatten(), None);
        match next(SQLITE, latest(SQLITE) + 1) {
            Err(StoreError::SchemaTooNew { database, binary }) => {
                assert_eq!((database, binary), (latest(SQLITE) + 1, latest(SQLITE)));
            }
            other => panic!("expected SchemaTooNew, got {other:?}"),
        }
    }
}
