//! Per-phase GPU time of forward passes, for `cllm bench --profile --device cuda`.
//!
//! A profiled pass records a CUDA event on the stream at every phase boundary (the same
//! phases as the CPU's profile) and, once the pass has finished, charges the GPU time between
//! two events to the phase that ended at the second. Profiled passes are launched one kernel
//! at a time, not replayed from a captured graph (an event in a graph is not a timestamp on
//! this stream), so where the host launches more slowly than the GPU runs, the gap between
//! kernels is charged to the phase that waits for it.

use crate::model::cpu::profile::{Phase, PhaseTimes};
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaEvent, CudaStream, DriverError};

/// Events of the pass in flight, reused from pass to pass, and the times so far.
#[derive(Default)]
pub(super) struct EventProfile {
    events: Vec<CudaEvent>,
    /// The phase that ends at each event after the first, in the pass in flight.
    ended: Vec<Phase>,
    times: PhaseTimes,
}

/// Events a pass records: its start, the embedding, nine phase ends a layer, and the final
/// norm and vocabulary product.
pub(super) fn events_per_pass(layers: usize) -> usize {
    2 + 9 * layers + 2
}

impl EventProfile {
    /// A profile with `events` events made up front, so that making them (a driver call
    /// each) does not sit between the launches of the first profiled pass. More are made as
    /// a pass needs them; where making them fails here, they are made then.
    pub fn new(stream: &CudaStream, events: usize) -> EventProfile {
        let mut profile = EventProfile::default();
        for _ in 0..events {
            match new_timing_event(stream) {
                Ok(event) => profile.events.push(event),
                Err(_) => break,
            }
        }
        profile
    }

    pub fn times(&self) -> &PhaseTimes {
        &self.times
    }

    pub fn reset(&mut self) {
        self.times = PhaseTimes::default();
    }

    /// A pass begins on `stream`: its first event is the start of the first phase.
    pub fn begin(&mut self, stream: &CudaStream) -> Result<(), DriverError> {
        self.ended.clear();
        self.record(stream, 0)
    }

    /// `phase` ends here, on `stream`, after the kernels launched so far.
    pub fn end(&mut self, stream: &CudaStream, phase: Phase) -> Result<(), DriverError> {
        self.ended.push(phase);
        self.record(stream, self.ended.len())
    }

    /// Records event `i` (made on first use, with timing on) on `stream`.
    fn record(&mut self, stream: &CudaStream, i: usize) -> Result<(), DriverError> {
        if self.events.len() <= i {
            self.events.push(new_timing_event(stream)?);
        }
        self.events[i].record(stream)
    }

    /// After the pass: waits for its last event and adds each phase's time.
    pub fn collect(&mut self) -> Result<(), DriverError> {
        for (i, &phase) in self.ended.iter().enumerate() {
            let ms = self.events[i].elapsed_ms(&self.events[i + 1])?;
            self.times.nanos[phase as usize] += (f64::from(ms) * 1e6) as u64;
        }
        if !self.ended.is_empty() {
            self.times.passes += 1;
        }
        self.ended.clear();
        Ok(())
    }
}

/// An event that records a timestamp (cudarc's default event does not).
fn new_timing_event(stream: &CudaStream) -> Result<CudaEvent, DriverError> {
    stream
        .context()
        .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
}
