//! pgfront: a PostgreSQL high-availability front end. It follows Patroni's keys in etcd,
//! routes clients to the writable primary (or to replicas) with leastconn and per-server
//! maxconn, holds clients during a switchover instead of refusing them, and closes sessions on
//! a demoted primary.
//!
//! Layout: pure cores (`config`, `config::diff`, `topology`, `discovery::keys`,
//! `balancer::select`, `proxy::pgwire`, `vip::{packet, fsm}`) with the I/O around them
//! (`discovery` sources, `balancer::pool`, `proxy::{listener, session}`, `vip` drivers, `admin`),
//! started, reloaded and stopped by `app`. `agent` is the node agent (`pgfront agent`) beside
//! each PostgreSQL: probe, key under a lease, Patroni-compatible health endpoints, fencing.
//! `metrics` and `events` sit at the bottom: every part registers and updates its own metric
//! families there and records its events (leader changes, drains, refusals, VIP transitions,
//! reloads) into the one ring, and `admin` only serves them.

pub mod admin;
pub mod agent;
pub mod app;
pub mod balancer;
pub mod check;
pub mod config;
pub mod discovery;
pub(crate) mod etcd;
pub mod events;
pub(crate) mod handover;
pub mod http;
pub mod metrics;
pub mod proxy;
pub(crate) mod sysd;
pub mod topology;
#[cfg(feature = "uring-experiment")]
pub mod uring_relay;
pub mod vip;
