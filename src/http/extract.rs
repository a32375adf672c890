//! The extractors API handlers use for a path, a query and a JSON body. Each wraps axum's own
//! and turns its rejection into an [`ApiError`], so that a malformed request gets the API's
//! `{"error": …}` JSON rather than axum's plain text, and no message names a Rust type.

use axum::body::{Body, Bytes};
use axum::extract::path::ErrorKind;
use axum::extract::rejection::PathRejection;
use axum::extract::{FromRequest, FromRequestParts, RawPathParams, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use super::ApiError;

/// Path parameters; a value that does not parse is a 400 that names the parameter.
pub struct Path<T>(pub T);

/// The query string; a missing or malformed field is a 400 that names it.
pub struct Query<T>(pub T);

/// A required JSON body; a missing, mistyped or malformed one is a 400 that says why, and one
/// sent without the JSON content type a 415.
pub struct JsonBody<T>(pub T);

/// A JSON body whose every field has a default: an absent or blank body is `T::default()`, so a
/// client may send none at all; a body that is present must be well-formed JSON, sent as JSON.
pub struct JsonBodyOrDefault<T>(pub T);

impl<T, S> FromRequestParts<S> for Path<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(Path(v)),
            Err(e) => {
                // A route with one parameter reports a bad value without its name; the raw
                // parameters let the message name it anyway.
                let raw: Vec<(String, String)> = RawPathParams::from_request_parts(parts, state)
                    .await
                    .map(|p| {
                        p.iter()
                            .map(|(k, v)| (k.to_owned(), v.to_owned()))
                            .collect()
                    })
                    .unwrap_or_default();
                Err(path_error(e, &raw))
            }
        }
    }
}

impl<T, S> FromRequestParts<S> for Query<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(v)| Query(v))
            .map_err(|e| rejection(e.status(), e.body_text()))
    }
}

impl<T, S> FromRequest<S> for JsonBody<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        axum::Json::<T>::from_request(req, state)
            .await
            .map(|axum::Json(v)| JsonBody(v))
            .map_err(|e| rejection(e.status(), e.body_text()))
    }
}

impl<T, S> FromRequest<S> for JsonBodyOrDefault<T>
where
    T: DeserializeOwned + Default,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let (parts, body) = req.into_parts();
        // Buffered under the same body limit as any other body (the limit lives in the
        // extensions, which the clone keeps).
        let bytes = Bytes::from_request(Request::from_parts(parts.clone(), body), state)
            .await
            .map_err(|e| rejection(e.status(), e.body_text()))?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(JsonBodyOrDefault(T::default()));
        }
        // A body that is there goes through axum's own checks, content type included, so that
        // it is refused with the same words as on every other route.
        let req = Request::from_parts(parts, Body::from(bytes));
        JsonBody::<T>::from_request(req, state)
            .await
            .map(|JsonBody(v)| JsonBodyOrDefault(v))
    }
}

/// Maps any axum rejection by its status: an over-long body is a 413, a body that is not JSON by
/// its content type a 415, any other client mistake a 400, each in axum's words (made plain); and
/// anything else (a handler that does not fit its route) a 500 whose text only the log sees.
fn rejection(status: StatusCode, text: String) -> ApiError {
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::PayloadTooLarge
    } else if status == StatusCode::UNSUPPORTED_MEDIA_TYPE {
        ApiError::UnsupportedMediaType(plain(&text))
    } else if status.is_client_error() {
        ApiError::BadRequest(plain(&text))
    } else {
        ApiError::Internal(anyhow::anyhow!("rejected by an extractor: {text}"))
    }
}

/// The path rejection, in words that name the parameter and what it must be. axum's own text
/// names the Rust type the value was parsed into (`Cannot parse "abc" to a "u64"`).
fn path_error(e: PathRejection, raw: &[(String, String)]) -> ApiError {
    let PathRejection::FailedToDeserializePathParams(e) = e else {
        return ApiError::Internal(anyhow::anyhow!("path rejection: {}", e.body_text()));
    };
    let bad = ApiError::BadRequest;
    match e.into_kind() {
        ErrorKind::ParseErrorAtKey {
            key,
            value,
            expected_type,
        } => bad(invalid(Some(&key), &value, expected_type)),
        ErrorKind::ParseErrorAtIndex {
            index,
            value,
            expected_type,
        } => {
            let key = raw.get(index).map(|(k, _)| k.as_str());
            bad(invalid(key, &value, expected_type))
        }
        ErrorKind::ParseError {
            value,
            expected_type,
        } => {
            let key = match raw {
                [(k, _)] => Some(k.as_str()),
                _ => raw
                    .iter()
                    .find(|(_, v)| *v == value)
                    .map(|(k, _)| k.as_str()),
            };
            bad(invalid(key, &value, expected_type))
        }
        ErrorKind::InvalidUtf8InPathParam { key } => {
            bad(format!("`{key}` is not valid UTF-8 once percent-decoded"))
        }
        ErrorKind::DeserializeError {
            key,
            value,
            message,
        } => bad(format!(
            "`{key}` is invalid, got `{}`: {}",
            shown(&value),
            plain(&message)
        )),
        ErrorKind::Message(m) => bad(format!("invalid path: {}", plain(&m))),
        // The handler's type does not fit its route (a wrong number of parameters, an
        // unsupported type): our mistake, not the client's.
        other => ApiError::Internal(anyhow::anyhow!("path extractor: {other}")),
    }
}

/// "`seq` must be a non-negative integer, got `abc`".
fn invalid(key: Option<&str>, value: &str, expected_type: &str) -> String {
    let what = key.map_or_else(|| "a path parameter".to_owned(), |k| format!("`{k}`"));
    let digits = value.strip_prefix('-').unwrap_or(value);
    let integer = !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit());
    // An integer that does not fit is told apart, since "must be an integer" would puzzle.
    if integer && describe(expected_type).is_some_and(|d| d.ends_with("integer")) {
        let negative_unsigned = value.starts_with('-') && expected_type.starts_with('u');
        if !negative_unsigned {
            return format!("{what} is out of range, got `{}`", shown(value));
        }
    }
    match describe(expected_type) {
        Some(d) => format!("{what} must be {d}, got `{}`", shown(value)),
        None => format!("{what} is invalid, got `{}`", shown(value)),
    }
}

/// A client's value as echoed back: at most 64 characters, so an error stays small.
fn shown(value: &str) -> String {
    const MAX: usize = 64;
    match value.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}…", &value[..i]),
        None => value.to_owned(),
    }
}

/// Words for a Rust primitive type name.
fn describe(ty: &str) -> Option<&'static str> {
    Some(match ty {
        "u8" | "u16" | "u32" | "u64" | "u128" | "usize" => "a non-negative integer",
        "i8" | "i16" | "i32" | "i64" | "i128" | "isize" => "an integer",
        "f32" | "f64" => "a number",
        "bool" => "`true` or `false`",
        "char" => "a single character",
        _ => return None,
    })
}

/// serde's messages end in what was expected, spelt as a Rust type (`expected u32`, `expected
/// struct RotateBody`); this rewrites those into words that tell the client what to send without
/// naming our types.
fn plain(msg: &str) -> String {
    const EXPECTED: &str = "expected ";
    const SHAPES: [(&str, &str); 6] = [
        ("struct variant ", "an object"),
        ("tuple variant ", "an array"),
        ("tuple struct ", "an array"),
        ("unit struct ", "null"),
        ("struct ", "an object"),
        ("enum ", "one of the allowed values"),
    ];
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut out = String::with_capacity(msg.len());
    let mut rest = msg;
    while let Some(i) = rest.find(EXPECTED) {
        let (head, tail) = rest.split_at(i + EXPECTED.len());
        out.push_str(head);
        rest = tail;
        if let Some((name, words)) = SHAPES
            .iter()
            .find_map(|(shape, words)| tail.strip_prefix(shape).map(|n| (n, *words)))
        {
            out.push_str(words);
            rest = name.trim_start_matches(is_ident);
            continue;
        }
        let end = tail.find(|c: char| !is_ident(c)).unwrap_or(tail.len());
        if let Some(words) = describe(&tail[..end]) {
            out.push_str(words);
            rest = &tail[end..];
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    use axum::routing::get;
    use axum::Router;
    use http_body_util::BodyExt;
    use serde::Deserialize;
    use tower::ServiceExt;

    fn check_plain(input: &str, expect: &str) {
        assert_eq!(plain(input), expect, "{input:?}");
    }

    #[test]
    fn serde_type_names_become_words() {
        check_plain(
            "overlap_secs: invalid value: integer `-1`, expected u32 at line 1 column 19",
            "overlap_secs: invalid value: integer `-1`, expected a non-negative integer at line 1 column 19",
        );
        check_plain(
            "invalid type: null, expected struct RotateBody at line 1 column 4",
            "invalid type: null, expected an object at line 1 column 4",
        );
        check_plain(
            "invalid type: integer `5`, expected enum Role",
            "invalid type: integer `5`, expected one of the allowed values",
        );
        check_plain(
            "expected struct variant Step::Plan, expected i64",
            "expected an object, expected an integer",
        );
        // What is already words stays as it is.
        for same in [
            "unknown variant `x`, expected one of `a`, `b`",
            "invalid type: integer `5`, expected a string",
            "unknown field `nmae`, expected one of `name`, `plan`",
            "expected",
            "expected ",
            "",
        ] {
            check_plain(same, same);
        }
    }

    #[test]
    fn echoed_values_are_cut_short() {
        assert_eq!(shown("abc"), "abc");
        let long = "é".repeat(100);
        assert_eq!(shown(&long), format!("{}…", "é".repeat(64)));
    }

    #[derive(Deserialize)]
    #[serde(rename_all = "lowercase")]
    enum Colour {
        Red,
        Blue,
    }

    #[derive(Deserialize)]
    struct Filter {
        colour: Colour,
        #[allow(dead_code)]
        limit: Option<u32>,
    }

    async fn by_colour(Query(f): Query<Filter>) -> &'static str {
        match f.colour {
            Colour::Red => "red",
            Colour::Blue => "blue",
        }
    }

    async fn pair(Path((a, b)): Path<(String, u64)>) -> String {
        format!("{a}{b}")
    }

    /// `(status, content type, body)` of a GET through a router with the wrappers.
    async fn get_(uri: &str) -> (u16, String, String) {
        let app = Router::new()
            .route("/colours", get(by_colour))
            .route("/pairs/{name}/{n}", get(pair));
        let resp = app
            .oneshot(Request::get(uri).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let ct = resp
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, ct, String::from_utf8(body.to_vec()).unwrap())
    }

    fn check_refused(got: (u16, String, String), needle: &str) {
        let (status, ct, body) = got;
        assert_eq!(status, 400, "{body}");
        assert_eq!(ct, "application/json", "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let msg = v["error"].as_str().unwrap();
        assert!(msg.contains(needle), "{msg:?} lacks {needle:?}");
        assert!(
            !msg.contains("Colour") && !msg.contains("u32") && !msg.contains("u64"),
            "{msg:?} names a Rust type"
        );
    }

    #[tokio::test]
    async fn bad_queries_and_paths_are_json_400s_in_plain_words() {
        assert_eq!(get_("/colours?colour=red").await.2, "red");
        check_refused(
            get_("/colours?colour=green").await,
            "unknown variant `green`, expected `red` or `blue`",
        );
        check_refused(get_("/colours").await, "missing field `colour`");
        check_refused(
            get_("/colours?colour=red&limit=lots").await,
            "limit: invalid digit",
        );
        assert_eq!(get_("/pairs/a/7").await.2, "a7");
        check_refused(
            get_("/pairs/a/seven").await,
            "`n` must be a non-negative integer, got `seven`",
        );
        check_refused(get_("/pairs/%FF/7").await, "`name` is not valid UTF-8");
    }

    /// Handlers take only these wrappers, so no route can answer with axum's plain text.
    #[test]
    fn the_api_uses_only_these_extractors() {
        let api = include_str!("api.rs");
        for (needle, what) in [
            ("extract::Path", "axum's Path"),
            ("extract::Query", "axum's Query"),
            ("Json<", "axum's Json as an extractor"),
        ] {
            assert!(!api.contains(needle), "src/http/api.rs uses {what}");
        }
        for line in api.lines().filter(|l| l.starts_with("use axum::extract")) {
            assert!(
                !line.contains("Path") && !line.contains("Query"),
                "src/http/api.rs imports axum's extractors: {line}"
            );
        }
    }
}
