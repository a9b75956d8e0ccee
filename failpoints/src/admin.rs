//! The `Admin` gRPC service (`treaty.v1.Admin`): arms, lists and clears a binary's failpoints.
//! Both the coordinator and the participant serve it beside their main service, with their own
//! [`Catalog`] (a coordinator that drives shards in process also serves its participants' points,
//! which fire in its process), and only when built with failpoints: this module does not exist
//! without the feature, so a release binary has no `Admin` service and a call to it answers
//! `UNIMPLEMENTED`.

use tonic::{Request, Response, Status};
use treaty_proto::{ApiError, pb};

use crate::{self as failpoints, Catalog, FailpointError};

pub struct AdminService {
    catalogs: &'static [&'static Catalog],
}

impl AdminService {
    /// Serves the points of every catalog in `catalogs` (names are unique across them: each
    /// starts with its crate's prefix).
    pub fn new(catalogs: &'static [&'static Catalog]) -> AdminService {
        AdminService { catalogs }
    }

    /// The service, ready for `Server::add_service`.
    pub fn server(catalogs: &'static [&'static Catalog]) -> pb::admin_server::AdminServer<AdminService> {
        pb::admin_server::AdminServer::new(AdminService::new(catalogs))
    }

    /// The catalog that has `name`, or the error naming every point this service knows.
    fn catalog_of(&self, name: &str) -> Result<&'static Catalog, FailpointError> {
        self.catalogs
            .iter()
            .copied()
            .find(|catalog| catalog.names().any(|known| known == name))
            .ok_or_else(|| FailpointError::Unknown {
                name: name.to_owned(),
                known: self
                    .catalogs
                    .iter()
                    .flat_map(|catalog| catalog.names())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn set_failpoint(
        &self,
        request: Request<pb::SetFailpointRequest>,
    ) -> Result<Response<pb::SetFailpointResponse>, Status> {
        let request = request.into_inner();
        let name = request.name.trim();
        self.catalog_of(name)
            .and_then(|catalog| failpoints::set(catalog, name, &request.actions))
            .map_err(|e| Status::from(ApiError::from(e)))?;
        Ok(Response::new(pb::SetFailpointResponse {}))
    }

    async fn clear_failpoints(
        &self,
        _request: Request<pb::ClearFailpointsRequest>,
    ) -> Result<Response<pb::ClearFailpointsResponse>, Status> {
        for catalog in self.catalogs {
            failpoints::clear(catalog);
        }
        tracing::info!(target: "treaty::failpoint", "every failpoint disarmed");
        Ok(Response::new(pb::ClearFailpointsResponse {}))
    }

    async fn list_failpoints(
        &self,
        _request: Request<pb::ListFailpointsRequest>,
    ) -> Result<Response<pb::ListFailpointsResponse>, Status> {
        let failpoints = self
            .catalogs
            .iter()
            .flat_map(|catalog| failpoints::list(catalog))
            .map(|(name, actions)| pb::Failpoint {
                name: name.to_owned(),
                actions,
            })
            .collect();
        Ok(Response::new(pb::ListFailpointsResponse {
            failpoints,
            enabled: self.catalogs.iter().any(|catalog| catalog.enabled()),
        }))
    }
}
