//! gRPC server reflection (v1 and v1alpha; grpcurl uses either) over Treaty's descriptors and the
//! health service's, for the coordinator and the participant alike.

use tonic_reflection::server::v1::{ServerReflection as V1, ServerReflectionServer as V1Server};
use tonic_reflection::server::v1alpha::{
    ServerReflection as V1Alpha, ServerReflectionServer as V1AlphaServer,
};

/// The two reflection services of a server whose API is `service` (its full name, such as
/// `treaty.v1.Coordinator`), advertising only what the build serves: with `admin`, also the
/// fault-injection `treaty.v1.Admin` service.
pub fn services(
    service: &'static str,
    admin: bool,
) -> Result<(V1Server<impl V1>, V1AlphaServer<impl V1Alpha>), tonic_reflection::server::Error> {
    let builder = || {
        let builder = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name(service)
            .with_service_name(tonic_health::pb::health_server::SERVICE_NAME)
            .with_service_name(tonic_reflection::pb::v1::server_reflection_server::SERVICE_NAME)
            .with_service_name(tonic_reflection::pb::v1alpha::server_reflection_server::SERVICE_NAME);
        if admin {
            builder.with_service_name(crate::pb::admin_server::SERVICE_NAME)
        } else {
            builder
        }
    };
    Ok((builder().build_v1()?, builder().build_v1alpha()?))
}
