//! The gateway's plan, key and stats APIs (routes are in `services.rs`).

use std::sync::Arc;

use meshwork_proto::v1::{
    self as pb, gateway_service_server::GatewayService, key_service_server::KeyService,
    plan_service_server::PlanService,
};
use tonic::{Request, Response, Status};

use super::services::route_status;
use crate::gateway::{keys, limits, stats};
use crate::node::NodeState;

/// Usage plans.
pub struct PlanApi {
    pub(super) node: Arc<NodeState>,
}

/// API keys.
pub struct KeyApi {
    pub(super) node: Arc<NodeState>,
}

/// Gateway counters.
pub struct GatewayApi {
    pub(super) node: Arc<NodeState>,
}

fn plan_to_pb(p: &keys::Plan) -> pb::Plan {
    pb::Plan {
        name: p.name.clone(),
        rate_per_second: p.rate_per_second,
        burst: p.burst,
        quota_per_day: p.quota_per_day,
        created_ms: p.created_ms,
    }
}

fn key_to_pb(k: &keys::ApiKey, used_today: u64) -> pb::ApiKey {
    pb::ApiKey {
        name: k.name.clone(),
        plan: k.plan.clone(),
        id: k.id.clone(),
        revoked: k.revoked,
        created_ms: k.created_ms,
        revoked_ms: k.revoked_ms,
        used_today,
    }
}

#[tonic::async_trait]
impl PlanService for PlanApi {
    async fn create(&self, req: Request<pb::Plan>) -> Result<Response<pb::Plan>, Status> {
        let p = req.into_inner();
        let plan = keys::create_plan(
            &self.node,
            keys::Plan {
                name: p.name,
                rate_per_second: p.rate_per_second,
                burst: p.burst,
                quota_per_day: p.quota_per_day,
                created_ms: 0,
            },
        )
        .map_err(route_status)?;
        Ok(Response::new(plan_to_pb(&plan)))
    }

    async fn list(
        &self,
        _req: Request<pb::ListPlansRequest>,
    ) -> Result<Response<pb::ListPlansResponse>, Status> {
        let plans = keys::plans(&self.node).iter().map(plan_to_pb).collect();
        Ok(Response::new(pb::ListPlansResponse { plans }))
    }

    async fn remove(
        &self,
        req: Request<pb::PlanRef>,
    ) -> Result<Response<pb::RemovePlanResponse>, Status> {
        keys::remove_plan(&self.node, &req.into_inner().name).map_err(route_status)?;
        Ok(Response::new(pb::RemovePlanResponse {}))
    }
}

#[tonic::async_trait]
impl KeyService for KeyApi {
    async fn create(
        &self,
        req: Request<pb::CreateKeyRequest>,
    ) -> Result<Response<pb::CreatedKey>, Status> {
        let r = req.into_inner();
        let (key, secret) = keys::create_key(&self.node, &r.name, &r.plan).map_err(route_status)?;
        Ok(Response::new(pb::CreatedKey {
            key: Some(key_to_pb(&key, 0)),
            secret,
        }))
    }

    async fn list(
        &self,
        _req: Request<pb::ListKeysRequest>,
    ) -> Result<Response<pb::ListKeysResponse>, Status> {
        let used = limits::used_today(&self.node);
        let keys = keys::keys(&self.node)
            .iter()
            .map(|k| key_to_pb(k, used.get(&k.name).copied().unwrap_or(0)))
            .collect();
        Ok(Response::new(pb::ListKeysResponse { keys }))
    }

    async fn revoke(&self, req: Request<pb::KeyRef>) -> Result<Response<pb::ApiKey>, Status> {
        let key = keys::revoke_key(&self.node, &req.into_inner().name).map_err(route_status)?;
        Ok(Response::new(key_to_pb(&key, 0)))
    }
}

#[tonic::async_trait]
impl GatewayService for GatewayApi {
    async fn stats(
        &self,
        _req: Request<pb::GatewayStatsRequest>,
    ) -> Result<Response<pb::GatewayStatsResponse>, Status> {
        let routes = stats::gather(&self.node)
            .await
            .into_iter()
            .map(|(route, c)| pb::RouteStats {
                p50_seconds: c.quantile(0.5),
                p99_seconds: c.quantile(0.99),
                route,
                requests: c.requests,
                client_errors: c.client_errors,
                server_errors: c.server_errors,
                throttled: c.throttled,
            })
            .collect();
        Ok(Response::new(pb::GatewayStatsResponse { routes }))
    }
}
