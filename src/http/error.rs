//! `ApiError`: the one error type at the HTTP edge. It never shows internal detail to a client; the
//! detail goes to the log through the response extensions.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

/// An error answered to an HTTP client.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the request is malformed; the message says how (never internal detail).
    #[error("{0}")]
    BadRequest(String),
    /// 401: no valid credential.
    #[error("a valid API key is required")]
    Unauthorized,
    /// 403: the credential may not do this.
    #[error("{0}")]
    Forbidden(String),
    /// 404: the thing does not exist, or belongs to another tenant (the two are not told apart).
    #[error("not found")]
    NotFound,
    /// 405: the route exists but not with this method.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// 409: the thing exists in this tenant but its state forbids the request (rotating a revoked
    /// key); the message says which state.
    #[error("{0}")]
    Conflict(String),
    /// 413: the request body is over the size limit.
    #[error("the request body is too large")]
    PayloadTooLarge,
    /// 415: the body is not in the media type the route takes (JSON sent as text or a form, or
    /// with no content type); the message names the one it takes.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// 429: the tenant's request rate is exceeded.
    #[error("too many requests; slow down")]
    TooManyRequests,
    /// 503: a dependency such as the store is not ready.
    #[error("not ready")]
    Unavailable(#[source] anyhow::Error),
    /// 500: anything unexpected. The cause is logged, never sent.
    #[error("internal error")]
    Internal(#[from] anyhow::Error),
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        ApiError::Internal(e.into())
    }
}

/// The cause of an error response, for the logging middleware to read.
#[derive(Clone, Debug)]
pub struct ErrorCause(pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::TooManyRequests => StatusCode::TOO_MANY_REQUESTS,
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let cause = match &self {
            ApiError::Unavailable(e) | ApiError::Internal(e) => Some(format!("{e:#}")),
            _ => None,
        };
        let mut resp = (
            status,
            axum::Json(serde_json::json!({"error": self.to_string()})),
        )
            .into_response();
        if let Some(cause) = cause {
            resp.extensions_mut().insert(ErrorCause(cause));
        }
        resp
    }
}
