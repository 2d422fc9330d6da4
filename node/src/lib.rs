//! The Meshwork node as a library: everything `meshd` does, so that tests and other programs
//! can embed a node. The binary only parses flags ([`config`]) and calls [`node::Node::start`].
//!
//! Layers, bottom up: sans-IO logic ([`state`], [`membership`], [`placement`]), storage
//! ([`datadir`], [`replica`]), the network ([`admission`], [`p2p`]), and the APIs ([`grpc`],
//! [`http`]). See docs/ARCHITECTURE.md for how they fit.

pub mod admission;
pub mod batch;
pub mod blobs;
pub mod capacity;
pub mod config;
pub mod containerd;
pub mod datadir;
pub mod fence;
pub mod functions;
pub mod gateway;
pub mod grpc;
pub mod http;
pub mod membership;
pub mod node;
pub mod p2p;
pub mod pacing;
pub mod placement;
pub mod registry;
pub mod replica;
pub mod rpc;
pub mod scheduler;
pub mod services;
pub mod state;
pub mod telemetry;

pub use node::{Node, NodeConfig, NodeError};
