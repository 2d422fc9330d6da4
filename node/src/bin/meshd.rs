//! `meshd`: parses flags and runs a Meshwork node until SIGINT or SIGTERM.

use anyhow::Context;
use clap::Parser;
use meshwork_node::config::MeshdArgs;
use meshwork_node::telemetry;

/// mimalloc instead of glibc's malloc: the gateway's per-request allocations (hyper, headers,
/// routing) spend about a quarter less CPU in the allocator (bench/gateway). Built without
/// transparent huge pages (the workspace's `no_thp` feature): with them, a thread's first
/// allocation from a fresh arena region faulted in and zeroed a whole 2 MiB page, which took
/// 5-40 ms now and then on a VM and made a restarted node's first function call that slow.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = MeshdArgs::parse();
    telemetry::init_logging(args.log_json);
    let dev = args.dev;
    let config = args.into_config()?;
    if dev {
        eprintln!(
            "meshd --dev: data in {}, gRPC on http://{}, HTTP on http://{}",
            config.data_dir.display(),
            config.grpc,
            config.http
        );
    }
    let metrics = telemetry::install_metrics();
    let mut node = meshwork_node::Node::start(config, metrics)
        .await
        .context("cannot start the node")?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted, stopping"),
        _ = term.recv() => tracing::info!("terminated, stopping"),
        _ = node.wait() => anyhow::bail!("a node task stopped unexpectedly"),
    }
    node.shutdown().await;
    Ok(())
}
