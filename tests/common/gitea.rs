//! A Gitea-like server on loopback: the archive route of one private
//! repository, behind its token, counting requests.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http_body_util::Full;
use hyper::StatusCode;

/// A Gitea-like server on loopback serving one private archive.
pub struct Gitea {
    pub addr: std::net::SocketAddr,
    pub requests: Arc<AtomicUsize>,
    _task: tokio::task::JoinHandle<()>,
}

impl Gitea {
    /// Serve `body` at `path` to requests bearing `token {token}`.
    pub async fn start(path: &'static str, token: &'static str, body: Vec<u8>) -> Gitea {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let counter = requests.clone();
        let body = Bytes::from(body);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let body = body.clone();
                let counter = counter.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            counter.fetch_add(1, Ordering::SeqCst);
                            let authorized = req.headers().get("authorization").is_some_and(|v| {
                                v.as_bytes() == format!("token {token}").as_bytes()
                            });
                            let resp = if req.uri().path() == path && authorized {
                                hyper::Response::new(Full::new(body.clone()))
                            } else {
                                // Gitea hides private repositories: 404 without a valid token.
                                let mut r = hyper::Response::new(Full::new(Bytes::from_static(
                                    b"{\"message\":\"Not Found\"}",
                                )));
                                *r.status_mut() = StatusCode::NOT_FOUND;
                                r
                            };
                            async move { Ok::<_, std::convert::Infallible>(resp) }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Gitea {
            addr,
            requests,
            _task: task,
        }
    }
}
