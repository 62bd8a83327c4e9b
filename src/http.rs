//! The HTTP surface: a status page (`/`), the API (`GET /users/{id}`, `GET /segments`,
//! `DELETE /users/{id}`),
//! `/metrics` (Prometheus text), `/healthz` (the process is up) and `/readyz` (the pipeline holds
//! partitions and is consuming). An optional bearer token protects all but metrics and health.
//!
//! Reads go to the shared per-user map and to a catalogue the pipeline republishes; an erasure
//! is a command to the pipeline, which owns the engine and publishes the `erased` change.

use crate::engine::{Engine, SegmentInfo};
use crate::features::FeatureParams;
use crate::metrics::Metrics;
use crate::peers::{Answer, Peers, FORWARDED, SERVED_BY};
use crate::store::Store;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Json;
use axum::Router;
use serde::Serialize;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// The segment catalogue as last published by the pipeline.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Catalogue {
    pub model_version: u64,
    /// Whether this instance trains the models (else it applies the trainer's).
    pub trainer: bool,
    /// Where predicted values come from: `cold_start`, `blended` or `model`
    /// ([`Engine::value_source`]).
    pub value_source: String,
    /// Progressive Σ predicted ÷ Σ actual value on matured labels (0 before any).
    pub value_calibration: f64,
    pub segments: Vec<SegmentInfo>,
}

/// Segment sizes over time, kept by the server so the status page starts with its past: one
/// point per [`History::EVERY_MS`] (the newest follows the live sizes until the next is due),
/// the last [`History::LEN`] of them (an hour).
#[derive(Clone, Debug, Default, Serialize)]
pub struct History {
    pub interval_ms: i64,
    /// `(wall-clock ms, size of each segment)`, oldest first.
    pub points: std::collections::VecDeque<(i64, Vec<u64>)>,
}

impl History {
    pub const EVERY_MS: i64 = 5_000;
    pub const LEN: usize = 720;

    /// Records the sizes at `now_ms`.
    pub fn record(&mut self, now_ms: i64, sizes: Vec<u64>) {
        self.interval_ms = Self::EVERY_MS;
        match self.points.back_mut() {
            Some((t, last)) if now_ms - *t < Self::EVERY_MS && last.len() == sizes.len() => {
                *last = sizes
            }
            _ => {
                self.points.push_back((now_ms, sizes));
                if self.points.len() > Self::LEN {
                    self.points.pop_front();
                }
            }
        }
    }
}

/// Requests the API makes of the pipeline.
#[derive(Debug)]
pub enum ApiCommand {
    /// Erase a user; the reply says whether the user was known.
    Erase {
        user: String,
        reply: oneshot::Sender<bool>,
    },
}

/// What the HTTP handlers share.
#[derive(Clone)]
pub struct ApiState {
    metrics: Metrics,
    store: Arc<Store>,
    params: FeatureParams,
    catalogue: Arc<RwLock<Catalogue>>,
    history: Arc<RwLock<History>>,
    commands: mpsc::Sender<ApiCommand>,
    token: Option<Arc<str>>,
    /// The other instances, asked about users this one does not hold.
    peers: Peers,
}

/// The pipeline's end of the API: where it publishes the catalogue and receives commands.
pub struct PipelineLink {
    pub catalogue: Arc<RwLock<Catalogue>>,
    pub history: Arc<RwLock<History>>,
    pub commands: mpsc::Receiver<ApiCommand>,
}

impl PipelineLink {
    /// A link nobody sends to (a pipeline without an API).
    pub(crate) fn detached() -> Self {
        let (_tx, rx) = mpsc::channel(1);
        Self {
            catalogue: Arc::default(),
            history: Arc::default(),
            commands: rx,
        }
    }

    /// Publishes the engine's catalogue, and its segment sizes at `now_ms` into the history.
    pub(crate) fn publish(&self, engine: &Engine, now_ms: i64) {
        let sizes = engine.segments().iter().map(|s| s.size as u64).collect();
        self.history
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .record(now_ms, sizes);
        let c = Catalogue {
            model_version: engine.model_version(),
            trainer: engine.is_trainer(),
            value_source: engine.value_source().to_owned(),
            value_calibration: engine.value_calibration().0,
            segments: engine.segments(),
        };
        *self.catalogue.write().unwrap_or_else(|p| p.into_inner()) = c;
    }
}

/// Connects an API to the pipeline that will run `engine`; `peers` are the other instances'
/// HTTP addresses (`http.peers`), empty for a single instance.
pub fn link(
    engine: &Engine,
    metrics: Metrics,
    token: Option<String>,
    peers: Vec<String>,
) -> (ApiState, PipelineLink) {
    let (tx, rx) = mpsc::channel(64);
    let catalogue: Arc<RwLock<Catalogue>> = Arc::default();
    let history: Arc<RwLock<History>> = Arc::default();
    let link = PipelineLink {
        catalogue: catalogue.clone(),
        history: history.clone(),
        commands: rx,
    };
    link.publish(engine, crate::clock::wall_ms());
    let state = ApiState {
        metrics,
        store: engine.store(),
        params: engine.feature_params().clone(),
        catalogue,
        history,
        commands: tx,
        peers: Peers::new(peers, token.clone()),
        token: token.map(Arc::from),
    };
    (state, link)
}

/// Only `/metrics` and the health checks (no API).
pub fn metrics_router(metrics: Metrics) -> Router {
    Router::new()
        .route("/metrics", get(render))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(metrics)
}

/// The API plus metrics and health.
pub fn api_router(state: ApiState) -> Router {
    let api = Router::new()
        .route("/users/{id}", get(user).delete(erase))
        .route("/segments", get(segments))
        .route("/segments/history", get(segment_history))
        .route("/", get(status_page))
        .route_layer(middleware::from_fn_with_state(state.clone(), authorize))
        .with_state(state.clone());
    metrics_router(state.metrics.clone()).merge(api)
}

async fn authorize(State(s): State<ApiState>, req: Request, next: Next) -> Response {
    if let Some(token) = &s.token {
        let ok = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|t| t == &**token);
        if !ok {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                "missing or wrong bearer token\n",
            )
                .into_response();
        }
    }
    next.run(req).await
}

/// The status page: segment sizes over time, descriptions and throughput, drawn in the browser
/// from `/segments` and `/metrics`.
async fn status_page() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        include_str!("assets/status.html"),
    )
}

async fn render(State(m): State<Metrics>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        m.render(),
    )
}

async fn ready(State(m): State<Metrics>) -> impl IntoResponse {
    if m.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

/// A user's profile.
#[derive(Serialize)]
struct Profile {
    user_id: String,
    segment: Option<u32>,
    segment_label: Option<String>,
    predicted_value: f64,
    /// P(a purchase within the value horizon).
    purchase_probability: f64,
    /// `cold_start`, `blended` or `model`: see [`Catalogue::value_source`].
    value_source: String,
    version: i64,
    events: u64,
    last_event_time: i64,
    features: serde_json::Map<String, serde_json::Value>,
}

async fn user(State(s): State<ApiState>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    let Some(state) = s.store.get(&id) else {
        return elsewhere(&s, Method::GET, &id, &headers).await;
    };
    let (label, value_source) = {
        let c = s.catalogue.read().unwrap_or_else(|p| p.into_inner());
        let label = state
            .segment
            .and_then(|seg| c.segments.get(seg as usize).map(|i| i.label.clone()));
        (label, c.value_source.clone())
    };
    Json(Profile {
        user_id: id,
        segment: state.segment,
        segment_label: label,
        predicted_value: state.predicted_value,
        purchase_probability: f64::from(state.signals.purchase_probability),
        value_source,
        version: state.version,
        events: state.events,
        last_event_time: state.anchor_ms,
        features: state
            .named(&s.params)
            .into_iter()
            .map(|(k, v)| (k, serde_json::json!(v)))
            .collect(),
    })
    .into_response()
}

async fn segments(State(s): State<ApiState>) -> Json<Catalogue> {
    Json(
        s.catalogue
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone(),
    )
}

async fn segment_history(State(s): State<ApiState>) -> Json<History> {
    Json(s.history.read().unwrap_or_else(|p| p.into_inner()).clone())
}

async fn erase(State(s): State<ApiState>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    let (reply, answer) = oneshot::channel();
    let sent = s
        .commands
        .send(ApiCommand::Erase {
            user: id.clone(),
            reply,
        })
        .await;
    match (sent, answer.await) {
        (Ok(()), Ok(true)) => StatusCode::NO_CONTENT.into_response(),
        (Ok(()), Ok(false)) => elsewhere(&s, Method::DELETE, &id, &headers).await,
        _ => (
            StatusCode::SERVICE_UNAVAILABLE,
            "the pipeline is not running\n",
        )
            .into_response(),
    }
}

/// The answer about a user this instance does not hold. A forwarded request (or one with no
/// peers) is answered from this instance alone; otherwise every peer is asked and the one that
/// holds the user answers. 404 only when every instance is ready and none holds the user; while
/// one is restoring or rebalancing, or does not answer, 503 with `Retry-After`: the user may be
/// in a partition that is moving.
async fn elsewhere(s: &ApiState, method: Method, id: &str, headers: &HeaderMap) -> Response {
    let ready_here = s.metrics.is_ready();
    let forwarded = headers.contains_key(FORWARDED);
    let mut unknown = !ready_here;
    if !forwarded && !s.peers.is_empty() {
        let path = format!("/users/{}", encode_path_segment(id));
        for answer in s.peers.ask(method, &path).await {
            match answer {
                Answer::Found { peer, status, body } => {
                    let mut r = (status, body).into_response();
                    let h = r.headers_mut();
                    if status != StatusCode::NO_CONTENT {
                        h.insert(
                            header::CONTENT_TYPE,
                            header::HeaderValue::from_static("application/json"),
                        );
                    }
                    if let Ok(v) = peer.to_string().parse() {
                        h.insert(SERVED_BY, v);
                    }
                    return r;
                }
                Answer::NotFound => {}
                Answer::Unknown => unknown = true,
            }
        }
    }
    if unknown {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "2")],
            "the user may be in a partition that is being restored or moved; retry\n",
        )
            .into_response()
    } else {
        (StatusCode::NOT_FOUND, "unknown user\n").into_response()
    }
}

/// `id` as one URL path segment: everything but the unreserved characters percent-encoded.
fn encode_path_segment(id: &str) -> String {
    const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    percent_encoding::utf8_percent_encode(id, SEGMENT).to_string()
}

/// Binds `addr` and serves `router` until `cancel` fires. Returns the bound address (port 0
/// resolved) and the server task.
pub async fn serve(
    addr: SocketAddr,
    router: Router,
    cancel: CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<std::io::Result<()>>)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let task = tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async move { cancel.cancelled().await })
            .await
    });
    Ok((local, task))
}

#[cfg(test)]
mod tests {
    use super::History;

    #[test]
    fn history_keeps_a_point_per_interval_the_newest_live_and_an_hour_at_most() {
        let mut h = History::default();
        h.record(0, vec![1, 2]);
        h.record(1_000, vec![3, 4]);
        assert_eq!(h.points.len(), 1, "the newest point follows the live sizes");
        assert_eq!(h.points[0], (0, vec![3, 4]));
        h.record(History::EVERY_MS, vec![5, 6]);
        assert_eq!(h.points.len(), 2);
        for i in 2..(History::LEN as i64 + 10) {
            h.record(i * History::EVERY_MS, vec![0, 0]);
        }
        assert_eq!(h.points.len(), History::LEN);
        // A new model with another k starts a new point at once.
        let last = h.points.back().unwrap().0;
        h.record(last + 1, vec![0, 0, 0]);
        assert_eq!(h.points.back().unwrap().1.len(), 3);
    }
}
