//! Local stand-ins that speak the real HTTP protocols: an OpenAI-compatible Chat Completions server,
//! an Anthropic Messages server and a webhook receiver, each on 127.0.0.1:0, scripted by the test.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};

/// One scripted model answer.
#[derive(Clone, Debug)]
pub enum Scripted {
    /// Ask for these tool calls: (wire name, arguments).
    Tools(Vec<(&'static str, Value)>),
    /// Answer with text.
    Final(&'static str),
    /// Take the request and answer nothing for a minute (a call a crash interrupts), then fail.
    Hang,
}

/// What a stand-in saw.
#[derive(Clone, Debug, Default)]
pub struct Seen {
    /// Request bodies, in order.
    pub bodies: Vec<Value>,
    /// Request headers, in order.
    pub headers: Vec<HeaderMap>,
}

#[derive(Clone)]
struct ModelState {
    script: Arc<Mutex<VecDeque<Scripted>>>,
    seen: Arc<Mutex<Seen>>,
    usage: (u64, u64),
    delay: Duration,
}

/// A running model stand-in.
pub struct ModelServer {
    /// Its base URL.
    pub url: String,
    seen: Arc<Mutex<Seen>>,
}

impl ModelServer {
    /// What it saw so far.
    pub fn seen(&self) -> Seen {
        self.seen.lock().unwrap().clone()
    }
}

async fn serve(router: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    format!("http://{addr}")
}

fn record(state: &ModelState, headers: HeaderMap, body: &Value) -> Option<Scripted> {
    let mut seen = state.seen.lock().unwrap();
    seen.bodies.push(body.clone());
    seen.headers.push(headers);
    state.script.lock().unwrap().pop_front()
}

async fn hang() -> (StatusCode, Json<Value>) {
    tokio::time::sleep(Duration::from_secs(60)).await;
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({"error": {"message": "hung"}})),
    )
}

async fn openai(
    State(state): State<ModelState>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    tokio::time::sleep(state.delay).await;
    let Some(next) = record(&state, headers, &body) else {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({"error": {"message": "script exhausted"}})),
        );
    };
    let message = match next {
        Scripted::Hang => return hang().await,
        Scripted::Final(text) => json!({"role": "assistant", "content": text}),
        Scripted::Tools(calls) => json!({
            "role": "assistant",
            "content": null,
            "tool_calls": calls.iter().enumerate().map(|(i, (name, args))| json!({
                "id": format!("call_{i}"),
                "type": "function",
                "function": {"name": name, "arguments": args.to_string()},
            })).collect::<Vec<_>>(),
        }),
    };
    (
        StatusCode::OK,
        Json(json!({
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "model": body["model"],
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": state.usage.0, "completion_tokens": state.usage.1, "total_tokens": state.usage.0 + state.usage.1},
        })),
    )
}

async fn anthropic(
    State(state): State<ModelState>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    let Some(next) = record(&state, headers, &body) else {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({"type": "error"})),
        );
    };
    let content = match next {
        Scripted::Hang => return hang().await,
        Scripted::Final(text) => vec![json!({"type": "text", "text": text})],
        Scripted::Tools(calls) => calls
            .iter()
            .enumerate()
            .map(|(i, (name, args))| json!({"type": "tool_use", "id": format!("toolu_{i}"), "name": name, "input": args}))
            .collect(),
    };
    (
        StatusCode::OK,
        Json(json!({
            "id": "msg_test",
            "type": "message",
            "role": "assistant",
            "model": body["model"],
            "content": content,
            "stop_reason": "end_turn",
            "usage": {"input_tokens": state.usage.0, "output_tokens": state.usage.1},
        })),
    )
}

/// Starts an OpenAI-compatible stand-in answering `script` in order, reporting `usage` each time.
pub async fn openai_server(
    script: Vec<Scripted>,
    usage: (u64, u64),
    delay: Duration,
) -> ModelServer {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let state = ModelState {
        script: Arc::new(Mutex::new(script.into())),
        seen: seen.clone(),
        usage,
        delay,
    };
    let url = serve(
        Router::new()
            .route("/v1/chat/completions", post(openai))
            .with_state(state),
    )
    .await;
    ModelServer {
        url: format!("{url}/v1"),
        seen,
    }
}

/// Starts an Anthropic Messages stand-in.
pub async fn anthropic_server(script: Vec<Scripted>, usage: (u64, u64)) -> ModelServer {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let state = ModelState {
        script: Arc::new(Mutex::new(script.into())),
        seen: seen.clone(),
        usage,
        delay: Duration::ZERO,
    };
    let url = serve(
        Router::new()
            .route("/v1/messages", post(anthropic))
            .with_state(state),
    )
    .await;
    ModelServer { url, seen }
}

/// One request the webhook receiver got, with whether its signature verified.
#[derive(Clone, Debug)]
pub struct Hook {
    /// The Idempotency-Key header.
    pub idempotency_key: String,
    /// The X-Agentgate-Run-Id header.
    pub run_id: String,
    /// Whether `X-Agentgate-Signature` verified under the shared secret and timestamp.
    pub signature_ok: bool,
    /// The body.
    pub body: Value,
}

#[derive(Clone)]
struct HookState {
    secret: Vec<u8>,
    hooks: Arc<Mutex<Vec<Hook>>>,
    reply: Arc<dyn Fn(usize) -> (Duration, String) + Send + Sync>,
}

async fn hook(
    State(state): State<HookState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> (StatusCode, String) {
    let h = |k: &str| {
        headers
            .get(k)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let ts: i64 = h("x-agentgate-timestamp").parse().unwrap_or(0);
    // The receiving side's check, written independently of the sender: HMAC-SHA256 over "v1:" ts ":" body.
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&state.secret).unwrap();
    mac.update(format!("v1:{ts}:").as_bytes());
    mac.update(&body);
    let expected = format!("v1={}", hex::encode(mac.finalize().into_bytes()));
    let fresh = (chrono::Utc::now().timestamp() - ts).abs() < 300;
    let n = {
        let mut hooks = state.hooks.lock().unwrap();
        hooks.push(Hook {
            idempotency_key: h("idempotency-key"),
            run_id: h("x-agentgate-run-id"),
            signature_ok: h("x-agentgate-signature") == expected && fresh,
            body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        });
        hooks.len()
    };
    let (delay, text) = (state.reply)(n);
    tokio::time::sleep(delay).await;
    (StatusCode::OK, text)
}

/// A running webhook receiver.
pub struct HookServer {
    /// Its URL.
    pub url: String,
    hooks: Arc<Mutex<Vec<Hook>>>,
}

impl HookServer {
    /// What it received so far.
    pub fn hooks(&self) -> Vec<Hook> {
        self.hooks.lock().unwrap().clone()
    }
}

/// Starts a webhook receiver with `secret`; `reply(n)` chooses the delay and body of the n-th request (1-based).
pub async fn hook_server(
    secret: &str,
    reply: impl Fn(usize) -> (Duration, String) + Send + Sync + 'static,
) -> HookServer {
    let hooks = Arc::new(Mutex::new(Vec::new()));
    let state = HookState {
        secret: secret.as_bytes().to_vec(),
        hooks: hooks.clone(),
        reply: Arc::new(reply),
    };
    let url = serve(Router::new().route("/hook", post(hook)).with_state(state)).await;
    HookServer {
        url: format!("{url}/hook"),
        hooks,
    }
}
