//! Node-to-node calls: a request-response protocol (`/meshwork/rpc/1`) on admitted
//! connections, routed by service name to handlers that subsystems register. Used to forward
//! a function invocation to a node that runs it warm, or to collect logs from every node.
//!
//! The network task owns the libp2p side; this module holds the plain types and the router.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use futures::future::BoxFuture;
use libp2p::PeerId;
use serde::{Deserialize, Serialize};

/// Largest request or response body. A forwarded function answer must fit: up to 32 MiB of
/// output plus its stderr and headers (checked at compile time in `functions`).
pub const MAX_RPC_BYTES: u64 = 34 << 20;

/// A call to another node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RpcRequest {
    /// Which handler, e.g. `fn.invoke`.
    pub service: String,
    /// The handler's own encoding of the call.
    pub body: Vec<u8>,
}

/// The answer of a call.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum RpcResponse {
    /// The handler's answer.
    Ok(Vec<u8>),
    /// The handler failed, or no handler is registered for the service.
    Err(String),
}

/// Why a call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RpcError {
    /// The peer could not be reached or did not answer in time.
    #[error("node {peer} did not answer: {reason}")]
    Unreachable {
        /// The peer.
        peer: PeerId,
        /// Why.
        reason: String,
    },
    /// The peer answered with an error.
    #[error("node {peer}: {message}")]
    Remote {
        /// The peer.
        peer: PeerId,
        /// Its message.
        message: String,
    },
}

/// A registered handler: caller and request body in, response body out.
pub type Handler =
    Arc<dyn Fn(PeerId, Vec<u8>) -> BoxFuture<'static, Result<Vec<u8>, String>> + Send + Sync>;

/// Handlers by service name.
#[derive(Default, Clone)]
pub struct RpcRouter {
    handlers: Arc<RwLock<HashMap<String, Handler>>>,
}

impl RpcRouter {
    /// Registers (or replaces) the handler of `service`.
    pub fn register(&self, service: &str, handler: Handler) {
        self.handlers
            .write()
            .expect("router lock")
            .insert(service.to_string(), handler);
    }

    /// Runs the handler for a request.
    pub async fn handle(&self, peer: PeerId, request: RpcRequest) -> RpcResponse {
        let handler = self
            .handlers
            .read()
            .expect("router lock")
            .get(&request.service)
            .cloned();
        match handler {
            Some(h) => match h(peer, request.body).await {
                Ok(body) => RpcResponse::Ok(body),
                Err(e) => RpcResponse::Err(e),
            },
            None => RpcResponse::Err(format!("no service {:?} on this node", request.service)),
        }
    }
}
