//! The CPU backend: SIMD matrix products, a thread pool, and the batched forward pass.

mod attention;
mod executor;
pub mod matmul;
pub mod ops;
pub mod pool;
mod shared;

pub use executor::{BatchEntry, CpuExecutor, ExecError, LogitRows};
