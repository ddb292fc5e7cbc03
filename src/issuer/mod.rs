//! The issuer side: onboarding events (from the issuer's backend over AMQP, or from Didit webhooks) become signed
//! share tokens for each partner whose policy matches; reshare requests from receivers become fresh tokens.
//!
//! - `policy`: which partners an event goes to (pure);
//! - `mint`: claim → share → publish → record, for one partner;
//! - `onboarding`: the `onboarding.finished` consumer;
//! - `reshare`: the `reshare.request` consumer;
//! - `webhook`: the webhook intake;
//! - `notices`: erasure and rectification notices to every recipient of a session, and their acknowledgements.
//!
//! The issuer talks to Didit (`didit`), the brokers (`amqp`) and its ledger, and never to the receiver: the two sides
//! meet only through messages.

pub mod notices;
pub mod onboarding;
pub mod policy;

pub(crate) mod mint;
pub(crate) mod reshare;
pub(crate) mod webhook;
