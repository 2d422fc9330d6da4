//! The HTTP listener of every node: `/healthz`, `/metrics`, functions at `/fn/<name>`, and
//! every gateway route (see [`crate::gateway`]) for anything else.

use std::sync::Arc;

use axum::Router;
use axum::body::{Body, to_bytes};
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::functions::runtime::CgiRequest;
use crate::functions::{FunctionError, Functions, MAX_BODY_BYTES};

#[derive(Clone)]
struct AppState {
    metrics: PrometheusHandle,
    functions: Arc<Functions>,
    node: Arc<crate::node::NodeState>,
}

/// Serves HTTP on `listener` until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    metrics: PrometheusHandle,
    functions: Arc<Functions>,
    node: Arc<crate::node::NodeState>,
    mut shutdown: watch::Receiver<bool>,
) {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(render_metrics))
        .route("/fn/{name}", any(invoke_function))
        .route("/fn/{name}/{*rest}", any(invoke_function))
        .fallback(gateway)
        .with_state(AppState {
            metrics,
            functions,
            node,
        });
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = shutdown.changed().await;
        })
        .await;
    if let Err(e) = result {
        tracing::error!(error = %e, "HTTP server failed");
    }
}

async fn render_metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

fn plain(status: StatusCode, text: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        text + "\n",
    )
        .into_response()
}

async fn invoke_function(
    State(state): State<AppState>,
    Path(params): Path<Vec<(String, String)>>,
    request: Request,
) -> Response {
    let name = params
        .iter()
        .find(|(k, _)| k == "name")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let rest = params
        .iter()
        .find(|(k, _)| k == "rest")
        .map(|(_, v)| format!("/{v}"))
        .unwrap_or_else(|| "/".into());
    call_function(&state, &name, rest, request).await
}

/// Anything that is not a built-in path: the gateway routes.
async fn gateway(State(state): State<AppState>, request: Request) -> Response {
    let routes = crate::gateway::list(&state.node);
    let path = request.uri().path().to_string();
    let Some((route, rest)) = crate::gateway::match_route(&routes, &path) else {
        return plain(
            StatusCode::NOT_FOUND,
            format!("no route for {}", path.escape_debug()),
        );
    };
    match &route.target {
        crate::gateway::RouteTarget::Function(name) => {
            call_function(&state, name, rest, request).await
        }
        crate::gateway::RouteTarget::Service(name) => {
            crate::gateway::proxy_to_service(&state.node, name, route.websocket, &rest, request)
                .await
        }
    }
}

async fn call_function(state: &AppState, name: &str, rest: String, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    // Read at most the limit plus one byte: a larger body is refused without being buffered.
    let body = match to_bytes(body, MAX_BODY_BYTES).await {
        Ok(b) => b,
        Err(_) => {
            return plain(
                StatusCode::PAYLOAD_TOO_LARGE,
                FunctionError::TooLarge.to_string(),
            );
        }
    };
    let headers = parts
        .headers
        .iter()
        .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
        .collect();
    let cgi = CgiRequest {
        method: parts.method.to_string(),
        path: rest,
        query: parts.uri.query().unwrap_or_default().to_string(),
        headers,
        body: body.to_vec(),
        env: Default::default(),
        args: vec![],
        raw_output: false,
    };
    match state.functions.invoke(name, cgi).await {
        Ok(resp) => {
            let mut headers = HeaderMap::new();
            for (k, v) in &resp.headers {
                // Header names and values that are not valid HTTP (CR, LF, ...) are dropped.
                if let (Ok(k), Ok(v)) = (HeaderName::try_from(k.as_str()), HeaderValue::from_str(v))
                {
                    headers.append(k, v);
                }
            }
            let status = StatusCode::from_u16(resp.status).unwrap_or(StatusCode::OK);
            (status, headers, Body::from(resp.body)).into_response()
        }
        Err(e) => {
            let status = StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::BAD_GATEWAY);
            plain(status, e.to_string())
        }
    }
}
