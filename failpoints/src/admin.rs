//! The `Admin` gRPC service (`treaty.v1.Admin`): arms, lists and clears a binary's failpoints.
//! Both the coordinator and the participant serve it beside their main service, with their own
//! [`Catalog`], and only when built with failpoints: this module does not exist without the
//! feature, so a release binary has no `Admin` service and a call to it answers `UNIMPLEMENTED`.

use tonic::{Request, Response, Status};
use treaty_proto::{ApiError, pb};

use crate::{self as failpoints, Catalog};

pub struct AdminService {
    catalog: &'static Catalog,
}

impl AdminService {
    pub fn new(catalog: &'static Catalog) -> AdminService {
        AdminService { catalog }
    }

    /// The service, ready for `Server::add_service`.
    pub fn server(catalog: &'static Catalog) -> pb::admin_server::AdminServer<AdminService> {
        pb::admin_server::AdminServer::new(AdminService::new(catalog))
    }
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn set_failpoint(
        &self,
        request: Request<pb::SetFailpointRequest>,
    ) -> Result<Response<pb::SetFailpointResponse>, Status> {
        let request = request.into_inner();
        failpoints::set(self.catalog, request.name.trim(), &request.actions)
            .map_err(|e| Status::from(ApiError::from(e)))?;
        Ok(Response::new(pb::SetFailpointResponse {}))
    }

    async fn clear_failpoints(
        &self,
        _request: Request<pb::ClearFailpointsRequest>,
    ) -> Result<Response<pb::ClearFailpointsResponse>, Status> {
        failpoints::clear(self.catalog);
        tracing::info!(target: "treaty::failpoint", "every failpoint disarmed");
        Ok(Response::new(pb::ClearFailpointsResponse {}))
    }

    async fn list_failpoints(
        &self,
        _request: Request<pb::ListFailpointsRequest>,
    ) -> Result<Response<pb::ListFailpointsResponse>, Status> {
        let failpoints = failpoints::list(self.catalog)
            .into_iter()
            .map(|(name, actions)| pb::Failpoint {
                name: name.to_owned(),
                actions,
            })
            .collect();
        Ok(Response::new(pb::ListFailpointsResponse {
            failpoints,
            enabled: self.catalog.enabled(),
        }))
    }
}
