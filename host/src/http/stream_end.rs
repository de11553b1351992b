//! Request metrics for streamed responses: the edge cannot see when a stream ends, so the
//! stream carries this guard and it counts the request once, when the stream is dropped.

use super::{AppState, RequestContext};
use std::sync::Arc;

/// HTTP status recorded for a stream whose client went away before its end (nginx's "client
/// closed request"); the client saw a 200, but the request did not complete.
pub const CLIENT_CLOSED: u16 = 499;

pub struct StreamEnd {
    app: Arc<AppState>,
    ctx: RequestContext,
    status: Option<u16>,
}

impl StreamEnd {
    pub fn new(app: Arc<AppState>, ctx: RequestContext) -> StreamEnd {
        StreamEnd {
            app,
            ctx,
            status: None,
        }
    }

    /// The stream ended as `status` says (200, or 500 for a failure sent as an event).
    pub fn ended(&mut self, status: u16) {
        self.status = Some(status);
    }

    pub fn app(&self) -> &Arc<AppState> {
        &self.app
    }

    pub fn ctx(&self) -> &RequestContext {
        &self.ctx
    }
}

impl Drop for StreamEnd {
    fn drop(&mut self) {
        let status = self.status.unwrap_or(CLIENT_CLOSED);
        self.app.observe_stream_end(&self.ctx, status);
    }
}
