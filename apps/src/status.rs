//! The `--status` HTTP endpoint: `GET /status` (JSON) and `GET /metrics` (Prometheus),
//! served by [`crate::httpd`] within its default [`Limits`]. `/metrics` ends with the
//! counters of the HTTP servers of the program (`ott_http_*_total{server="..."}`).

use std::net::SocketAddr;
use std::sync::Arc;

use crate::httpd::{self, HttpStats, Limits, Response, Router};

/// What the endpoint serves; called on a connection thread for each request.
pub trait StatusSource: Send + Sync + 'static {
    /// The JSON document of `GET /status`.
    fn status(&self) -> serde_json::Value;
    /// The Prometheus text of `GET /metrics`.
    fn metrics(&self) -> String;
    /// Other HTTP servers of the program whose counters `/metrics` shows too.
    fn http_stats(&self) -> Vec<Arc<HttpStats>> {
        Vec::new()
    }
}

/// Start the HTTP endpoint on `addr` in background threads. Returns the bound address
/// (useful with port 0).
pub fn serve(addr: SocketAddr, source: Arc<dyn StatusSource>) -> anyhow::Result<SocketAddr> {
    let server = serve_with(addr, source, Limits::default())?;
    let bound = server.local_addr();
    tracing::info!(%bound, "status endpoint listening");
    Ok(bound)
}

/// [`serve`] within `limits`, returning the server (its counters, and a way to stop it).
pub fn serve_with(
    addr: SocketAddr,
    source: Arc<dyn StatusSource>,
    limits: Limits,
) -> anyhow::Result<httpd::Server> {
    let stats = Arc::new(HttpStats::new("status"));
    httpd::serve(addr, router(source, stats.clone()), limits, stats)
}

fn router(source: Arc<dyn StatusSource>, stats: Arc<HttpStats>) -> Router {
    let for_status = source.clone();
    Router::new()
        .get("/status", move |_| {
            let body =
                serde_json::to_string_pretty(&for_status.status()).unwrap_or_else(|_| "{}".into());
            Response::new(200, "application/json", body).into()
        })
        .get("/metrics", move |_| {
            let mut text = source.metrics();
            let others = source.http_stats();
            let mut servers: Vec<&HttpStats> = vec![&stats];
            servers.extend(others.iter().map(|s| s.as_ref()));
            text.push_str(&httpd::prometheus(&servers));
            Response::new(200, "text/plain; version=0.0.4", text).into()
        })
}
