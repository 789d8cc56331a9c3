//! `mic-console`'s modules: the daemon (`src/main.rs`) is built on them,
//! and the fuzz target `console` drives [`txq`], [`rxq`] and [`control`]
//! through [`fuzz`] (`docs/fuzzing.md`).

pub mod backend;
pub mod config;
pub mod control;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzz;
pub mod host;
pub mod logfile;
pub mod rxq;
pub mod sandbox;
pub mod txq;
