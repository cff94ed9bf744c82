//! Request-body helpers shared by handlers: the `Content-Type` rule (415),
//! JSON parsing with line and column on error, and unknown-field detection.

use super::ApiError;
use crate::http::Request;
use serde_json::{json, Map, Value};

/// 415 unless the body is JSON (`application/json`, parameters allowed; a
/// missing `Content-Type` counts as JSON).
pub fn require_json(req: &Request) -> Result<(), ApiError> {
    let Some(ct) = req.header("content-type") else {
        return Ok(());
    };
    let media = ct.split(|&b| b == b';').next().unwrap_or(b"").trim_ascii();
    if media.eq_ignore_ascii_case(b"application/json") {
        Ok(())
    } else {
        Err(ApiError::new(
            415,
            "unsupported_media_type",
            "The request body must be application/json.",
        ))
    }
}

/// Parses the body as JSON; 400 `malformed_json` with line and column.
pub fn parse_json(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            400,
            "malformed_json",
            format!("The body is not valid JSON: {e}."),
        )
        .details(json!({"line": e.line(), "column": e.column()}))
    })
}

/// The body as a JSON object, or 400.
pub fn parse_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match parse_json(body)? {
        Value::Object(m) => Ok(m),
        _ => Err(
            ApiError::new(400, "validation_error", "The body must be a JSON object.")
                .details(json!({"body": "must be a JSON object"})),
        ),
    }
}

/// Collects field errors; `finish` turns them into one 400.
#[derive(Default)]
pub struct FieldErrors(Map<String, Value>);

impl FieldErrors {
    pub fn add(&mut self, field: &str, reason: impl Into<String>) {
        self.0
            .insert(field.to_string(), Value::String(reason.into()));
    }

    /// Names every field of `obj` not in `known`.
    pub fn unknown_fields(&mut self, obj: &Map<String, Value>, known: &[&str]) {
        for k in obj.keys() {
            if !known.contains(&k.as_str()) {
                self.add(k, "unknown field");
            }
        }
    }

    pub fn finish(self) -> Result<(), ApiError> {
        if self.0.is_empty() {
            return Ok(());
        }
        let names: Vec<&str> = self.0.keys().map(String::as_str).collect();
        Err(ApiError::new(
            400,
            "validation_error",
            format!("Invalid fields: {}.", names.join(", ")),
        )
        .details(Value::Object(self.0)))
    }
}
