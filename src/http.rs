//! The HTTP endpoint: `/metrics` (Prometheus text), `/healthz` (the process is up) and
//! `/readyz` (the pipeline holds partitions and is consuming).

use crate::metrics::Metrics;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use std::net::SocketAddr;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub fn router(metrics: Metrics) -> Router {
    Router::new()
        .route("/metrics", get(render))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(metrics)
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

/// Binds `addr` and serves until `cancel` fires. Returns the bound address (port 0 resolved) and
/// the server task.
pub async fn serve(
    addr: SocketAddr,
    metrics: Metrics,
    cancel: CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<std::io::Result<()>>)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let task = tokio::spawn(async move {
        axum::serve(listener, router(metrics))
            .with_graceful_shutdown(async move { cancel.cancelled().await })
            .await
    });
    Ok((local, task))
}
