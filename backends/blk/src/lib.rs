//! `mic-blk`'s modules: the daemon (`src/main.rs`) is built on them, and the
//! fuzz target `blk_request` drives [`request`] through [`fuzz`]
//! (`docs/fuzzing.md`).

pub mod backend;
pub mod config;
pub mod disk;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzz;
pub mod limits;
pub mod pool;
pub mod request;
pub mod sandbox;
