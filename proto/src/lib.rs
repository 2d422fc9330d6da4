//! The `mesh.v1` gRPC API of a Meshwork node: generated messages and tonic stubs.
//!
//! The `.proto` source under `proto/mesh/v1/` is the contract; this crate only compiles it so
//! that `meshd` (server) and `meshctl` (client) share one definition. Any gRPC stack can use the
//! same file, or discover it at run time through server reflection.

pub mod units;

/// Messages and services of the `mesh.v1` package.
#[allow(missing_docs)] // generated code carries the .proto comments, not rustdoc on every item
pub mod v1 {
    tonic::include_proto!("mesh.v1");
}

/// Encoded `FileDescriptorSet` of the package, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/mesh_v1_descriptor.bin"));
