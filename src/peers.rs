//! The other instances of the deployment, for API requests about users this instance does not
//! hold: a request it cannot answer from its own partitions is asked of every peer (`http.peers`:
//! addresses, or a name that resolves to all of them, like a Kubernetes headless Service), and
//! the answer of the one that holds the user is relayed.
//!
//! Asking all peers, rather than computing the owner from the key, keeps the answer right
//! whatever partitioner the producers use (librdkafka's default is CRC32-based, Java's murmur2)
//! and needs no membership protocol; a deployment has a handful of instances and the API serves
//! people and campaign tools, not the event stream. Forwarding rather than redirecting keeps the
//! bearer token and the pod addresses inside the deployment (clients drop `Authorization` on a
//! redirect to another host, and pod addresses are not reachable from outside the cluster).

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::net::SocketAddr;
use std::time::Duration;

/// Header on a forwarded request: the peer answers from its own partitions only.
pub const FORWARDED: &str = "x-segstream-forwarded";
/// Header on a relayed answer: the peer that held the user.
pub const SERVED_BY: &str = "x-segstream-served-by";

/// A peer's answer about one user.
#[derive(Debug)]
pub enum Answer {
    /// It holds the user: the status and body to relay.
    Found {
        peer: SocketAddr,
        status: StatusCode,
        body: Bytes,
    },
    /// It is ready and does not hold the user.
    NotFound,
    /// It is not ready (restoring, rebalancing) or did not answer in time: it may hold the user.
    Unknown,
}

/// The peers and a client to ask them.
#[derive(Clone)]
pub struct Peers {
    entries: Vec<String>,
    token: Option<String>,
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>,
}

/// How long a peer has to answer.
const TIMEOUT: Duration = Duration::from_secs(3);

impl Peers {
    pub fn new(entries: Vec<String>, token: Option<String>) -> Peers {
        Peers {
            entries,
            token,
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Every address the entries resolve to now (a headless Service resolves to its pods).
    async fn addresses(&self) -> (Vec<SocketAddr>, bool) {
        let mut all = Vec::new();
        let mut unresolved = false;
        for e in &self.entries {
            match tokio::net::lookup_host(e.as_str()).await {
                Ok(addrs) => all.extend(addrs),
                Err(_) => unresolved = true,
            }
        }
        all.sort();
        all.dedup();
        (all, unresolved)
    }

    /// Asks every peer `method path` (forwarded: each answers from its own partitions). An entry
    /// that does not resolve counts as one peer that did not answer.
    pub(crate) async fn ask(&self, method: Method, path: &str) -> Vec<Answer> {
        let (addrs, unresolved) = self.addresses().await;
        let mut asks = tokio::task::JoinSet::new();
        for peer in addrs {
            let (client, token, method) = (self.client.clone(), self.token.clone(), method.clone());
            let uri = format!("http://{peer}{path}");
            asks.spawn(async move {
                let mut req = Request::builder()
                    .method(method)
                    .uri(uri)
                    .header(FORWARDED, "1");
                if let Some(t) = token {
                    req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
                }
                let Ok(req) = req.body(Empty::new()) else {
                    return Answer::Unknown;
                };
                let answer = async {
                    let resp = client.request(req).await.ok()?;
                    let status = resp.status();
                    let body = resp.into_body().collect().await.ok()?.to_bytes();
                    Some(match status {
                        StatusCode::NOT_FOUND => Answer::NotFound,
                        s if s.is_success() => Answer::Found {
                            peer,
                            status: s,
                            body,
                        },
                        _ => Answer::Unknown,
                    })
                };
                tokio::time::timeout(TIMEOUT, answer)
                    .await
                    .ok()
                    .flatten()
                    .unwrap_or(Answer::Unknown)
            });
        }
        let mut answers = Vec::new();
        if unresolved {
            answers.push(Answer::Unknown);
        }
        while let Some(a) = asks.join_next().await {
            answers.push(a.unwrap_or(Answer::Unknown));
        }
        answers
    }
}
