//! [`Admission::admit`]: policy (rate limit, priority), then the queue, then waiting until the
//! scheduler takes every sequence of the request (or the queue wait runs out).

use super::client_slots::{ClientSlot, ClientSlots};
use super::policy::Policy;
use super::usage::{Admitted, Ledger, Outcome, SequenceEvents};
use crate::error::ApiError;
use crate::model::generation::GenerationParams;
use crate::scheduler::{Pending, SeqEvent};
use crate::tracker::Stage;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// A decision: the queue priority and the request's ledger, or the refusal.
type Decided = Result<(i32, Arc<Ledger>), ApiError>;

/// One sequence a request asks for: OpenAI's `n` and prompt lists make several.
#[derive(Clone, Debug)]
pub struct SequenceSpec {
    pub prompt_ids: Vec<u32>,
    pub params: GenerationParams,
}

/// Everything admission decides on: who asks, through which endpoint, and for what.
#[derive(Clone, Debug)]
pub struct Ticket {
    pub request_id: String,
    pub client_id: String,
    /// The route template (`/generate`, `/v1/chat/completions`, ...).
    pub endpoint: &'static str,
    pub received_at: Instant,
    /// The request headers plugins may see.
    pub headers: Vec<(String, String)>,
    /// The priority the request asked for (TGI's `parameters.priority`, OpenAI's `priority`).
    pub requested_priority: Option<i32>,
    /// At least one.
    pub sequences: Vec<SequenceSpec>,
}

impl Ticket {
    /// A ticket that asks for nothing (stands in for one lost to a panic).
    fn empty(request_id: String) -> Ticket {
        Ticket {
            request_id,
            client_id: String::new(),
            endpoint: "",
            received_at: Instant::now(),
            headers: Vec::new(),
            requested_priority: None,
            sequences: Vec::new(),
        }
    }
}

/// The admission stage; one per server.
pub struct Admission {
    pub policy: Policy,
    /// Open requests per client (`rate_limiter.max_concurrent_per_client`).
    pub client_slots: Arc<ClientSlots>,
    queue: Arc<crate::admission::queue::RequestQueue<Pending>>,
    max_queue_wait: Duration,
    next_queue_id: AtomicU64,
}

/// Takes a request's sequences out of the queue if admission is abandoned (the client went
/// away) before the scheduler took them.
struct QueueGuard<'a> {
    admission: &'a Admission,
    request_id: &'a str,
    queued: Vec<u64>,
}

impl QueueGuard<'_> {
    /// Removes every still-queued sequence; true when at least one was still there.
    fn withdraw(&mut self) -> bool {
        let mut any = false;
        for id in self.queued.drain(..) {
            any |= self.admission.queue.remove(id).is_some();
        }
        any
    }
}

impl Drop for QueueGuard<'_> {
    fn drop(&mut self) {
        if self.withdraw() {
            let tracker = &self.admission.policy.tracker;
            tracker.record_with(self.request_id, Stage::Cancelled, "client disconnected");
        }
    }
}

impl Admission {
    pub fn new(
        policy: Policy,
        client_slots: Arc<ClientSlots>,
        queue: Arc<crate::admission::queue::RequestQueue<Pending>>,
        max_queue_wait: Duration,
    ) -> Arc<Admission> {
        Arc::new(Admission {
            policy,
            client_slots,
            queue,
            max_queue_wait,
            next_queue_id: AtomicU64::new(1),
        })
    }

    /// [`Policy::decide`], on the blocking pool when a plugin it calls needs that: the queue
    /// priority and the request's ledger. The ledger is made beside the decision, so that
    /// the limiters that allowed the request hear of it even when the client leaves while a
    /// decision runs on the blocking pool (the ledger then ends, cancelled, with the task).
    async fn decide(
        self: &Arc<Self>,
        ticket: Ticket,
        slot: Option<ClientSlot>,
    ) -> (Ticket, Decided) {
        let plugins = self.policy.plugins_now();
        let blocking = Policy::needs_blocking_pool(plugins.as_deref());
        let decide = move |admission: &Arc<Admission>, ticket: &Ticket| {
            let (priority, allowed) = admission.policy.decide(ticket, plugins.as_deref())?;
            let ledger = Ledger::new(admission.clone(), ticket, slot, allowed);
            Ok((priority, Arc::new(ledger)))
        };
        if !blocking {
            let decision = decide(self, &ticket);
            return (ticket, decision);
        }
        let admission = self.clone();
        let request_id = ticket.request_id.clone();
        let decided = tokio::task::spawn_blocking(move || {
            let decision = decide(&admission, &ticket);
            (ticket, decision)
        })
        .await;
        decided.unwrap_or_else(|panicked| {
            tracing::error!(request_id, "admission policy panicked: {panicked}");
            let message = "admission policy failed".to_string();
            (Ticket::empty(request_id), Err(ApiError::Internal(message)))
        })
    }

    /// Admits `ticket`: an error is the response to send (429, 503, ...); `Ok` means the
    /// scheduler runs every sequence and their tokens arrive on [`Admitted::sequences`].
    pub async fn admit(self: &Arc<Self>, ticket: Ticket) -> Result<Admitted, ApiError> {
        // Before the rate limiter: a refused request should not spend the client's budget.
        // The slot is held by the ledger, which lives as long as the request's sequences.
        let Ok(slot) = self.client_slots.take(&ticket.client_id) else {
            let max = self.client_slots.max();
            let reason = format!("too many concurrent requests (at most {max} per client)");
            return Err(self.policy.refuse(&ticket, Duration::from_secs(1), reason));
        };
        let (mut ticket, decision) = self.decide(ticket, slot).await;
        let (priority, ledger) = decision?;
        let mut guard = QueueGuard {
            admission: self,
            request_id: &ticket.request_id,
            queued: Vec::with_capacity(ticket.sequences.len()),
        };
        // Policy and ledger have read the specs: they move into the queue. Each sequence's
        // events are wrapped at once: if admission gives up half way, dropping them cancels
        // what the scheduler already took and charges what it generated.
        let specs = std::mem::take(&mut ticket.sequences);
        let mut sequences = Vec::with_capacity(specs.len());
        for spec in specs {
            let (tx, rx) = mpsc::unbounded_channel();
            let pending = Pending {
                request_id: ticket.request_id.clone(),
                prompt_ids: spec.prompt_ids,
                params: spec.params,
                events: tx,
                received_at: ticket.received_at,
            };
            let queue_id = self.next_queue_id.fetch_add(1, Ordering::Relaxed);
            // Recorded under the queue's lock: before the scheduler can take the request and
            // record its later stages.
            let first = sequences.is_empty();
            let tracker = &self.policy.tracker;
            let record = || {
                if first {
                    tracker.record(&ticket.request_id, Stage::Queued);
                }
            };
            if self
                .queue
                .push_then(queue_id, priority, pending, record)
                .is_err()
            {
                guard.withdraw();
                // Refused, even when some sequences were queued (and withdrawn) already: the
                // worst ending wins, and tokens any of them generated are still charged.
                ledger.end(Outcome::Refused);
                return Err(ApiError::QueueFull {
                    max_size: self.queue.max_size(),
                    retry_after: Duration::from_secs(1),
                });
            }
            guard.queued.push(queue_id);
            sequences.push(SequenceEvents::new(rx, ledger.clone()));
        }
        let deadline = tokio::time::Instant::now() + self.max_queue_wait;
        for (i, events) in sequences.iter_mut().enumerate() {
            let first = match tokio::time::timeout_at(deadline, events.next()).await {
                Ok(event) => event,
                Err(_elapsed) => {
                    if self.queue.remove(guard.queued[i]).is_some() {
                        // Still waiting: the request times out. What is still queued leaves
                        // now; what was scheduled is cancelled when its events are dropped.
                        guard.queued.drain(..=i);
                        guard.withdraw();
                        let tracker = &self.policy.tracker;
                        tracker.record_with(&ticket.request_id, Stage::Cancelled, "queue_timeout");
                        ledger.end(Outcome::TimedOut);
                        let max_ms = self.max_queue_wait.as_millis() as u64;
                        return Err(ApiError::QueueTimeout {
                            waited_ms: max_ms,
                            max_ms,
                        });
                    }
                    // Taken by the scheduler just now: its Scheduled event is on the way.
                    events.next().await
                }
            };
            // Scheduled is always the first event; a failure or a closed channel is recorded
            // as failed by `next` itself.
            match first {
                Some(SeqEvent::Scheduled) => {}
                Some(SeqEvent::Failed(message)) => return Err(ApiError::Internal(message)),
                Some(_) | None => return Err(ApiError::Internal("scheduler stopped".into())),
            }
        }
        guard.queued.clear();
        Ok(Admitted { sequences })
    }
}
