//! The admin API: list, add, remove and drain replicas while the router serves.
//!
//! It exists only when `--admin-token` is set, and every call must carry
//! `Authorization: Bearer <token>` (compared in constant time). With `--admin-listen`
//! it is served on its own address (keep that one off the public network) and not on
//! the serving port at all.
//!
//! - `GET /admin/replicas`: every replica, its stage, health, draining, requests in
//!   flight, breaker and models.
//! - `POST /admin/replicas {"url": "http://host:port"}`: add a replica. It is probed at
//!   once and enters rotation when healthy; with `consistent-hash` only the sessions
//!   its ring points take over move to it.
//! - `DELETE /admin/replicas?url=http://host:port`: remove a replica. New requests stop
//!   at once; those in flight finish.
//! - `POST /admin/replicas/drain {"url": "...", "draining": true}`: stop (or, with
//!   `false`, resume) new requests to a replica while it stays listed with its in-flight
//!   count, so an operator can wait for zero and then remove or restart it.
//!
//! In P/D mode a body or query may name `"role": "prefill"` or `"decode"` (the default).
//! URLs are validated as the command line validates them (`http://host:port`, nothing
//! else), so the API can only point the router at replica addresses, never make it
//! fetch an arbitrary target.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Query, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use http::{StatusCode, header};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::admission::{ApiKey, ApiKeys};
use crate::error::{error_body, error_response};
use crate::ingress::json as json_response;
use crate::replicas::{MembershipError, Replica, ReplicaUrl, Stage};

pub struct Admin {
    token: ApiKeys,
    /// The default stage first.
    stages: Vec<Stage>,
}

/// The admin API's refusals, in the OpenAI error shape.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("the admin API needs Authorization: Bearer <admin token>")]
    Unauthorized,
    #[error("{0}")]
    BadRequest(String),
    #[error(transparent)]
    Membership(#[from] MembershipError),
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        let (status, kind) = match &self {
            AdminError::Unauthorized => (StatusCode::UNAUTHORIZED, "AuthenticationError"),
            AdminError::BadRequest(_) => (StatusCode::BAD_REQUEST, "BadRequestError"),
            AdminError::Membership(MembershipError::Exists(_)) => (StatusCode::CONFLICT, "ConflictError"),
            AdminError::Membership(MembershipError::NotFound(_)) => (StatusCode::NOT_FOUND, "NotFoundError"),
        };
        let param = matches!(self, AdminError::BadRequest(_) | AdminError::Membership(_)).then_some("url");
        error_response(status, error_body(&self.to_string(), kind, param, status))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Target {
    url: String,
    role: Option<String>,
    /// Drain only: false resumes.
    draining: Option<bool>,
}

impl Admin {
    pub fn new(token: String, stages: Vec<Stage>) -> Self {
        Admin { token: ApiKeys::new(vec![ApiKey::plain("admin".into(), &token)]), stages }
    }

    pub fn routes(self: Arc<Self>) -> Router {
        Router::new()
            .route("/admin/replicas", get(list).post(add).delete(remove))
            .route("/admin/replicas/drain", post(drain))
            .layer(axum::middleware::from_fn_with_state(self.clone(), authorize))
            .with_state(self)
    }

    fn stage(&self, role: Option<&str>) -> Result<&Stage, AdminError> {
        match role {
            None => Ok(&self.stages[0]),
            Some(role) => self.stages.iter().find(|s| s.role == role).ok_or_else(|| {
                let roles: Vec<_> = self.stages.iter().map(|s| s.role).collect();
                AdminError::BadRequest(format!("role `{role}` is not one of {}", roles.join(", ")))
            }),
        }
    }
}

async fn authorize(State(admin): State<Arc<Admin>>, request: Request, next: Next) -> Response {
    if admin.token.accepts(request.headers().get(header::AUTHORIZATION)) {
        next.run(request).await
    } else {
        AdminError::Unauthorized.into_response()
    }
}

fn describe(role: &str, r: &Replica) -> Value {
    let models: Vec<String> =
        r.models().map(|m| m.iter().map(|c| c.id.clone()).collect()).unwrap_or_default();
    json!({"url": r.name(), "role": role, "healthy": r.is_healthy(), "draining": r.is_draining(),
           "in_flight": r.in_flight(), "circuit_open": r.breaker_open(), "models": models})
}

fn parse_target(body: &Bytes) -> Result<Target, AdminError> {
    serde_json::from_slice(body)
        .map_err(|e| AdminError::BadRequest(format!("expected {{\"url\": ...}}: {e}")))
}

fn parse_url(text: &str) -> Result<ReplicaUrl, AdminError> {
    ReplicaUrl::parse(text).map_err(AdminError::BadRequest)
}

async fn list(State(admin): State<Arc<Admin>>) -> Response {
    let replicas: Vec<Value> = admin
        .stages
        .iter()
        .flat_map(|s| s.registry.replicas().into_iter().map(move |r| describe(s.role, &r)))
        .collect();
    json_response(StatusCode::OK, json!({"replicas": replicas}).to_string())
}

async fn add(State(admin): State<Arc<Admin>>, body: Bytes) -> Result<Response, AdminError> {
    let target = parse_target(&body)?;
    let stage = admin.stage(target.role.as_deref())?;
    let replica = stage.join(parse_url(&target.url)?, "admin").await?;
    Ok(json_response(StatusCode::CREATED, describe(stage.role, &replica).to_string()))
}

#[derive(Deserialize)]
struct RemoveQuery {
    url: Option<String>,
    role: Option<String>,
}

async fn remove(
    State(admin): State<Arc<Admin>>,
    Query(query): Query<RemoveQuery>,
) -> Result<Response, AdminError> {
    let url = query.url.ok_or_else(|| AdminError::BadRequest("expected ?url=http://host:port".into()))?;
    let stage = admin.stage(query.role.as_deref())?;
    let replica = stage.leave(parse_url(&url)?.name(), "admin")?;
    Ok(json_response(StatusCode::OK, describe(stage.role, &replica).to_string()))
}

async fn drain(State(admin): State<Arc<Admin>>, body: Bytes) -> Result<Response, AdminError> {
    let target = parse_target(&body)?;
    let stage = admin.stage(target.role.as_deref())?;
    let draining = target.draining.unwrap_or(true);
    let replica = stage.registry.set_draining(parse_url(&target.url)?.name(), draining)?;
    tracing::info!(replica = replica.name(), role = stage.role, draining, "replica drain changed");
    Ok(json_response(StatusCode::OK, describe(stage.role, &replica).to_string()))
}
