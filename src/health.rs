//! Readiness: each part of the process (a broker connection, the topology, a consumer, the ledger, a pause) reports
//! whether it is ready and, if not, why. `/readyz` answers 200 only when every registered part is ready and the
//! process is not draining; otherwise 503 with every reason. Liveness is separate and needs none of this.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

/// Shared readiness state.
#[derive(Debug, Default)]
pub struct Health {
    parts: Mutex<BTreeMap<String, Option<String>>>,
    draining: AtomicBool,
}

impl Health {
    /// An empty state: ready until a part is registered.
    pub fn new() -> Self {
        Self::default()
    }

    /// Marks `part` not ready because of `reason` (registering it if new).
    pub fn not_ready(&self, part: &str, reason: impl Into<String>) {
        self.parts
            .lock()
            .expect("health lock")
            .insert(part.to_string(), Some(reason.into()));
    }

    /// Marks `part` ready.
    pub fn ready(&self, part: &str) {
        self.parts
            .lock()
            .expect("health lock")
            .insert(part.to_string(), None);
    }

    /// Forgets `part` (a component that has stopped on purpose).
    pub fn remove(&self, part: &str) {
        self.parts.lock().expect("health lock").remove(part);
    }

    /// The process is shutting down: never ready again.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Whether shutdown has begun.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// `Ok` when ready, else every reason as `part: reason`.
    pub fn check(&self) -> Result<(), Vec<String>> {
        let mut reasons: Vec<String> = self
            .parts
            .lock()
            .expect("health lock")
            .iter()
            .filter_map(|(part, reason)| reason.as_ref().map(|r| format!("{part}: {r}")))
            .collect();
        if self.is_draining() {
            reasons.insert(0, "draining: shutting down".to_string());
        }
        if reasons.is_empty() {
            Ok(())
        } else {
            Err(reasons)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_accumulate_and_clear() {
        let h = Health::new();
        assert!(h.check().is_ok());
        h.not_ready("amqp", "connecting");
        h.not_ready("ledger", "not opened");
        assert_eq!(h.check().unwrap_err().len(), 2);
        h.ready("amqp");
        h.ready("ledger");
        assert!(h.check().is_ok());
        h.set_draining();
        assert_eq!(
            h.check().unwrap_err(),
            vec!["draining: shutting down".to_string()]
        );
    }
}
