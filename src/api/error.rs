//! The one error type of the API and its mapping to the error shape
//! `{"error", "code", "details", "request_id"}`. Every error response the
//! server sends is built here.

use crate::http::{HttpError, Response};
use serde_json::{json, Value};
use std::borrow::Cow;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
    pub details: Option<Value>,
    pub headers: Vec<(&'static str, Cow<'static, str>)>,
    /// Close the connection after answering.
    pub close: bool,
}

impl ApiError {
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            details: None,
            headers: Vec::new(),
            close: false,
        }
    }

    pub fn details(mut self, details: Value) -> ApiError {
        self.details = Some(details);
        self
    }

    pub fn header(mut self, name: &'static str, value: impl Into<Cow<'static, str>>) -> ApiError {
        self.headers.push((name, value.into()));
        self
    }

    pub fn closing(mut self) -> ApiError {
        self.close = true;
        self
    }

    pub fn not_found() -> ApiError {
        ApiError::new(404, "not_found", "No such resource.")
    }

    pub fn method_not_allowed(allow: &'static str) -> ApiError {
        ApiError::new(
            405,
            "method_not_allowed",
            "Method not allowed on this route.",
        )
        .header("allow", allow)
    }

    pub fn unavailable(message: impl Into<String>, retry_after_secs: u32) -> ApiError {
        ApiError::new(503, "unavailable", message)
            .header("retry-after", retry_after_secs.to_string())
    }

    pub fn overloaded(retry_after_secs: u32) -> ApiError {
        ApiError::new(503, "overloaded", "The server is saturated; retry later.")
            .header("retry-after", retry_after_secs.to_string())
    }

    pub fn internal() -> ApiError {
        ApiError::new(500, "internal_error", "Internal error.")
    }

    /// A row PostgreSQL refused: 400 for a data exception (the event's
    /// content), 500 for any other rule the database enforces.
    pub fn refused(r: &crate::persist::Refusal) -> ApiError {
        let details = json!({"sqlstate": r.sqlstate, "database_error": r.message});
        if r.is_data_exception() {
            ApiError::new(
                400,
                "validation_error",
                "PostgreSQL refused this event's data; it was not stored.",
            )
            .details(json!({"event": details}))
        } else {
            ApiError::new(
                500,
                "internal_error",
                "PostgreSQL refused to store this event; it was not stored.",
            )
            .details(details)
        }
    }

    pub fn request_timeout() -> ApiError {
        ApiError::new(
            408,
            "request_timeout",
            "The request was not received in time.",
        )
        .closing()
    }

    pub fn from_framing(e: &HttpError) -> ApiError {
        match e {
            HttpError::Malformed(what) => ApiError::new(
                400,
                "validation_error",
                format!("Malformed HTTP request: {what}."),
            )
            .closing(),
            HttpError::HeaderTooLarge => ApiError::new(
                431,
                "header_too_large",
                "The request header block is too large.",
            )
            .closing(),
            HttpError::BodyTooLarge { limit } => ApiError::new(
                413,
                "payload_too_large",
                format!("The request body exceeds {limit} bytes."),
            )
            .details(json!({ "limit_bytes": limit }))
            .closing(),
        }
    }

    pub fn into_response(self, request_id: &str) -> Response {
        let mut body = json!({
            "error": self.message,
            "code": self.code,
            "request_id": request_id,
        });
        if let Some(details) = self.details {
            body["details"] = details;
        }
        let mut r = Response::json(self.status, serde_json::to_vec(&body).unwrap_or_default());
        r.headers.extend(self.headers);
        r.close = self.close;
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_shape() {
        let r = ApiError::from_framing(&HttpError::BodyTooLarge { limit: 10 }).into_response("rid");
        assert_eq!(r.status, 413);
        assert!(r.close);
        let v: Value = serde_json::from_slice(&r.body).expect("json");
        assert_eq!(v["code"], "payload_too_large");
        assert_eq!(v["details"]["limit_bytes"], 10);
        assert_eq!(v["request_id"], "rid");
        assert!(v["error"].is_string());
    }
}
