//! A stand-in Kubernetes API server on 127.0.0.1 that serves EndpointSlices the way the
//! real one does for a list and a watch: `GET .../endpointslices?labelSelector=...`
//! answers an `EndpointSliceList` with its `resourceVersion`; with `watch=true` it
//! streams `{"type": "ADDED" | "MODIFIED" | "DELETED", "object": ...}` lines from the
//! given resource version on, and after [`KubeApi::expire`] it ends open watches with
//! an `ERROR` event carrying a 410 `Status` (resource version too old), as the real
//! server does when its watch cache has moved on, so the client must list again.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;

#[derive(Default)]
struct Inner {
    version: u64,
    slices: BTreeMap<String, Value>,
    /// Every change since the last expiry: (resource version, watch event line).
    history: Vec<(u64, Value)>,
    /// Watches from before this version get 410.
    oldest: u64,
}

pub struct ApiState {
    inner: Mutex<Inner>,
    events: broadcast::Sender<(u64, Value)>,
    /// Bumped by `expire`: open watches end with a 410 error.
    epoch: tokio::sync::watch::Sender<u64>,
    pub lists: AtomicUsize,
    pub watches: AtomicUsize,
}

pub struct KubeApi {
    pub addr: SocketAddr,
    pub state: Arc<ApiState>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// An EndpointSlice of a Service named `service`, its endpoints on `port`.
pub fn slice(name: &str, labels: Value, port: u16, endpoints: &[(&str, bool)]) -> Value {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|(ip, ready)| json!({"addresses": [ip], "conditions": {"ready": ready}}))
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "serving", "labels": labels},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": endpoints,
    })
}

impl KubeApi {
    pub async fn start() -> KubeApi {
        let state = Arc::new(ApiState {
            inner: Mutex::new(Inner::default()),
            events: broadcast::channel(256).0,
            epoch: tokio::sync::watch::channel(0).0,
            lists: AtomicUsize::new(0),
            watches: AtomicUsize::new(0),
        });
        let app = Router::new()
            .route("/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices", get(endpointslices))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        KubeApi { addr, state, server }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Create or replace a slice; watches see ADDED or MODIFIED.
    pub fn apply(&self, mut slice: Value) {
        let mut inner = self.state.inner.lock().unwrap();
        inner.version += 1;
        let version = inner.version;
        slice["metadata"]["resourceVersion"] = json!(version.to_string());
        let name = slice["metadata"]["name"].as_str().unwrap().to_owned();
        let kind = if inner.slices.contains_key(&name) { "MODIFIED" } else { "ADDED" };
        inner.slices.insert(name, slice.clone());
        let event = json!({"type": kind, "object": slice});
        inner.history.push((version, event.clone()));
        let _ = self.state.events.send((version, event));
    }

    /// Delete a slice; watches see DELETED.
    pub fn delete(&self, name: &str) {
        let mut inner = self.state.inner.lock().unwrap();
        inner.version += 1;
        let version = inner.version;
        if let Some(mut slice) = inner.slices.remove(name) {
            slice["metadata"]["resourceVersion"] = json!(version.to_string());
            let event = json!({"type": "DELETED", "object": slice});
            inner.history.push((version, event.clone()));
            let _ = self.state.events.send((version, event));
        }
    }

    /// Replace a slice without telling any watch, then end every open watch with a 410
    /// error and forget the history: only a new list sees the change.
    pub fn expire(&self, mut slice: Value) {
        {
            let mut inner = self.state.inner.lock().unwrap();
            inner.version += 1;
            slice["metadata"]["resourceVersion"] = json!(inner.version.to_string());
            let name = slice["metadata"]["name"].as_str().unwrap().to_owned();
            inner.slices.insert(name, slice);
            inner.history.clear();
            inner.oldest = inner.version + 1;
        }
        self.state.epoch.send_modify(|e| *e += 1);
    }
}

fn selected(slice: &Value, selector: Option<&str>) -> bool {
    selector.is_none_or(|selector| {
        selector.split(',').filter(|s| !s.is_empty()).all(|term| match term.split_once('=') {
            Some((k, v)) => slice["metadata"]["labels"][k].as_str() == Some(v),
            None => slice["metadata"]["labels"].get(term).is_some(),
        })
    })
}

fn gone() -> Value {
    json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": "too old resource version", "reason": "Expired", "code": 410}})
}

async fn endpointslices(
    State(state): State<Arc<ApiState>>,
    Path(_namespace): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let selector = query.get("labelSelector").cloned();
    if query.get("watch").map(String::as_str) != Some("true") {
        state.lists.fetch_add(1, Ordering::SeqCst);
        let inner = state.inner.lock().unwrap();
        let items: Vec<&Value> = inner.slices.values().filter(|s| selected(s, selector.as_deref())).collect();
        let list = json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSliceList",
            "metadata": {"resourceVersion": inner.version.to_string()}, "items": items});
        return ([("content-type", "application/json")], list.to_string()).into_response();
    }
    state.watches.fetch_add(1, Ordering::SeqCst);
    let from: u64 = query.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(64);
    let mut live = state.events.subscribe();
    let mut epoch = state.epoch.subscribe();
    let (backlog, too_old) = {
        let inner = state.inner.lock().unwrap();
        let backlog: Vec<(u64, Value)> = inner.history.iter().filter(|(v, _)| *v > from).cloned().collect();
        (backlog, from + 1 < inner.oldest)
    };
    let line = |event: &Value| Ok(Bytes::from(format!("{event}\n")));
    tokio::spawn(async move {
        if too_old {
            let _ = tx.send(line(&gone())).await;
            return;
        }
        let mut sent = from;
        for (version, event) in backlog {
            if selected(&event["object"], selector.as_deref()) && tx.send(line(&event)).await.is_err() {
                return;
            }
            sent = version;
        }
        loop {
            tokio::select! {
                event = live.recv() => match event {
                    Ok((version, event)) if version > sent => {
                        sent = version;
                        if selected(&event["object"], selector.as_deref()) && tx.send(line(&event)).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => return,
                },
                changed = epoch.changed() => {
                    if changed.is_ok() {
                        let _ = tx.send(line(&gone())).await;
                    }
                    return;
                }
            }
        }
    });
    ([("content-type", "application/json")], Body::from_stream(ReceiverStream::new(rx))).into_response()
}
