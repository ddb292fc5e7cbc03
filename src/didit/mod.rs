//! Didit's verification API as the bridge uses it: wire types shared with the sandbox (`wire`), webhook
//! signatures (`signature`), and the HTTP client whose every answer becomes one typed outcome (`client`, `error`).
//! Knows no queue and no pipeline.

pub mod client;
pub mod error;
pub mod signature;
pub mod wire;
