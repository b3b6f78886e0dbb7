//! Customers' effective limits: the configured tier merged with the
//! customer's own overrides, kept in the [`Limiter`] and refreshed by the
//! change feed (a tier change is live on every instance within a second).

use std::collections::HashMap;
use std::sync::Arc;

use dashmap::DashMap;

use crate::ids::CustomerId;
use crate::limits::{Limiter, Limits};
use crate::store::{Customer, Page, Store, StoreError};

/// Customers fetched per page when loading them all.
const PAGE: u32 = 1000;

/// The tiers of the config and what each customer gets.
pub struct Policies {
    tiers: HashMap<String, Limits>,
    limiter: Arc<Limiter>,
    tier_of: DashMap<CustomerId, Arc<str>>,
}

impl Policies {
    pub fn new(tiers: HashMap<String, Limits>, limiter: Arc<Limiter>) -> Policies {
        Policies {
            tiers,
            limiter,
            tier_of: DashMap::new(),
        }
    }

    pub fn limiter(&self) -> &Arc<Limiter> {
        &self.limiter
    }

    /// The tier name of a known customer.
    pub fn tier(&self, customer: CustomerId) -> Option<Arc<str>> {
        self.tier_of.get(&customer).map(|tier| tier.clone())
    }

    /// Sets one customer's effective limits.
    ///
    /// A tier the config no longer has, or overrides that no longer parse
    /// (both only possible after a config change), leave the customer
    /// blocked rather than unlimited: every monthly limit zero, which the
    /// operator sees as 429s and in the log, never as an unbounded bill.
    pub fn apply(&self, customer: &Customer) {
        let limits = match self.tiers.get(&customer.tier) {
            Some(tier) => match tier.with_overrides(&customer.overrides) {
                Ok(limits) => limits,
                Err(error) => {
                    tracing::error!(
                        message = "Customer overrides are invalid; the customer is blocked until they are fixed.",
                        customer_id = %customer.id,
                        %error,
                    );
                    blocked()
                }
            },
            None => {
                tracing::error!(
                    message = "Customer has a tier the config does not define; the customer is blocked until it is.",
                    customer_id = %customer.id,
                    tier = %customer.tier,
                );
                blocked()
            }
        };
        self.tier_of
            .insert(customer.id, Arc::from(customer.tier.as_str()));
        self.limiter.set_limits(customer.id, limits);
    }

    /// Re-reads one customer (after a change event).
    pub async fn refresh(&self, store: &dyn Store, id: CustomerId) -> Result<(), StoreError> {
        match store.customer(id).await? {
            Some(customer) => self.apply(&customer),
            None => {
                self.tier_of.remove(&id);
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
