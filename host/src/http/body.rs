//! JSON bodies with cllm's error table: 400 for broken JSON, 408 for a body that does not
//! arrive in time, 413 for oversized bodies, 422 for JSON of the wrong shape.

use crate::error::ApiError;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

/// Like `axum::Json`, but every failure is an [`ApiError`].
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let RawBody(bytes) = RawBody::from_request(req, state).await?;
        parse_json(&bytes).map(JsonBody)
    }
}

/// The body's bytes, with the same errors as [`JsonBody`] (for handlers that parse it
/// more than once).
pub struct RawBody(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for RawBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let limits = req.extensions().get::<BodyLimits>().copied();
        let max_bytes = limits.map_or(usize::MAX, |l| l.max_bytes);
        let read = Bytes::from_request(req, state);
        let read = match limits {
            Some(l) => tokio::time::timeout(l.read_timeout, read)
                .await
                .map_err(|_| ApiError::BodyTimeout {
                    timeout_ms: l.read_timeout.as_millis() as u64,
                })?,
            None => read.await,
        };
        read.map(RawBody).map_err(|e: BytesRejection| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::BodyTooLarge { limit: max_bytes }
            } else {
                ApiError::MalformedJson(e.body_text())
            }
        })
    }
}

/// The configured body limits, put in request extensions by the middleware (and so errors
/// can name them).
#[derive(Clone, Copy)]
pub struct BodyLimits {
    pub max_bytes: usize,
    /// How long the whole body may take to arrive.
    pub read_timeout: std::time::Duration,
}

/// Parses a JSON body. A value of the wrong type or shape is an [`ApiError::InvalidParam`]
/// naming the field's path (`parameters.top_k`, `messages[1].content`).
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        match inner.classify() {
            serde_json::error::Category::Data if path != "." && !path.is_empty() => {
                ApiError::InvalidParam {
                    message: format!("{path}: {inner}"),
                    param: path,
                }
            }
            serde_json::error::Category::Data => ApiError::Validation(inner.to_string()),
            _ => ApiError::MalformedJson(inner.to_string()),
        }
    })?;
    de.end()
        .map_err(|e| ApiError::MalformedJson(e.to_string()))?;
    Ok(value)
}
