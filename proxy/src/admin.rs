//! The admin listener: `GET /metrics` (Prometheus), `GET /healthz` (200 while accepting, 503
//! while draining), `POST /reload` (re-read the configuration file; 200 with notes, or 400 with
//! every problem of the new file). Meant for a loopback or management address only.

use std::convert::Infallible;
use std::future::Future;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::Server;

/// Serves until `shutdown` completes.
pub async fn serve(listener: TcpListener, server: Server, shutdown: impl Future<Output = ()>) {
    if let Ok(addr) = listener.local_addr() {
        info!(admin = %addr, "admin endpoints: /metrics /healthz /reload");
    }
    let tasks = TaskTracker::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            _ = &mut shutdown => break,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors: the proxy's own accept loop backs off too.
                    debug!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let server = server.clone();
        tasks.spawn(async move {
            let service = service_fn(move |req| {
                let server = server.clone();
                async move { Ok::<_, Infallible>(handle(&req, &server)) }
            });
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(error = %e, "admin connection failed");
            }
        });
    }
}

fn handle(req: &Request<Incoming>, server: &Server) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => response(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            server.metrics_text(),
        ),
        (&Method::GET, "/healthz") if server.accepting() => text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/healthz") => text(StatusCode::SERVICE_UNAVAILABLE, "not accepting connections\n"),
        (&Method::POST, "/reload") => match server.reload() {
            Ok(notes) => {
                info!(notes = notes.len(), "configuration reloaded (admin endpoint)");
                for n in &notes {
                    warn!("reload: {n}");
                }
                let mut body = String::from("reloaded\n");
                for n in notes {
                    body.push_str(&format!("note: {n}\n"));
                }
                text(StatusCode::OK, body)
            }
            Err(e) => {
                warn!("reload refused, keeping the running configuration: {e}");
                text(StatusCode::BAD_REQUEST, format!("{e}\n"))
            }
        },
        (_, "/metrics" | "/healthz" | "/reload") => text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /metrics, /healthz or POST /reload\n",
        ),
    }
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<Full<Bytes>> {
    response(status, "text/plain; charset=utf-8", body.into())
}

fn response(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    r
}
