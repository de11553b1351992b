//! Work that may take milliseconds, called from code that can run on a tokio worker thread.
//!
//! A worker that blocks stalls every other task queued on it. [`off_async_workers`] runs such
//! work under `tokio::task::block_in_place` when it is on a multi-thread runtime's worker (the
//! worker's other tasks move to another thread meanwhile); elsewhere (a blocking-pool thread,
//! the scheduler's thread, a CLI command) it just runs it. Hot paths that know they will block
//! use `spawn_blocking` instead; this is for code shared by both worlds.

use tokio::runtime::{Handle, RuntimeFlavor};

/// Runs `f`, handing the async worker's duties to another thread first if this is one.
/// On a current-thread runtime (tests) `f` runs in place: there is no other thread to hand to.
pub fn off_async_workers<R>(f: impl FnOnce() -> R) -> R {
    match Handle::try_current() {
        Ok(runtime) if runtime.runtime_flavor() == RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}
