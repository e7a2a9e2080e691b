//! The data path: listeners accept clients, sessions place them on a server through the
//! listener's pool and move bytes both ways until either side closes or the server is drained.

pub mod cancel;
mod interrupt;
pub mod listener;
pub mod pgwire;
pub mod pipe;
pub mod session;
pub(crate) mod workers;
