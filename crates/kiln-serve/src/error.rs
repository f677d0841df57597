//! Errors that become HTTP answers: a status and a one-line message, as plain text.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

/// An error with the status it should be answered with.
#[derive(Clone, Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Message for the client (and the log).
    pub message: String,
    /// Seconds for a Retry-After header.
    pub retry_after: Option<u64>,
}

macro_rules! ctor {
    ($($name:ident => $status:ident),* $(,)?) => {$(
        #[doc = concat!("A `", stringify!($status), "` error.")]
        pub fn $name(msg: impl Into<String>) -> Self {
            Self { status: StatusCode::$status, message: msg.into(), retry_after: None }
        }
    )*};
}

impl ApiError {
    ctor!(
        bad_request => BAD_REQUEST,
        forbidden => FORBIDDEN,
        not_found => NOT_FOUND,
        too_large => PAYLOAD_TOO_LARGE,
        unsupported_type => UNSUPPORTED_MEDIA_TYPE,
        internal => INTERNAL_SERVER_ERROR,
        bad_gateway => BAD_GATEWAY,
        gateway_timeout => GATEWAY_TIMEOUT,
    );

    /// 429 or 503 with Retry-After.
    pub fn busy(status: StatusCode, msg: impl Into<String>, retry_after: u64) -> Self {
        Self {
            status,
            message: msg.into(),
            retry_after: Some(retry_after),
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.status, self.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(status = %self.status, "{}", self.message);
        } else {
            tracing::debug!(status = %self.status, "{}", self.message);
        }
        let mut r = (self.status, format!("{}\n", self.message)).into_response();
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}
