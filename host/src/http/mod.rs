//! The HTTP side of a running host, on `--metrics-addr`:
//!
//! | path          | what                                                 |
//! |---------------|------------------------------------------------------|
//! | `/`           | the dashboard page (`page.html`, built into the binary) |
//! | `/api/status` | the status document as JSON (`status::Document`)    |
//! | `/metrics`    | Prometheus text                                      |
//! | `/healthz`    | 200 `ok`, or 503 with the reasons                    |
//!
//! A small HTTP/1.1 responder rather than a web framework: four GET
//! routes, each response closes its connection, and every cost is bounded
//! here in plain sight: at most [`MAX_CONNECTIONS`] at once (further
//! clients wait in the kernel's backlog, not in memory), a request head of
//! at most [`MAX_REQUEST`] bytes read within [`READ_TIMEOUT`], a response
//! written within [`WRITE_TIMEOUT`], and an accept that fails (EMFILE: out
//! of file descriptors) waits, with a growing pause, instead of spinning.

pub mod client;

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::metrics::Metrics;
use crate::status::Status;

/// The dashboard: one file, no build step, no network access.
const PAGE: &str = include_str!("page.html");

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 64;
/// Longest request head read.
pub const MAX_REQUEST: usize = 8 * 1024;
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// The pause after a failed accept, doubling up to [`ACCEPT_PAUSE_MAX`].
const ACCEPT_PAUSE_MIN: Duration = Duration::from_millis(10);
const ACCEPT_PAUSE_MAX: Duration = Duration::from_secs(1);

/// What the server reads from.
pub struct State {
    pub status: Option<Arc<Status>>,
    pub metrics: &'static Metrics,
}

/// Serves until the process ends.
pub async fn serve(listener: TcpListener, state: Arc<State>) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut pause = ACCEPT_PAUSE_MIN;
    loop {
        // Take a permit before accepting: when all are in use, new
        // clients wait in the listen backlog.
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        match listener.accept().await {
            Ok((stream, _)) => {
                pause = ACCEPT_PAUSE_MIN;
                let state = state.clone();
                tokio::spawn(async move {
                    handle(stream, &state).await;
                    drop(permit);
                });
            }
            Err(e) => {
                // EMFILE/ENFILE and friends: the error repeats at once, so
                // accepting again straight away would spin a core.
                if pause == ACCEPT_PAUSE_MIN {
                    tracing::warn!("metrics server: cannot accept a connection: {e}; pausing");
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(ACCEPT_PAUSE_MAX);
            }
        }
    }
}

/// A response: status line, content type, body.
struct Response {
    status: &'static str,
    content_type: &'static str,
    body: String,
}

impl Response {
    fn text(status: &'static str, body: impl Into<String>) -> Response {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }
}

async fn handle(mut stream: TcpStream, state: &State) {
    let response = match tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream)).await {
        Ok(Ok(head)) => route(&head, state),
        Ok(Err(HeadError::TooLarge)) => {
            Response::text("431 Request Header Fields Too Large", "request too large\n")
        }
        Ok(Err(HeadError::Closed)) | Err(_) => return,
    };
    let head = format!(
        "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        response.status,
        response.content_type,
        response.body.len()
    );
    let write = async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(response.body.as_bytes()).await?;
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(WRITE_TIMEOUT, write).await;
}

enum HeadError {
    TooLarge,
    Closed,
}

/// Reads up to the blank line that ends a request head.
async fn read_head(stream: &mut TcpStream) -> Result<String, HeadError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|_| HeadError::Closed)?;
        if n == 0 {
            // A client that sent a request line and closed its side.
            if buf.is_empty() {
                return Err(HeadError::Closed);
            }
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n") {
            break;
        }
        if buf.len() > MAX_REQUEST {
            return Err(HeadError::TooLarge);
        }
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

fn route(head: &str, state: &State) -> Response {
    let mut parts = head.split_whitespace();
    let method = parts.next().unwrap_or("");
    let target = parts.next().unwrap_or("/");
    let path = target.split('?').next().unwrap_or("/");
    if method != "GET" {
        return Response::text("405 Method Not Allowed", "only GET\n");
    }
    match path {
        "/" | "/index.html" => Response {
            status: "200 OK",
            content_type: "text/html; charset=utf-8",
            body: PAGE.to_owned(),
        },
        "/api/status" => match &state.status {
            Some(status) => match serde_json::to_string(&status.document(state.metrics)) {
                Ok(body) => Response {
                    status: "200 OK",
                    content_type: "application/json",
                    body,
                },
                Err(e) => Response::text(
                    "500 Internal Server Error",
                    format!("cannot encode the status: {e}\n"),
                ),
            },
            None => Response::text("503 Service Unavailable", "no status yet\n"),
        },
        "/metrics" => Response {
            status: "200 OK",
            content_type: "text/plain; version=0.0.4",
            body: state.metrics.render(),
        },
        "/healthz" => match state.metrics.health() {
            None => Response::text("200 OK", "ok\n"),
            Some(reasons) => Response::text("503 Service Unavailable", format!("{reasons}\n")),
        },
        _ => Response::text(
            "404 Not Found",
            "try / (dashboard), /api/status, /metrics or /healthz\n",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> Arc<State> {
        Arc::new(State {
            status: None,
            metrics: crate::metrics::global(),
        })
    }

    async fn get(addr: std::net::SocketAddr, request: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn routes_answer_and_a_request_may_arrive_in_pieces() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, state()));
        assert!(get(addr, b"GET /healthz HTTP/1.0\r\n\r\n")
            .await
            .starts_with("HTTP/1.1 200"));
        assert!(get(addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .contains("<html"));
        assert!(get(addr, b"GET /nope HTTP/1.0\r\n\r\n")
            .await
            .starts_with("HTTP/1.1 404"));
        assert!(get(addr, b"POST / HTTP/1.0\r\n\r\n")
            .await
            .starts_with("HTTP/1.1 405"));
        // The head split over two writes.
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        s.write_all(b"Host: x\r\n\r\n").await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(out.contains("pipeline_rows_read_total"), "{out}");
    }

    #[tokio::test]
    async fn an_oversized_request_is_refused() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, state()));
        let mut request = b"GET / HTTP/1.1\r\n".to_vec();
        request.extend(std::iter::repeat_n(b'x', MAX_REQUEST + 10));
        let out = get(addr, &request).await;
        assert!(out.starts_with("HTTP/1.1 431"), "{out}");
    }

    /// Clients that connect and send nothing hold a permit each until
    /// their read times out; the others wait in the backlog, and none of
    /// it costs a busy loop. With every permit held, a new client is
    /// answered once one frees.
    #[tokio::test]
    async fn connections_beyond_the_cap_wait_for_a_free_slot() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, state()));
        let mut idle = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let waiting = tokio::spawn(get(addr, b"GET /healthz HTTP/1.0\r\n\r\n"));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!waiting.is_finished(), "served beyond the cap");
        drop(idle.pop());
        let out = tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("served once a slot freed")
            .unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    }
}
