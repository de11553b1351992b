//! The CUDA backend: the kernels of `kernels/` compiled at run time by NVRTC for the GPU's own
//! architecture and launched through `cudarc`. Every build carries it (the driver and NVRTC
//! libraries are loaded at run time); without them, opening it fails cleanly and `--device
//! auto` runs on the CPU.

mod attention;
mod backend;
mod check;
pub mod compile;
mod dependent_launch;
mod kernels;
mod memory;
mod products;
mod profile;
mod tensor_cores;
mod weights;

pub use backend::{driver_present, CudaBackend};
pub use check::{AttentionCase, KernelCheck, ProductInput};
