//! The `--status` HTTP endpoint: `GET /status` (JSON) and `GET /metrics` (Prometheus).

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use anyhow::Context;

/// What the endpoint serves; called on the HTTP thread for each request.
pub trait StatusSource: Send + Sync + 'static {
    /// The JSON document of `GET /status`.
    fn status(&self) -> serde_json::Value;
    /// The Prometheus text of `GET /metrics`.
    fn metrics(&self) -> String;
}

/// Start the HTTP endpoint on `addr` in a background thread. Returns the bound address
/// (useful with port 0).
pub fn serve(addr: SocketAddr, source: Arc<dyn StatusSource>) -> anyhow::Result<SocketAddr> {
    let server = tiny_http::Server::http(addr)
        .map_err(|e| anyhow::anyhow!("cannot serve --status on {addr}: {e}"))?;
    let bound = server
        .server_addr()
        .to_ip()
        .context("status server has no IP address")?;
    thread::Builder::new()
        .name("status-http".into())
        .spawn(move || loop {
            match server.recv_timeout(Duration::from_millis(500)) {
                Ok(Some(req)) => respond(req, source.as_ref()),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "status endpoint stopped");
                    return;
                }
            }
        })
        .context("cannot start the status thread")?;
    tracing::info!(%bound, "status endpoint listening");
    Ok(bound)
}

fn respond(req: tiny_http::Request, source: &dyn StatusSource) {
    let path = req.url().split('?').next().unwrap_or("").to_string();
    let (code, ctype, body) = match (req.method(), path.as_str()) {
        (tiny_http::Method::Get, "/status") => (
            200,
            "application/json",
            serde_json::to_string_pretty(&source.status()).unwrap_or_else(|_| "{}".into()),
        ),
        (tiny_http::Method::Get, "/metrics") => {
            (200, "text/plain; version=0.0.4", source.metrics())
        }
        (tiny_http::Method::Get, _) => (
            404,
            "text/plain",
            "not found: try /status or /metrics\n".into(),
        ),
        _ => (405, "text/plain", "method not allowed\n".into()),
    };
    let header = tiny_http::Header::from_bytes(&b"Content-Type"[..], ctype.as_bytes());
    let mut resp = tiny_http::Response::from_string(body).with_status_code(code);
    if let Ok(h) = header {
        resp = resp.with_header(h);
    }
    if let Err(e) = req.respond(resp) {
        tracing::debug!(error = %e, "status response not sent");
    }
}
