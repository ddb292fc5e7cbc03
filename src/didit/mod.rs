//! Didit's verification API as the bridge uses it: wire types shared with the sandbox (`wire`), webhook
//! signatures (`signature`), the HTTP client whose every answer becomes one typed outcome (`client`, `error`), and
//! the per-key pacing of writes under Didit's rate limit (`pacing`). Knows no queue and no pipeline.

pub mod client;
pub mod error;
pub mod pacing;
pub mod signature;
pub mod wire;
