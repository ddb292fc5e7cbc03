//! What stands between a request and Didit's rules: the per-key write limit (Didit's `generic-write` scope,
//! 300 per 60 s sliding window by default, on real time; the `X-RateLimit-*` headers only on 429 unless switched to
//! the older always-sent behaviour; limit and window changeable for tests) and the fault settings of
//! `POST /sandbox/faults`.
//!
//! Both are pure: they decide, the route middleware acts (sleeps, answers 429 or 5xx, resets the connection).
//! A refused request (hang, 5xx, 429) changes nothing; a lost answer (`drop_response_rate`, `hang_after_rate`) is
//! the opposite: the request is carried out in full, and only its answer never reaches the client.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::http::{HeaderMap, HeaderValue, StatusCode};

use super::error::ApiError;
use super::model::{FaultEndpoint, FaultSettings, FaultState, RateLimitHeaders, Settings};

/// Didit's window of the write limit.
pub const WINDOW: Duration = Duration::from_secs(60);

/// The outcome of one write against the limit, with what the `X-RateLimit-*` headers say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateDecision {
    /// False: answer 429.
    pub allowed: bool,
    /// `X-RateLimit-Limit`.
    pub limit: u32,
    /// `X-RateLimit-Remaining`.
    pub remaining: u32,
    /// `X-RateLimit-Reset`: unix seconds when the oldest write leaves the window.
    pub reset_epoch: u64,
    /// `Retry-After` seconds (meaningful on 429).
    pub retry_after: u64,
}

impl RateDecision {
    /// Writes the `X-RateLimit-*` headers (and `Retry-After` when refused).
    pub fn apply(&self, headers: &mut HeaderMap) {
        headers.insert("x-ratelimit-limit", HeaderValue::from(self.limit));
        headers.insert("x-ratelimit-remaining", HeaderValue::from(self.remaining));
        headers.insert("x-ratelimit-reset", HeaderValue::from(self.reset_epoch));
        if !self.allowed {
            headers.insert("retry-after", HeaderValue::from(self.retry_after));
        }
    }
}

fn epoch_after(wait: Duration) -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    (now + wait).as_secs_f64().ceil() as u64
}

/// Per-key sliding-window counter of writes. A refused write is not counted.
#[derive(Debug)]
pub struct RateLimiter {
    enabled: bool,
    per_minute: u32,
    window: Duration,
    headers: RateLimitHeaders,
    windows: HashMap<String, VecDeque<Instant>>,
}

impl RateLimiter {
    /// A limiter, on or off, over Didit's 60 s window, headers only on 429.
    #[cfg(test)]
    pub fn new(enabled: bool, per_minute: u32) -> RateLimiter {
        Self::with_window(enabled, per_minute, WINDOW, RateLimitHeaders::On429)
    }

    /// A limiter over another window, with the headers sent as `headers` says.
    pub fn with_window(
        enabled: bool,
        per_minute: u32,
        window: Duration,
        headers: RateLimitHeaders,
    ) -> RateLimiter {
        RateLimiter {
            enabled,
            per_minute: per_minute.max(1),
            window: window.max(Duration::from_millis(1)),
            headers,
            windows: HashMap::new(),
        }
    }

    /// The settings in force.
    pub fn settings(&self) -> Settings {
        Settings {
            rate_limit: self.enabled,
            writes_per_minute: self.per_minute,
            window_ms: self.window.as_millis() as u64,
            rate_limit_headers: self.headers,
        }
    }

    /// Changes the settings; windows start afresh.
    pub fn configure(&mut self, settings: Settings) {
        self.enabled = settings.rate_limit;
        self.per_minute = settings.writes_per_minute.max(1);
        self.window = Duration::from_millis(settings.window_ms.max(1));
        self.headers = settings.rate_limit_headers;
        self.windows.clear();
    }

    /// Whether an answer carrying `decision` gets the `X-RateLimit-*` headers.
    pub fn sends_headers(&self, decision: &RateDecision) -> bool {
        !decision.allowed || self.headers == RateLimitHeaders::Always
    }

    /// Counts one write by `key` at `now`; `None` when the limit is off.
    pub fn check(&mut self, key: &str, now: Instant) -> Option<RateDecision> {
        if !self.enabled {
            return None;
        }
        if self.windows.len() > 10_000 {
            // Keys that wrote nothing for a minute cost nothing to forget.
            let window = self.window;
            self.windows
                .retain(|_, w| w.back().is_some_and(|t| now.duration_since(*t) < window));
        }
        let span = self.window;
        let window = self.windows.entry(key.to_string()).or_default();
        while window
            .front()
            .is_some_and(|t| now.duration_since(*t) >= span)
        {
            window.pop_front();
        }
        let limit = self.per_minute;
        let allowed = (window.len() as u32) < limit;
        if allowed {
            window.push_back(now);
        }
        let oldest = window.front().copied().unwrap_or(now);
        let wait = span.saturating_sub(now.duration_since(oldest));
        Some(RateDecision {
            allowed,
            limit,
            remaining: limit.saturating_sub(window.len() as u32),
            reset_epoch: epoch_after(wait),
            retry_after: wait.as_secs_f64().ceil().max(1.0) as u64,
        })
    }
}

/// What the fault settings decided for one request.
#[derive(Debug, Clone, PartialEq)]
pub enum FaultAction {
    /// Carry on.
    Pass,
    /// Never answer (until shutdown or the hang limit).
    Hang,
    /// Answer this 5xx.
    Fail(ApiError),
    /// Answer 429 with `Retry-After: 1`.
    Throttle,
    /// Carry on, then lose the answer: reset the connection instead of sending it.
    DropAnswer,
    /// Carry on, then withhold the answer (until shutdown or the hang limit).
    HangAfter,
}

/// The fault settings in force, per endpoint.
#[derive(Debug, Default)]
pub struct Faults {
    by_endpoint: HashMap<FaultEndpoint, FaultSettings>,
}

impl Faults {
    /// Sets (or, when they do nothing, removes) one endpoint's settings after checking the rates.
    pub fn set(&mut self, settings: FaultSettings) -> Result<(), ApiError> {
        for (name, rate) in [
            ("error_rate", settings.error_rate),
            ("rate_limit_rate", settings.rate_limit_rate),
            ("hang_rate", settings.hang_rate),
            ("drop_response_rate", settings.drop_response_rate),
            ("hang_after_rate", settings.hang_after_rate),
        ] {
            if !(0.0..=1.0).contains(&rate) {
                return Err(ApiError::Validation(format!(
                    "{name} must be between 0 and 1"
                )));
            }
        }
        if settings.is_noop() {
            self.by_endpoint.remove(&settings.endpoint);
        } else {
            self.by_endpoint.insert(settings.endpoint, settings);
        }
        Ok(())
    }

    /// Removes every setting.
    pub fn clear(&mut self) {
        self.by_endpoint.clear();
    }

    /// The settings in force.
    pub fn state(&self) -> FaultState {
        let mut faults: Vec<FaultSettings> = self.by_endpoint.values().cloned().collect();
        faults.sort_by_key(|f| match f.endpoint {
            FaultEndpoint::Share => 0,
            FaultEndpoint::Import => 1,
            FaultEndpoint::All => 2,
        });
        FaultState { faults }
    }

    /// The latency and action for a request to `endpoint` (`None`: a route that is neither share nor import),
    /// given a uniform draw `roll` in 0..1 and another, `pick`, choosing the kind of 5xx.
    pub fn plan(
        &self,
        endpoint: Option<FaultEndpoint>,
        roll: f64,
        pick: f64,
    ) -> (Duration, FaultAction) {
        let settings = endpoint
            .and_then(|e| self.by_endpoint.get(&e))
            .or_else(|| self.by_endpoint.get(&FaultEndpoint::All));
        let Some(s) = settings else {
            return (Duration::ZERO, FaultAction::Pass);
        };
        let latency = Duration::from_millis(s.latency_ms);
        let action = if roll < s.hang_rate {
            FaultAction::Hang
        } else if roll < s.hang_rate + s.error_rate {
            let (status, with_body) = if pick < 0.34 {
                (StatusCode::INTERNAL_SERVER_ERROR, true)
            } else if pick < 0.67 {
                (StatusCode::BAD_GATEWAY, true)
            } else if pick < 0.84 {
                (StatusCode::SERVICE_UNAVAILABLE, true)
            } else {
                (StatusCode::SERVICE_UNAVAILABLE, false)
            };
            FaultAction::Fail(ApiError::Internal {
                status,
                detail: "Injected fault: the service is temporarily unavailable.".to_string(),
                with_body,
            })
        } else if roll < s.hang_rate + s.error_rate + s.rate_limit_rate {
            FaultAction::Throttle
        } else if roll < s.hang_rate + s.error_rate + s.rate_limit_rate + s.drop_response_rate {
            FaultAction::DropAnswer
        } else if roll
            < s.hang_rate
                + s.error_rate
                + s.rate_limit_rate
                + s.drop_response_rate
                + s.hang_after_rate
        {
            FaultAction::HangAfter
        } else {
            FaultAction::Pass
        };
        (latency, action)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sliding_window_counts_per_key() {
        let mut limiter = RateLimiter::new(true, 2);
        let t0 = Instant::now();
        let a = limiter.check("k", t0).unwrap();
        assert!(a.allowed);
        assert_eq!(a.remaining, 1);
        assert!(limiter.check("k", t0).unwrap().allowed);
        let refused = limiter.check("k", t0 + Duration::from_secs(10)).unwrap();
        assert!(!refused.allowed);
        assert_eq!(refused.remaining, 0);
        assert_eq!(refused.retry_after, 50);
        assert!(limiter.check("other", t0).unwrap().allowed);
        assert!(
            limiter
                .check("k", t0 + Duration::from_secs(60))
                .unwrap()
                .allowed
        );
        let mut off = limiter.settings();
        off.rate_limit = false;
        limiter.configure(off);
        assert!(limiter.check("k", t0).is_none());
    }

    #[test]
    fn headers_only_on_429_unless_switched_to_always() {
        let mut limiter = RateLimiter::new(true, 1);
        let t0 = Instant::now();
        let allowed = limiter.check("k", t0).unwrap();
        let refused = limiter.check("k", t0).unwrap();
        assert!(!limiter.sends_headers(&allowed));
        assert!(limiter.sends_headers(&refused));
        let mut always = limiter.settings();
        always.rate_limit_headers = RateLimitHeaders::Always;
        limiter.configure(always);
        assert!(limiter.sends_headers(&allowed));
        assert_eq!(limiter.settings().window_ms, 60_000);
    }

    #[test]
    fn a_shorter_window_forgets_sooner() {
        let mut limiter =
            RateLimiter::with_window(true, 1, Duration::from_secs(5), RateLimitHeaders::On429);
        let t0 = Instant::now();
        assert!(limiter.check("k", t0).unwrap().allowed);
        let refused = limiter.check("k", t0 + Duration::from_secs(4)).unwrap();
        assert_eq!((refused.allowed, refused.retry_after), (false, 1));
        assert!(
            limiter
                .check("k", t0 + Duration::from_secs(5))
                .unwrap()
                .allowed
        );
    }

    /// The bridge's pacing ([`crate::didit::pacing::Budget`]) against this window: 64 concurrent callers, 1,000
    /// writes, each with its own latency to and from the sandbox. Not one write is refused, and the backlog still
    /// ends within the floor the window allows (⌈1000 / 300⌉ − 1 = 3 windows) plus the latencies: a token bucket
    /// small enough never to be refused would need more than 3 windows. Virtual time (`start_paused`), so the
    /// bound is exact, not a measured speed.
    #[tokio::test(start_paused = true)]
    async fn the_bridge_budget_never_overfills_this_window() {
        use crate::didit::pacing::Budget;
        use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
        use std::sync::{Arc, Mutex};
        const LIMIT: u32 = 300;
        const WRITES: u64 = 1000;
        let budget = Arc::new(Budget::new(LIMIT, WINDOW, "sim", None));
        let sandbox = Arc::new(Mutex::new(RateLimiter::new(true, LIMIT)));
        let refused = Arc::new(AtomicU32::new(0));
        let next = Arc::new(AtomicU64::new(0));
        let t0 = tokio::time::Instant::now();
        let workers: Vec<_> = (0..64u64)
            .map(|worker| {
                let (budget, sandbox, refused, next) = (
                    budget.clone(),
                    sandbox.clone(),
                    refused.clone(),
                    next.clone(),
                );
                tokio::spawn(async move {
                    loop {
                        let n = next.fetch_add(1, Ordering::Relaxed);
                        if n >= WRITES {
                            return;
                        }
                        let permit = budget.acquire(None).await.unwrap();
                        // A spread of latencies, 0..40 ms each way, from a fixed sequence.
                        let spread = (n * 7919 + worker * 104_729) % 41;
                        tokio::time::sleep(Duration::from_millis(spread)).await;
                        let arrival = tokio::time::Instant::now().into_std();
                        if !sandbox
                            .lock()
                            .unwrap()
                            .check("key", arrival)
                            .unwrap()
                            .allowed
                        {
                            refused.fetch_add(1, Ordering::Relaxed);
                        }
                        tokio::time::sleep(Duration::from_millis(40 - spread)).await;
                        drop(permit);
                    }
                })
            })
            .collect();
        for w in workers {
            w.await.unwrap();
        }
        assert_eq!(refused.load(Ordering::Relaxed), 0, "writes answered 429");
        let took = t0.elapsed();
        assert!(took >= 3 * WINDOW, "{took:?}");
        assert!(took <= 3 * WINDOW + Duration::from_secs(1), "{took:?}");
    }

    #[test]
    fn faults_pick_the_endpoint_then_the_wildcard() {
        let mut faults = Faults::default();
        faults
            .set(FaultSettings {
                endpoint: FaultEndpoint::Share,
                error_rate: 1.0,
                ..Default::default()
            })
            .unwrap();
        assert!(matches!(
            faults.plan(Some(FaultEndpoint::Share), 0.5, 0.9).1,
            FaultAction::Fail(_)
        ));
        assert_eq!(
            faults.plan(Some(FaultEndpoint::Import), 0.5, 0.0).1,
            FaultAction::Pass
        );
        faults
            .set(FaultSettings {
                rate_limit_rate: 1.0,
                latency_ms: 5,
                ..Default::default()
            })
            .unwrap();
        let (latency, action) = faults.plan(None, 0.99, 0.0);
        assert_eq!(
            (latency, action),
            (Duration::from_millis(5), FaultAction::Throttle)
        );
        assert!(
            faults
                .set(FaultSettings {
                    hang_rate: 1.5,
                    ..Default::default()
                })
                .is_err()
        );
        faults.clear();
        assert!(faults.state().faults.is_empty());
    }

    #[test]
    fn lost_answers_come_after_the_refusals() {
        let mut faults = Faults::default();
        faults
            .set(FaultSettings {
                endpoint: FaultEndpoint::Import,
                error_rate: 0.2,
                drop_response_rate: 0.3,
                hang_after_rate: 0.1,
                ..Default::default()
            })
            .unwrap();
        let plan = |roll| faults.plan(Some(FaultEndpoint::Import), roll, 0.0).1;
        assert!(matches!(plan(0.1), FaultAction::Fail(_)));
        assert_eq!(plan(0.25), FaultAction::DropAnswer);
        assert_eq!(plan(0.55), FaultAction::HangAfter);
        assert_eq!(plan(0.65), FaultAction::Pass);
        assert!(
            faults
                .set(FaultSettings {
                    drop_response_rate: -0.1,
                    ..Default::default()
                })
                .is_err()
        );
        assert!(
            !FaultSettings {
                hang_after_rate: 0.5,
                ..Default::default()
            }
            .is_noop()
        );
    }
}
