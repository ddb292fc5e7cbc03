//! `partner-bridge`: moves Didit B2B Reusable KYC share tokens between partner businesses over RabbitMQ.
//!
//! Read in this order:
//! - [`config`] and [`secret`]: what an operator writes, and how secrets stay out of logs;
//! - [`didit`]: Didit's API (wire types, webhook signatures, the client and its outcome table, the per-key pacing
//!   of writes under Didit's rate limit);
//! - [`envelope`]: our own messages and their Ed25519 signatures;
//! - [`amqp`]: RabbitMQ: names and topology, the supervised connection, confirmed publishing, consumers;
//! - [`ledger`]: what was already minted, imported or seen, so that duplicates have no second effect;
//! - [`audit`]: the hash-chained, signed record of every act of sharing (docs/compliance.md), in the ledger's
//!   database but kept apart from it;
//! - [`issuer`] and [`receiver`]: the two sides of the bridge, which decide what each message leads to
//!   ([`retry`] and [`probe`] are the in-process backoff and the way out of a pause they share);
//! - [`app`]: wiring and lifecycle; [`shutdown`], [`telemetry`], and [`trace`] (W3C trace context on messages);
//! - [`metrics`], [`health`] and [`admin`]: what the process reports;
//! - [`cli`], [`commands`], [`backfill`] and [`demo`]: the command line;
//! - [`sandbox`]: a Didit emulator for tests, demos and the benchmark (no production path uses it).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod amqp;
pub mod app;
pub mod audit;
pub mod backfill;
pub mod cli;
pub mod commands;
pub mod config;
pub mod demo;
pub mod didit;
pub mod envelope;
pub mod health;
pub mod http_server;
pub mod issuer;
pub mod keys;
pub mod ledger;
pub mod metrics;
pub mod probe;
pub mod receiver;
pub mod retry;
pub mod sandbox;
pub mod secret;
pub mod shutdown;
pub mod telemetry;
pub mod trace;
