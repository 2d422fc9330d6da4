//! The mesh as its own registry: a content-addressed blob store on every node, and the
//! peer-to-peer transfer that fills it from other nodes, verified piece by piece.

pub mod direct;
pub mod store;
pub mod transfer;
