//! Balancing: the pure selection core (`select`) and the per-listener pool around it (`pool`).

pub mod pool;
pub mod select;
