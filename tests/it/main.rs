//! The one integration test binary: every test talks to real things (RabbitMQ at 127.0.0.1:5672, the sandbox over
//! HTTP on 127.0.0.1:0, SQLite files in temporary directories). Each test uses its own AMQP prefix, so tests run
//! in parallel on one broker.

mod amqp;
mod audit;
mod backfill;
mod brands;
mod brokers;
mod client_sandbox;
mod cluster;
mod config;
mod deploy;
mod didit_client;
mod docs;
mod e2e;
mod extra_nodes;
mod fuzz;
mod import_edges;
mod issuer;
mod ledger;
mod ledger_edges;
mod ledger_tls;
mod misconf;
mod notices;
mod ops;
mod pacing;
mod receiver;
mod reliability;
mod replay_edges;
mod reshare_trust;
mod rotation;
mod sandbox;
mod shovel;
mod support;
mod traces;
mod trust_edges;
mod webhook_edges;
