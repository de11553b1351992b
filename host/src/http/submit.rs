//! Admission of a validated request: rate limiter → priority → queue → wait until scheduled.

use super::{AppState, RequestContext};
use crate::error::ApiError;
use crate::http::params::ValidRequest;
use crate::scheduler::{Pending, SeqEvent};
use crate::tracker::Stage;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// A request the scheduler has taken: its token events arrive on `events`.
pub struct Submission {
    pub events: mpsc::UnboundedReceiver<SeqEvent>,
    pub guard: QueueGuard,
}

/// Takes a request out of the queue if its handler is dropped (client gone) before it ran.
pub struct QueueGuard {
    state: Arc<AppState>,
    queue_id: u64,
    request_id: String,
    scheduled: bool,
}

impl Drop for QueueGuard {
    fn drop(&mut self) {
        if !self.scheduled && self.state.scheduler.queue.remove(self.queue_id).is_some() {
            self.state.tracker.record_with(
                &self.request_id,
                Stage::Cancelled,
                "client disconnected",
            );
        }
    }
}

pub async fn submit(
    state: &Arc<AppState>,
    ctx: &RequestContext,
    valid: &ValidRequest,
) -> Result<Submission, ApiError> {
    let rid = &ctx.request_id;
    let priority = super::policy::admit(state, ctx, valid)?;
    let (tx, rx) = mpsc::unbounded_channel();
    let pending = Pending {
        request_id: rid.clone(),
        prompt_ids: valid.prompt_ids.clone(),
        params: valid.params.clone(),
        events: tx,
        received_at: ctx.received_at,
    };
    let queue_id = state.next_queue_id.fetch_add(1, Ordering::Relaxed);
    let queue = &state.scheduler.queue;
    if queue.push(queue_id, priority, pending).is_err() {
        return Err(ApiError::QueueFull {
            max_size: queue.max_size(),
            retry_after: Duration::from_secs(1),
        });
    }
    state.tracker.record(rid, Stage::Queued);
    let mut guard = QueueGuard {
        state: state.clone(),
        queue_id,
        request_id: rid.clone(),
        scheduled: false,
    };
    let mut events = rx;
    let max_wait = state.max_queue_wait;
    let deadline = tokio::time::Instant::now() + max_wait;
    let first = match tokio::time::timeout_at(deadline, events.recv()).await {
        Ok(event) => event,
        Err(_elapsed) => {
            if queue.remove(queue_id).is_some() {
                state
                    .tracker
                    .record_with(rid, Stage::Cancelled, "queue_timeout");
                guard.scheduled = true; // removed above: nothing left for the guard to do
                return Err(ApiError::QueueTimeout {
                    waited_ms: max_wait.as_millis() as u64,
                    max_ms: max_wait.as_millis() as u64,
                });
            }
            // Taken by the scheduler just now: its Scheduled event is on the way.
            events.recv().await
        }
    };
    match first {
        // Scheduled is always the first event.
        Some(SeqEvent::Scheduled) | Some(SeqEvent::Token { .. }) => {}
        Some(SeqEvent::Failed(message)) => return Err(ApiError::Internal(message)),
        None => return Err(ApiError::Internal("scheduler stopped".into())),
    }
    guard.scheduled = true;
    Ok(Submission { events, guard })
}
