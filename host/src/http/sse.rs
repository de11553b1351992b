//! How both APIs send a stream of server-sent events.

use axum::http::{HeaderName, HeaderValue};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::Stream;
use std::convert::Infallible;

/// `events` as an SSE response: keep-alive comments while nothing is sent, and
/// `X-Accel-Buffering: no`, which tells a proxy such as nginx to pass each event on at once
/// instead of buffering the stream (TGI sends it too).
pub fn sse_response<S>(events: S) -> Response
where
    S: Stream<Item = Result<Event, Infallible>> + Send + 'static,
{
    let mut response = Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response();
    response.headers_mut().insert(
        HeaderName::from_static("x-accel-buffering"),
        HeaderValue::from_static("no"),
    );
    response
}
