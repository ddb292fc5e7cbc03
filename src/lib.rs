//! `partner-bridge`: moves Didit B2B Reusable KYC share tokens between partner businesses over RabbitMQ.
//!
//! Read in this order:
//! - [`config`] and [`secret`]: what an operator writes, and how secrets stay out of logs;
//! - [`didit`]: Didit's API (wire types, webhook signatures, the client and its outcome table);
//! - [`envelope`]: our own messages and their Ed25519 signatures;
//! - [`amqp`]: RabbitMQ: names and topology, the supervised connection, confirmed publishing, consumers;
//! - [`metrics`] and [`health`]: what the process reports.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod amqp;
pub mod config;
pub mod didit;
pub mod envelope;
pub mod health;
pub mod metrics;
pub mod secret;
