//! The API's errors: each is one HTTP status with a JSON body `{"error": "..."}`.

/// Why a request failed; [`ApiError::status`] is the HTTP status it is answered with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// 400: malformed HTTP or JSON, an unknown field, a value out of range.
    #[error("{0}")]
    BadRequest(String),
    /// 404: no such route or target.
    #[error("{0}")]
    NotFound(String),
    /// 405: the route exists but not with this method.
    #[error("{method} is not allowed on {path} (allowed: {allowed})")]
    MethodNotAllowed {
        /// The method used.
        method: String,
        /// The route.
        path: String,
        /// The methods the route takes, comma-separated (the `Allow` header).
        allowed: &'static str,
    },
    /// 408: the client did not send a whole request in time.
    #[error("{0}")]
    Timeout(String),
    /// 409: the request conflicts with the VMs' state (target ended, dump under way, slots
    /// full, no fleet to add targets to).
    #[error("{0}")]
    Conflict(String),
    /// 411: a body without a Content-Length (chunked bodies are not taken).
    #[error("{0}")]
    LengthRequired(String),
    /// 413: the body is larger than the limit.
    #[error("{0}")]
    TooLarge(String),
    /// 431: the request line and headers are larger than the limit.
    #[error("{0}")]
    HeadersTooLarge(String),
    /// 500: something failed inside the shim.
    #[error("{0}")]
    Internal(String),
    /// 501: the operation exists but this build cannot do it.
    #[error("{0}")]
    NotImplemented(String),
    /// 503: too many connections, or the VM did not respond in time.
    #[error("{0}")]
    Unavailable(String),
    /// 507: the output's file system is full.
    #[error("{0}")]
    InsufficientStorage(String),
}

impl ApiError {
    /// The HTTP status code.
    pub fn status(&self) -> u16 {
        match self {
            ApiError::BadRequest(_) => 400,
            ApiError::NotFound(_) => 404,
            ApiError::MethodNotAllowed { .. } => 405,
            ApiError::Timeout(_) => 408,
            ApiError::Conflict(_) => 409,
            ApiError::LengthRequired(_) => 411,
            ApiError::TooLarge(_) => 413,
            ApiError::HeadersTooLarge(_) => 431,
            ApiError::Internal(_) => 500,
            ApiError::NotImplemented(_) => 501,
            ApiError::Unavailable(_) => 503,
            ApiError::InsufficientStorage(_) => 507,
        }
    }

    /// The JSON body: `{"error": "<message>"}`.
    pub fn body(&self) -> Vec<u8> {
        serde_json::json!({ "error": self.to_string() })
            .to_string()
            .into_bytes()
    }
}

/// The reason phrase of `status`.
pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        507 => "Insufficient Storage",
        _ => "Unknown",
    }
}
