//! Pacing of Didit writes, per API key: Didit allows `didit.writes_per_minute` writes (POST, PATCH, DELETE; 300 by
//! default) per key over a sliding window (`didit.rate_window_ms`, 60 s), and only says so on a 429. The bridge does
//! not find the limit by hitting it: every client built for a key shares one [`Budget`] for it ([`Pacing`] is the
//! registry, keyed by a SHA-256 of the key, never the key), and a write waits for room in the budget before it is
//! sent. Reads (GET) have their own, larger scope at Didit and are not paced.
//!
//! # Why a window and not a token bucket
//!
//! A token bucket (GCRA) with burst `B` and rate `r` lets `B + r·60 s` writes into any 60 s window; to stay under
//! Didit's window it needs `B + r·60 ≤ limit`, so a backlog of `N` takes `(N − B)/r`, about `N / limit` minutes.
//! Didit's window lets the first `limit` writes through at once and `limit` more each minute after: `N` writes in
//! `(⌈N/limit⌉ − 1)` minutes, the floor of DESIGN.md §10 (900 writes at 300: 2 minutes, where a bucket needs 3).
//! So the budget mirrors the window itself: it remembers the last `limit` writes and lets a write go while fewer
//! than `limit` happened within the window. A write is counted from the moment its answer arrived (in flight it
//! counts as now): Didit stamped it before answering, so Didit always forgets a write before the bridge does, and
//! the write's own latency is the margin — no other margin is needed, and the default is Didit's own 300.
//!
//! # The gate
//!
//! Another program using the same key, or a replica that does not split the budget, can still make Didit answer
//! 429. That answer closes the key's gate until its `Retry-After` (or `X-RateLimit-Reset`) for every caller of the
//! key, so one 429 stops them all instead of each finding out by its own.
//!
//! # Waiting is not failing
//!
//! Writes wait in arrival order. A caller gives its hold deadline (`retry.hold_max_s` from when the delivery arrived):
//! when the write cannot go before it, [`Budget::acquire`] says so at once ([`Paced`]) and the pipeline sends the
//! message through its retry queue without counting an attempt; a wait never dead-letters.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use crate::metrics::Metrics;

/// How long the gate stays closed after a 429 that names no wait: Didit's guidance starts its backoff at 5 s.
pub const GATE_WITHOUT_RETRY_AFTER: Duration = Duration::from_secs(5);

/// A write could not go before the caller's deadline: `wait` is the earliest it could (a lower bound when writes
/// in flight must finish first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Paced {
    /// How long from now the write would have had to wait at least.
    pub wait: Duration,
}

/// The registry of budgets of one bridge: one [`Budget`] per API key, whatever role or pipeline uses it.
#[derive(Debug)]
pub struct Pacing {
    limit: u32,
    window: Duration,
    metrics: Arc<Metrics>,
    budgets: Mutex<HashMap<[u8; 32], Arc<Budget>>>,
}

impl Pacing {
    /// `limit` writes per `window` per key; `0` switches the window off (the gate still works).
    pub fn new(limit: u32, window: Duration, metrics: Arc<Metrics>) -> Arc<Pacing> {
        Arc::new(Pacing {
            limit,
            window,
            metrics,
            budgets: Mutex::new(HashMap::new()),
        })
    }

    /// The budget of `key`, created on first use. `role` names it in metrics and logs (`issuer`, `receiver`; a key
    /// both roles use is `issuer+receiver`); the key itself is only hashed.
    pub fn budget(&self, key: &str, role: &str) -> Arc<Budget> {
        use sha2::Digest;
        let digest: [u8; 32] = sha2::Sha256::digest(key.as_bytes()).into();
        let mut budgets = lock(&self.budgets);
        let budget = budgets.entry(digest).or_insert_with(|| {
            Arc::new(Budget::new(
                self.limit,
                self.window,
                role,
                Some(self.metrics.clone()),
            ))
        });
        budget.join(role);
        Arc::clone(budget)
    }
}

/// One key's write budget and its 429 gate. Shared through an `Arc` by every client of the key.
#[derive(Debug)]
pub struct Budget {
    limit: u32,
    window: Duration,
    label: Mutex<String>,
    state: Mutex<Window>,
    /// Waiters take their turn in arrival order (tokio's mutex is fair); only the first one sleeps on the clock.
    turnstile: tokio::sync::Mutex<()>,
    metrics: Option<Arc<Metrics>>,
}

/// What the budget remembers: when recent writes were answered, how many are in flight, how many callers wait, and
/// until when a 429 closed the gate.
#[derive(Debug, Default)]
struct Window {
    done: VecDeque<Instant>,
    in_flight: u32,
    waiting: u32,
    gate: Option<Instant>,
}

impl Window {
    /// When the caller with `ahead` callers before it could send, at the earliest (exact when only answered writes
    /// fill the window; a lower bound when writes in flight must be answered and then age out first).
    fn slot(&mut self, now: Instant, limit: u32, window: Duration, ahead: u32) -> Instant {
        while self.done.front().is_some_and(|t| *t + window <= now) {
            self.done.pop_front();
        }
        let gate = self.gate.filter(|g| *g > now).unwrap_or(now);
        if limit == 0 {
            return gate;
        }
        let occupied = self.done.len() as u64 + u64::from(self.in_flight);
        let need = occupied + u64::from(ahead) + 1;
        let slot = if need <= u64::from(limit) {
            now
        } else {
            // This many remembered writes must leave the window first.
            let leave = (need - u64::from(limit)) as usize;
            match self.done.get(leave - 1) {
                Some(t) => *t + window,
                None => now + window,
            }
        };
        slot.max(gate)
    }
}

impl Budget {
    /// A budget on its own (tests; the bridge gets its budgets from [`Pacing`]).
    pub fn new(limit: u32, window: Duration, label: &str, metrics: Option<Arc<Metrics>>) -> Budget {
        Budget {
            limit,
            window,
            label: Mutex::new(label.to_string()),
            state: Mutex::new(Window::default()),
            turnstile: tokio::sync::Mutex::new(()),
            metrics,
        }
    }

    fn join(&self, role: &str) {
        let mut label = lock(&self.label);
        if !label.split('+').any(|r| r == role) {
            label.push('+');
            label.push_str(role);
        }
    }

    /// The metric label: the roles using this key.
    pub fn label(&self) -> String {
        lock(&self.label).clone()
    }

    /// Waits until a write may go, in arrival order, and returns the permit that counts it. With a `deadline`, a
    /// write that could not go by then is refused at once (or as soon as that is known) with [`Paced`], holding
    /// nothing. Cancel-safe: dropping the future gives its place up.
    pub async fn acquire(self: &Arc<Self>, deadline: Option<Instant>) -> Result<Permit, Paced> {
        let started = Instant::now();
        {
            let mut state = lock(&self.state);
            let ahead = state.waiting;
            let slot = state.slot(started, self.limit, self.window, ahead);
            if let Some(deadline) = deadline
                && slot > deadline
            {
                drop(state);
                return Err(self.deferred(slot - started));
            }
            state.waiting += 1;
        }
        let waiting = Waiting(self);
        let turn = match deadline {
            Some(deadline) => {
                match tokio::time::timeout_at(deadline, self.turnstile.lock()).await {
                    Ok(turn) => turn,
                    Err(_) => return Err(self.deferred(Duration::ZERO)),
                }
            }
            None => self.turnstile.lock().await,
        };
        loop {
            let now = Instant::now();
            let slot = {
                let mut state = lock(&self.state);
                let slot = state.slot(now, self.limit, self.window, 0);
                if slot <= now {
                    state.in_flight += 1;
                    state.waiting -= 1;
                    std::mem::forget(waiting);
                    break;
                }
                slot
            };
            if let Some(deadline) = deadline
                && slot > deadline
            {
                return Err(self.deferred(slot - now));
            }
            // Re-checked on waking: a 429 meanwhile may have closed the gate for longer.
            tokio::time::sleep_until(slot).await;
        }
        drop(turn);
        let waited = started.elapsed();
        if let Some(metrics) = &self.metrics {
            metrics.limiter_wait(&self.label(), waited);
        }
        if waited >= Duration::from_secs(1) {
            tracing::debug!(key = %self.label(), waited_ms = waited.as_millis() as u64, "write waited for the Didit rate limit");
        }
        Ok(Permit {
            budget: Arc::clone(self),
        })
    }

    fn deferred(&self, wait: Duration) -> Paced {
        if let Some(metrics) = &self.metrics {
            metrics.limiter_deferred(&self.label());
        }
        // Never zero: a retry loop reading it must see that the wait ends past its deadline.
        Paced {
            wait: wait.max(Duration::from_millis(1)),
        }
    }

    /// Closes the gate for every caller of this key until `now + wait` (a 429's `Retry-After`, or
    /// [`GATE_WITHOUT_RETRY_AFTER`]); a gate already closed for longer stays so.
    pub fn close_gate(&self, wait: Option<Duration>) {
        let until = Instant::now() + wait.unwrap_or(GATE_WITHOUT_RETRY_AFTER);
        let mut state = lock(&self.state);
        if state.gate.is_none_or(|g| g < until) {
            state.gate = Some(until);
        }
        drop(state);
        tracing::info!(key = %self.label(), wait_ms = wait.unwrap_or(GATE_WITHOUT_RETRY_AFTER).as_millis() as u64, "Didit answered 429; every write with this key waits");
    }

    /// Callers waiting for room right now.
    pub fn waiting(&self) -> u32 {
        lock(&self.state).waiting
    }

    /// Until when the gate is closed, if it is.
    pub fn gate(&self) -> Option<Instant> {
        lock(&self.state).gate.filter(|g| *g > Instant::now())
    }
}

/// Gives a waiter's place up when its future is dropped.
struct Waiting<'a>(&'a Budget);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        lock(&self.0.state).waiting -= 1;
    }
}

/// One write on its way: dropping it (the answer arrived, or the call was abandoned) counts the write from now.
#[derive(Debug)]
pub struct Permit {
    budget: Arc<Budget>,
}

impl Permit {
    /// Didit answered 429: close the key's gate.
    pub fn rate_limited(&self, retry_after: Option<Duration>) {
        self.budget.close_gate(retry_after);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let now = Instant::now();
        let mut state = lock(&self.budget.state);
        state.in_flight = state.in_flight.saturating_sub(1);
        if self.budget.limit > 0 {
            // Answers arrive in time order under this lock, so the deque stays sorted.
            let at = state.done.back().map_or(now, |last| now.max(*last));
            state.done.push_back(at);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain data: a panic elsewhere cannot leave it half-updated in a way that matters more than stopping would.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_secs(60);

    fn budget(limit: u32) -> Arc<Budget> {
        Arc::new(Budget::new(limit, WINDOW, "test", None))
    }

    #[tokio::test(start_paused = true)]
    async fn the_window_fills_then_opens_a_minute_after_each_answer() {
        let b = budget(3);
        let t0 = Instant::now();
        for _ in 0..3 {
            drop(b.acquire(None).await.unwrap());
        }
        assert_eq!(Instant::now(), t0, "three writes fit at once");
        tokio::time::advance(Duration::from_secs(10)).await;
        drop(b.acquire(None).await.unwrap());
        assert_eq!(
            Instant::now(),
            t0 + WINDOW,
            "the fourth waits for the first to age out"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_in_flight_counts_until_answered() {
        let b = budget(1);
        let permit = b.acquire(None).await.unwrap();
        tokio::time::advance(Duration::from_secs(90)).await;
        let t_answer = Instant::now();
        drop(permit);
        drop(b.acquire(None).await.unwrap());
        assert_eq!(Instant::now(), t_answer + WINDOW);
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_refuses_at_once_and_holds_nothing() {
        let b = budget(2);
        drop(b.acquire(None).await.unwrap());
        drop(b.acquire(None).await.unwrap());
        let t0 = Instant::now();
        let e = b
            .acquire(Some(t0 + Duration::from_secs(30)))
            .await
            .unwrap_err();
        assert_eq!(e.wait, WINDOW);
        assert_eq!(Instant::now(), t0, "refused without waiting");
        assert_eq!(lock(&b.state).waiting, 0);
        // A deadline the slot fits in waits for it.
        drop(b.acquire(Some(t0 + WINDOW)).await.unwrap());
        assert_eq!(Instant::now(), t0 + WINDOW);
    }

    #[tokio::test(start_paused = true)]
    async fn callers_queued_ahead_count_against_a_deadline() {
        let b = budget(2);
        drop(b.acquire(None).await.unwrap());
        tokio::time::advance(Duration::from_secs(1)).await;
        drop(b.acquire(None).await.unwrap());
        let t0 = Instant::now();
        // The first waiter takes the slot at t0 + 59 s; the second needs the one at t0 + 60 s.
        let first = tokio::spawn({
            let b = b.clone();
            async move { b.acquire(None).await.map(drop) }
        });
        tokio::task::yield_now().await;
        let e = b
            .acquire(Some(t0 + Duration::from_millis(59_500)))
            .await
            .unwrap_err();
        assert_eq!(e.wait, WINDOW);
        first.await.unwrap().unwrap();
        assert_eq!(Instant::now(), t0 + Duration::from_secs(59));
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_closes_the_gate_for_every_caller_of_the_key() {
        let b = budget(0);
        let permit = b.acquire(None).await.unwrap();
        let t0 = Instant::now();
        permit.rate_limited(Some(Duration::from_secs(7)));
        drop(permit);
        let waiters: Vec<_> = (0..5)
            .map(|_| {
                let b = b.clone();
                tokio::spawn(async move {
                    b.acquire(None).await.map(drop).unwrap();
                    Instant::now()
                })
            })
            .collect();
        for w in waiters {
            assert_eq!(w.await.unwrap(), t0 + Duration::from_secs(7));
        }
        // A 429 without a wait closes it for the default.
        b.close_gate(None);
        assert_eq!(
            b.gate(),
            Some(t0 + Duration::from_secs(7) + GATE_WITHOUT_RETRY_AFTER)
        );
        // A shorter wait never shortens a closed gate.
        b.close_gate(Some(Duration::from_secs(1)));
        assert_eq!(
            b.gate(),
            Some(t0 + Duration::from_secs(7) + GATE_WITHOUT_RETRY_AFTER)
        );
        let e = b
            .acquire(Some(t0 + Duration::from_secs(8)))
            .await
            .unwrap_err();
        assert_eq!(e.wait, Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_waiter_gives_its_place_up() {
        let b = budget(1);
        drop(b.acquire(None).await.unwrap());
        let waiting = tokio::spawn({
            let b = b.clone();
            async move { b.acquire(None).await.map(drop) }
        });
        tokio::task::yield_now().await;
        assert_eq!(lock(&b.state).waiting, 1);
        waiting.abort();
        let _ = waiting.await;
        assert_eq!(lock(&b.state).waiting, 0);
    }

    #[test]
    fn one_budget_per_key_named_by_its_roles() {
        let pacing = Pacing::new(300, WINDOW, Arc::new(Metrics::new()));
        let a = pacing.budget("sk_same", "issuer");
        let b = pacing.budget("sk_same", "receiver");
        let c = pacing.budget("sk_other", "receiver");
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &c));
        assert_eq!(a.label(), "issuer+receiver");
        assert_eq!(c.label(), "receiver");
        assert!(!format!("{pacing:?}").contains("sk_same"));
    }
}
