//! The one error type of the request path, its one table to status code and `error_type`, and
//! its two renderings: TGI's `{"error", "error_type"}` and OpenAI's `{"error": {message, type,
//! param, code}}` (for `/v1/*`).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use std::time::Duration;

#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    /// The body is not JSON.
    #[error("malformed JSON: {0}")]
    MalformedJson(String),
    #[error("request body exceeds {limit} bytes")]
    BodyTooLarge { limit: usize },
    /// JSON of the wrong shape or with values out of range.
    #[error("{0}")]
    Validation(String),
    /// One named request field is missing, malformed, out of range or not supported.
    #[error("{message}")]
    InvalidParam { param: String, message: String },
    /// The prompt, or the prompt with the tokens asked for, does not fit the context: an
    /// invalid parameter that OpenAI's clients recognise by its own code
    /// (`context_length_exceeded`), e.g. to shorten a conversation and retry.
    #[error("{message}")]
    ContextLength { param: String, message: String },
    /// The request names a model this server does not serve.
    #[error("the model `{0}` does not exist")]
    ModelNotFound(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("rate limit exceeded: {reason}")]
    RateLimited {
        retry_after: Duration,
        reason: String,
    },
    #[error("request queue is full ({max_size} waiting)")]
    QueueFull {
        max_size: usize,
        retry_after: Duration,
    },
    #[error("request waited {waited_ms} ms in the queue (max_wait_time {max_ms} ms)")]
    QueueTimeout { waited_ms: u64, max_ms: u64 },
    #[error("policy plugin unavailable: {0}")]
    PolicyUnavailable(String),
    #[error("not found: {0}")]
    NotFound(String),
    /// The path exists but not with this HTTP method.
    #[error("method {0} is not allowed on this endpoint")]
    MethodNotAllowed(String),
    /// The client did not send its whole body within `http.body_read_timeout_ms`.
    #[error("the request body was not received within {timeout_ms} ms")]
    BodyTimeout { timeout_ms: u64 },
    #[error("internal error: {0}")]
    Internal(String),
    /// Generation failed inside the model for this request (TGI's `generation` error, 424).
    #[error("Request failed during generation: {0}")]
    Generation(String),
    /// The request's sequence ended without its last token (TGI's `incomplete_generation`).
    #[error("Incomplete generation: {0}")]
    IncompleteGeneration(String),
}

impl ApiError {
    /// A request whose sequence stream closed before its last token: the scheduler stopped.
    pub fn stopped_early() -> ApiError {
        ApiError::IncompleteGeneration("the scheduler stopped before the request finished".into())
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::MalformedJson(_) => StatusCode::BAD_REQUEST,
            ApiError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Validation(_)
            | ApiError::InvalidParam { .. }
            | ApiError::ContextLength { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::ModelNotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::QueueFull { .. }
            | ApiError::QueueTimeout { .. }
            | ApiError::PolicyUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            ApiError::Generation(_) => StatusCode::FAILED_DEPENDENCY,
            ApiError::Internal(_) | ApiError::IncompleteGeneration(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }

    /// The machine-readable kind, as in `{"error_type": ...}` and the errors metric.
    pub fn error_type(&self) -> &'static str {
        match self {
            ApiError::MalformedJson(_) => "malformed_json",
            ApiError::BodyTooLarge { .. } => "body_too_large",
            ApiError::Validation(_)
            | ApiError::InvalidParam { .. }
            | ApiError::ContextLength { .. } => "validation",
            ApiError::ModelNotFound(_) => "model_not_found",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::RateLimited { .. } => "rate_limited",
            ApiError::QueueFull { .. } => "queue_full",
            ApiError::QueueTimeout { .. } => "queue_timeout",
            ApiError::PolicyUnavailable(_) => "policy_unavailable",
            ApiError::NotFound(_) => "not_found",
            ApiError::MethodNotAllowed(_) => "method_not_allowed",
            ApiError::BodyTimeout { .. } => "request_timeout",
            ApiError::Internal(_) => "internal",
            ApiError::Generation(_) => "generation",
            ApiError::IncompleteGeneration(_) => "incomplete_generation",
        }
    }

    /// How long a client should wait before trying again, when that is known.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ApiError::RateLimited { retry_after, .. } | ApiError::QueueFull { retry_after, .. } => {
                Some(*retry_after)
            }
            ApiError::QueueTimeout { .. } => Some(Duration::from_secs(1)),
            _ => None,
        }
    }

    /// The JSON body: `{"error": ..., "error_type": ...}`.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({ "error": self.to_string(), "error_type": self.error_type() })
    }

    /// The status on OpenAI's routes: invalid parameters are 400 there, not 422, and a failed
    /// generation is a server error (TGI's 424 is its own).
    pub fn openai_status(&self) -> StatusCode {
        match self.status() {
            StatusCode::UNPROCESSABLE_ENTITY => StatusCode::BAD_REQUEST,
            StatusCode::FAILED_DEPENDENCY => StatusCode::INTERNAL_SERVER_ERROR,
            status => status,
        }
    }

    /// OpenAI's error body: `{"error": {"message", "type", "param", "code"}}`.
    pub fn openai_body(&self) -> serde_json::Value {
        let kind = match self.openai_status().as_u16() {
            400 | 404 | 405 | 408 | 413 => "invalid_request_error",
            401 => "authentication_error",
            429 => "rate_limit_error",
            503 => "service_unavailable_error",
            _ => "server_error",
        };
        let code = match self {
            ApiError::Unauthorized(_) => "invalid_api_key",
            ApiError::RateLimited { .. } => "rate_limit_exceeded",
            ApiError::InvalidParam { .. } | ApiError::Validation(_) => "invalid_value",
            ApiError::ContextLength { .. } => "context_length_exceeded",
            other => other.error_type(),
        };
        let param = match self {
            ApiError::InvalidParam { param, .. } | ApiError::ContextLength { param, .. } => {
                Some(param.as_str())
            }
            ApiError::ModelNotFound(_) => Some("model"),
            _ => None,
        };
        serde_json::json!({ "error": {
            "message": self.to_string(),
            "type": kind,
            "param": param,
            "code": code,
        }})
    }

    /// The response in OpenAI's shape (same headers as the TGI one).
    pub fn into_openai_response(self) -> Response {
        let response = (self.openai_status(), axum::Json(self.openai_body())).into_response();
        self.decorate(response)
    }

    /// Adds `Retry-After` and the extensions the edge reads (metrics, the error itself).
    fn decorate(self, mut response: Response) -> Response {
        if let Some(wait) = self.retry_after() {
            // Retry-After is whole seconds: round up so a client never retries too early.
            let secs = wait.as_millis().div_ceil(1000).max(1);
            if let Ok(value) = HeaderValue::from_str(&secs.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, value);
            }
        }
        response
            .extensions_mut()
            .insert(ErrorKind(self.error_type()));
        response.extensions_mut().insert(self);
        response
    }
}

/// The `error_type` of an error response, put in its extensions for the errors metric.
#[derive(Clone, Copy, Debug)]
pub struct ErrorKind(pub &'static str);

/// Builds an [`ApiError::InvalidParam`].
pub fn invalid_param(param: impl Into<String>, message: impl Into<String>) -> ApiError {
    ApiError::InvalidParam {
        param: param.into(),
        message: message.into(),
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let response = (self.status(), axum::Json(self.body())).into_response();
        self.decorate(response)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_maps_each_error_to_status_and_type() {
        let cases = [
            (ApiError::MalformedJson("x".into()), 400, "malformed_json"),
            (ApiError::BodyTooLarge { limit: 1 }, 413, "body_too_large"),
            (ApiError::Validation("x".into()), 422, "validation"),
            (ApiError::Unauthorized("x".into()), 401, "unauthorized"),
            (
                ApiError::MethodNotAllowed("GET".into()),
                405,
                "method_not_allowed",
            ),
            (
                ApiError::RateLimited {
                    retry_after: Duration::from_millis(1500),
                    reason: "x".into(),
                },
                429,
                "rate_limited",
            ),
            (ApiError::Internal("x".into()), 500, "internal"),
            (ApiError::Generation("x".into()), 424, "generation"),
            (
                ApiError::IncompleteGeneration("x".into()),
                500,
                "incomplete_generation",
            ),
            (
                ApiError::BodyTimeout { timeout_ms: 5 },
                408,
                "request_timeout",
            ),
        ];
        for (err, status, kind) in cases {
            assert_eq!(err.status().as_u16(), status);
            assert_eq!(err.error_type(), kind);
        }
        // OpenAI's clients know no 424.
        let failed = ApiError::Generation("x".into());
        assert_eq!(failed.openai_status().as_u16(), 500);
        let long = ApiError::ContextLength {
            param: "messages".into(),
            message: "x".into(),
        };
        assert_eq!(long.openai_status().as_u16(), 400);
        assert_eq!(
            long.openai_body()["error"]["code"],
            "context_length_exceeded"
        );
        assert_eq!(long.openai_body()["error"]["param"], "messages");
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        let response = ApiError::RateLimited {
            retry_after: Duration::from_millis(1001),
            reason: "x".into(),
        }
        .into_response();
        assert_eq!(response.headers()[header::RETRY_AFTER], "2");
    }
}
