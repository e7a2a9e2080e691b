//! pgfront: a PostgreSQL high-availability front end. It follows Patroni's keys in etcd,
//! routes clients to the writable primary (or to replicas) with leastconn and per-server
//! maxconn, holds clients during a switchover instead of refusing them, and closes sessions on
//! a demoted primary.
//!
//! Layout: pure cores (`config`, `topology`, `discovery::keys`, `balancer::select`,
//! `proxy::pgwire`) with the I/O around them (`discovery` sources, `balancer::pool`,
//! `proxy::{listener, session}`, `admin`), started and stopped by `app`.

pub mod admin;
pub mod app;
pub mod balancer;
pub mod check;
pub mod config;
pub mod discovery;
// Building blocks of the binary upgrade and of systemd Type=notify, not wired into `app` yet
// (the supervisor is being reworked): dead code until then.
#[allow(dead_code)]
pub(crate) mod handover;
pub mod proxy;
pub(crate) mod sysd;
pub mod topology;
pub mod vip;
