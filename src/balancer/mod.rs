//! Balancing: the pure selection core (`select`), the per-listener pool around it (`pool`), and
//! the operator maintenance of members that applies to every pool of a cluster (`maintenance`).

pub mod maintenance;
pub mod pool;
pub mod select;
