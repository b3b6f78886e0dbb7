//! Customers' effective limits: the configured tier merged with the
//! customer's own overrides, kept in the [`Limiter`] and refreshed by the
//! change feed (a tier change is live on every instance within a second).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use dashmap::DashMap;

use crate::events::{BlockedReason, CustomerBlocked};
use crate::keys::ids::CustomerId;
use crate::limits::{Limiter, Limits};
use crate::store::{Customer, KeyRecord, Page, Store, StoreError};
use crate::telemetry::emit;

/// Customers fetched per page when loading them all.
const PAGE: u32 = 1000;

/// The tiers of the config and what each customer gets.
pub struct Policies {
    /// The tiers, replaced on a config reload ([`Policies::set_tiers`]).
    /// Held while a customer's limits are computed and stored, so that
    /// updates (the change feed, a reload) apply one at a time and a
    /// reload never re-applies a customer's older version over a newer one.
    tiers: Mutex<HashMap<String, Limits>>,
    limiter: Arc<Limiter>,
    /// Every known customer, so that new tiers can be applied without
    /// asking the database.
    customers: DashMap<CustomerId, Known>,
}

struct Known {
    tier: Arc<str>,
    customer: Arc<Customer>,
}

impl Policies {
    pub fn new(tiers: HashMap<String, Limits>, limiter: Arc<Limiter>) -> Policies {
        Policies {
            tiers: Mutex::new(tiers),
            limiter,
            customers: DashMap::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Limits>> {
        self.tiers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Replaces the tiers and re-applies every known customer's limits.
    /// Counters are kept: only the limits they are checked against change.
    pub fn set_tiers(&self, tiers: HashMap<String, Limits>) {
        let mut current = self.lock();
        *current = tiers;
        let customers: Vec<Arc<Customer>> = self
            .customers
            .iter()
            .map(|entry| entry.value().customer.clone())
            .collect();
        for customer in customers {
            self.apply_with(&current, customer);
        }
    }

    /// How many known customers are on `tier`.
    pub fn customers_on(&self, tier: &str) -> usize {
        self.customers
            .iter()
            .filter(|entry| &*entry.value().tier == tier)
            .count()
    }

    pub fn limiter(&self) -> &Arc<Limiter> {
        &self.limiter
    }

    /// A known customer as last loaded.
    pub fn customer(&self, customer: CustomerId) -> Option<Arc<Customer>> {
        self.customers
            .get(&customer)
            .map(|known| known.customer.clone())
    }

    /// The tier name of a known customer.
    pub fn tier(&self, customer: CustomerId) -> Option<Arc<str>> {
        self.customers
            .get(&customer)
            .map(|known| known.tier.clone())
    }

    /// Sets (or clears) one key's own limits in the limiter; `unused`
    /// when the key has just been made (see [`Limiter::set_key_limits`]).
    pub fn set_key(&self, key: &KeyRecord, unused: bool) {
        self.limiter.set_key_limits(
            key.id,
            key.family_id,
            key.customer_id,
            key.limits.as_ref(),
            unused,
        );
    }

    /// Sets one customer's effective limits.
    ///
    /// A tier the config no longer has, or overrides that no longer parse
    /// (both only possible after a config change), leave the customer
    /// blocked rather than unlimited: every monthly limit zero, which the
    /// operator sees as 429s and in the log, never as an unbounded bill.
    pub(crate) fn apply(&self, customer: &Customer) {
        let tiers = self.lock();
        self.apply_with(&tiers, Arc::new(customer.clone()));
    }

    fn apply_with(&self, tiers: &HashMap<String, Limits>, customer: Arc<Customer>) {
        let limits = match tiers.get(&customer.tier) {
            Some(tier) => match tier.with_overrides(&customer.overrides) {
                Ok(limits) => limits,
                Err(error) => {
                    emit(CustomerBlocked {
                        customer: customer.id,
                        reason: BlockedReason::InvalidOverrides(&error),
                    });
                    blocked()
                }
            },
            None => {
                emit(CustomerBlocked {
                    customer: customer.id,
                    reason: BlockedReason::UnknownTier(&customer.tier),
                });
                blocked()
            }
        };
        self.limiter.set_limits(customer.id, limits);
        self.customers.insert(
            customer.id,
            Known {
                tier: Arc::from(customer.tier.as_str()),
                customer,
            },
        );
    }

    /// Re-reads one customer (after a change event).
    pub(crate) async fn refresh(
        &self,
        store: &dyn Store,
        id: CustomerId,
    ) -> Result<(), StoreError> {
        match store.customer(id).await? {
            Some(customer) => self.apply(&customer),
            None => {
                let _serialized = self.lock();
                self.customers.remove(&id);
                self.limiter.remove(id);
            }
        }
        Ok(())
    }

    /// Loads every customer; returns how many.
    pub async fn reload(&self, store: &dyn Store) -> Result<usize, StoreError> {
        let mut after = None;
        let mut count = 0;
        loop {
            let page = store.list_customers(Page { after, limit: PAGE }).await?;
            count += page.len();
            for customer in &page {
                self.apply(customer);
            }
            match page.last() {
                Some(last) if page.len() == PAGE as usize => after = Some(last.id),
                _ => return Ok(count),
            }
        }
    }
}

fn blocked() -> Limits {
    Limits {
        monthly_requests: Some(0),
        monthly_tokens: Some(0),
        monthly_cost_nanos: Some(0),
        ..Limits::default()
    }
}
