//! The one error type of the client-facing boundary, and its single mapping to the
//! OpenAI/vLLM error shape.
//!
//! Everything the router itself says "no" to ends up here: bad input, unknown models,
//! no healthy replica, an upstream that failed without giving us a response to pass on.
//! Upstream responses (including upstream 4xx/5xx) are not errors of ours: they stream
//! through unchanged. The body mirrors vLLM's `ErrorResponse`
//! (`{"error": {"message", "type", "param", "code"}}` with `code` the HTTP status), so
//! a client sees the same shape whether the router or the engine refused the request.
//!
//! What a client reads names no replica address and no operating system error: those
//! are for the router's log ([`RouterError::detail`]) and metrics, not for whoever
//! sent the request.

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};

use crate::ingress::request_facts::FactsError;

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("{0}")]
    BadRequest(#[from] FactsError),
    #[error("request body is larger than the limit of {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("could not read the request body: {0}")]
    BodyRead(String),
    #[error("the request body did not arrive within {0:?}")]
    BodyTimeout(std::time::Duration),
    #[error("no healthy replica is available")]
    NoHealthyReplica,
    #[error("the model replica failed before responding")]
    Upstream { replica: String, reason: String },
    #[error("prefill failed: the prefill replica failed before responding")]
    Prefill { replica: String, reason: String },
    #[error("the model replica sent no response within {after:?}")]
    UpstreamTimeout { replica: String, after: std::time::Duration },
    #[error("route {0} not found")]
    RouteNotFound(String),
    #[error("a valid API key is required: Authorization: Bearer <key>")]
    Unauthorized,
    #[error("too many requests are queued; retry later")]
    QueueFull,
    #[error("no capacity within {after:?}; retry later")]
    QueueTimeout { after: std::time::Duration },
    #[error("method {method} is not allowed on {path}")]
    MethodNotAllowed { method: String, path: String },
    #[error("rate limit reached for this API key: {} {} per minute; retry in {}s",
        .0.per_minute, .0.limit.label(), .0.retry_after.as_secs())]
    RateLimited(crate::admission::rate_limits::Refused),
    #[error("the model `{0}` does not exist or you do not have access to it")]
    ModelNotAllowed(String),
    #[error("the request's form cannot be read: {0}")]
    BadForm(String),
    #[error("the path `{0}` has dot segments, empty segments or encoded separators")]
    BadPath(String),
    #[error("the router holds as many request bytes as it may; retry shortly")]
    BodiesBuffered,
}

impl RouterError {
    pub fn status(&self) -> StatusCode {
        match self {
            RouterError::BadRequest(_)
            | RouterError::BodyRead(_)
            | RouterError::BadForm(_)
            | RouterError::BadPath(_) => StatusCode::BAD_REQUEST,
            RouterError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            RouterError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            RouterError::RouteNotFound(_) => StatusCode::NOT_FOUND,
            RouterError::NoHealthyReplica => StatusCode::SERVICE_UNAVAILABLE,
            RouterError::Upstream { .. } | RouterError::Prefill { .. } => StatusCode::BAD_GATEWAY,
            RouterError::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            RouterError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            RouterError::Unauthorized => StatusCode::UNAUTHORIZED,
            RouterError::QueueFull => StatusCode::TOO_MANY_REQUESTS,
            RouterError::QueueTimeout { .. } | RouterError::BodiesBuffered => StatusCode::SERVICE_UNAVAILABLE,
            RouterError::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            RouterError::ModelNotAllowed(_) => StatusCode::NOT_FOUND,
        }
    }

    /// vLLM's `type` strings are exception class names; we use the same vocabulary.
    fn kind(&self) -> &'static str {
        match self {
            RouterError::BadRequest(_)
            | RouterError::BodyRead(_)
            | RouterError::BadForm(_)
            | RouterError::BadPath(_) => "BadRequestError",
            RouterError::BodyTooLarge { .. } => "RequestEntityTooLargeError",
            RouterError::BodyTimeout(_) => "RequestTimeoutError",
            RouterError::RouteNotFound(_) => "NotFoundError",
            RouterError::NoHealthyReplica => "ServiceUnavailableError",
            RouterError::Upstream { .. } | RouterError::Prefill { .. } => "BadGatewayError",
            RouterError::UpstreamTimeout { .. } => "GatewayTimeoutError",
            RouterError::MethodNotAllowed { .. } => "MethodNotAllowedError",
            RouterError::Unauthorized => "AuthenticationError",
            RouterError::QueueFull => "RateLimitError",
            RouterError::QueueTimeout { .. } | RouterError::BodiesBuffered => "ServiceUnavailableError",
            RouterError::RateLimited(_) => "RateLimitError",
            RouterError::ModelNotAllowed(_) => "NotFoundError",
        }
    }

    fn param(&self) -> Option<&str> {
        match self {
            RouterError::BadRequest(e) => e.field(),
            RouterError::ModelNotAllowed(_) | RouterError::BadForm(_) => Some("model"),
            _ => None,
        }
    }

    /// What the log says beyond what the client reads: the replica and the failure.
    pub fn detail(&self) -> Option<String> {
        match self {
            RouterError::Upstream { replica, reason } | RouterError::Prefill { replica, reason } => {
                Some(format!("{replica}: {reason}"))
            }
            RouterError::UpstreamTimeout { replica, .. } => Some(replica.clone()),
            _ => None,
        }
    }

    /// The JSON body of this error, in the shape vLLM's OpenAI server uses.
    pub fn body(&self) -> String {
        error_body(&self.to_string(), self.kind(), self.param(), self.status())
    }
}

/// `{"error": {"message", "type", "param", "code"}}`: vLLM's `ErrorResponse`, the
/// shape of every error the router itself answers (the admin API's included).
pub fn error_body(message: &str, kind: &str, param: Option<&str>, status: StatusCode) -> String {
    serde_json::json!({
        "error": {"message": message, "type": kind, "param": param, "code": status.as_u16()}
    })
    .to_string()
}

/// An error response: the status and [`error_body`] as JSON.
pub fn error_response(status: StatusCode, body: String) -> Response {
    let mut response = (status, body).into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

impl IntoResponse for RouterError {
    fn into_response(self) -> Response {
        let mut response = error_response(self.status(), self.body());
        let headers = response.headers_mut();
        match &self {
            RouterError::QueueFull | RouterError::QueueTimeout { .. } | RouterError::BodiesBuffered => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            RouterError::RateLimited(refused) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(refused.retry_after.as_secs()));
            }
            _ => {}
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_has_openai_error_shape() {
        let err = RouterError::BadRequest(FactsError::MissingModel);
        let v: serde_json::Value = serde_json::from_str(&err.body()).unwrap();
        assert_eq!(v["error"]["message"], "`model` is required");
        assert_eq!(v["error"]["type"], "BadRequestError");
        assert_eq!(v["error"]["param"], "model");
        assert_eq!(v["error"]["code"], 400);
        assert_eq!(err.status(), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn upstream_failure_is_bad_gateway_and_names_nothing_internal() {
        let err = RouterError::Upstream {
            replica: "http://10.0.0.7:8000".into(),
            reason: "connection failed: Connection refused (os error 111)".into(),
        };
        assert_eq!(err.status(), StatusCode::BAD_GATEWAY);
        let v: serde_json::Value = serde_json::from_str(&err.body()).unwrap();
        assert_eq!(v["error"]["code"], 502);
        let body = err.body();
        assert!(!body.contains("10.0.0.7") && !body.contains("os error"), "{body}");
        assert!(err.detail().unwrap().contains("10.0.0.7"), "the log has it");
    }
}
