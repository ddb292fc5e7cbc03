//! The admin HTTP server, on its own address (`admin.listen`), never the webhook port:
//! - `/metrics`: Prometheus text exposition;
//! - `/livez`: 200 while the process runs (the runtime answers, nothing else is checked);
//! - `/readyz`: 200 when every part reports ready (broker connected, topology declared, consumers running, ledger
//!   writable, not paused, not draining), else 503 with one reason per line.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::health::Health;
use crate::http_server::{self, HttpLimits};
use crate::metrics::{self, Metrics};

#[derive(Clone)]
struct AdminState {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

/// The admin routes.
pub fn router(metrics: Arc<Metrics>, health: Arc<Health>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(AdminState { metrics, health })
}

async fn metrics_handler(State(state): State<AdminState>) -> Response {
    (
        [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
        state.metrics.encode(),
    )
        .into_response()
}

async fn readyz(State(state): State<AdminState>) -> Response {
    match state.health.check() {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(reasons) => {
            let mut body = String::from("not ready\n");
            for reason in reasons {
                body.push_str(&reason);
                body.push('\n');
            }
            (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
        }
    }
}

/// A bound admin server, not yet serving.
pub struct AdminServer {
    listener: TcpListener,
    router: Router,
    limits: HttpLimits,
}

impl AdminServer {
    /// Binds the address (so a port conflict is reported before anything else starts).
    pub async fn bind(
        addr: SocketAddr,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
    ) -> std::io::Result<AdminServer> {
        let listener = TcpListener::bind(addr).await?;
        Ok(AdminServer {
            listener,
            router: router(metrics, health),
            limits: HttpLimits::default(),
        })
    }

    /// Serves within `limits` (`[http]`) rather than the defaults.
    pub fn with_limits(mut self, limits: HttpLimits) -> AdminServer {
        self.limits = limits;
        self
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `stop` is cancelled, every connection bounded (see [`crate::http_server`]).
    pub async fn serve(self, stop: CancellationToken) -> std::io::Result<()> {
        http_server::serve(self.listener, self.router, self.limits, async move {
            stop.cancelled().await
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    async fn get_path(app: Router, path: &str) -> (StatusCode, String) {
        let response = app
            .oneshot(Request::builder().uri(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, String::from_utf8(bytes.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn readyz_follows_health() {
        let metrics = Arc::new(Metrics::new());
        let health = Arc::new(Health::new());
        health.not_ready("amqp:receiver_tokens", "connecting");
        let app = router(metrics, health.clone());
        let (status, body) = get_path(app.clone(), "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("amqp:receiver_tokens: connecting"));
        health.ready("amqp:receiver_tokens");
        assert_eq!(get_path(app.clone(), "/readyz").await.0, StatusCode::OK);
        assert_eq!(get_path(app.clone(), "/livez").await.0, StatusCode::OK);
        let (status, body) = get_path(app, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains("partner_bridge_build_info"));
    }
}
