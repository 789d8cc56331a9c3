//! `mic-net`'s modules: the daemon (`src/main.rs`) is built on them, and the
//! fuzz targets `net_tx` and `net_rx` drive [`txq`] and [`rxq`] through
//! [`fuzz`] (`docs/fuzzing.md`).

pub mod backend;
pub mod config;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzz;
pub mod limits;
pub mod rxq;
pub mod sandbox;
pub mod stream;
pub mod tap;
pub mod txq;
