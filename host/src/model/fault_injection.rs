//! A forward pass that fails on purpose, for the fault-injection tests: wrapped around the
//! real executor when `scheduler.debug_fail_on_token` is set, it fails any pass in which a
//! sequence feeds that token id, naming that sequence's batch entry, before the real pass
//! runs. Everything else goes to the real executor unchanged.

use super::config::ModelConfig;
use super::cpu::pool::{PoolTimes, ThreadPool};
use super::cpu::profile::PhaseTimes;
use super::executor::{BatchEntry, DeviceInfo, ExecError, Executor, PassOutput};
use super::kv_cache::BlockPool;
use super::llama::ModelWeights;

pub struct FailOnToken {
    inner: Box<dyn Executor>,
    token: u32,
}

impl FailOnToken {
    pub fn wrap(inner: Box<dyn Executor>, token: u32) -> Box<dyn Executor> {
        tracing::warn!(
            token,
            "fault injection on: a forward pass fails for any sequence feeding token {token}"
        );
        Box::new(FailOnToken { inner, token })
    }
}

impl Executor for FailOnToken {
    fn device(&self) -> &DeviceInfo {
        self.inner.device()
    }

    fn blocks(&self) -> &BlockPool {
        self.inner.blocks()
    }

    fn blocks_mut(&mut self) -> &mut BlockPool {
        self.inner.blocks_mut()
    }

    fn ensure_blocks(&mut self, blocks: usize) -> Result<(), ExecError> {
        self.inner.ensure_blocks(blocks)
    }

    fn forward(
        &mut self,
        config: &ModelConfig,
        weights: &ModelWeights,
        batch: &mut [BatchEntry],
        out: &mut PassOutput,
    ) -> Result<(), ExecError> {
        if let Some(entry) = batch.iter().position(|e| e.tokens.contains(&self.token)) {
            return Err(ExecError::Injected {
                entry,
                token: self.token,
            });
        }
        self.inner.forward(config, weights, batch, out)
    }

    fn host_pool(&self) -> &ThreadPool {
        self.inner.host_pool()
    }

    fn set_profiling(&mut self, on: bool) {
        self.inner.set_profiling(on)
    }

    fn profile(&self) -> Option<(PhaseTimes, PoolTimes)> {
        self.inner.profile()
    }

    fn reset_profile(&mut self) {
        self.inner.reset_profile()
    }

    fn copy_bandwidth_gbs(&mut self, bytes: usize) -> Option<f64> {
        self.inner.copy_bandwidth_gbs(bytes)
    }
}
