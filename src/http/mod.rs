//! The HTTP surface: `AppState`, the router that merges each area's routes, and the health routes.

pub mod api;
pub mod auth;
pub mod error;
pub mod extract;
pub mod serve;

use std::time::Duration;

use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

pub use error::ApiError;
use error::ErrorCause;

use crate::store::Store;
use crate::tenant::Tenants;

/// What every handler can reach. Cheap handles only.
#[derive(Clone)]
pub struct AppState {
    /// The store, reached by handlers only through a context.
    pub store: Store,
    /// Tenant resolution, provisioning and API keys.
    pub tenants: Tenants,
    /// The agent loop, for admin changes to its policies and tools.
    pub agent: crate::agent::Agent,
    /// The audit logs.
    pub audit: crate::audit::log::AuditLog,
    /// The audit sink admin changes are recorded through.
    pub sink: std::sync::Arc<dyn crate::audit::AuditSink>,
    /// The per-tenant API rate limit.
    pub api_limiter: std::sync::Arc<crate::agent::budget::RunLimiter>,
    /// The tenants with an export running: one at a time each, since an export writes a copy of
    /// the whole range to the temporary directory, and a loop of them would fill the disk that
    /// every tenant's log is on.
    pub exports: std::sync::Arc<api::Exporting>,
    /// The request timeout; an export's client that reads nothing for as long (at least a
    /// second) is given up on.
    pub request_timeout: Duration,
    /// The requests' handler tasks (see `run_to_completion`), which a stopping server waits for.
    pub handlers: tokio_util::task::TaskTracker,
}

/// The whole router, with the platforms' routes (`transports`: Slack's, Discord's) under the same
/// request timeout, error logging and tracing as the API's.
///
/// Why they are passed in rather than merged by the caller afterwards: a layer wraps only the
/// routes its router has when it is applied, so routes merged later would have no timeout, and a
/// client sending a body a byte a minute would hold its connection (and a graceful shutdown)
/// forever.
pub fn router(state: AppState, request_timeout: Duration, transports: Vec<Router>) -> Router {
    let timed = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(api::router())
        // Unknown paths and methods answer in the API's JSON too, not with an empty body.
        .fallback(|| async { ApiError::NotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .with_state(state.clone());
    transports
        .into_iter()
        .fold(timed, Router::merge)
        // Inside the timeout: a request answered 408 still finishes what it started.
        .layer(middleware::from_fn_with_state(
            state.handlers.clone(),
            run_to_completion,
        ))
        .layer(TimeoutLayer::with_status_code(
            axum::http::StatusCode::REQUEST_TIMEOUT,
            request_timeout,
        ))
        // After the timeout, so that these routes are not under it (see `untimed_router`).
        .merge(api::untimed_router().with_state(state))
        .layer(middleware::from_fn(log_error_cause))
        .layer(TraceLayer::new_for_http())
}

/// Liveness: the process answers.
async fn healthz() -> &'static str {
    "ok"
}

/// Readiness: the store answers a read.
async fn readyz(State(state): State<AppState>) -> Result<&'static str, ApiError> {
    state
        .store
        .ping()
        .map_err(|e| ApiError::Unavailable(e.into()))?;
    Ok("ready")
}

/// Prometheus text metrics.
async fn metrics(State(state): State<AppState>) -> impl axum::response::IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        crate::metrics::render(state.audit.checkpoint_age_secs()),
    )
}

/// Runs the rest of the request in a task of its own, so that the request timeout (or a client
/// that goes away) answers without cancelling the handler halfway. Handlers append an audit event
/// and then store its effect, or claim a platform request id and then record its command; cut
/// between the two, the log would say what the store does not, or a retry would be taken for a
/// command that never ran.
///
/// Once the request is answered without its handler (the timeout, a client gone), its body stops:
/// a handler still reading it gets an error, so a client sending a body a byte a minute keeps
/// neither a task nor its connection. The body is not read here, so the routes' own order holds
/// (a credential is checked before a body is read, and the platforms' lower size limits apply).
/// The tasks are tracked, so that a stopping server waits for them before it closes the logs
/// and the store they write to.
async fn run_to_completion(
    State(handlers): State<tokio_util::task::TaskTracker>,
    req: Request,
    next: Next,
) -> Response {
    let answered = tokio_util::sync::CancellationToken::new();
    // Cancels when this future ends: after the handler, or when the timeout drops it.
    let _answered = answered.clone().drop_guard();
    let req = req.map(|body| {
        axum::body::Body::new(StopsWhenAnswered {
            inner: body,
            answered: Box::pin(answered.cancelled_owned()),
        })
    });
    let task = tracing::Instrument::instrument(next.run(req), tracing::Span::current());
    match handlers.spawn(task).await {
        Ok(resp) => resp,
        // A handler that panicked: a 500, with nothing of it in the body.
        Err(e) => axum::response::IntoResponse::into_response(ApiError::Internal(anyhow::anyhow!(
            "the request's task stopped: {e}"
        ))),
    }
}

/// Logs the internal cause that an [`ApiError`] kept out of the response body.
async fn log_error_cause(req: Request, next: Next) -> Response {
    crate::metrics::inc(&crate::metrics::REQUESTS);
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let resp = next.run(req).await;
    if let Some(ErrorCause(cause)) = resp.extensions().get::<ErrorCause>() {
        tracing::error!(%method, %path, status = resp.status().as_u16(), cause = %cause, "request failed");
    }
    resp
}

/// A request body that ends in an error once its request has been answered without it (see
/// [`run_to_completion`]).
struct StopsWhenAnswered {
    inner: axum::body::Body,
    answered: std::pin::Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
}

impl http_body::Body for StopsWhenAnswered {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        if std::future::Future::poll(self.answered.as_mut(), cx).is_ready() {
            return std::task::Poll::Ready(Some(Err(axum::Error::new(
                "the request was answered before its body was read",
            ))));
        }
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
