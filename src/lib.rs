//! `partner-bridge`: moves Didit B2B Reusable KYC share tokens between partner businesses over RabbitMQ.
//!
//! Read in this order:
//! - [`config`] and [`secret`]: what an operator writes, and how secrets stay out of logs;
//! - [`didit`]: Didit's API (wire types, webhook signatures, the client and its outcome table);
//! - [`envelope`]: our own messages and their Ed25519 signatures;
//! - [`amqp`]: RabbitMQ: names and topology, the supervised connection, confirmed publishing, consumers;
//! - [`ledger`]: what was already minted, imported or seen, so that duplicates have no second effect;
//! - [`metrics`] and [`health`]: what the process reports.
//! - [`metrics`] and [`health`]: what the process reports;
//! - [`sandbox`]: a Didit emulator for tests, demos and the benchmark (no production path uses it).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod amqp;
pub mod cli;
pub mod commands;
pub mod config;
pub mod didit;
pub mod envelope;
pub mod health;
pub mod ledger;
pub mod metrics;
pub mod sandbox;
pub mod secret;
pub mod shutdown;
pub mod telemetry;
