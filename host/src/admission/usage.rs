//! The admitted side of a request: its sequences' event streams, and the ledger that tells the
//! rate limiters what the request used once all its sequences have ended, whatever the ending.

use super::client_slots::ClientSlot;
use super::stage::{Admission, Ticket};
use crate::model::generation::FinishReason;
use crate::plugins::bindings::Usage;
use crate::plugins::Plugin;
use crate::scheduler::SeqEvent;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

/// How a request ended, for usage accounting and logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    /// Ended by length or an end-of-sequence token.
    Finished,
    /// Ended by one of its stop sequences.
    Stopped,
    /// The client went away first.
    Cancelled,
    /// Waited in the queue past the limit.
    TimedOut,
    /// The scheduler or the model failed it.
    Failed,
    /// Allowed by the rate limiters, then refused before it was queued (another limiter, a
    /// failing prioritizer, a full queue): recorded as `failed`, with whatever a sequence
    /// withdrawn from the queue had generated (usually nothing).
    Refused,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Finished => "finished",
            Outcome::Stopped => "stopped",
            Outcome::Cancelled => "cancelled",
            Outcome::TimedOut => "timed_out",
            Outcome::Failed => "failed",
            Outcome::Refused => "refused",
        }
    }

    /// The `cllm:policy` outcome (which has no refusal: that is a failure to run).
    pub(super) fn for_plugins(self) -> crate::plugins::bindings::Outcome {
        use crate::plugins::bindings::Outcome as O;
        match self {
            Outcome::Finished => O::Finished,
            Outcome::Stopped => O::Stopped,
            Outcome::Cancelled => O::Cancelled,
            Outcome::TimedOut => O::TimedOut,
            Outcome::Failed | Outcome::Refused => O::Failed,
        }
    }

    fn of_finish(reason: FinishReason) -> Outcome {
        match reason {
            FinishReason::StopSequence => Outcome::Stopped,
            FinishReason::Length | FinishReason::EosToken => Outcome::Finished,
        }
    }
}

/// Usage of one admitted request, summed over its sequences; recorded once, when the last
/// holder (admission or a sequence stream) lets go.
pub(super) struct Ledger {
    admission: Arc<Admission>,
    request_id: String,
    client_id: String,
    prompt_tokens: usize,
    generated: AtomicUsize,
    /// The worst ending seen so far (`None`: nothing ended yet, which means cancelled).
    outcome: Mutex<Option<Outcome>>,
    /// The client's open-request slot, given back when the request's last sequence is gone.
    _slot: Option<ClientSlot>,
    /// The limiters whose `check` allowed the request: its usage goes to them, even after a
    /// hot swap (a new version of a limiter never saw the request's `check`).
    limiters: Vec<Arc<Plugin>>,
}

impl Ledger {
    pub(super) fn new(
        admission: Arc<Admission>,
        ticket: &Ticket,
        slot: Option<ClientSlot>,
        limiters: Vec<Arc<Plugin>>,
    ) -> Ledger {
        Ledger {
            admission,
            request_id: ticket.request_id.clone(),
            client_id: ticket.client_id.clone(),
            prompt_tokens: ticket.sequences.iter().map(|s| s.prompt_ids.len()).sum(),
            generated: AtomicUsize::new(0),
            outcome: Mutex::new(None),
            _slot: slot,
            limiters,
        }
    }

    /// Notes an ending; the worst of a request's endings is the request's.
    pub(super) fn end(&self, outcome: Outcome) {
        let mut slot = self.outcome.lock().unwrap_or_else(|e| e.into_inner());
        *slot = Some(slot.map_or(outcome, |o| o.max(outcome)));
    }
}

impl Drop for Ledger {
    fn drop(&mut self) {
        let outcome = self
            .outcome
            .get_mut()
            .map_or(Some(Outcome::Failed), |o| *o)
            .unwrap_or(Outcome::Cancelled);
        let clamp = |n: usize| n.min(u32::MAX as usize) as u32;
        let usage = Usage {
            request_id: std::mem::take(&mut self.request_id),
            client_id: std::mem::take(&mut self.client_id),
            prompt_tokens: clamp(self.prompt_tokens),
            generated_tokens: clamp(*self.generated.get_mut()),
            outcome: outcome.for_plugins(),
        };
        let policy = &self.admission.policy;
        let limiters = std::mem::take(&mut self.limiters);
        // Plugin calls stay off the async workers (see `Policy::needs_blocking_pool`).
        let off_worker = limiters.iter().any(|p| !p.calls_inline());
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) if off_worker => {
                let admission = self.admission.clone();
                drop(runtime.spawn_blocking(move || {
                    admission.policy.record_usage(&usage, outcome, &limiters);
                }));
            }
            _ => policy.record_usage(&usage, outcome, &limiters),
        }
    }
}

/// An admitted request: one event stream per sequence, in the order they were asked for.
pub struct Admitted {
    pub sequences: Vec<SequenceEvents>,
}

/// The token events of one sequence. Dropping it before the sequence ended cancels the
/// sequence (the scheduler sees the closed channel) and counts it as cancelled, with every
/// token generated up to then charged.
pub struct SequenceEvents {
    events: mpsc::UnboundedReceiver<SeqEvent>,
    ledger: Arc<Ledger>,
    ended: bool,
}

impl SequenceEvents {
    pub(super) fn new(events: mpsc::UnboundedReceiver<SeqEvent>, ledger: Arc<Ledger>) -> Self {
        SequenceEvents {
            events,
            ledger,
            ended: false,
        }
    }

    /// The next event; `None` once the sequence has ended (its last token or a failure was
    /// returned) or the scheduler is gone.
    pub async fn next(&mut self) -> Option<SeqEvent> {
        if self.ended {
            return None;
        }
        let event = self.events.recv().await;
        match &event {
            Some(event) => self.account(event),
            None => {
                self.ended = true;
                self.ledger.end(Outcome::Failed);
            }
        }
        event
    }

    fn account(&mut self, event: &SeqEvent) {
        match event {
            SeqEvent::Token { finish, .. } => {
                self.ledger.generated.fetch_add(1, Ordering::Relaxed);
                if let Some(finish) = finish {
                    self.ended = true;
                    self.ledger.end(Outcome::of_finish(finish.reason));
                }
            }
            SeqEvent::Failed(_) => {
                self.ended = true;
                self.ledger.end(Outcome::Failed);
            }
            SeqEvent::Scheduled | SeqEvent::PromptLogprobs(_) => {}
        }
    }
}

impl Drop for SequenceEvents {
    fn drop(&mut self) {
        // Tokens the scheduler sent that nobody read were still generated: charge them.
        self.events.close();
        while !self.ended {
            match self.events.try_recv() {
                Ok(event) => self.account(&event),
                Err(_) => break,
            }
        }
        if !self.ended {
            self.ledger.end(Outcome::Cancelled);
        }
    }
}
