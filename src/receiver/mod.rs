//! The receiver side: share-token envelopes from trusted issuers become imported sessions in this application, each
//! outcome reported as `import.result`, expired tokens turned into reshare requests.
//!
//! - `outcome`: the vendor_data template, workflow choice and outcome mapping (pure);
//! - `tokens`: the `share_token` consumer;
//! - `notices`: the `subject.notice` consumer (erasure and rectification notices from issuers).
//!
//! The receiver talks to Didit (`didit`), its broker (`amqp`) and its ledger, and never to the issuer side.

pub mod outcome;

pub(crate) mod notices;
pub(crate) mod tokens;
