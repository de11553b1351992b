//! The CPU backend: SIMD matrix products, a thread pool, and the batched forward pass.

mod attention;
#[cfg(target_arch = "x86_64")]
#[clippy::msrv = "1.89"]
mod attention_avx512;
#[cfg(target_arch = "x86_64")]
mod attention_split;
mod executor;
mod kv_element;
pub mod matmul;
pub mod ops;
pub mod pool;
pub mod profile;
mod shared;
#[cfg(target_arch = "x86_64")]
#[clippy::msrv = "1.89"]
mod vector_math;

pub use executor::CpuExecutor;
