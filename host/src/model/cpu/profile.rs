//! Per-phase wall time of forward passes, for `cllm bench --profile`.
//!
//! Off unless switched on: a disabled profiler costs one branch per phase boundary. When on,
//! the executor reads the clock at each boundary and charges the time since the previous one
//! to the phase that just ended, so the phases of a pass add up to the pass.

use std::time::Instant;

/// The parts of one forward pass, in the order they run within a layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Embedding rows and rotary angles for the new tokens.
    Embed,
    /// RMS norms (both per layer, and the final one).
    Norm,
    /// The q, k and v projections.
    QkvProj,
    /// Rotary embedding of queries and keys, and storing keys and values in the cache.
    RopeKv,
    /// Scores, softmax and the weighted sum of values.
    Attention,
    /// The attention output projection.
    OProj,
    /// The gate and up projections.
    GateUpProj,
    /// SiLU(gate) * up and the residual additions.
    Elementwise,
    /// The down projection.
    DownProj,
    /// The final norm's output times the vocabulary matrix.
    LmHead,
}

impl Phase {
    pub const ALL: [Phase; 10] = [
        Phase::Embed,
        Phase::Norm,
        Phase::QkvProj,
        Phase::RopeKv,
        Phase::Attention,
        Phase::OProj,
        Phase::GateUpProj,
        Phase::Elementwise,
        Phase::DownProj,
        Phase::LmHead,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Phase::Embed => "embedding + rope angles",
            Phase::Norm => "rms norms",
            Phase::QkvProj => "matmul q/k/v",
            Phase::RopeKv => "rope + kv store",
            Phase::Attention => "attention",
            Phase::OProj => "matmul o",
            Phase::GateUpProj => "matmul gate/up",
            Phase::Elementwise => "silu*up + residuals",
            Phase::DownProj => "matmul down",
            Phase::LmHead => "matmul lm_head",
        }
    }

    /// Whether the phase is a matrix product with the weights.
    pub fn is_matmul(self) -> bool {
        matches!(
            self,
            Phase::QkvProj | Phase::OProj | Phase::GateUpProj | Phase::DownProj | Phase::LmHead
        )
    }
}

/// Nanoseconds spent in each phase, and the passes they cover.
#[derive(Clone, Debug, Default)]
pub struct PhaseTimes {
    pub nanos: [u64; Phase::ALL.len()],
    pub passes: u64,
}

impl PhaseTimes {
    pub fn get(&self, phase: Phase) -> u64 {
        self.nanos[phase as usize]
    }

    pub fn total(&self) -> u64 {
        self.nanos.iter().sum()
    }
}

/// The clock the executor reads at phase boundaries.
#[derive(Default)]
pub(crate) struct Profiler {
    enabled: bool,
    times: PhaseTimes,
    last: Option<Instant>,
}

impl Profiler {
    pub fn set_enabled(&mut self, enabled: bool) {
        self.enabled = enabled;
        self.last = None;
    }

    pub fn reset(&mut self) {
        self.times = PhaseTimes::default();
    }

    pub fn times(&self) -> &PhaseTimes {
        &self.times
    }

    /// A pass begins: nothing is charged for the time before it.
    #[inline]
    pub fn begin(&mut self) {
        if self.enabled {
            self.last = Some(Instant::now());
            self.times.passes += 1;
        }
    }

    /// `phase` just ended: charge it the time since the previous boundary.
    #[inline]
    pub fn end(&mut self, phase: Phase) {
        if let Some(last) = self.last.as_mut() {
            let now = Instant::now();
            self.times.nanos[phase as usize] += now.duration_since(*last).as_nanos() as u64;
            *last = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disabled_profiler_records_nothing() {
        let mut p = Profiler::default();
        p.begin();
        std::thread::sleep(std::time::Duration::from_millis(1));
        p.end(Phase::Attention);
        assert_eq!(p.times().total(), 0);
        assert_eq!(p.times().passes, 0);
    }

    #[test]
    fn phases_add_up_to_the_pass() {
        let mut p = Profiler::default();
        p.set_enabled(true);
        let start = Instant::now();
        p.begin();
        std::thread::sleep(std::time::Duration::from_millis(2));
        p.end(Phase::QkvProj);
        std::thread::sleep(std::time::Duration::from_millis(1));
        p.end(Phase::Attention);
        let wall = start.elapsed().as_nanos() as u64;
        let t = p.times();
        assert!(t.get(Phase::QkvProj) >= 2_000_000);
        assert!(t.get(Phase::Attention) >= 1_000_000);
        assert!(t.total() <= wall);
        assert_eq!(t.passes, 1);
    }
}
