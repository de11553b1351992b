//! In-flight requests per client (`rate_limiter.max_concurrent_per_client`): a rate limit
//! bounds how often a client may start requests, this bounds how many it may hold open at
//! once, so one client cannot fill the queue and the batch with long streams.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The count of open requests per client; clients with none are not kept.
pub struct ClientSlots {
    /// Most open requests one client may have; 0 = no limit.
    max: u32,
    held: Mutex<HashMap<String, u32>>,
}

/// A client already holds the most open requests it may.
#[derive(Debug)]
pub struct AllSlotsHeld;

/// One open request of `client`; given back when dropped.
pub struct ClientSlot {
    slots: Arc<ClientSlots>,
    client: String,
}

impl ClientSlots {
    pub fn new(max: u32) -> Arc<ClientSlots> {
        Arc::new(ClientSlots {
            max,
            held: Mutex::new(HashMap::new()),
        })
    }

    /// The most open requests per client (0 = no limit).
    pub fn max(&self) -> u32 {
        self.max
    }

    /// A slot for one more open request of `client`: `None` when the limit is off, `Err`
    /// when the client already holds `max`.
    pub fn take(self: &Arc<Self>, client: &str) -> Result<Option<ClientSlot>, AllSlotsHeld> {
        if self.max == 0 {
            return Ok(None);
        }
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let count = held.entry(client.to_string()).or_insert(0);
        if *count >= self.max {
            return Err(AllSlotsHeld);
        }
        *count += 1;
        Ok(Some(ClientSlot {
            slots: self.clone(),
            client: client.to_string(),
        }))
    }

    /// Open requests `client` holds now.
    pub fn held_by(&self, client: &str) -> u32 {
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.get(client).copied().unwrap_or(0)
    }

    /// Clients holding at least one slot.
    pub fn clients(&self) -> usize {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut held = self.slots.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = held.get_mut(&self.client) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                held.remove(&self.client);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_holds_at_most_max_and_gets_them_back() {
        let slots = ClientSlots::new(2);
        let a1 = slots.take("a").expect("first");
        let a2 = slots.take("a").expect("second");
        assert!(slots.take("a").is_err(), "a third is refused");
        let b1 = slots.take("b").expect("another client is not affected");
        assert_eq!((slots.held_by("a"), slots.held_by("b")), (2, 1));
        drop(a1);
        let a3 = slots.take("a").expect("a slot came back");
        drop((a2, a3, b1));
        assert_eq!(slots.clients(), 0, "clients with none are forgotten");
    }

    #[test]
    fn zero_means_no_limit() {
        let slots = ClientSlots::new(0);
        for _ in 0..1000 {
            assert!(slots.take("a").expect("no limit").is_none());
        }
        assert_eq!(slots.clients(), 0);
    }
}
